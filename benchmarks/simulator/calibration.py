"""Step-time model for the scheduler simulator, calibrated once from the real ``ModelRunner``.

A step's time is looked up by its shape bucket, as the runner pads it: a decode-only step by its
row count (rounded up to a power of two), a mixed step by its token count (rounded up to a power
of two; mixed steps always carry ``max_num_seqs`` rows). On top of that base, attention over the
cached KV costs ``kv_token_s`` per cached token of the batch (the CPU attention path follows the
real sequence lengths), and a swap costs ``swap_page_s`` per page moved.

The calibration times the runner's jitted steps directly (``block_until_ready`` around
``execute``, as ``engine_profile.decode_step_ms`` does) on batches built like the engine's, keeping
the fastest of a few repeats (on a shared machine the slower ones also time the neighbours' jobs).
Host-side scheduling and postprocessing are not included: the engine overlaps most of them with
the device step.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import statistics
import time

import numpy as np

from scalellm_jax.engine.buckets import bucket_for
from scalellm_jax.engine.scheduler import SchedulerOutput

BASE_CONTEXT = 16  # KV length per decode row for the base timings
LONG_CONTEXT = 1024  # KV length per decode row for the KV slope


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The engine shape the calibration (and so the simulation) is for."""

    page_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int = 4096

    @property
    def max_pages_per_seq(self) -> int:
        return -(-self.max_model_len // self.page_size)

    @property
    def cpu_num_pages(self) -> int:
        """The CPU engine's default pool: 64 pages per sequence slot plus the null page (``memory.plan_memory``)."""
        return 1 + self.max_num_seqs * min(self.max_pages_per_seq, 64)


@dataclasses.dataclass(frozen=True)
class StepTimes:
    """Seconds per step by bucket, plus per-KV-token and per-swapped-page costs."""

    geometry: Geometry
    decode_s: dict[int, float]  # seq bucket → seconds (KV excluded)
    mixed_s: dict[int, float]  # token bucket → seconds (KV excluded)
    kv_token_s: float
    swap_page_s: float
    meta: dict = dataclasses.field(default_factory=dict)

    @property
    def decode_buckets(self) -> tuple[int, ...]:
        """The calibrated decode row buckets (for the policy's ``StepCostModel``)."""
        return tuple(self.decode_s)

    def with_seats(self, max_num_seqs: int | None) -> StepTimes:
        """These times for fewer seats: decode buckets up to that are calibrated; mixed steps were timed
        with the calibration's full row count (padding rows are nearly free in the ragged path)."""
        if max_num_seqs is None:
            return self
        if not 1 <= max_num_seqs <= self.geometry.max_num_seqs:
            raise ValueError(f"--max-num-seqs must be in [1, {self.geometry.max_num_seqs}] (the calibration's)")
        return dataclasses.replace(self, geometry=dataclasses.replace(self.geometry, max_num_seqs=max_num_seqs))

    def step_s(self, out: SchedulerOutput) -> float:
        """Modeled seconds of the step ``out`` plans (its swaps included)."""
        if not out.scheduled:
            return 0.0
        if out.is_decode_only:
            base = self.decode_s[bucket_for(len(out.scheduled), tuple(self.decode_s))]
        else:
            base = self.mixed_s[bucket_for(out.num_batched_tokens, tuple(self.mixed_s))]
        kv_tokens = sum(s.end for s in out.scheduled)
        pages = sum(len(op.pages) for op in (*out.swap_out, *out.swap_in))
        return base + self.kv_token_s * kv_tokens + self.swap_page_s * pages

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["decode_s"] = {str(k): v for k, v in self.decode_s.items()}
        d["mixed_s"] = {str(k): v for k, v in self.mixed_s.items()}
        return d

    @classmethod
    def from_json(cls, d: dict) -> StepTimes:
        return cls(
            geometry=Geometry(**d["geometry"]),
            decode_s={int(k): float(v) for k, v in d["decode_s"].items()},
            mixed_s={int(k): float(v) for k, v in d["mixed_s"].items()},
            kv_token_s=float(d["kv_token_s"]),
            swap_page_s=float(d["swap_page_s"]),
            meta=d.get("meta", {}),
        )

    def save(self, path: pathlib.Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: pathlib.Path) -> StepTimes:
        return cls.from_json(json.loads(path.read_text()))


# ---------------------------------------------------------------------------------------------- calibration


def _fastest_s(fn, reps: int) -> float:
    fn()  # first call: compile (or warm caches)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _fill_rows(runner, batch, rows: list[tuple[int, int]]) -> int:
    """Write rows of (new tokens, kv length after the step) into ``batch``; returns KV tokens.

    Each row gets its own disjoint pages (wrapping inside the pool), like distinct requests.
    """
    ps, pps = runner.page_size, runner.max_pages_per_seq
    offset = 0
    for i, (n, kv_len) in enumerate(rows):
        batch.page_table[i] = 1 + (i * pps + np.arange(pps)) % (runner.num_pages - 1)
        positions = np.arange(kv_len - n, kv_len)
        batch.tokens[offset:offset + n] = 3 + (positions + i) % 1000
        batch.positions[offset:offset + n] = positions
        batch.slot_mapping[offset:offset + n] = batch.page_table[i, positions // ps] * ps + positions % ps
        batch.kv_lengths[i] = kv_len
        offset += n
        batch.cu_q_lens[i + 1:] = offset
        batch.logits_index[i] = offset - 1
    return sum(kv for _, kv in rows)


def _build_batch(runner, decode_only: bool, num_tokens: int, rows: list[tuple[int, int]]):
    n_rows = num_tokens if decode_only else runner.max_num_seqs
    batch = runner._empty(decode_only, num_tokens, n_rows)
    return batch, _fill_rows(runner, batch, rows)


def _time_interleaved(runner, batches: dict, rounds: int) -> dict:
    """Times of each batch over ``rounds`` passes through all of them.

    Interleaving spreads every bucket's samples over the whole calibration, so a burst of load
    from other jobs does not spoil one bucket's every sample.
    """
    import jax

    def run(batch):
        jax.block_until_ready(runner.execute(batch))

    samples: dict = {}
    for key, (batch, _) in batches.items():
        run(batch)  # compile
        samples[key] = []
    for _ in range(rounds):
        for key, (batch, _) in batches.items():
            start = time.perf_counter()
            run(batch)
            samples[key].append(time.perf_counter() - start)
    return samples


def _key_name(key) -> str:
    return key if isinstance(key, str) else f"{key[0]}:{key[1]}"


def _monotone(times: dict[int, float]) -> dict[int, float]:
    """Each bucket's time capped by every larger bucket's: a smaller padded shape never costs more,
    so an inversion is measurement noise (another job took the CPU in every sample of that bucket)."""
    out, cap = {}, float("inf")
    for n in sorted(times, reverse=True):
        cap = min(cap, times[n])
        out[n] = cap
    return dict(sorted(out.items()))


def _mixed_rows(geometry: Geometry, tokens: int) -> list[tuple[int, int]]:
    """A representative full mixed bucket: a quarter decode rows, the rest one prompt chunk from 0."""
    decodes = min(geometry.max_num_seqs - 1, tokens // 4)
    return [(1, BASE_CONTEXT)] * decodes + [(tokens - decodes, tokens - decodes)]


def _swap_page_s(runner, reps: int) -> float:
    """Seconds per page of one swap-out plus swap-in of a 16-page request (pages 1..16)."""
    import jax

    if runner.swapper is None:
        return 0.0
    pages = tuple(range(1, 17))

    def round_trip():
        runner.swapper.swap_out(runner.pools, "calibration", pages)
        runner.swapper.finish_transfers()
        runner.pools = runner.swapper.swap_in(runner.pools, "calibration", pages)
        jax.block_until_ready(runner.pools)

    return _fastest_s(round_trip, reps) / (2 * len(pages))


def calibrate(geometry: Geometry, model_config, reps: int = 30, seed: int = 0, progress=None) -> StepTimes:
    """Build the small-preset runner for ``geometry`` on the default JAX device and time its steps."""
    import jax

    from scalellm_jax.config import EngineConfig
    from scalellm_jax.engine.resolved import resolve
    from scalellm_jax.engine.runner import ModelRunner
    from scalellm_jax.engine.step_program import PlatformChoices
    from scalellm_jax.loader import Model

    say = progress or (lambda *_: None)
    model = Model.random(model_config, seed=seed, dtype="float32")
    engine = EngineConfig(page_size=geometry.page_size, num_pages=geometry.cpu_num_pages,
                          max_model_len=geometry.max_model_len, max_num_seqs=geometry.max_num_seqs,
                          max_num_batched_tokens=geometry.max_num_batched_tokens, swap_space_gb=1.0)
    runner = ModelRunner(model, resolve(engine, model_config, dtype=model.dtype, budget_bytes=None),
                         choices=PlatformChoices.for_platform("cpu"))
    full = geometry.max_num_seqs
    batches = {("decode", n): _build_batch(runner, True, n, [(1, BASE_CONTEXT)] * n)
               for n in runner.seq_buckets}
    long_context = min(LONG_CONTEXT, geometry.max_model_len)
    batches["long"] = _build_batch(runner, True, full, [(1, long_context)] * full)  # for the KV slope
    batches |= {("mixed", n): _build_batch(runner, False, n, _mixed_rows(geometry, n)) for n in runner.token_buckets}
    samples = _time_interleaved(runner, batches, reps)
    best = {key: min(v) for key, v in samples.items()}
    kv_token_s = max(best["long"] - best[("decode", full)], 0.0) / (batches["long"][1] - batches[("decode", full)][1])
    say(f"kv slope: {1e9 * kv_token_s:.1f} ns per cached token")
    decode_s, mixed_s = {}, {}
    for key, (_, kv) in batches.items():
        if key == "long":
            continue
        kind, n = key
        (decode_s if kind == "decode" else mixed_s)[n] = best[key] - kv_token_s * kv
        say(f"{kind} {n:4}: {1e3 * best[key]:7.1f} ms")
    decode_s, mixed_s = _monotone(decode_s), _monotone(mixed_s)
    swap_page_s = _swap_page_s(runner, reps)
    say(f"swap: {1e6 * swap_page_s:.0f} us per page each way")
    device = jax.devices()[0]
    meta = {"device": device.device_kind, "platform": device.platform, "jax": jax.__version__,
            "model_config": dataclasses.asdict(model_config), "dtype": "float32", "reps": reps,
            "num_pages": geometry.cpu_num_pages, "base_context": BASE_CONTEXT, "long_context": long_context,
            # The model uses the fastest sample; the median shows how much other jobs slowed the rest.
            "median_ms": {_key_name(k): 1e3 * statistics.median(v) for k, v in samples.items()},
            "fastest_ms": {_key_name(k): 1e3 * v for k, v in best.items()}}
    return StepTimes(geometry, decode_s, mixed_s, kv_token_s, swap_page_s, meta)
