"""Fixtures for checkpoints_tools tests (helpers live in ckpt_helpers.py)."""

from __future__ import annotations

import pytest
from ckpt_helpers import build_hf


@pytest.fixture
def hf_checkpoint(tmp_path):
    """``hf_checkpoint(name, **build_hf kwargs) -> (folder, torch model)``."""

    def make(name: str = "hf", **kwargs):
        folder = tmp_path / name
        return folder, build_hf(folder, **kwargs)

    return make


@pytest.fixture(scope="module")
def base_hf(tmp_path_factory):
    """One float32 legacy checkpoint per module, to copy and break."""
    folder = tmp_path_factory.mktemp("base") / "hf"
    build_hf(folder)
    return folder
