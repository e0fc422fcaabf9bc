"""torch runs the Hugging Face reference in tests. ``make test`` installs it where a CPU wheel is at hand
(Python 3.11 here); elsewhere the tests that need it skip, saying why."""

from __future__ import annotations

import pytest

TORCH_MISSING = "torch is not installed: the Hugging Face reference runs in it (make test installs it on Python 3.11)"


def require_torch():
    """The torch module, or a skip of the calling test."""
    return pytest.importorskip("torch", reason=TORCH_MISSING)
