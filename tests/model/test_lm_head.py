"""The LM head: one bfloat16 row (a one-sequence decode step) is projected as two rows, for speed on
XLA:CPU; what comes back must be that row's logits, the same as in a batch."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import scalellm_jax
from scalellm_jax.config import ModelConfig

CONFIG = ModelConfig(
    vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=8, num_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_one_row_gets_the_logits_it_gets_in_a_batch(tied, dtype):
    config = dataclasses.replace(CONFIG, tie_word_embeddings=tied)
    model = scalellm_jax.Model.random(config, seed=np.random.randint(2**31), dtype=dtype)
    tokens = np.random.default_rng().choice(np.arange(3, config.vocab_size), size=(3, 1), replace=False)
    batch = np.asarray(model.logits(tokens), np.float32)
    for i in range(len(tokens)):
        alone = np.asarray(model.logits(tokens[i:i + 1]), np.float32)
        assert alone.shape == (1, 1, config.vocab_size)
        scale = np.abs(batch[i]).max()
        assert np.abs(alone[0] - batch[i]).max() <= 1e-2 * scale
