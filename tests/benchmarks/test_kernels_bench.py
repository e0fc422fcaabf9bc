"""The kernel benchmark's correctness check, its inputs, its sweep list and its deadline (fast: stand-in kernels)."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from benchmarks import gpu_suite, kernel_correctness, kernel_tuning, kernels
from benchmarks.deadline import Deadline, Recorder
from pallas_kernels import reference

PLAN = kernels.Plan(shapes=kernels.SMOKE, decode_configs=("default",), prefill_configs=("default",))


def stand_in(real, corrupt=None):
    """``real`` (a reference) with the kernels' signature (``interpret``, tuning knobs ignored), output
    passed through ``corrupt(out, args)``."""
    def fn(*args, interpret=False, **kwargs):
        kw = {k: v for k, v in kwargs.items() if k in ("scale", "sliding_window", "k_scales", "v_scales")}
        out = real(*args, **kw)
        return out if corrupt is None else corrupt(out, args)
    return fn


def test_poisoned_cache_poisons_every_slot_no_sequence_owns():
    rng = np.random.default_rng(0)
    shapes, lengths = kernels.SMOKE, [0, 1, 4, 5, 11]
    cache = kernel_correctness.poisoned_cache(rng, lengths, shapes, int8=False)
    k, table = np.asarray(cache.k_pages, np.float32), np.asarray(cache.page_table)
    owned = np.zeros(k.shape[1:3], bool)
    for s, n in enumerate(lengths):
        for t in range(n):
            owned[table[s, t // shapes.page], t % shapes.page] = True
    assert np.isfinite(k[:, owned]).all() and np.isnan(k[:, ~owned]).all()
    assert owned.sum() == sum(lengths) and (~owned).sum() >= 3 * shapes.page  # the spare pages
    q = kernel_correctness.poisoned_cache(rng, lengths, shapes, int8=True)
    assert q.k_pages.dtype == jnp.int8 and np.isnan(np.asarray(q.scales["k_scales"])).sum() > 0


@pytest.mark.parametrize("kernel", ["decode", "prefill"])
def test_correctness_fails_a_kernel_that_leaks_nan_or_writes_padding_rows(monkeypatch, kernel):
    rng = np.random.default_rng(0)
    name = "paged_decode_attention" if kernel == "decode" else "ragged_prefill_attention"
    real = getattr(reference, name)
    cases = [(kernel, "bf16", ("default",))]
    zero = kernel_correctness.correctness_inputs(rng, kernel, kernels.SMOKE, False, None)[2][0]  # empty or padding
    rows = []
    monkeypatch.setattr(pk, name, stand_in(real))
    kernel_correctness.correctness(rng, PLAN, True, rows=rows, cases=cases)
    assert rows[-1]["pass"] and rows[-1]["rel_err"] == 0  # the reference itself passes
    monkeypatch.setattr(pk, name, stand_in(real, lambda out, args: out.at[zero].set(jnp.nan)))
    kernel_correctness.correctness(rng, PLAN, True, rows=rows, cases=cases)
    assert not rows[-1]["pass"] and rows[-1]["nonfinite"] > 0
    monkeypatch.setattr(pk, name, stand_in(real, lambda out, args: out.at[zero].add(1.0)))
    kernel_correctness.correctness(rng, PLAN, True, rows=rows, cases=cases)
    assert not rows[-1]["pass"] and not rows[-1]["zero_rows_ok"] and rows[-1]["nonfinite"] == 0
    assert kernels.failures({"correctness": rows}) == [f"correctness {kernel}/bf16/default"] * 2


def test_the_sweep_times_every_tuning_configuration(monkeypatch):
    """``python -m benchmarks.kernels`` and stage 1 sweep the configurations of ``benchmarks.kernel_tuning``."""
    assert kernels.Plan().decode_configs == tuple(kernel_tuning.DECODE)
    assert kernels.Plan().prefill_configs == tuple(kernel_tuning.PREFILL)
    mixtral = gpu_suite.PRESETS["mixtral-8x7b"]
    assert mixtral.kernel_decode_configs == tuple(kernel_tuning.DECODE)
    assert mixtral.kernel_prefill_configs == tuple(kernel_tuning.PREFILL)
    monkeypatch.setattr(pk, "paged_decode_attention", stand_in(reference.paged_decode_attention))
    monkeypatch.setattr(kernels, "bundled", None)
    row = kernels.bench_decode(np.random.default_rng(0), 2, 32, True, 1e9, shapes=kernels.SMOKE)
    assert set(row["impls"]) == {"xla", "jax_bundled", *(f"ours/{c}" for c in kernel_tuning.DECODE)}
    assert all(row["impls"][f"ours/{c}"]["ok"] for c in kernel_tuning.DECODE)
    assert row["speedup_vs_xla"] > 0 and row["best"].startswith("ours/")


def test_an_expired_deadline_skips_the_sweep_and_records_it(tmp_path, monkeypatch):
    monkeypatch.setattr(pk, "ragged_prefill_attention", stand_in(reference.ragged_prefill_attention))
    rec = Recorder(tmp_path / "k.json", {})
    row = kernels.bench_prefill(np.random.default_rng(0), [8, 4], True, 1e12, shapes=kernels.SMOKE,
                                configs=("default", "bq16"), deadline=Deadline(0.0), rec=rec)
    assert row["impls"] == {name: {"skipped": "deadline"} for name in ("xla", "ours/default", "ours/bq16")}
    saved = json.loads((tmp_path / "k.json").read_text())
    assert [s["what"] for s in saved["skipped"]] == ["prefill 8+4 xla", "prefill 8+4 ours/default",
                                                     "prefill 8+4 ours/bq16"]
