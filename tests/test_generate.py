import numpy as np
import pytest

import scalellm_jax
from scalellm_jax.config import ModelConfig

CONFIG = ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=8, num_experts=4, num_experts_per_tok=2, max_position_embeddings=128, sliding_window=6,
)


@pytest.fixture(scope="module")
def model():
    return scalellm_jax.Model.random(CONFIG, seed=np.random.randint(2**31), dtype="float32")


def random_prompts(lengths):
    rng = np.random.default_rng()
    return [rng.integers(3, CONFIG.vocab_size, size=n).tolist() for n in lengths]


def test_batch_of_mixed_lengths_equals_each_prompt_alone(model):
    prompts = random_prompts([1, 7, 16, 17])
    batch = scalellm_jax.generate(model, prompts, 10)
    assert batch == [scalellm_jax.generate(model, [p], 10)[0] for p in prompts]
    assert all(len(out) == 10 for out in batch)


def test_greedy_continuation_is_consistent_with_full_forward(model):
    prompt = random_prompts([5])[0]
    out = scalellm_jax.generate(model, [prompt], 6)[0]
    logits = np.asarray(model.logits([prompt + out]))
    np.testing.assert_array_equal(logits[0, len(prompt) - 1 : -1].argmax(-1), out)


def test_same_seed_same_tokens_different_seed_different_tokens(model):
    prompts = random_prompts([3, 8])
    kwargs = dict(temperature=1.0, top_p=0.95, top_k=40)
    a = scalellm_jax.generate(model, prompts, 12, seed=7, **kwargs)
    assert a == scalellm_jax.generate(model, prompts, 12, seed=7, **kwargs)
    assert a != scalellm_jax.generate(model, prompts, 12, seed=8, **kwargs)


def test_eos_stops_a_row_and_is_included(model):
    prompts = random_prompts([4, 9])
    free = scalellm_jax.generate(model, prompts, 8)
    eos = free[0][2]
    stopped = scalellm_jax.generate(model, prompts, 8, eos_token_id=eos)
    assert stopped[0] == free[0][: free[0].index(eos) + 1]
    other = free[1][: free[1].index(eos) + 1] if eos in free[1] else free[1]
    assert stopped[1] == other


def test_array_input_equals_list_input(model):
    prompts = random_prompts([6, 6])
    assert scalellm_jax.generate(model, np.array(prompts), 4) == scalellm_jax.generate(model, prompts, 4)


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        (([[]], 4), {}, "prompt 0 is empty"),
        (([[1, 2]], 0), {}, "max_new_tokens"),
        (([[1, 2]], 4), {"top_p": 0.0}, "top_p"),
        (([[1, 2]], 4), {"temperature": -1.0}, "temperature"),
        (([[1, 999]], 4), {}, "token id 999 is outside the vocabulary"),
        (([[1] * 120], 20), {}, "exceed the model's context"),
    ],
)
def test_bad_input_raises_clear_errors(model, args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        scalellm_jax.generate(model, *args, **kwargs)
