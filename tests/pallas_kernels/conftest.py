"""Fixtures for the kernel tests: a fresh random generator per test, with its seed reported."""

from __future__ import annotations

import os
import secrets

import numpy as np
import pytest


@pytest.fixture
def rng(request):
    """New seed every run; set PALLAS_TEST_SEED=<n> to replay one printed by a failure."""
    seed = int(os.environ.get("PALLAS_TEST_SEED") or secrets.randbits(32))
    request.node.user_properties.append(("seed", seed))
    print(f"{request.node.nodeid}: seed={seed} (replay with PALLAS_TEST_SEED={seed})")
    return np.random.default_rng(seed)
