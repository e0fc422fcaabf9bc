"""AsyncEngine: streaming outputs to asyncio clients from the engine thread, aborts, bad input."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

import scalellm_jax
from scalellm_jax.config import EngineConfig, ModelConfig
from scalellm_jax.engine.async_engine import AsyncEngine
from scalellm_jax.engine.engine import LLMEngine
from scalellm_jax.engine.request import SamplingParams

CONFIG = ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4, num_kv_heads=2,
    head_dim=8, num_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
)


@pytest.fixture(scope="module")
def async_engine():
    model = scalellm_jax.Model.random(CONFIG, seed=np.random.randint(2**31), dtype="float32")
    engine = LLMEngine(model, EngineConfig(page_size=4, num_pages=64, max_num_seqs=4, max_num_batched_tokens=16))
    engine.warmup(progress=False)
    served = AsyncEngine(engine)
    yield served
    served.shutdown()


def test_concurrent_streams_match_the_research_api(async_engine):
    rng = np.random.default_rng()
    prompts = [rng.integers(3, 64, int(n)).tolist() for n in rng.integers(1, 20, 6)]
    params = SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True)

    async def collect(prompt):
        seen = []
        async for out in async_engine.add_request(prompt, params):
            seen.append((out, list(out.token_ids)))  # an output's lists keep growing: keep a snapshot
        return seen

    async def deltas(prompt):
        return [delta async for delta in async_engine.add_request(prompt, params, deltas=True)]

    async def main():
        return await asyncio.gather(*(collect(p) for p in prompts), *(deltas(p) for p in prompts))

    results = asyncio.run(main())
    streams, delta_streams = results[:len(prompts)], results[len(prompts):]
    expected = scalellm_jax.generate(async_engine.engine.model, prompts, 7)
    for prompt, seen, sent, tokens in zip(prompts, streams, delta_streams, expected, strict=True):
        assert seen[-1][0].finished and seen[-1][0].token_ids == tokens
        # streamed one token at a time, each output extending the previous one
        assert [snapshot for _, snapshot in seen] == [tokens[:n] for n in range(1, 8)]
        assert seen[0][0].queue_time is not None and seen[0][0].queue_time >= 0  # the first output only
        assert all(out.queue_time is None for out, _ in seen[1:])
        # the same request as deltas: one new token each, the prompt in the first only
        assert [d.new_token_ids for d in sent] == [(t,) for t in tokens]
        assert sent[0].prompt_token_ids == tuple(prompt) and all(d.prompt_token_ids is None for d in sent[1:])
        assert [d.finished for d in sent] == [False] * 6 + [True] and sent[-1].finish_reason == "length"


def test_leaving_the_stream_aborts_the_request(async_engine):
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)

    async def main():
        stream = async_engine.add_request([3, 4, 5], params, request_id="leaver")
        async for out in stream:
            assert not out.finished
            break
        await stream.aclose()
        # the engine thread processes the abort; a fresh request still completes
        return [o async for o in async_engine.add_request([6, 7], SamplingParams(max_tokens=2, ignore_eos=True))]

    outs = asyncio.run(main())
    assert outs[-1].finished
    assert async_engine.engine.scheduler.get("leaver") is None


def test_bad_input_raises_before_queueing(async_engine):
    async def main():
        with pytest.raises(ValueError, match="prompt_token_ids"):
            async_engine.add_request([], SamplingParams())
        with pytest.raises(ValueError, match="prompt_token_ids"):
            async_engine.add_request([1, 99], SamplingParams())

    asyncio.run(main())


def test_a_callable_prompt_is_tokenized_on_the_engine_thread(async_engine):
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    calls = []

    def tokenize():
        calls.append(threading.current_thread().name)
        return [3, 9, 27, 14]

    def too_long():
        return [5] * 70  # the model's context is 64

    def rejected():
        raise ValueError("messages: the template rejects this conversation")

    async def outputs(prompt):
        return [o async for o in async_engine.add_request(prompt, params)]

    async def failure(prompt):
        with pytest.raises(ValueError) as info:
            await outputs(prompt)
        return str(info.value)

    async def main():
        return await asyncio.gather(outputs(tokenize), outputs([3, 9, 27, 14]), failure(too_long), failure(rejected))

    deferred, direct, long_error, template_error = asyncio.run(main())
    assert calls == ["scalellm-engine"]
    assert deferred[-1].finished and deferred[-1].token_ids == direct[-1].token_ids
    assert deferred[-1].prompt_token_ids == [3, 9, 27, 14]
    assert "prompt" in long_error and "64" in long_error
    assert template_error.startswith("messages")
    assert asyncio.run(outputs([4, 4]))[-1].finished  # the failures left the engine serving


def test_abort_all_ends_every_stream_with_the_error_and_frees_their_pages(async_engine):
    from scalellm_jax.engine.async_engine import ShuttingDownError

    params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    kv = async_engine.engine.kv

    async def consume(stream):
        seen = 0
        try:
            async for _ in stream:
                seen += 1
        except ShuttingDownError as exc:
            return seen, str(exc)
        return seen, None

    async def main():
        streams = [async_engine.add_request([3, 4, 5 + i], params) for i in range(6)]  # 4 run, 2 wait
        first = await anext(streams[0])  # running: the engine has taken them in
        assert not first.finished
        async_engine.abort_all(ShuttingDownError("closing"))
        results = await asyncio.gather(*(consume(s) for s in streams))
        after = [o async for o in async_engine.add_request([6, 7], SamplingParams(max_tokens=2, ignore_eos=True))]
        return results, after

    results, after = asyncio.run(main())
    assert all(error == "closing" for _, error in results)  # running and waiting alike
    assert after[-1].finished  # the engine goes on serving new requests
    assert kv.num_free_pages == kv.num_usable_pages
    assert not async_engine.engine.has_unfinished()
