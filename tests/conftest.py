"""Shared fixtures: random-weight Hugging Face Mixtral checkpoints written with ``save_pretrained``."""

from __future__ import annotations

import random

import pytest

from tests.torch_reference import require_torch


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


@pytest.fixture
def make_hf_mixtral(tmp_path):
    """``make_hf_mixtral(**config_overrides) -> (folder, torch model)`` with fresh random weights."""
    torch = require_torch()
    from transformers import MixtralConfig, MixtralForCausalLM

    counter = iter(range(1000))

    def make(dtype: str = "float32", **overrides):
        fields = dict(
            vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
            num_experts_per_tok=2, max_position_embeddings=256, initializer_range=0.1,
            bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )
        fields.update(overrides)
        config = MixtralConfig(**fields)
        seed = random.randrange(2**31)
        torch.manual_seed(seed)
        model = MixtralForCausalLM(config).eval().to(getattr(torch, dtype))
        folder = tmp_path / f"hf{next(counter)}"
        model.save_pretrained(folder, safe_serialization=True)
        model = MixtralForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=getattr(torch, dtype))
        return folder, model.eval()

    return make
