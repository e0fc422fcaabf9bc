"""The host CPU's model name and instruction-set flags (Linux ``/proc/cpuinfo``).

XLA:CPU's matmul libraries differ in speed by extension (AVX2 only, AVX-512, AVX-512 BF16, AMX): the
engine's CPU compile choices (``engine.step_program.PlatformChoices``) and every CPU benchmark result
depend on them.
"""

from __future__ import annotations

import functools
import pathlib


@functools.lru_cache(maxsize=1)
def host_cpu() -> tuple[str | None, frozenset[str]]:
    """(model name, flags) of the first CPU; (None, no flags) where ``/proc/cpuinfo`` is unreadable."""
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return None, frozenset()
    model = None
    for line in text.splitlines():
        if line.startswith("model name") and model is None:
            model = line.split(":", 1)[1].strip()
        elif line.startswith("flags"):
            return model, frozenset(line.split(":", 1)[1].split())
    return model, frozenset()
