"""One engine over several processes (hosts): process 0 leads, the others follow its device work in lockstep.

Under ``jax.distributed`` every jitted step is one global program: each process must call it, in the
same order, with the same host inputs, and each computes its own devices' shards. Process 0 runs the
whole engine (scheduler, KV page tables, tokenizer, HTTP). Its ``ModelRunner`` is wrapped in a
``LeaderRunner``, which sends every device operation (a step's batch, swaps, warmup) to the other
processes before running it; each of those runs a ``FollowerRunner.follow`` loop that receives the
operation and runs it on its own runner. The step's sampled tokens come out replicated, so process 0
reads them from its own devices.

The transport is JAX's own collective over the hosts' CPUs: a sum over a mesh of every process's CPU
devices (gloo over TCP, which ``scalellm_jax.distributed`` configures): a fixed-shape header with the
message length, then the pickled message padded to a power-of-two length (so a few shapes compile).
The CPU, not the accelerator: a GPU runs its programs in order on one stream, so a broadcast there
would wait for the step in flight and the next step could not be prepared and sent while the device
works (``multihost_utils.broadcast_one_to_all`` runs on the default backend). vLLM and SGLang send
their step metadata over a CPU (gloo) group for the same reason. The operations are small (a step's
inputs are numpy arrays of a few kilobytes); the KV cache and weights never move.

Failures stop every process, never hang one: a collective whose peer died fails at once (the
connection resets), so a dead follower fails the leader's next operation and a dead leader fails the
followers' wait. An idle leader sends a keepalive every ``KEEPALIVE_S`` so that this holds while no
request runs too. JAX's coordination service stops any process whose peer stops heartbeating
(``jax.distributed.initialize``'s ``heartbeat_timeout_seconds``) as a last resort.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle

import jax
import jax.numpy as jnp
import numpy as np

from scalellm_jax.config import ConfigError

logger = logging.getLogger(__name__)

KEEPALIVE_S = 1.0  # an idle leader's keepalive period: how soon either side learns the other died
_MIN_PAYLOAD = 1024  # bytes: smaller messages share one compiled broadcast shape
_DESCRIPTION_BYTES = 4096  # the start-up comparison's fixed buffer


class LockstepError(RuntimeError):
    """The processes of a multi-process engine lost each other (a peer died or a collective failed)."""


@dataclasses.dataclass(frozen=True)
class Operation:
    """One device operation the followers repeat: a ``ModelRunner`` method and its (plain-data) arguments."""

    method: str  # "execute" | "swap" | "finish_swaps" | "drop_swapped" | "warmup" | "keepalive" | "stop"
    args: tuple = ()


class StepChannel:
    """Process 0 → every process: pickled ``Operation``s, broadcast over the processes' CPU devices."""

    def __init__(self):
        devices = _host_devices()
        mesh = jax.sharding.Mesh(np.array(devices).reshape(jax.process_count(), -1), ("processes", "local"))
        self._sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("processes"))
        # the source contributes its message, every other process zeros: the sum is the message
        self._sum = jax.jit(lambda x: jnp.sum(x, axis=0, dtype=x.dtype),
                            out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        self.is_source = jax.process_index() == 0

    def _broadcast(self, value: np.ndarray) -> np.ndarray:
        if jax.process_count() == 1:
            return value
        local = (value if self.is_source else np.zeros_like(value))[None]
        stacked = jax.make_array_from_process_local_data(self._sharding, local, (jax.process_count(), *value.shape))
        return np.asarray(self._sum(stacked).addressable_data(0))

    def send(self, operation: Operation) -> None:
        data = pickle.dumps(operation, protocol=pickle.HIGHEST_PROTOCOL)
        self._exchange(data)

    def receive(self) -> Operation:
        return pickle.loads(self._exchange(None))

    def _exchange(self, data: bytes | None) -> bytes:
        """The source's ``data`` on every process (others pass None)."""
        try:
            size = int(self._broadcast(np.array([0 if data is None else len(data)], np.int32))[0])
            padded = max(_MIN_PAYLOAD, 1 << (size - 1).bit_length())
            words = np.zeros(padded // 4, np.int32)  # int32: the broadcast sums, and sums int32 exactly
            if data is not None:
                words.view(np.uint8)[:size] = np.frombuffer(data, np.uint8)
            received = np.asarray(self._broadcast(words), np.int32)
        except jax.errors.JaxRuntimeError as exc:
            raise LockstepError(f"lost another process of this engine: {_first_line(exc)}") from exc
        return received.view(np.uint8)[:size].tobytes()


def check_same_engine(description: dict) -> None:
    """Every process calls this at the same point: raises ``ConfigError`` (on every process) naming the fields
    where any process's engine differs from process 0's, e.g. a host that sized its KV cache differently."""
    from jax.experimental import multihost_utils

    data = json.dumps(description, sort_keys=True, default=str).encode()
    if len(data) > _DESCRIPTION_BYTES:
        raise ValueError(f"engine description of {len(data)} bytes exceeds {_DESCRIPTION_BYTES}")
    buffer = np.zeros(_DESCRIPTION_BYTES, np.uint8)
    buffer[: len(data)] = np.frombuffer(data, np.uint8)
    try:
        gathered = np.asarray(multihost_utils.process_allgather(buffer))  # [processes, bytes]
    except jax.errors.JaxRuntimeError as exc:
        raise LockstepError(f"lost another process of this engine: {_first_line(exc)}") from exc
    differences = engine_differences([json.loads(row.tobytes().rstrip(b"\0")) for row in gathered])
    if differences:
        raise ConfigError(f"the processes disagree on the engine ({differences}): start every process with the "
                          "same flags, checkpoint and device type")


def engine_differences(descriptions: list[dict]) -> str:
    """Where each process's description differs from process 0's, one clause per field ("" when none)."""
    leader = descriptions[0]
    clauses = []
    for rank, other in enumerate(descriptions[1:], start=1):
        clauses += [f"{k}: process 0 has {leader.get(k)!r}, process {rank} has {other.get(k)!r}"
                    for k in sorted(leader.keys() | other.keys()) if leader.get(k) != other.get(k)]
    return "; ".join(clauses)


class LeaderRunner:
    """Process 0's runner: sends each device operation to the followers, then runs it on its own devices.

    Everything else (shapes, buckets, ``prepare``, which is host-only) is the wrapped runner's.
    """

    keepalive_s = KEEPALIVE_S

    def __init__(self, runner, channel: StepChannel):
        self._runner = runner
        self._channel = channel
        self._stopped = False

    def __getattr__(self, name):  # host-side attributes and methods: the wrapped runner's
        return getattr(self._runner, name)

    def _both(self, method: str, *args):
        if self._stopped:
            raise LockstepError("the followers were stopped: this engine can run no more steps")
        self._channel.send(Operation(method, args))
        return getattr(self._runner, method)(*args)

    def execute(self, batch):
        return self._both("execute", batch)

    def swap(self, swap_out, swap_in) -> None:
        if swap_out or swap_in:
            self._both("swap", swap_out, swap_in)

    def finish_swaps(self) -> None:
        swapper = getattr(self._runner, "swapper", None)  # a simulated device's swaps are timed, not copied
        if swapper is not None and swapper.has_in_flight:
            self._both("finish_swaps")

    def drop_swapped(self, request_id: str) -> None:
        if getattr(self._runner, "swapper", None) is not None:
            self._both("drop_swapped", request_id)

    def warmup(self, progress: bool = True) -> None:
        self._both("warmup", False)  # progress bars on process 0 only
        if progress:
            logger.info("warmed up on every process")

    def keepalive(self) -> None:
        """Tell the followers the leader lives (an idle engine calls this every ``keepalive_s``)."""
        self._channel.send(Operation("keepalive"))

    def close(self) -> None:
        """Let the followers' ``follow`` return (they exit); idempotent."""
        if not self._stopped:
            self._stopped = True
            self._channel.send(Operation("stop"))


class FollowerRunner:
    """A follower process's runner: repeats process 0's device operations until told to stop.

    Its engine never steps on its own: scheduling, requests and outputs live on process 0.
    """

    def __init__(self, runner, channel: StepChannel):
        self._runner = runner
        self._channel = channel

    def __getattr__(self, name):  # shapes and buckets, read while the engine is built
        return getattr(self._runner, name)

    def follow(self) -> int:
        """Run process 0's operations until it stops; returns the number of steps run.

        Raises ``LockstepError`` when process 0 is lost.
        """
        steps = 0
        while True:
            operation = self._channel.receive()
            if operation.method == "stop":
                return steps
            if operation.method == "keepalive":
                continue
            getattr(self._runner, operation.method)(*operation.args)
            steps += operation.method == "execute"

    def _refuse(self, *args, **kwargs):
        raise RuntimeError(f"process {jax.process_index()} follows process 0: only process 0 runs the engine")

    execute = swap = finish_swaps = drop_swapped = warmup = _refuse


def for_processes(runner, description: dict):
    """``runner`` as it runs in this process: itself in a single-process run, else a ``LeaderRunner``
    (process 0) or a ``FollowerRunner``, after checking every process built the same engine."""
    if jax.process_count() == 1:
        return runner
    check_same_engine(description)
    channel = StepChannel()
    if channel.is_source:
        logger.info("leading %d processes: every step runs on all of them", jax.process_count())
        return LeaderRunner(runner, channel)
    return FollowerRunner(runner, channel)


def _host_devices() -> list:
    """Every process's CPU devices, process by process. The CPU backend spans the processes once
    ``jax.distributed`` has started (on GPU hosts too); where it does not, the default backend's devices."""
    try:
        devices = sorted(jax.devices("cpu"), key=lambda d: (d.process_index, d.id))
    except RuntimeError:  # JAX_PLATFORMS names no cpu backend
        devices = []
    count = jax.process_count()
    if {d.process_index for d in devices} == set(range(count)) and len(devices) % count == 0:
        return devices
    logger.warning("the CPU backend does not span the processes (is JAX_PLATFORMS without cpu?): step "
                   "operations go over the accelerators' collectives, which wait for the step in flight")
    return sorted(jax.devices(), key=lambda d: (d.process_index, d.id))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
