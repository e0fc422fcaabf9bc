"""``benchmarks.engine_profile.StepProfile`` wraps engine methods by name: every name must still exist.

The profile runs only in the torch-backed offline-throughput smoke run, so a renamed engine method
would otherwise surface only on the leg that has torch.
"""

from __future__ import annotations

from benchmarks.engine_profile import StepProfile
from scalellm_jax.engine.engine import LLMEngine
from scalellm_jax.engine.runner import ModelRunner
from scalellm_jax.engine.scheduler import Scheduler

OWNER_CLASSES = {"": LLMEngine, "scheduler": Scheduler, "runner": ModelRunner}


def test_every_profiled_phase_is_a_method_of_its_owner():
    for owner, name, _ in StepProfile.PHASES:
        assert callable(getattr(OWNER_CLASSES[owner], name, None)), f"{OWNER_CLASSES[owner].__name__}.{name}"
    assert callable(LLMEngine.step)


def test_report_keys_are_the_phase_keys():
    assert {key for _, _, key in StepProfile.PHASES} == {"schedule", "prepare", "execute", "update", "output"}
