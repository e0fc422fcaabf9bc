"""Where an engine's time goes: step-phase wall times and single-step timings (benchmark helpers)."""

from __future__ import annotations

import statistics
import time
from collections import defaultdict


class StepProfile:
    """Wall time of the engine's step phases, by wrapping instance methods (restore with ``remove``)."""

    # (owner attribute or "" for the engine, method, report key); ``_emit_pending`` builds step N-1's deltas
    PHASES = (("scheduler", "schedule", "schedule"), ("runner", "prepare", "prepare"),
              ("runner", "execute", "execute"), ("scheduler", "update", "update"), ("", "_emit_pending", "output"))

    def __init__(self, engine):
        self.engine = engine
        self.time: dict[str, float] = defaultdict(float)
        self.steps: dict[str, list[float]] = defaultdict(list)
        self._kind = None
        self._wrapped = []
        for owner, name, key in self.PHASES:
            self._wrap(getattr(engine, owner) if owner else engine, name, key)
        self._wrap(engine, "step", None)

    def _wrap(self, obj, name, key):
        original = getattr(obj, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                result = original(*args, **kwargs)
                if name == "execute":
                    batch = args[0]
                    self._kind = f"{'decode' if batch.decode_only else 'mixed'}:{len(batch.tokens)}"
                return result
            finally:
                elapsed = time.perf_counter() - start
                if key is not None:
                    self.time[key] += elapsed
                elif self._kind is not None:
                    self.steps[self._kind].append(elapsed)
                    self._kind = None

        setattr(obj, name, timed)
        self._wrapped.append((obj, name))

    def remove(self) -> None:
        for obj, name in self._wrapped:
            delattr(obj, name)  # the class's method shows through again

    def report(self, wall: float) -> dict:
        step_total = sum(sum(v) for v in self.steps.values())
        host = {f"{k}_s": v for k, v in self.time.items()}
        device_wait = step_total - sum(self.time.values())
        return {
            "steps": sum(len(v) for v in self.steps.values()),
            "step_time_s": step_total,
            "outside_steps_s": wall - step_total,  # LLM.generate: validation, add_request, result collection
            "host_phases": host,  # execute = jit dispatch only (asynchronous)
            # step time minus the host phases: mostly blocking on the device (an underestimate of device
            # time, since the engine builds step N-1's outputs while the device runs step N)
            "device_wait_s": device_wait,
            "by_bucket": {
                k: {"steps": len(v), "total_s": sum(v), "mean_ms": 1e3 * statistics.fmean(v)}
                for k, v in sorted(self.steps.items(), key=lambda kv: (kv[0].split(":")[0], int(kv[0].split(":")[1])))
            },
        }


def decode_step_ms(runner, rows: int, context: int, reps: int = 10) -> float:
    """Median ms of one decode step at ``rows`` sequences of ``context`` tokens, through the runner."""
    import jax
    import numpy as np

    ps, pps = runner.page_size, runner.max_pages_per_seq
    context = max(1, min(context, ps * pps))
    batch = runner._empty(True, rows, rows)
    for i in range(rows):
        batch.page_table[i] = 1 + (i * pps + np.arange(pps)) % (runner.num_pages - 1)
        pos = context - 1
        batch.tokens[i] = 3 + i
        batch.positions[i] = pos
        batch.slot_mapping[i] = batch.page_table[i, pos // ps] * ps + pos % ps
        batch.kv_lengths[i] = context
        batch.cu_q_lens[i + 1] = i + 1
        batch.logits_index[i] = i
    jax.block_until_ready(runner.execute(batch))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(runner.execute(batch))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def component_ms(model, rows: int, reps: int = 10) -> dict:
    """Median ms of the parts of a decode step at ``rows`` sequences, outside the engine.

    ``forward``: the full causal forward of ``rows`` one-token sequences (same MoE and LM head as a
    decode step, attention over one position, no paged KV); ``sample``: greedy sampling plus the
    token logprobs over the vocabulary, as the runner does them after the forward.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from scalellm_jax.engine.sampling import row_keys, sample, token_logprobs

    @jax.jit
    def greedy(logits, seeds):
        zeros = jnp.zeros(rows, jnp.int32)
        tokens = sample(logits, row_keys(seeds), zeros, jnp.zeros(rows), zeros, jnp.ones(rows))
        return tokens, token_logprobs(logits, tokens)

    tokens = np.arange(3, 3 + rows, dtype=np.int32)[:, None] % model.config.vocab_size
    logits = jax.random.normal(jax.random.key(0), (rows, model.config.vocab_size), jnp.float32)
    return {"forward": median_ms(model.logits, tokens, reps=reps),
            "sample": median_ms(greedy, logits, jnp.arange(rows, dtype=jnp.uint32), reps=reps)}


def median_ms(fn, *args, reps: int = 10) -> float:
    """Median ms of ``fn(*args)`` (a jitted function) over ``reps`` calls, after one untimed call."""
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)
