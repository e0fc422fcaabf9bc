import jax
import numpy as np
import pytest

import scalellm_jax
from checkpoints_tools.convert import main as convert_main


def test_converted_folder_loads_the_same_weights_as_the_hf_folder(make_hf_mixtral, tmp_path):
    folder, _ = make_hf_mixtral(sliding_window=4)
    out = tmp_path / "converted"
    assert convert_main(["--hf", str(folder), "--out", str(out), "--no-progress"]) == 0
    direct = scalellm_jax.load(folder, dtype="float32")
    converted = scalellm_jax.load(out, dtype="float32")
    assert converted.config == direct.config
    same = jax.tree.map(lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()), direct.params, converted.params)
    assert all(jax.tree.leaves(same))
    tokens = np.random.default_rng().integers(0, direct.config.vocab_size, (2, 7))
    np.testing.assert_array_equal(np.asarray(direct.logits(tokens)), np.asarray(converted.logits(tokens)))


def test_bfloat16_load_casts_every_param(make_hf_mixtral):
    folder, _ = make_hf_mixtral()
    model = scalellm_jax.load(folder)
    assert {leaf.dtype for leaf in jax.tree.leaves(model.params)} == {np.dtype("bfloat16")}


def test_load_errors_are_clear(tmp_path, make_hf_mixtral):
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        scalellm_jax.load(tmp_path / "missing")
    folder, _ = make_hf_mixtral()
    with pytest.raises(ValueError, match="dtype must be one of"):
        scalellm_jax.load(folder, dtype="int8")


def test_logits_rejects_bad_token_ids():
    model = scalellm_jax.Model.random(scalellm_jax.preset("tiny"), dtype="float32")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.logits([[1, 32000]])
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        model.logits([1, 2, 3])
