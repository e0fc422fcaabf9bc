"""Our Flax Mixtral, loaded by our own loader, against ``transformers.MixtralForCausalLM``."""

from __future__ import annotations

import numpy as np
import pytest

import scalellm_jax
from tests.torch_reference import require_torch

torch = require_torch()

PARITY_CONFIGS = {
    "gqa2-top2": dict(),
    "one-kv-head-top1-rope1e4": dict(
        num_key_value_heads=1, num_experts_per_tok=1, rope_theta=1e4, hidden_size=48, head_dim=16,
    ),
    "sliding-window-tied-8heads-top3": dict(
        num_attention_heads=8, num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=3,
        sliding_window=5, tie_word_embeddings=True, rope_theta=5e5,
    ),
}


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_float32_logits_match_transformers(make_hf_mixtral, name):
    folder, hf = make_hf_mixtral(**PARITY_CONFIGS[name])
    ours = scalellm_jax.load(folder, dtype="float32")
    tokens = np.random.default_rng().integers(0, hf.config.vocab_size, size=(3, 13))
    expected = hf_logits(hf, tokens)
    got = np.asarray(ours.logits(tokens))
    assert got.shape == expected.shape
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() / scale < 1e-4


def router_margin(hf, tokens: np.ndarray) -> float:
    """Smallest gap, over tokens and layers, between the last chosen and the first unchosen router logit."""
    with torch.no_grad():
        router_logits = hf(torch.tensor(tokens), output_router_logits=True).router_logits
    k = hf.config.num_experts_per_tok
    return min(
        float((ranked[:, k - 1] - ranked[:, k]).min())
        for ranked in (torch.sort(r.float(), dim=-1, descending=True).values for r in router_logits)
    )


def test_bfloat16_logits_close_to_transformers(make_hf_mixtral):
    """bfloat16 weights: our bfloat16 forward against transformers' float32 forward of the same weights.

    bfloat16 rounding can flip a router choice whose top-k logits are nearly tied (then that token's
    logits legitimately differ, and so do later tokens that attend to it). The draw of weights and
    tokens is therefore redrawn until the float32 reference has no near tie, a property of the
    reference alone; then every token must be close.
    """
    from transformers import MixtralForCausalLM

    rng = np.random.default_rng()
    for _ in range(20):
        folder, _ = make_hf_mixtral(dtype="bfloat16")
        reference = MixtralForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32)
        tokens = rng.integers(0, reference.config.vocab_size, size=(2, 11))
        if router_margin(reference.eval(), tokens) > 1e-2:
            break
    else:
        pytest.fail("no draw without a near-tied router choice in 20 tries")
    expected = hf_logits(reference, tokens)
    got = np.asarray(scalellm_jax.load(folder, dtype="bfloat16").logits(tokens)).astype(np.float32)
    assert np.isfinite(got).all()
    per_token = np.linalg.norm(got - expected, axis=-1) / np.linalg.norm(expected, axis=-1)
    assert per_token.max() < 3e-2


@pytest.mark.parametrize("name", ["gqa2-top2", "sliding-window-tied-8heads-top3"])
def test_greedy_generate_matches_transformers(make_hf_mixtral, name):
    folder, hf = make_hf_mixtral(**PARITY_CONFIGS[name])
    ours = scalellm_jax.load(folder, dtype="float32")
    rng = np.random.default_rng()
    prompts = [list(rng.integers(3, hf.config.vocab_size, size=n)) for n in (3, 9, 6, 1)]
    got = scalellm_jax.generate(ours, prompts, 32)

    # Hugging Face pads on the left and takes positions from the attention mask.
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt):] = torch.tensor(prompt)
        mask[i, width - len(prompt):] = 1
    with torch.no_grad():
        out = hf.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=32, do_sample=False,
            eos_token_id=None, pad_token_id=0,
        )
    expected = out[:, width:].tolist()
    assert got == expected
