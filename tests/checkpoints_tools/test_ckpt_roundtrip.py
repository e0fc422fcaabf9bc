"""HF -> ours (convert CLI) -> HF (export CLI): bit-exact, loadable by transformers, same logits."""

from __future__ import annotations

import json

import jax
import ml_dtypes
import numpy as np
import pytest
from ckpt_helpers import bits_equal, expected_params, raw_tensors

from checkpoints_tools import convert as convert_cli
from checkpoints_tools import export as export_cli
from scalellm_jax.checkpoints.hf_layout import FUSED, LEGACY, param_shapes
from scalellm_jax.checkpoints.orbax_io import ParamReader, is_converted, read_converted, write_converted
from scalellm_jax.checkpoints.safetensors_io import HFCheckpoint
from tests.torch_reference import require_torch


def legacy_names_of(folder) -> dict[str, np.ndarray]:
    """Tensors of any HF folder in the legacy layout (fused ones are split the documented way)."""
    tensors = raw_tensors(folder)
    out = {}
    for name, arr in tensors.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix, inter = name.replace("mlp.experts.gate_up_proj", "block_sparse_moe.experts."), arr.shape[1] // 2
            for e in range(arr.shape[0]):
                out[f"{prefix}{e}.w1.weight"] = np.ascontiguousarray(arr[e, :inter])
                out[f"{prefix}{e}.w3.weight"] = np.ascontiguousarray(arr[e, inter:])
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name.replace("mlp.experts.down_proj", "block_sparse_moe.experts.")
            for e in range(arr.shape[0]):
                out[f"{prefix}{e}.w2.weight"] = np.ascontiguousarray(arr[e])
        else:
            out[name.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = arr
    return out


@pytest.mark.parametrize(
    "layout, dtype, extra",
    [
        (LEGACY, "float32", {}),
        (LEGACY, "bfloat16", {"max_shard_size": "20KB"}),
        (FUSED, "float32", {}),
        (FUSED, "bfloat16", {}),
        (LEGACY, "float32", {"tie_word_embeddings": True}),
    ],
)
def test_round_trip_is_bit_exact(hf_checkpoint, tmp_path, layout, dtype, extra):
    folder, model = hf_checkpoint(layout=layout, dtype=dtype, **extra)
    ours, back = tmp_path / "ours", tmp_path / "back"
    assert convert_cli.main(["--hf", str(folder), "--out", str(ours)]) == 0
    assert is_converted(ours) and not is_converted(folder)
    stored = json.loads((ours / "config.json").read_text())
    assert stored["scalellm_jax"] == {"format_version": 1, "dtype": dtype}

    cfg, params = read_converted(ours)
    assert cfg == HFCheckpoint(folder).config
    expected = expected_params(model)
    flat = {p: params[p[0]][p[1]] if len(p) == 2 else params[p[0]][p[1]][p[2]] for p in param_shapes(cfg)}
    assert set(jax.tree_util.tree_leaves(jax.tree.map(lambda x: x.dtype.name, params))) == {dtype}
    for path, arr in flat.items():
        assert isinstance(arr, jax.Array)
        assert bits_equal(np.asarray(arr), expected[path]), path

    assert export_cli.main(["--ckpt", str(ours), "--hf", str(back)]) == 0
    exported, original = raw_tensors(back), legacy_names_of(folder)
    if extra.get("tie_word_embeddings"):
        original.pop("lm_head.weight", None)
    assert sorted(exported) == sorted(original)
    for name in original:
        assert bits_equal(exported[name], original[name]), name
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(original)
    assert len(set(index["weight_map"].values())) == cfg.num_layers + 2
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in original.values())
    assert not list(tmp_path.glob("*.tmp-*"))


def test_export_loads_in_transformers_with_same_logits(hf_checkpoint, tmp_path):
    torch = require_torch()
    from transformers import MixtralForCausalLM

    folder, model = hf_checkpoint()
    ours, back = tmp_path / "ours", tmp_path / "back"
    assert convert_cli.main(["--hf", str(folder), "--out", str(ours)]) == 0
    assert export_cli.main(["--ckpt", str(ours), "--hf", str(back)]) == 0
    reloaded = MixtralForCausalLM.from_pretrained(back).eval()
    assert reloaded.dtype == torch.float32
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    with torch.no_grad():
        want, got = model(ids).logits, reloaded(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_convert_with_dtype_and_read_with_cast_and_sharding(hf_checkpoint, tmp_path):
    folder, model = hf_checkpoint()
    ours = tmp_path / "ours"
    assert convert_cli.main(["--hf", str(folder), "--out", str(ours), "--dtype", "bfloat16"]) == 0
    expected = expected_params(model)
    reader = ParamReader(ours)
    assert reader.dtype_name == "bfloat16"
    w = reader(("layers_1", "moe", "w_down"))
    assert isinstance(w, np.ndarray)
    assert bits_equal(w, expected[("layers_1", "moe", "w_down")].astype(ml_dtypes.bfloat16))

    # orbax casts on load; shardings may be one Sharding or a matching pytree
    device = jax.devices()[0]
    one = jax.sharding.SingleDeviceSharding(device)
    cfg, params = read_converted(ours, dtype="float32", shardings=one)
    got = np.asarray(params["layers_0"]["attn"]["wq"])
    assert got.dtype == np.float32
    want = expected[("layers_0", "attn", "wq")].astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(got, want)
    tree = jax.tree.map(lambda _: one, params)
    _, params2 = read_converted(ours, shardings=tree)
    leaf = params2["layers_1"]["moe"]["w_up"]
    assert leaf.dtype == np.dtype(ml_dtypes.bfloat16) and leaf.sharding == one


def test_interrupted_write_leaves_nothing(hf_checkpoint, tmp_path):
    from scalellm_jax.checkpoints.hf_layout import iter_params_from_hf

    folder, _ = hf_checkpoint()
    ckpt = HFCheckpoint(folder)

    def interrupted():
        for k, item in enumerate(iter_params_from_hf(ckpt, ckpt.config)):
            if k == 5:
                raise KeyboardInterrupt
            yield item

    out = tmp_path / "ours"
    with pytest.raises(KeyboardInterrupt):
        write_converted(out, ckpt.config, interrupted(), "float32", progress=False)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
