"""The host CPU's model name and instruction-set extensions (Linux ``/proc/cpuinfo``).

XLA:CPU's matmul libraries differ in speed by extension (AVX2 only, AVX-512, AVX-512 BF16, AMX), so
every CPU benchmark result depends on them (benchmarks.provenance records them).
"""

from __future__ import annotations

import functools
import pathlib


@functools.lru_cache(maxsize=1)
def cpu_model_and_flags() -> tuple[str | None, frozenset[str]]:
    """(model name, flags) of the first CPU; (None, empty) where ``/proc/cpuinfo`` is unreadable."""
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return None, frozenset()
    model, flags = None, frozenset()
    for line in text.splitlines():
        if line.startswith("model name") and model is None:
            model = line.split(":", 1)[1].strip()
        elif line.startswith("flags"):
            flags = frozenset(line.split(":", 1)[1].split())
            break
    return model, flags


def vector_extensions(flags: frozenset[str]) -> list[str]:
    """The flags that decide matmul speed: AVX*, AMX, FMA, F16C."""
    return sorted(f for f in flags if f.startswith(("avx", "amx")) or f in ("fma", "f16c"))
