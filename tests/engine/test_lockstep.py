"""``lockstep``: what a multi-process leader sends is all a follower needs to repeat its device work.

In one process: a leader engine's runner records its operations into a queue, a second engine's runner
replays them as a follower would, and both end with the same KV pools, token history and swap counts.
The real two-process runs (gloo, HTTP) are in ``tests/server/test_multihost_serving.py``.
"""

from __future__ import annotations

import collections

import jax
import numpy as np
import pytest

import scalellm_jax
from scalellm_jax.config import ConfigError, EngineConfig, ModelConfig
from scalellm_jax.engine import lockstep
from scalellm_jax.engine.engine import LLMEngine
from scalellm_jax.engine.request import SamplingParams

CONFIG = ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=8, num_experts=4, num_experts_per_tok=2, max_position_embeddings=96,
)
# few pages and swap space: the requests below preempt each other and swap
CROWDED = EngineConfig(page_size=4, num_pages=24, max_num_seqs=4, max_num_batched_tokens=16, swap_space_gb=1.0,
                       decode_buckets=(4,), token_buckets=(16,))  # few programs: both engines compile them


class QueueChannel:
    """Both ends of a channel in one process; messages pickled as ``StepChannel`` does."""

    def __init__(self):
        self.sent: collections.deque = collections.deque()

    def send(self, operation: lockstep.Operation) -> None:
        self.sent.append(lockstep.pickle.dumps(operation))

    def receive(self) -> lockstep.Operation:
        return lockstep.pickle.loads(self.sent.popleft())


def leaves(runner) -> list[np.ndarray]:
    return [np.asarray(a) for a in jax.tree.leaves((runner.pools, runner.history))]


def test_a_follower_replaying_the_leaders_operations_ends_in_the_same_device_state():
    model = scalellm_jax.Model.random(CONFIG, seed=np.random.randint(2**31), dtype="float32")
    leader, follower = LLMEngine(model, CROWDED), LLMEngine(model, CROWDED)
    channel = QueueChannel()
    leader.runner = lockstep.LeaderRunner(leader.runner, channel)
    follower.runner = lockstep.FollowerRunner(follower.runner, channel)
    leader.warmup(progress=False)
    rng = np.random.default_rng()
    penalized = SamplingParams(max_tokens=30, temperature=0.8, presence_penalty=0.5, logprobs=True)  # token history
    for i in range(6):
        prompt = rng.integers(3, CONFIG.vocab_size, int(rng.integers(5, 30))).tolist()
        leader.add_request(prompt, penalized if i % 2 else SamplingParams(max_tokens=30, temperature=0),
                           priority=i % 3)
    while leader.has_unfinished():
        leader.step()
    leader.keepalive()
    leader.close()
    leader.close()  # idempotent: one stop

    assert leader.runner.swapper.num_swap_outs > 0  # the case covers swaps
    steps = follower.follow()
    assert not channel.sent  # every operation consumed, up to and including the stop
    assert steps > 0
    for a, b in zip(leaves(leader.runner), leaves(follower.runner), strict=True):
        np.testing.assert_array_equal(a, b)
    for counter in ("num_swap_outs", "num_swap_ins"):
        assert getattr(follower.runner.swapper, counter) == getattr(leader.runner.swapper, counter)
    with pytest.raises(lockstep.LockstepError, match="followers were stopped"):
        leader.runner.execute(None)


def test_a_follower_never_steps_on_its_own():
    model = scalellm_jax.Model.random(CONFIG, seed=0, dtype="float32")
    engine = LLMEngine(model, EngineConfig(page_size=4, num_pages=24, max_num_seqs=4, max_num_batched_tokens=16))
    channel = QueueChannel()
    engine.runner = lockstep.FollowerRunner(engine.runner, channel)
    engine.warmup()  # nothing: the leader's warmup reaches it through ``follow`` (so LLM(...) builds on every process)
    assert not channel.sent and engine.runner.num_compilations() == 0
    engine.add_request([5, 6, 7], SamplingParams(max_tokens=2))
    with pytest.raises(RuntimeError, match="follows process 0"):
        engine.step()
    with pytest.raises(RuntimeError, match="only a follower process"):
        LLMEngine(model, EngineConfig(page_size=4, num_pages=24, max_num_seqs=4,
                                      max_num_batched_tokens=16)).follow()


@pytest.mark.parametrize("size", [0, 1, 1023, 1024, 1025, 70_000])
def test_the_channel_carries_messages_of_any_size(size):
    channel = lockstep.StepChannel()  # one process: the broadcast returns the input
    payload = np.random.default_rng().integers(0, 256, size, dtype=np.uint8).tobytes()
    assert channel._exchange(payload) == payload


def test_the_channel_runs_on_the_host_cpus_and_says_so_when_it_cannot(monkeypatch, caplog):
    assert all(d.platform == "cpu" for d in lockstep._host_devices())
    real = jax.devices

    def no_cpu_backend(backend=None):
        if backend == "cpu":
            raise RuntimeError("Unknown backend cpu")
        return real(backend)

    monkeypatch.setattr(jax, "devices", no_cpu_backend)
    assert lockstep._host_devices() == sorted(real(), key=lambda d: (d.process_index, d.id))
    assert "the CPU backend does not span the processes" in caplog.text


def test_differing_engines_are_named_field_by_field():
    same = {"num_pages": 65, "dtype": "float32"}
    assert lockstep.engine_differences([same, dict(same)]) == ""
    text = lockstep.engine_differences([same, {"num_pages": 64, "dtype": "float32"}, {**same, "tp": 2}])
    assert text == "num_pages: process 0 has 65, process 1 has 64; tp: process 0 has None, process 2 has 2"


def test_one_process_runs_its_own_runner():
    sentinel = object()
    assert lockstep.for_processes(sentinel, {}) is sentinel


def test_a_simulated_device_must_span_the_processes_that_run_it(monkeypatch):
    from scalellm_jax.engine.simulated_device import SimulatedDevice

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    model = scalellm_jax.Model(CONFIG, params=None, dtype="bfloat16")
    with pytest.raises(ConfigError, match="simulated devices span 1 hosts but 2 processes run the engine"):
        LLMEngine(model, EngineConfig(page_size=4, max_num_seqs=4, max_num_batched_tokens=16),
                  simulated=SimulatedDevice("h200", CONFIG, itemsize=2))
