"""The H200 compile check: its log parsing (always), and that it fails on an oversized block and on a
register spill (where the CUDA plugin is installed: ``make gpu-compile-check`` runs this file with it)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from benchmarks import gpu_compile_check as check

PTXAS_LOG = """\
I1202 16:27:15.844939    2743 subprocess_compilation.cc:356] ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'paged_decode_attention' for 'sm_90a'
ptxas info    : Function properties for paged_decode_attention
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 153 registers, used 1 barriers
I1202 16:27:15.856784    2744 subprocess_compilation.cc:356] ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'input_reduce_fusion_4' for 'sm_90a'
ptxas info    : Function properties for input_reduce_fusion_4
    8 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers
"""
THUNKS = (
    "001: kCustomKernel [source | next=002 (1)] loop_clamp_fusion grid: [32, 1, 1] threads: [128, 1, 1]  "
    "shared_memory: 0 bytes\n"
    "002: kCustomKernel [prev=001 (1) | sink] paged_decode_attention grid: [64, 8, 1] threads: [128, 1, 1]  "
    "shared_memory: 4096 bytes\n"
)


def test_ptxas_report_gives_registers_and_spills_per_kernel():
    kernels = check.parse_ptxas(PTXAS_LOG)
    assert kernels["paged_decode_attention"].registers == 153
    assert kernels["paged_decode_attention"].spill_stores == 0
    assert (kernels["input_reduce_fusion_4"].registers, kernels["input_reduce_fusion_4"].spill_loads) == (40, 8)


def test_thunk_sequence_gives_shared_memory_per_kernel():
    assert check.parse_thunks(THUNKS) == {"loop_clamp_fusion": 0, "paged_decode_attention": 4096}


def _plugin_installed() -> bool:
    return any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") is not None for v in (12, 13)) if \
        importlib.util.find_spec("jax_plugins") is not None else False


needs_plugin = pytest.mark.skipif(not _plugin_installed(), reason="the CUDA plugin is not installed: "
                                  "make gpu-compile-check installs it and runs these tests")


def compile_kernel(kernel: str, n: int, tuning: dict) -> dict:
    """One kernel compiled for the H200 in a fresh process (XLA's logging is configured before jax loads)."""
    code = ("import json, sys; from benchmarks.gpu_compile_check import compile_one_kernel; "
            f"print('ROW' + json.dumps(compile_one_kernel({kernel!r}, 'bf16', {n}, {tuning!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          cwd=check.ROOT)
    rows = [line[3:] for line in done.stdout.splitlines() if line.startswith("ROW")]
    assert rows, done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads(rows[0])


@needs_plugin
@pytest.mark.slow
def test_default_prefill_compiles_and_reports_registers_and_shared_memory():
    row = compile_kernel("ragged_prefill", 2048, {})
    assert row["error"] is None
    assert 0 < row["registers"] <= 255 and 0 < row["shared_memory_bytes"] <= 232448


@needs_plugin
@pytest.mark.slow
def test_an_oversized_block_fails_on_shared_memory():
    row = compile_kernel("ragged_prefill", 2048, {"block_q": 128, "pages_per_block": 16})
    assert row["error"] and "Shared memory size limit exceeded" in row["error"]


@needs_plugin
@pytest.mark.slow
def test_a_register_spill_in_our_kernel_fails():
    row = compile_kernel("ragged_prefill", 2048, {"block_q": 64, "num_warps": 4})
    assert row["error"] and "register spill in ragged_prefill_attention" in row["error"]
    assert row["spills"]["ragged_prefill_attention"] > 0
