"""Result files name the host CPU's model and the extensions that decide its matmul speed."""

from __future__ import annotations

import pathlib

from benchmarks.provenance import cpu_description


def test_the_cpu_description_lists_only_vector_extensions_the_host_has():
    info = cpu_description()
    assert info["cpu_count"] >= 1 and info["machine"]
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        assert info["extensions"] == []
        return
    flags = set(next(line for line in text.splitlines() if line.startswith("flags")).split(":", 1)[1].split())
    assert set(info["extensions"]) <= flags
    assert info["extensions"] == sorted(f for f in flags if f.startswith(("avx", "amx")) or f in ("fma", "f16c"))
    assert info["model"]
