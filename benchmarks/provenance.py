"""Provenance recorded with every benchmark result (the git commit, whether the tree was dirty, the CPU), and
where a new result goes.

Result policy: ``benchmarks/results/`` holds, in git, the runs the README cites (and the files they need);
every other run goes to ``benchmarks/runs/``, which git ignores. A run is recorded, written to
``benchmarks/results/``, only when asked: ``SCALELLM_RECORD=1`` in the environment, for every benchmark
alike (an explicit ``--out`` wins over both). A recorded run is then cited in the README, or deleted."""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import subprocess

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"  # recorded runs, in git
RUNS = ROOT / "benchmarks" / "runs"  # every other run, ignored by git
RECORD_ENV = "SCALELLM_RECORD"


def recording() -> bool:
    """Whether this run is to be recorded (``SCALELLM_RECORD`` set to anything but empty or 0)."""
    return os.environ.get(RECORD_ENV, "") not in ("", "0")


def output_dir() -> pathlib.Path:
    """The folder a new result goes to by default (see the module docstring), created if missing."""
    folder = RESULTS if recording() else RUNS
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def git_state() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=ROOT).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "uncommitted", "dirty": None, "changes": []}
    try:
        changes = [line[3:] for line in git("status", "--porcelain").splitlines() if line.strip()]
    except (OSError, subprocess.CalledProcessError):
        changes = None
    return {"commit": commit, "dirty": bool(changes) if changes is not None else None,
            "changes": changes if changes is None else changes[:50]}


def cpu_description() -> dict:
    """What decides CPU matmul speed: the model name and the vector/matrix extensions present."""
    from scalellm_jax.cpu_features import host_cpu

    model, flags = host_cpu()
    return {"machine": platform.machine(), "cpu_count": os.cpu_count(), "model": model,
            "extensions": sorted(f for f in flags if f.startswith(("avx", "amx")) or f in ("fma", "f16c"))}


def write_result(name: str, result: dict, out: pathlib.Path | None = None) -> pathlib.Path:
    """Write ``result`` as JSON to ``out`` (default ``output_dir()/<name>-<local time>.json``)."""
    out = out or output_dir() / f"{name}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return out
