"""The tuning configurations of our Pallas attention kernels that the kernel benchmark sweeps.

One list, read by ``benchmarks.kernels`` (speed on a GPU) and ``benchmarks.gpu_compile_check``
(every configuration compiled for the H200 in CI), so a configuration the benchmark can time is
always one that compiles. Each entry is a name and the keyword arguments it passes to the kernel;
``{}`` is the heuristic default the engine uses.
"""

from __future__ import annotations

# paged_decode_attention: pages per loop step, flash-decoding splits, CUDA-core vs padded-MMA
# GQA rows, warps.
DECODE: dict[str, dict] = {
    "default": {},
    "mma": {"use_mma": True},
    "ppb1": {"pages_per_block": 1},
    "ppb4": {"pages_per_block": 4},
    "ppb8": {"pages_per_block": 8},
    "splits1": {"num_splits": 1},
    "splits8": {"num_splits": 8},
    "warps8": {"num_warps": 8},
    "mma_ppb8_warps8": {"use_mma": True, "pages_per_block": 8, "num_warps": 8},
}

# ragged_prefill_attention: tokens per tile (times the GQA group = matmul rows), pages per KV
# step, warps, pipeline stages.
PREFILL: dict[str, dict] = {
    "default": {},
    "bq16": {"block_q": 16},
    "bq64": {"block_q": 64},
    "ppb2": {"pages_per_block": 2},
    "ppb8": {"pages_per_block": 8},
    "warps4": {"num_warps": 4},
    "stages3": {"num_stages": 3},
}
