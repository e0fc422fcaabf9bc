"""Provenance recorded with every benchmark result: the git commit and whether the tree was dirty."""

from __future__ import annotations

import pathlib
import subprocess

ROOT = pathlib.Path(__file__).resolve().parent.parent


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
