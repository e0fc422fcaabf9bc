"""A simulated accelerator under the real engine: every part runs except the jitted step.

``--simulate-device h200`` (server) or ``LLM(..., simulate_device="h200")`` keep the tokenizer, the
scheduler and its policies, the length predictor, the KV manager and its page counts, the swap
bookkeeping, detokenization, HTTP and metrics, and replace the device with ``SimulatedRunner``:
a step takes the time ``device_models`` gives for it (its bytes and FLOPs on that device), spent
asleep, which releases the GIL and uses no CPU, as a GPU step would. The KV pool comes from the
engine's own memory plan over the simulated device's memory.

Dispatch is asynchronous as on a GPU: ``execute`` returns at once with results that become
readable when the simulated device finishes the step (steps queue behind each other), so the
engine's host work for one step overlaps the device's next step exactly as it does for real.

Across processes (``SCALELLM_COORDINATOR``: one engine over several hosts) the engine runs as a real
one does: process 0 leads and sends every step to the others over ``engine.lockstep``'s channel (the
real transport, timed as it is), each process's simulated device takes the step's time, and the cost
model puts the collectives whose device group spans the hosts on the network.

The tokens are not a model's (logit controls such as ``logit_bias`` have no effect): random ids,
except that a request whose prompt is in the workload file (``lengths_path``: JSONL rows of
``instruction`` and ``output``) ends with EOS after as many tokens as that row's answer had, so a
benchmark can replay real answer lengths without telling the scheduler (``max_tokens`` stays the
client's).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from device_models import DeviceCostModel, ModelShape, StepWork, device_profile
from scalellm_jax.engine.buckets import bucket_for
from scalellm_jax.engine.memory import page_bytes_per_device
from scalellm_jax.engine.resolved import ResolvedConfig
from scalellm_jax.engine.scheduler import ScheduledRequest, SwapOp
from scalellm_jax.engine.step_program import TOP_LOGPROBS, StepOutput, StepShapes
from scalellm_jax.workloads import WorkloadError, load_rows

logger = logging.getLogger(__name__)

FIRST_RANDOM_ID = 259  # past the special and byte-fallback ids of SentencePiece vocabularies: word pieces


@dataclasses.dataclass(frozen=True)
class SimulatedDevice:
    """Which device to simulate, for which model; builds the engine's runner and memory budget."""

    device: str  # a ``device_models.DEVICES`` name
    model_config: object  # a ``ModelConfig``
    itemsize: int = 2  # weights' bytes per value (bfloat16, as served on a GPU)
    tp: int = 1
    ep: int = 1
    hosts: int = 1  # the tp x ep devices span this many hosts (one engine over several processes)
    lengths: dict = dataclasses.field(default_factory=dict, repr=False)  # prompt ids (tuple) -> answer tokens
    # request id -> answer tokens, before ``lengths``: for a benchmark that gives each request its own
    # length (two requests with one prompt may differ). Read when a request first samples; may be
    # updated between runs (new requests need new ids: a request's length is remembered by id).
    lengths_by_request: dict = dataclasses.field(default_factory=dict, repr=False)
    lengths_path: str | None = None
    seed: int = 0

    def __post_init__(self):
        device_profile(self.device)  # ValueError naming the choices

    @property
    def profile(self):
        return device_profile(self.device)

    def budget_bytes(self, utilization: float) -> int:
        return int(utilization * self.profile.memory_bytes)

    def kv_itemsize(self, kv_cache_dtype: str) -> int:
        return 1 if kv_cache_dtype == "int8" else self.itemsize

    def swap_page_bytes(self, page_size: int, kv_cache_dtype: str, compression: str) -> int:
        """Host bytes of one swapped page (every device's shard of it) under ``compression``."""
        itemsize = 1 if compression == "int8" else self.kv_itemsize(kv_cache_dtype)
        return self.tp * page_bytes_per_device(self.model_config, page_size, itemsize, self.tp)

    def cost_model(self, kv_itemsize: int) -> DeviceCostModel:
        return DeviceCostModel(self.profile, ModelShape.of(self.model_config), itemsize=self.itemsize,
                               kv_itemsize=kv_itemsize, tp=self.tp, ep=self.ep, hosts=self.hosts)

    def describe(self) -> str:
        lengths = f", answer lengths of {len(self.lengths)} prompts from {self.lengths_path}" if self.lengths else ""
        hosts = f" over {self.hosts} hosts" if self.hosts > 1 else ""
        return (f"SIMULATED {self.device} (device_models cost model, tp={self.tp}, ep={self.ep}{hosts}): "
                f"no model runs, "
                f"output tokens are random{lengths}")


def load_workload_lengths(path: str | Path, tokenizer) -> dict[tuple[int, ...], int]:
    """Prompt token ids (as the server encodes a completion prompt) -> the row's answer length in tokens."""
    try:
        return {row.prompt_ids: row.output_len for row in load_rows(path, tokenizer)}  # every prompt, whole
    except WorkloadError as exc:
        raise ValueError(f"simulate_lengths: {exc}") from None


@dataclasses.dataclass
class SimulatedStep:
    """A prepared step: its cost-model work and the token each row samples."""

    work: StepWork
    tokens: np.ndarray
    decode_only: bool
    num_tokens: int = 0  # the step's token positions (prompt logprobs have one per position)


class _DeviceResult:
    """A step output that becomes readable when the simulated device has finished the step."""

    __slots__ = ("_value", "_ready_at")

    def __init__(self, value: np.ndarray, ready_at: float):
        self._value, self._ready_at = value, ready_at

    def __array__(self, dtype=None, copy=None):
        wait = self._ready_at - time.perf_counter()
        if wait > 0:
            time.sleep(wait)  # the host waits on the device: no CPU, GIL released
        return self._value if dtype is None else self._value.astype(dtype)


class SimulatedRunner:
    """``ModelRunner``'s interface over a simulated device (see the module docstring)."""

    def __init__(self, device: SimulatedDevice, resolved: ResolvedConfig):
        config = resolved.engine
        self.device = device
        self.page_size, self.num_pages = config.page_size, resolved.num_pages
        self.max_pages_per_seq, self.max_num_seqs = resolved.max_pages_per_seq, config.max_num_seqs
        self.shapes = StepShapes(config.max_num_seqs, config.max_num_batched_tokens, resolved.max_pages_per_seq,
                                 decode_sizes=config.decode_buckets, token_sizes=config.token_buckets)
        self.seq_buckets, self.token_buckets = self.shapes.seq_buckets, self.shapes.token_buckets
        self.cost = device.cost_model(device.kv_itemsize(config.kv_cache_dtype))
        self._page_bytes = {compression: device.swap_page_bytes(config.page_size, config.kv_cache_dtype, compression)
                            for compression in ("none", "int8")}
        self.swap_compression = resolved.swap_compression
        eos_token_id, vocab_size = resolved.model.eos_token_id, resolved.model.vocab_size
        self._eos = eos_token_id
        self._low = FIRST_RANDOM_ID if vocab_size > 2 * FIRST_RANDOM_ID else 0
        self._vocab = vocab_size
        self._logprob = -math.log(vocab_size)  # a uniform draw's
        self._rng = np.random.default_rng(device.seed)
        self._targets: OrderedDict[str, int | None] = OrderedDict()  # request id -> answer length, recent first
        self._busy_until = 0.0  # perf_counter time the simulated device finishes its queued work
        self._pending_swap_s = 0.0
        self.num_steps = 0
        self.num_swap_outs = 0  # requests whose KV went to host memory (as ``KVSwapper.num_swap_outs``)
        self.busy_s = 0.0  # modelled device time so far

    def swap_page_bytes(self, compression: str = "none") -> int:
        return self._page_bytes[compression]

    # ------------------------------------------------------------------ host side

    def _target(self, request) -> int | None:
        rid = request.request_id
        if rid in self._targets:
            self._targets.move_to_end(rid)
            return self._targets[rid]
        target = self.device.lengths_by_request.get(rid)
        if target is None and self.device.lengths:
            target = self.device.lengths.get(tuple(request.prompt_token_ids))
        self._targets[rid] = target
        while len(self._targets) > 8 * self.max_num_seqs:  # entries are re-derivable: a small LRU suffices
            self._targets.popitem(last=False)
        return target

    def _ends(self, request) -> bool:
        """Whether the request's next token is its last (EOS at its workload answer length, not before
        ``min_tokens``: the device would hold EOS back)."""
        target = self._target(request)
        params = request.sampling_params
        return (target is not None and request.num_output_tokens + 1 >= max(target, params.min_tokens)
                and self._eos is not None and not params.ignore_eos)

    def prepare(self, scheduled: list[ScheduledRequest], kv) -> SimulatedStep:
        num_tokens = sum(s.num_new_tokens for s in scheduled)
        decode_only = num_tokens == len(scheduled)
        padded = (bucket_for(len(scheduled), self.seq_buckets) if decode_only
                  else bucket_for(num_tokens, self.token_buckets))
        rows = [(s.num_new_tokens, s.end) for s in scheduled]
        work = StepWork.of_rows(rows, num_sampled=sum(s.needs_sample for s in scheduled), padded_tokens=padded)
        # One draw for the whole batch: a GPU host samples on the device, so per-row host work would
        # charge the simulated engine CPU the real one does not spend.
        tokens = self._rng.integers(self._low, self._vocab, size=len(scheduled)).astype(np.int32)
        if self._eos is not None:
            tokens[tokens == self._eos] = self._low
        for i, s in enumerate(scheduled):
            if not s.needs_sample:
                tokens[i] = 0
            elif self._ends(s.request):
                tokens[i] = self._eos
        return SimulatedStep(work, tokens, decode_only, padded)

    # ------------------------------------------------------------------ device side

    def _queue(self, seconds: float) -> float:
        start = max(time.perf_counter(), self._busy_until)
        self._busy_until = start + seconds
        self.busy_s += seconds
        return self._busy_until

    def execute(self, step: SimulatedStep) -> StepOutput:
        """The step's outputs, readable once the simulated device is done: the drawn tokens, at a uniform
        draw's logprob, with the first TOP_LOGPROBS ids as the alternatives (prompt positions alike)."""
        seconds = self.cost.step_s(step.work) + self._pending_swap_s
        self._pending_swap_s = 0.0
        ready_at = self._queue(seconds)
        self.num_steps += 1
        k = min(TOP_LOGPROBS, self._vocab)

        def uniform(*shape):
            return _DeviceResult(np.full(shape, self._logprob, np.float32), ready_at)

        def ids(n):
            return _DeviceResult(np.broadcast_to(np.arange(k, dtype=np.int32), (n, k)), ready_at)

        rows, n = len(step.tokens), step.num_tokens
        return StepOutput(_DeviceResult(step.tokens, ready_at), uniform(rows), uniform(rows, k), ids(rows),
                          uniform(n), uniform(n, k), ids(n))

    def swap(self, swap_out: list[SwapOp], swap_in: list[SwapOp]) -> None:
        if (swap_out or swap_in) and self.swap_compression is None:
            raise RuntimeError("the scheduler planned a swap but this runner has no swap space")
        self.num_swap_outs += len(swap_out)
        pages = sum(len(op.pages) for op in (*swap_out, *swap_in))
        if pages:  # copies on the device's queue, before the step that needs them
            self._pending_swap_s += self.cost.swap_s(pages * self._page_bytes[self.swap_compression])

    def finish_swaps(self) -> None:
        pass  # a swap's time is part of the next step's

    def drop_swapped(self, request_id: str) -> None:
        self._targets.pop(request_id, None)

    def warmup(self, progress: bool = True) -> None:
        logger.warning("%s: nothing to compile", self.device.describe())

    def num_compilations(self) -> int:
        return 0
