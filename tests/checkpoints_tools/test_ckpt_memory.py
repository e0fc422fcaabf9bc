"""Peak memory of the convert CLI stays near one stacked tensor, far below the model size."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ckpt_helpers import bits_equal, build_big_legacy_checkpoint

REPO = Path(__file__).resolve().parents[2]
MB = 2**20


def peak_rss(code: str) -> int:
    """Run ``code`` in a fresh interpreter that prints its own peak RSS; return bytes.

    The peak is VmHWM from /proc/self/status, not ``getrusage().ru_maxrss``: Linux carries the
    *parent's* high-water mark across fork+exec into ru_maxrss, so a child of this (large, torch-
    importing) pytest process would report pytest's size. VmHWM belongs to the new address space.
    """
    wrapper = code + (
        "\nimport re\n"
        "print('MAXRSS', re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1))\n"
    )
    # glibc keeps freed memory in per-thread arenas (tensorstore writes from many threads); how much
    # depends on the core count, not on our code. Two arenas make the number about our streaming.
    env = {**os.environ, "PYTHONPATH": str(REPO), "MALLOC_ARENA_MAX": "2"}
    proc = subprocess.run([sys.executable, "-c", wrapper], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("MAXRSS")][-1]
    return int(line.split()[1]) * 1024


@pytest.mark.slow
def test_convert_peak_memory_is_bounded(tmp_path):
    hf, out = tmp_path / "hf", tmp_path / "out"
    layers, hidden, inter, experts = 12, 256, 704, 8
    model_bytes = build_big_legacy_checkpoint(hf, layers=layers, hidden=hidden, inter=inter, experts=experts)
    largest = experts * hidden * inter * 4  # one stacked expert param, float32
    assert model_bytes >= 200 * MB and largest * 30 < model_bytes

    baseline = peak_rss("import checkpoints_tools.convert")
    peak = peak_rss(
        "import sys\nfrom checkpoints_tools.convert import main\n"
        f"assert main(['--hf', {str(hf)!r}, '--out', {str(out)!r}, '--no-progress']) == 0"
    )
    grown = peak - baseline
    print(f"model {model_bytes / MB:.0f} MB, largest tensor {largest / MB:.1f} MB, "
          f"baseline {baseline / MB:.0f} MB, peak {peak / MB:.0f} MB, grown {grown / MB:.0f} MB")
    assert grown < 3 * largest + 64 * MB
    assert grown < model_bytes / 3

    # and the result is right (spot check one stacked param against its HF source)
    from scalellm_jax.checkpoints.orbax_io import ParamReader
    from scalellm_jax.checkpoints.safetensors_io import HFCheckpoint

    ckpt, reader = HFCheckpoint(hf), ParamReader(out)
    w_down = reader(("layers_7", "moe", "w_down"))
    want = np.stack([ckpt.read(f"model.layers.7.block_sparse_moe.experts.{e}.w2.weight").T for e in range(experts)])
    assert bits_equal(w_down, want)
