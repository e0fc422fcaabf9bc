"""The time of one engine step on a device: a roofline over the step's bytes and FLOPs.

A step reads the weights its tokens need (every dense matrix; of the experts, those its tokens
can reach), reads the KV of every row's context and writes its new tokens' KV, and computes the
matmuls of its (padded) tokens, the attention scores of its (query, key) pairs and the LM head
of its sampled rows. Its time is the slower of memory and compute at their calibrated
efficiencies (good kernels overlap the two), plus tensor/expert-parallel collectives over NVLink
and a fixed per-step cost. Swaps move KV pages over the host link.

Everything is per device: under tensor parallelism each device holds ``1/tp`` of every matrix and
of the KV heads; under expert parallelism ``1/ep`` of the experts (and their tokens).

The ``tp x ep`` devices may span ``hosts`` hosts (one engine over several processes), tensor-parallel
devices packed within a host first, as the engine's mesh orders them: a collective whose group spans
hosts runs at the slowest link of its ring, the network's, and pays the network's latency.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from device_models.calibration import Calibration, load_calibration
from device_models.profiles import DeviceProfile
from device_models.shapes import ModelShape


@dataclasses.dataclass(frozen=True)
class StepWork:
    """What one step computes, in the units its cost depends on."""

    num_tokens: int  # new tokens (prompt chunks and decodes) whose KV the step writes
    padded_tokens: int  # tokens the matmuls run over: ``num_tokens`` padded up to the step's shape bucket
    num_sampled: int  # rows whose next-token logits are computed
    kv_tokens: int  # keys attention reads: every row's context after the step
    attention_pairs: int  # (query, key) pairs scored: causal within a chunk, all earlier keys

    @classmethod
    def of_rows(cls, rows: Iterable[tuple[int, int]], *, num_sampled: int | None = None,
                padded_tokens: int | None = None) -> StepWork:
        """From ``(new_tokens, context_after_step)`` per row; every row samples unless told otherwise."""
        rows = list(rows)
        tokens = sum(n for n, _ in rows)
        kv = sum(ctx for _, ctx in rows)
        pairs = sum(n * (ctx - n) + n * (n + 1) // 2 for n, ctx in rows)
        return cls(tokens, max(tokens, padded_tokens or 0), len(rows) if num_sampled is None else num_sampled,
                   kv, pairs)

    @classmethod
    def decode(cls, batch: int, context: int) -> StepWork:
        """``batch`` rows of one new token, each with ``context`` keys after the step."""
        return cls.of_rows([(1, context)] * batch)


class DeviceCostModel:
    """Seconds per step and per swap for ``shape`` on ``profile`` (weights ``itemsize`` bytes, KV
    ``kv_itemsize``: 1 for int8 pages), over ``tp`` x ``ep`` devices on ``hosts`` hosts."""

    def __init__(self, profile: DeviceProfile, shape: ModelShape, calibration: Calibration | None = None, *,
                 itemsize: int = 2, kv_itemsize: int = 2, tp: int = 1, ep: int = 1, hosts: int = 1):
        if itemsize not in (1, 2, 4) or kv_itemsize not in (1, 2, 4):
            raise ValueError(f"itemsize and kv_itemsize must be 1, 2 or 4 bytes, got {itemsize}, {kv_itemsize}")
        if tp < 1 or ep < 1 or shape.num_experts % ep:
            raise ValueError(f"tp and ep must be >= 1 and ep must divide num_experts, got tp={tp}, ep={ep}")
        if hosts < 1 or (tp * ep) % hosts:
            raise ValueError(f"hosts must divide the tp x ep = {tp * ep} devices, got hosts={hosts}")
        self.profile, self.shape = profile, shape
        self.calibration = calibration or load_calibration(profile.name)
        if self.calibration.device != profile.name:
            raise ValueError(f"calibration is for {self.calibration.device!r}, not {profile.name!r}")
        self.itemsize, self.kv_itemsize, self.tp, self.ep, self.hosts = itemsize, kv_itemsize, tp, ep, hosts
        per_host = tp * ep // hosts
        self._tp_crosses_hosts = tp > per_host
        self._ep_crosses_hosts = hosts > 1 and ep > 1
        s = shape
        self._kv_shards = min(tp, s.num_kv_heads)
        self.kv_bytes_per_token = s.kv_bytes_per_token(kv_itemsize) / self._kv_shards  # per device
        # Per device, per token: matmul FLOPs outside attention scores and the LM head.
        self._token_flops = 2 * s.num_layers * (s.dense_layer_params / tp
                                                + s.num_experts_per_tok * s.expert_params / (tp * ep))
        self._pair_flops = 4 * s.num_layers * s.num_heads * s.head_dim / tp  # QK^T and PV per (query, key)

    def describe(self) -> dict:
        """What a result file should record about the modelled device."""
        return {"device": self.profile.name, "model_shape": dataclasses.asdict(self.shape),
                "itemsize": self.itemsize, "kv_itemsize": self.kv_itemsize, "tp": self.tp, "ep": self.ep,
                "hosts": self.hosts,
                "profile": dataclasses.asdict(self.profile), "calibration": self.calibration.to_json(),
                "calibrated_from_gpu_run": self.calibration.measured}

    def weight_bytes_read(self, num_tokens: int) -> float:
        s = self.shape
        experts = s.experts_touched(num_tokens) / self.ep if s.num_experts > 1 else 1.0
        per_layer = s.dense_layer_params / self.tp + experts * s.expert_params / self.tp
        return self.itemsize * (s.num_layers * per_layer + s.lm_head_params / self.tp)

    def memory_s(self, work: StepWork) -> float:
        kv = (work.kv_tokens + work.num_tokens) * self.kv_bytes_per_token
        total = self.weight_bytes_read(work.padded_tokens) + kv
        return total / (self.profile.memory_bps * self.calibration.memory_efficiency)

    def compute_s(self, work: StepWork) -> float:
        s = self.shape
        flops = (work.padded_tokens * self._token_flops + work.attention_pairs * self._pair_flops
                 + 2 * work.num_sampled * s.lm_head_params / self.tp)
        return flops / (self.profile.bf16_flops * self.calibration.compute_efficiency)

    def collective_s(self, work: StepWork) -> float:
        """Tensor parallelism: two all-reduces of the hidden states per layer (ring: 2(n-1)/n of the data
        per device); expert parallelism: the routed tokens' dispatch and combine (all-to-all). Over NVLink
        within a host; a group that spans hosts over the network, plus its latency per collective."""
        s, n = self.shape, work.padded_tokens
        seconds = 0.0
        if self.tp > 1:
            moved = 2 * s.num_layers * 2 * (self.tp - 1) / self.tp * n * s.hidden_size * self.itemsize
            seconds += self._over(moved, 2 * s.num_layers, self._tp_crosses_hosts)
        if self.ep > 1:
            routed = n * s.num_experts_per_tok * s.hidden_size * self.itemsize
            moved = 2 * s.num_layers * (self.ep - 1) / self.ep * routed
            seconds += self._over(moved, 2 * s.num_layers, self._ep_crosses_hosts)
        return seconds

    def _over(self, moved: float, collectives: int, across_hosts: bool) -> float:
        efficiency = self.calibration.interconnect_efficiency
        if not across_hosts:
            return moved / (self.profile.interconnect_bps * efficiency)
        return moved / (self.profile.network_bps * efficiency) + collectives * self.profile.network_latency_s

    def step_s(self, work: StepWork) -> float:
        """Seconds of one step (0 for an empty one)."""
        if work.padded_tokens == 0:
            return 0.0
        return (max(self.memory_s(work), self.compute_s(work)) + self.collective_s(work)
                + self.calibration.step_overhead_s)

    def swap_s(self, num_bytes: float) -> float:
        """Seconds to move ``num_bytes`` of KV between device and host memory (one direction)."""
        return num_bytes / (self.profile.host_link_bps * self.calibration.host_link_efficiency)
