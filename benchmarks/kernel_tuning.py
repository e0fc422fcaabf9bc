"""The tuning configurations of our Pallas attention kernels that the kernel benchmark sweeps.

One list, read by ``benchmarks.kernels`` (speed on a GPU) and ``benchmarks.gpu_compile_check``
(every configuration compiled for the H200 in CI), so a configuration the benchmark can time is
always one that compiles. Each entry is a name and the keyword arguments it passes to the kernel;
``{}`` is the heuristic default the engine uses.
"""

from __future__ import annotations

# Only configurations that compile for the H200 without register spills (make gpu-compile-check). Dropped
# because ptxas spills them on sm_90a: decode CUDA-core tiles of 2+ pages (pages_per_block 2/4/8); prefill
# block_q 64, pages_per_block 8, 4 warps at block_q 32, pages_per_block 2 with 4 warps
# (gpu_compile_check-jax0.11.2-20261202-171445.json, before they were dropped).

# paged_decode_attention: flash-decoding splits, CUDA-core vs padded-MMA GQA rows, pages per loop step
# (MMA tiles only), warps.
DECODE: dict[str, dict] = {
    "default": {},
    "mma": {"use_mma": True},
    "splits1": {"num_splits": 1},
    "splits4": {"num_splits": 4},
    "splits8": {"num_splits": 8},
    "warps8": {"num_warps": 8},
    "mma_ppb4": {"use_mma": True, "pages_per_block": 4},
    "mma_warps8": {"use_mma": True, "num_warps": 8},
    "mma_ppb8_warps8": {"use_mma": True, "pages_per_block": 8, "num_warps": 8},
}

# ragged_prefill_attention: tokens per tile (times the GQA group = matmul rows), pages per KV step,
# pipeline stages.
PREFILL: dict[str, dict] = {
    "default": {},
    "bq16": {"block_q": 16},
    "ppb2": {"pages_per_block": 2},
    "stages3": {"num_stages": 3},
    "bq16_stages3": {"block_q": 16, "num_stages": 3},
}
