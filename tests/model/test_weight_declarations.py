"""A weight is declared once (scalellm_jax.weights): init, sharding, HF import/export and the converted format all
follow from that one entry. The test adds an optional bias the way a new model variant would, by one declaration,
and checks every consumer picks it up."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

from checkpoints_tools.convert import convert_checkpoint
from checkpoints_tools.export import export_checkpoint
from scalellm_jax import weights
from scalellm_jax.checkpoints.hf_layout import FUSED, LEGACY, expected_hf_shapes, iter_hf_tensors, iter_params_from_hf
from scalellm_jax.checkpoints.orbax_io import read_converted
from scalellm_jax.checkpoints.safetensors_io import CheckpointError, HFCheckpoint
from scalellm_jax.config import ModelConfig
from scalellm_jax.engine.memory import weights_bytes_per_device
from scalellm_jax.loader import load
from scalellm_jax.model import CausalAttention, Mixtral
from scalellm_jax.parallel import EXPERT, TENSOR, param_specs

CONFIG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2)
Q_BIAS = weights.Weight(
    "attn", "bq", ("heads", "head_dim"),
    weights.HFTensor("model.layers.{layer}.self_attn.q_proj.bias", (("heads", "head_dim"),)),
    sharded=("heads",), init="zeros",
)


@pytest.fixture
def with_q_bias(monkeypatch):
    monkeypatch.setattr(weights, "WEIGHTS", weights.WEIGHTS + (Q_BIAS,))


def init_params(config: ModelConfig) -> dict:
    model = Mixtral(config, CausalAttention(None, config.head_dim**-0.5))
    tokens = jnp.zeros((1, 4), jnp.int32)
    return model.init(jax.random.key(0), tokens, tokens)["params"]


def flat(tree: dict, prefix=()) -> dict:
    out = {}
    for key, value in tree.items():
        out.update(flat(value, prefix + (key,)) if isinstance(value, dict) else {prefix + (key,): value})
    return out


def test_the_table_is_the_model_s_parameter_tree():
    params = flat(init_params(CONFIG))
    assert {p: v.shape for p, v in params.items()} == weights.param_shapes(CONFIG)
    tied = CONFIG.replace(tie_word_embeddings=True)
    assert set(flat(init_params(tied))) == set(weights.param_shapes(tied))
    assert ("lm_head", "kernel") not in weights.param_shapes(tied)


def test_a_new_weight_reaches_init_sharding_and_the_memory_plan(monkeypatch):
    without = weights_bytes_per_device(CONFIG, 4, tp=2, ep=1)
    monkeypatch.setattr(weights, "WEIGHTS", weights.WEIGHTS + (Q_BIAS,))
    # float32, split over the heads on tensor=2: half of each layer's [heads, head_dim] bias per device
    assert weights_bytes_per_device(CONFIG, 4, tp=2, ep=1) - without == CONFIG.num_layers * 4 * 8 * 4 // 2
    params = flat(init_params(CONFIG))
    for layer in range(CONFIG.num_layers):
        bias = params[(f"layers_{layer}", "attn", "bq")]
        assert bias.shape == (4, 8) and not np.any(np.asarray(bias))  # declared init: zeros
    assert weights.param_shapes(CONFIG)[("layers_1", "attn", "bq")] == (4, 8)
    specs = param_specs(CONFIG, AbstractMesh((1, 2), (EXPERT, TENSOR)))
    assert specs["layers_0"]["attn"]["bq"] == P(TENSOR, None)
    assert specs["layers_0"]["attn"]["wq"] == P(None, TENSOR, None)


def write_hf_folder(folder, config: ModelConfig, tensors: dict[str, np.ndarray]) -> None:
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config.to_hf_dict()))


def random_params(config: ModelConfig) -> dict:
    rng = np.random.default_rng(1)
    return {path: rng.standard_normal(shape).astype(np.float32) for path, shape in weights.param_shapes(config).items()}


def test_a_new_weight_reaches_import_conversion_and_export(with_q_bias, tmp_path):
    ours = random_params(CONFIG)
    hf = dict(iter_hf_tensors(ours.__getitem__, CONFIG))
    assert hf["model.layers.1.self_attn.q_proj.bias"].shape == (32,)  # HF's flat [heads * head_dim]
    np.testing.assert_array_equal(hf["model.layers.1.self_attn.q_proj.bias"], ours[("layers_1", "attn", "bq")].ravel())
    write_hf_folder(tmp_path / "hf", CONFIG, hf)

    imported = dict(iter_params_from_hf(HFCheckpoint(tmp_path / "hf"), CONFIG))
    assert imported.keys() == ours.keys()
    for path, value in ours.items():
        np.testing.assert_array_equal(imported[path], value, err_msg=str(path))

    convert_checkpoint(tmp_path / "hf", tmp_path / "converted", progress=False)
    _, converted = read_converted(tmp_path / "converted")
    np.testing.assert_array_equal(converted["layers_0"]["attn"]["bq"], ours[("layers_0", "attn", "bq")])
    export_checkpoint(tmp_path / "converted", tmp_path / "exported", progress=False)
    exported = {}
    for file in (tmp_path / "exported").glob("*.safetensors"):
        exported.update(load_file(str(file)))
    assert exported.keys() == hf.keys()
    for name, value in hf.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)

    loaded = load(tmp_path / "hf", dtype="float32")
    np.testing.assert_array_equal(loaded.params["layers_1"]["attn"]["bq"], ours[("layers_1", "attn", "bq")])


def test_a_checkpoint_without_the_new_weight_is_refused_by_name(with_q_bias, tmp_path):
    hf = dict(iter_hf_tensors(random_params(CONFIG).__getitem__, CONFIG))
    del hf["model.layers.0.self_attn.q_proj.bias"]
    write_hf_folder(tmp_path / "hf", CONFIG, hf)
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.0\.self_attn\.q_proj\.bias is missing"):
        iter_params_from_hf(HFCheckpoint(tmp_path / "hf"), CONFIG)


@pytest.mark.parametrize("layout", [LEGACY, FUSED])
def test_hf_shapes_follow_the_declared_axes(layout):
    shapes = expected_hf_shapes(CONFIG, layout)
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (32, 32)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (16, 32)
    assert shapes["model.layers.0.self_attn.o_proj.weight"] == (32, 32)
    assert shapes["lm_head.weight"] == (64, 32)
    if layout == LEGACY:
        assert shapes["model.layers.1.block_sparse_moe.experts.3.w2.weight"] == (32, 48)
        assert shapes["model.layers.1.block_sparse_moe.gate.weight"] == (4, 32)
    else:
        assert shapes["model.layers.1.mlp.experts.gate_up_proj"] == (4, 96, 32)
        assert shapes["model.layers.1.mlp.experts.down_proj"] == (4, 32, 48)
        assert shapes["model.layers.1.mlp.gate.weight"] == (4, 32)


def test_declarations_are_checked():
    with pytest.raises(ValueError, match="unknown axis 'heds'"):
        weights.Weight("attn", "bq", ("heds",), weights.HFTensor("x", (("heds",),)))
    with pytest.raises(ValueError, match="do not cover"):
        weights.Weight("attn", "bq", ("heads", "head_dim"), weights.HFTensor("x", (("heads",),)))
    with pytest.raises(ValueError, match="padded axes .* must be sharded axes"):
        weights.Weight("attn", "bq", ("heads",), weights.HFTensor("x", (("heads",),)), padded=("heads",))
    with pytest.raises(ValueError, match="declared twice"):
        weights.check_table(weights.WEIGHTS + (weights.find("attn", "wq"),))
    with pytest.raises(ValueError, match="both per layer and per model"):
        weights.check_table((Q_BIAS, weights.Weight("attn", "b2", ("hidden",), weights.HFTensor("y", (("hidden",),)),
                                                    per_layer=False)))
