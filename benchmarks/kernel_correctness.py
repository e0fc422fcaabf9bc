"""On-device correctness of our paged attention kernels against the jnp reference (``benchmarks.kernels``).

Inputs are built to catch what a GPU compile can break and the interpreter tests may not: random page
tables, every page slot no sequence owns poisoned (NaN for float pages; garbage int8 with NaN scales),
table entries past a sequence pointing at poisoned pages or -1, a zero-length row, lengths at page
edges, NaN query padding rows. A row passes when its output is finite, within the dtype's relative
error of the reference, and exactly zero where no key is visible.
"""

from __future__ import annotations

import functools
import time

import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from benchmarks import kernel_tuning
from benchmarks.kernels import TOL, Costs, Plan, Shapes, attempt, budget_allows
from pallas_kernels import reference
from pallas_kernels.testing import PagedKV, make_paged_kv


def poisoned_cache(rng, lengths, shapes: Shapes, int8: bool) -> PagedKV:
    """K/V for sequences of ``lengths`` tokens in shuffled pages whose unused slots are poisoned
    (``pallas_kernels.testing``: NaN in float pages; garbage int8 values with NaN scales)."""
    kv_dtype = "int8" if int8 else jnp.dtype(shapes.dtype).name
    return make_paged_kv(rng, lengths, num_kv_heads=shapes.kv_heads, head_dim=shapes.head_dim,
                         page_size=shapes.page, kv_dtype=kv_dtype)


def _queries(rng, rows: int, shapes: Shapes, nan_rows: int = 0):
    q = rng.normal(size=(rows + nan_rows, shapes.heads, shapes.head_dim)).astype(np.float32)
    q[rows:] = np.nan
    return jnp.asarray(q, shapes.dtype)


# ---------------------------------------------------------------------------------------------- correctness


def correctness_inputs(rng, kernel: str, shapes: Shapes, int8: bool, window: int | None):
    """``(args, kwargs, rows that must be exactly zero)`` of one correctness case."""
    p = shapes.page
    if kernel == "decode":
        lengths = [0, 1, p - 1, p, p + 1, 2 * p + 1, 7 * p + 3, 64 * p]  # empty row, page edges, long
        cache = poisoned_cache(rng, lengths, shapes, int8)
        q = _queries(rng, len(lengths), shapes)
        args = (q, cache.k_pages, cache.v_pages, cache.page_table, jnp.asarray(lengths, jnp.int32))
        return args, {"sliding_window": window, **cache.scales}, [i for i, n in enumerate(lengths) if n == 0]
    # (new tokens, total kv length): an empty row, one token, a page, chunks after a cached prefix, many tiles
    seqs = [(0, 0), (1, 1), (p, p), (p + 1, 3 * p + 2), (5, 2 * p + 5), (9 * p + 6, 12 * p + 1)]
    cache = poisoned_cache(rng, [kv for _, kv in seqs], shapes, int8)
    total, pad = sum(n for n, _ in seqs), 5
    q = _queries(rng, total, shapes, nan_rows=pad)  # NaN batch padding must come back as zeros
    cu = jnp.asarray(np.concatenate([[0], np.cumsum([n for n, _ in seqs])]), jnp.int32)
    kv_lengths = jnp.asarray([kv for _, kv in seqs], jnp.int32)
    args = (q, cache.k_pages, cache.v_pages, cache.page_table, kv_lengths, cu)
    return args, {"sliding_window": window, **cache.scales}, list(range(total, total + pad))


def compare(out, ref, zero_rows, tol: float) -> dict:
    o, r = np.asarray(out).astype(np.float64), np.asarray(ref).astype(np.float64)
    nonfinite = int((~np.isfinite(o)).sum())
    rel = float(np.linalg.norm(o - r) / max(np.linalg.norm(r), 1e-30)) if nonfinite == 0 else float("inf")
    zeros_ok = bool(np.all(o[zero_rows] == 0)) if zero_rows else True
    return {"rel_err": rel, "nonfinite": nonfinite, "zero_rows_ok": zeros_ok,
            "pass": nonfinite == 0 and rel <= tol and zeros_ok}


def correctness_cases(plan: Plan) -> list[tuple[str, str, tuple[str, ...]]]:
    """(kernel, KV case, tuning configs): the default tuning on bf16, int8 and sliding-window KV first,
    then every other configuration on bf16 KV."""
    cases = [(kernel, case, ("default",)) for kernel in ("decode", "prefill") for case in ("bf16", "int8", "window")]
    return cases + [("decode", "bf16", tuple(c for c in plan.decode_configs if c != "default")),
                    ("prefill", "bf16", tuple(c for c in plan.prefill_configs if c != "default"))]


def correctness(rng, plan: Plan, interpret: bool, *, rows: list, cases=None, deadline=None, rec=None,
                fallback_s=5.0) -> None:
    """Append one row per (kernel, case, tuning config) of ``cases`` (default: ``correctness_cases``) to ``rows``."""
    shapes, tol = plan.shapes, TOL[plan.shapes.dtype]
    window = 3 * shapes.page + 5  # cuts pages mid-way, shorter than the long rows
    cases = correctness_cases(plan) if cases is None else cases
    costs = Costs(fallback_s)
    for kernel, case, names in cases:
        if not names:
            continue
        tuning = kernel_tuning.DECODE if kernel == "decode" else kernel_tuning.PREFILL
        ours = pk.paged_decode_attention if kernel == "decode" else pk.ragged_prefill_attention
        oracle = reference.paged_decode_attention if kernel == "decode" else reference.ragged_prefill_attention
        if not budget_allows(f"correctness {kernel}/{case}", costs, deadline, rec):
            continue
        args, kwargs, zero_rows = correctness_inputs(rng, kernel, shapes, case == "int8",
                                                     window if case == "window" else None)
        ref, err = attempt(functools.partial(oracle, *args, scale=shapes.scale, **kwargs))
        for name in names:
            if not budget_allows(f"correctness {kernel}/{case}/{name}", costs, deadline, rec):
                continue
            start = time.monotonic()
            row = {"kernel": kernel, "case": case, "config": name}
            if err is None:
                out, row_err = attempt(functools.partial(ours, *args, scale=shapes.scale, interpret=interpret,
                                                         **kwargs, **tuning[name]))
                row.update({"error": row_err, "pass": False} if row_err else compare(out, ref, zero_rows, tol))
            else:
                row.update(error=f"reference: {err}", **{"pass": False})
            costs.add(time.monotonic() - start)
            rows.append(row)
            print(f"  correctness {kernel:7} {case:6} {name:16} "
                  + ("PASS" if row["pass"] else "FAIL") + f"  rel_err {row.get('rel_err', float('nan')):.2e}"
                  + (f"  {row['error']}" if row.get("error") else ""), flush=True)
            if rec is not None:
                rec.save()
