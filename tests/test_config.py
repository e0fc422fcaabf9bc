import json

import pytest
from transformers import MixtralConfig

from scalellm_jax.config import PRESETS, ConfigError, EngineConfig, ModelConfig, preset


def test_reads_transformers_config_including_rope_parameters():
    hf = MixtralConfig(
        vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=8,
        num_key_value_heads=1, num_local_experts=6, num_experts_per_tok=1, rope_theta=12345.0,
        sliding_window=7, tie_word_embeddings=True, head_dim=16,
    ).to_dict()
    c = ModelConfig.from_hf_dict(hf)
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers) == (100, 64, 96, 3)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.q_per_kv) == (8, 1, 16, 8)
    assert (c.num_experts, c.num_experts_per_tok) == (6, 1)
    assert c.rope_theta == 12345.0 and c.sliding_window == 7 and c.tie_word_embeddings


def test_legacy_top_level_rope_theta_and_default_head_dim():
    c = ModelConfig.from_hf_dict({
        "model_type": "mixtral", "vocab_size": 10, "hidden_size": 32, "intermediate_size": 8,
        "num_hidden_layers": 1, "num_attention_heads": 4, "rope_theta": 500.0,
    })
    assert c.head_dim == 8 and c.rope_theta == 500.0 and c.num_kv_heads == 4


def test_round_trip_through_hf_dict():
    for config in PRESETS.values():
        assert ModelConfig.from_hf_dict(config.to_hf_dict()) == config


def test_mixtral_8x7b_preset_matches_published_shapes():
    c = preset("mixtral-8x7b")
    assert (c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads) == (4096, 14336, 32, 32, 8)
    with pytest.raises(ConfigError, match="unknown model preset 'nope'"):
        preset("nope")


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(num_heads=6, num_kv_heads=4), "num_heads"),
        (dict(num_experts_per_tok=5), "num_experts_per_tok"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(head_dim=15), "head_dim"),
        (dict(sliding_window=0), "sliding_window"),
        (dict(rope_theta=-1.0), "rope_theta"),
    ],
)
def test_invalid_configs_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        preset("tiny").replace(**changes)


def test_bad_json_files(tmp_path):
    with pytest.raises(ConfigError, match="config.json not found"):
        ModelConfig.from_json_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="invalid JSON"):
        ModelConfig.from_json_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral", "vocab_size": 3}))
    with pytest.raises(ConfigError, match="missing required field"):
        ModelConfig.from_json_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type must be 'mixtral'"):
        ModelConfig.from_json_file(tmp_path / "config.json")


def test_engine_options_the_model_cannot_take_fail_before_loading(monkeypatch):
    from scalellm_jax import LLM
    from scalellm_jax.engine import llm

    monkeypatch.setattr(llm.Model, "random", lambda *a, **k: pytest.fail("checked after loading"))
    with pytest.raises(ConfigError, match="max_model_len 100000 is over the model's context of 4096"):
        LLM("tiny", max_model_len=100000, warmup=False)
    with pytest.raises(ConfigError, match="tensor_parallel_size 8"):
        LLM("tiny", tensor_parallel_size=8, warmup=False)
    with pytest.raises(ConfigError, match="max_num_batched_tokens must be >= max_num_seqs"):
        EngineConfig(max_num_seqs=64, max_num_batched_tokens=32)


def test_a_model_that_does_not_fit_the_device_fails_before_loading(monkeypatch):
    from scalellm_jax import LLM
    from scalellm_jax.engine import llm, resolved

    monkeypatch.setattr(llm.Model, "random", lambda *a, **k: pytest.fail("planned after loading"))
    monkeypatch.setattr(resolved, "device_budget_bytes", lambda device, utilization: 2**20)  # a 1 MiB device
    with pytest.raises(ConfigError, match="the model does not fit"):
        LLM("tiny", warmup=False)


def test_the_engine_is_built_from_the_resolved_options():
    from scalellm_jax.engine.engine import LLMEngine
    from scalellm_jax.engine.resolved import resolve
    from scalellm_jax.loader import Model

    model = Model.random(preset("tiny"), seed=0, dtype="float32")
    options = EngineConfig(page_size=8, num_pages=40, max_model_len=256, max_num_seqs=4, max_num_batched_tokens=32,
                           swap_space_gb=0.001)
    plan = resolve(options, model.config, dtype=model.dtype)
    assert (plan.max_pages_per_seq, plan.num_pages, plan.swap_compression) == (32, 40, "none")
    assert plan.num_host_pages == int(0.001 * 2**30) // plan.swap_page_bytes > 0
    engine = LLMEngine(model, plan)
    assert engine.resolved is plan and engine.runner.num_pages == engine.kv.num_pages == 40
    assert engine.kv.num_host_pages == plan.num_host_pages
    assert engine.scheduler.config.max_model_len == 256 and engine.runner.max_pages_per_seq == 32
    assert plan.swap_page_bytes == engine.runner.swap_page_bytes("none")
    with pytest.raises(ValueError, match="resolved for another model, dtype or mesh"):
        LLMEngine(Model.random(preset("tiny"), seed=0, dtype="bfloat16"), plan)
