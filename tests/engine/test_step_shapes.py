"""Shape buckets: the defaults, ``EngineConfig.decode_buckets`` / ``token_buckets`` overrides (validated, the largest
always kept), and an engine that warms only those and compiles nothing while serving."""

from __future__ import annotations

import json

import numpy as np
import pytest

import scalellm_jax
from scalellm_jax.config import ConfigError, EngineConfig, ModelConfig
from scalellm_jax.engine.engine import LLMEngine
from scalellm_jax.engine.request import SamplingParams
from scalellm_jax.engine.step_program import StepShapes

CONFIG = ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=8, num_experts=4, num_experts_per_tok=2, max_position_embeddings=96,
)


def test_default_buckets_are_unchanged_and_positional_construction_works():
    shapes = StepShapes(64, 512, 8)  # as benchmarks.gpu_compile_check builds it
    assert shapes.seq_buckets == (1, 2, 4, 8, 16, 24, 32, 48, 64)
    assert shapes.token_buckets == (16, 32, 64, 128, 192, 256, 384, 512)
    assert len(shapes.warmup()) == 17


def test_overrides_keep_those_sizes_and_the_largest():
    shapes = StepShapes(64, 512, 8, decode_sizes=(16, 2), token_sizes=(100,))
    assert shapes.seq_buckets == (2, 16, 64) and shapes.token_buckets == (100, 512)
    assert shapes.warmup() == [(True, 2, 2), (True, 16, 16), (True, 64, 64), (False, 100, 64), (False, 512, 64)]
    assert StepShapes(64, 512, 8, decode_sizes=(64,)).seq_buckets == (64,)
    with pytest.raises(ValueError, match="decode_sizes"):
        StepShapes(64, 512, 8, decode_sizes=(65,)).seq_buckets  # noqa: B018


def test_engine_config_stores_a_sorted_tuple_of_unique_sizes_and_round_trips_through_json():
    config = EngineConfig(max_num_seqs=64, max_num_batched_tokens=2048, decode_buckets=[64, 16, 16, 1],
                          token_buckets=(2048, 256))
    assert config.decode_buckets == (1, 16, 64) and config.token_buckets == (256, 2048)
    assert EngineConfig().decode_buckets is None and EngineConfig().token_buckets is None
    fields = {"max_num_seqs": 64, "max_num_batched_tokens": 2048, "decode_buckets": config.decode_buckets,
              "token_buckets": config.token_buckets}
    assert EngineConfig(**json.loads(json.dumps(fields))) == config


@pytest.mark.parametrize("field, value", [
    ("decode_buckets", [0]),
    ("decode_buckets", [-4, 8]),
    ("decode_buckets", [9]),  # above max_num_seqs
    ("decode_buckets", [2.0]),
    ("decode_buckets", [True]),
    ("decode_buckets", []),
    ("decode_buckets", "2,4"),
    ("decode_buckets", 4),
    ("token_buckets", [33]),  # above max_num_batched_tokens
    ("token_buckets", [0, 16]),
    ("token_buckets", ["16"]),
])
def test_bad_buckets_raise_config_error_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=f"EngineConfig.{field}"):
        EngineConfig(max_num_seqs=8, max_num_batched_tokens=32, **{field: value})


@pytest.fixture(scope="module")
def model():
    return scalellm_jax.Model.random(CONFIG, seed=np.random.randint(2**31), dtype="float32")


def test_an_engine_warms_only_the_chosen_buckets_and_serves_every_batch_size_without_compiling(model):
    engine = LLMEngine(model, EngineConfig(page_size=4, num_pages=256, max_num_seqs=8, max_num_batched_tokens=32,
                                           decode_buckets=[2], token_buckets=[16], swap_space_gb=0))
    runner = engine.runner
    assert (runner.seq_buckets, runner.token_buckets) == ((2, 8), (16, 32))
    engine.warmup(progress=False)
    compiled = runner.num_compilations()
    assert compiled == 4 + 4  # decode 2 and 8, mixed 16 and 32; history writes of 1, 2, 4 and 8 rows

    steps, execute = [], runner.execute

    def spy(batch):  # (decode step?, padded size, real rows)
        steps.append((batch.decode_only, len(batch.tokens), int((batch.kv_lengths > 0).sum())))
        return execute(batch)

    runner.execute = spy
    rng = np.random.default_rng()
    prompts = [rng.integers(3, CONFIG.vocab_size, int(n)).tolist() for n in rng.integers(1, 40, 12)]
    lengths = [1 + 2 * i for i in range(12)]  # requests finish one by one: the running batch shrinks 8 → 1
    ids = [engine.add_request(p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
           for p, n in zip(prompts, lengths, strict=True)]
    finished = {}
    while engine.has_unfinished():
        finished.update((out.request_id, out) for out in engine.step() if out.finished)
    assert runner.num_compilations() == compiled

    expected = scalellm_jax.generate(model, prompts, max(lengths))  # greedy: a shorter run is a prefix
    assert [finished[i].token_ids for i in ids] == [e[:n] for e, n in zip(expected, lengths, strict=True)]
    assert {(d, size) for d, size, _ in steps} <= {(True, 2), (True, 8), (False, 16), (False, 32)}
    decode_rows = {rows for d, _, rows in steps if d}
    assert 1 in decode_rows and decode_rows & {3, 4, 5, 6, 7}, decode_rows  # padded up to 2 and to 8
