"""hf_layout + safetensors_io: the name map, both HF layouts, sharding, dtype casting, slicing."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
from ckpt_helpers import bits_equal, expected_params, raw_tensors

from scalellm_jax.checkpoints.hf_layout import (
    FUSED,
    LEGACY,
    detect_layout,
    iter_hf_tensors,
    iter_params_from_hf,
    param_shapes,
)
from scalellm_jax.checkpoints.safetensors_io import CheckpointError, HFCheckpoint
from scalellm_jax.config import ModelConfig


def test_param_shapes_is_the_contract():
    c = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2)
    shapes = param_shapes(c)
    assert len(shapes) == 1 + 2 * 10 + 2
    assert shapes[("embed", "embedding")] == (96, 32)
    assert shapes[("layers_1", "attn_norm", "scale")] == (32,)
    assert shapes[("layers_1", "attn", "wq")] == (32, 4, 16)
    assert shapes[("layers_1", "attn", "wk")] == (32, 2, 16)
    assert shapes[("layers_1", "attn", "wv")] == (32, 2, 16)
    assert shapes[("layers_1", "attn", "wo")] == (4, 16, 32)
    assert shapes[("layers_0", "mlp_norm", "scale")] == (32,)
    assert shapes[("layers_0", "moe", "router")] == (32, 4)
    assert shapes[("layers_0", "moe", "w_gate")] == (4, 32, 48)
    assert shapes[("layers_0", "moe", "w_up")] == (4, 32, 48)
    assert shapes[("layers_0", "moe", "w_down")] == (4, 48, 32)
    assert shapes[("final_norm", "scale")] == (32,)
    assert shapes[("lm_head", "kernel")] == (32, 96)
    assert ("lm_head", "kernel") not in param_shapes(c.replace(tie_word_embeddings=True))


@pytest.mark.parametrize(
    "layout, dtype, shard",
    [(LEGACY, "float32", None), (LEGACY, "bfloat16", "20KB"), (FUSED, "float32", None), (FUSED, "bfloat16", None)],
)
def test_iter_params_matches_torch(hf_checkpoint, layout, dtype, shard):
    folder, model = hf_checkpoint(layout=layout, dtype=dtype, max_shard_size=shard)
    ckpt = HFCheckpoint(folder)
    if shard:
        assert ckpt.source.name == "model.safetensors.index.json"
        assert len({ckpt.file_of(n) for n in ckpt.names()}) > 2
    assert detect_layout(ckpt.names()) == layout
    expected = expected_params(model)
    got = dict(iter_params_from_hf(ckpt, ckpt.config))
    assert list(got) == list(param_shapes(ckpt.config)) == list(expected)
    for path, arr in got.items():
        assert bits_equal(arr, expected[path]), path
        assert arr.flags["C_CONTIGUOUS"]


def test_cast_on_import(hf_checkpoint):
    folder, model = hf_checkpoint(layout=FUSED)
    ckpt = HFCheckpoint(folder)
    expected = expected_params(model)
    for path, arr in iter_params_from_hf(ckpt, ckpt.config, dtype="bfloat16"):
        assert bits_equal(arr, expected[path].astype(ml_dtypes.bfloat16)), path


def test_tied_embeddings(hf_checkpoint):
    folder, model = hf_checkpoint(tie_word_embeddings=True)
    ckpt = HFCheckpoint(folder)
    got = dict(iter_params_from_hf(ckpt, ckpt.config))
    assert ("lm_head", "kernel") not in got
    assert bits_equal(got[("embed", "embedding")], expected_params(model)[("embed", "embedding")])


def test_iter_hf_tensors_inverts_import(hf_checkpoint):
    folder, _ = hf_checkpoint()
    ckpt = HFCheckpoint(folder)
    params = dict(iter_params_from_hf(ckpt, ckpt.config))
    original = raw_tensors(folder)
    tree: dict = {}
    for path, arr in params.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = arr
    for source in (tree, params.__getitem__):  # nested dict and reader callable
        exported = dict(iter_hf_tensors(source, ckpt.config))
        assert sorted(exported) == sorted(original)
        for name, arr in exported.items():
            assert bits_equal(arr, original[name]), name
            assert arr.flags["C_CONTIGUOUS"]


def test_read_slice_and_header_queries(hf_checkpoint):
    folder, model = hf_checkpoint(layout=FUSED, dtype="bfloat16")
    ckpt = HFCheckpoint(folder)
    name = "model.layers.1.mlp.experts.gate_up_proj"
    assert ckpt.shape(name) == (4, 96, 32)
    assert ckpt.dtype(name) == np.dtype(ml_dtypes.bfloat16)
    half = ckpt.read(name, (2, slice(48, 96)))
    assert half.shape == (48, 32)
    assert bits_equal(half, ckpt.read(name)[2, 48:])


def test_mixed_layouts_rejected():
    with pytest.raises(CheckpointError, match="mixes MoE layouts"):
        detect_layout(["model.layers.0.mlp.experts.down_proj", "model.layers.1.block_sparse_moe.gate.weight"])


def test_config_mismatch_is_a_shape_error(base_hf, tmp_path):
    # A config.json that disagrees with the tensors: reported per tensor, naming the file.
    from ckpt_helpers import rewrite_hf

    folder = rewrite_hf(base_hf, tmp_path / "bad", config_edit=lambda c: c.update(intermediate_size=40))
    ckpt = HFCheckpoint(folder)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor .*w1\.weight has shape \[48, 32\], "
                                              r"expected \[40, 32\]"):
        iter_params_from_hf(ckpt, ckpt.config)


def test_index_pointing_to_missing_shard(hf_checkpoint, tmp_path):
    folder, _ = hf_checkpoint(max_shard_size="20KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (folder / victim).unlink()
    with pytest.raises(CheckpointError, match=f"{victim}: shard listed in model.safetensors.index.json"):
        HFCheckpoint(folder)
