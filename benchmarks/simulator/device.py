"""Step times for the scheduler simulator from the device cost model (``--device``), not a CPU calibration.

``DeviceSteps`` has the interface ``replay`` uses of ``StepTimes`` (``geometry``, ``step_s(out)``,
``decode_buckets``, ``with_seats``): a step's time is ``DeviceCostModel.step_s`` of its ``StepWork``
(each scheduled row's new tokens and context after the step; the matmuls padded to the engine's
shape bucket for the step: a decode step's row bucket, a mixed step's token bucket, as
``StepShapes`` and ``SimulatedRunner.prepare`` pad them), plus the time to move the step's swapped
pages over the host link (pages × one page's bytes at the swap's dtype: ``--swap-compression int8``
moves int8 pages).

The KV pool is the engine's own memory plan (``plan_memory`` over ``gpu_memory_utilization`` 0.9 of
the device's memory, bfloat16 weights, int8 pages with ``--kv-cache-dtype int8``), or ``--kv-gib``
GiB of pages; host swap pages are ``--swap-space-gb`` over the swapped page's bytes, as the engine
sizes them. Nothing here ran on a GPU: the device is modelled (``DeviceCostModel.describe()`` says
where its figures come from; the calibrations are datasheet figures and assumed efficiencies until a
GPU run refits them).
"""

from __future__ import annotations

import dataclasses

from benchmarks.simulator.calibration import Geometry
from device_models import DEVICES, MODELS, DeviceCostModel, StepWork, device_profile, model_shape
from scalellm_jax.engine.buckets import bucket_for
from scalellm_jax.engine.scheduler import SchedulerOutput
from scalellm_jax.engine.step_program import StepShapes

GIB = 2**30
GPU_MEMORY_UTILIZATION = 0.9  # EngineConfig's default
KV_DTYPES = {"bf16": 2, "int8": 1}  # --kv-cache-dtype → bytes per value
DEVICE_GEOMETRY = Geometry(page_size=16, max_num_seqs=256, max_num_batched_tokens=2048, max_model_len=4096)

__all__ = ["DEVICES", "DEVICE_GEOMETRY", "KV_DTYPES", "MODELS", "DeviceSteps", "device_steps"]


@dataclasses.dataclass(frozen=True)
class DeviceSteps:
    """Modelled seconds per scheduler step on a device (see the module docstring)."""

    geometry: Geometry
    cost: DeviceCostModel
    swap_page_bytes: int  # host bytes of one swapped page (at the swap's dtype)
    memory: dict  # the KV pool's provenance: the memory plan, or --kv-gib
    num_pages: int
    num_host_pages: int

    @property
    def shapes(self) -> StepShapes:
        g = self.geometry
        return StepShapes(g.max_num_seqs, g.max_num_batched_tokens, g.max_pages_per_seq)

    @property
    def decode_buckets(self) -> tuple[int, ...]:
        return self.shapes.seq_buckets

    def __post_init__(self):
        shapes = self.shapes
        object.__setattr__(self, "_seq_buckets", shapes.seq_buckets)
        object.__setattr__(self, "_token_buckets", shapes.token_buckets)

    def with_seats(self, max_num_seqs: int | None) -> DeviceSteps:
        if max_num_seqs is None or max_num_seqs == self.geometry.max_num_seqs:
            return self
        if not 1 <= max_num_seqs <= self.geometry.max_num_batched_tokens:
            raise ValueError(f"--max-num-seqs must be in [1, {self.geometry.max_num_batched_tokens}] "
                             "(at most the per-step token budget)")
        return dataclasses.replace(self, geometry=dataclasses.replace(self.geometry, max_num_seqs=max_num_seqs))

    def work(self, out: SchedulerOutput) -> StepWork:
        """The step's work as the engine would run it (padded to its shape bucket)."""
        scheduled = out.scheduled
        num_tokens = out.num_batched_tokens
        decode_only = num_tokens == len(scheduled)
        padded = (bucket_for(len(scheduled), self._seq_buckets) if decode_only
                  else bucket_for(num_tokens, self._token_buckets))
        return StepWork.of_rows([(s.num_new_tokens, s.end) for s in scheduled],
                                num_sampled=sum(s.needs_sample for s in scheduled), padded_tokens=padded)

    def swap_s(self, out: SchedulerOutput) -> float:
        pages = sum(len(op.pages) for op in (*out.swap_out, *out.swap_in))
        return self.cost.swap_s(pages * self.swap_page_bytes) if pages else 0.0

    def step_s(self, out: SchedulerOutput) -> float:
        """Modelled seconds of the step ``out`` plans, its swaps included (swaps queue before the step)."""
        if not out.scheduled:
            return self.swap_s(out)
        return self.cost.step_s(self.work(out)) + self.swap_s(out)

    def describe(self) -> dict:
        return {"modelled": "a device cost model (device_models), not a GPU run; see cost_model.calibration "
                            "for which figures are datasheet and which assumed",
                "cost_model": self.cost.describe(), "memory": self.memory,
                "swap_page_bytes": self.swap_page_bytes, "num_pages": self.num_pages,
                "num_host_pages": self.num_host_pages,
                "decode_buckets": list(self.decode_buckets), "token_buckets": list(self._token_buckets)}


def device_steps(device: str, model: str, *, kv_cache_dtype: str = "bf16", geometry: Geometry = DEVICE_GEOMETRY,
                 kv_gib: float | None = None, num_pages: int | None = None, swap_space_gb: float = 4.0,
                 swap_compression: str = "none") -> DeviceSteps:
    """``DeviceSteps`` for ``model`` on ``device`` with the engine's memory plan (``ValueError`` naming the
    flag when something does not fit)."""
    from scalellm_jax.config import ConfigError, EngineConfig, ModelConfig
    from scalellm_jax.engine.kv_manager import KVManager
    from scalellm_jax.engine.memory import page_bytes_per_device, plan_memory

    profile, shape = device_profile(device), model_shape(model)
    if kv_cache_dtype not in KV_DTYPES:
        raise ValueError(f"--kv-cache-dtype must be one of {list(KV_DTYPES)}, got {kv_cache_dtype!r}")
    if swap_compression not in ("none", "int8"):
        raise ValueError(f"--swap-compression must be none or int8, got {swap_compression!r}")
    kv_itemsize = KV_DTYPES[kv_cache_dtype]
    config = ModelConfig(**dataclasses.asdict(shape), max_position_embeddings=max(geometry.max_model_len, 32768))
    g = geometry
    try:
        engine = EngineConfig(page_size=g.page_size, max_num_seqs=g.max_num_seqs,
                              max_num_batched_tokens=g.max_num_batched_tokens, max_model_len=g.max_model_len,
                              kv_cache_dtype="int8" if kv_cache_dtype == "int8" else "auto",
                              gpu_memory_utilization=GPU_MEMORY_UTILIZATION, swap_space_gb=swap_space_gb,
                              swap_compression=swap_compression)
        budget = int(GPU_MEMORY_UTILIZATION * profile.memory_bytes)
        plan = plan_memory(config, engine, dtype="bfloat16", budget_bytes=budget,
                           max_pages_per_seq=g.max_pages_per_seq)
    except ConfigError as exc:
        raise ValueError(f"--model {model} on --device {device}: {exc}") from None
    memory = {"memory_plan": plan.describe(), "budget_bytes": budget, "weights_bytes": plan.weights_bytes,
              "workspace_bytes": plan.workspace_bytes, "page_bytes": plan.page_bytes,
              "planned_num_pages": plan.num_pages, "gpu_memory_utilization": GPU_MEMORY_UTILIZATION,
              "kv_cache_dtype": kv_cache_dtype}
    pages = plan.num_pages
    if kv_gib is not None and num_pages is not None:
        raise ValueError("--kv-gib and --num-pages: give one of them")
    if kv_gib is not None:
        pages = int(kv_gib * GIB) // plan.page_bytes
        if pages > plan.num_pages:
            raise ValueError(f"--kv-gib {kv_gib}: the memory plan leaves only {plan.kv_bytes / GIB:.2f} GiB for KV "
                             f"on {device} ({plan.describe()})")
        memory["source"] = f"--kv-gib {kv_gib}: {pages} pages of {plan.page_bytes} bytes"
    elif num_pages is not None:
        pages = num_pages
        memory["source"] = f"--num-pages {num_pages}"
    else:
        memory["source"] = "the engine's memory plan (plan_memory)"
    kv = KVManager(max(pages, 2), g.page_size, g.max_pages_per_seq)
    if kv.num_usable_pages - kv.watermark_pages < g.max_pages_per_seq:  # the scheduler's per-request check
        raise ValueError(f"--kv-gib/--num-pages: {pages} pages cannot hold one request of max_model_len "
                         f"{g.max_model_len} ({g.max_pages_per_seq} pages plus the null page and the watermark)")
    swap_bytes = page_bytes_per_device(config, g.page_size, 1 if swap_compression == "int8" else kv_itemsize, 1)
    host_pages = int(swap_space_gb * GIB) // swap_bytes
    cost = DeviceCostModel(profile, shape, itemsize=2, kv_itemsize=kv_itemsize)
    return DeviceSteps(g, cost, swap_bytes, memory, pages, host_pages)
