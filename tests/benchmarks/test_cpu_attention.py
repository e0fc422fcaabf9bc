"""``benchmarks.cpu_attention``: the quick run end to end; every variant matches the reference."""

from __future__ import annotations

import json

import pytest

from benchmarks import cpu_attention as bench


@pytest.mark.slow
def test_quick_run_times_every_variant_and_checks_it(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "PREFILL_MIXES", {k: bench.PREFILL_MIXES[k] for k in list(bench.PREFILL_MIXES)[-1:]})
    monkeypatch.setattr(bench, "DECODE_CONTEXTS", {"skewed": [9] * 63 + [70]})
    out = tmp_path / "r.json"
    assert bench.main(["--quick", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["git"]["commit"] and record["command"] == f"python -m benchmarks.cpu_attention --quick --out {out}"
    (row,) = record["prefill_512_tokens"]
    assert set(row["ms"]) == set(bench.PREFILL_VARIANTS)
    assert all(err < 1e-4 for err in row["max_abs_err_vs_reference"].values())
    (decode,) = record["decode_64_rows"]
    assert set(decode["ms"]) == {f"{b}-page blocks" for b in bench.DECODE_BLOCKS} and decode["context"] == "skewed"
    assert all(err < 1e-4 for err in decode["max_abs_err_vs_reference"].values())
