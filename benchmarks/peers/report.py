"""Figures of a peer run: greedy agreement between engines, and paired ratios with their spread.

Repeats alternate the engines' order, and a ratio is taken within one repeat (the same minutes of
the same machine), so drift that slows every engine alike cancels; the spread over repeats is kept.
"""

from __future__ import annotations

import itertools
import statistics


def agreement(first_tokens: dict[str, list[list[int]]], tokens: int) -> dict[str, float]:
    """Per engine pair ``"a/b"``: the fraction of prompts whose first ``tokens`` answer tokens agree."""
    out = {}
    for a, b in itertools.combinations(sorted(first_tokens), 2):
        x, y = first_tokens[a], first_tokens[b]
        if len(x) != len(y):
            raise ValueError(f"{a} answered {len(x)} prompts, {b} {len(y)}")
        out[f"{a}/{b}"] = sum(p[:tokens] == q[:tokens] for p, q in zip(x, y, strict=True)) / len(x)
    return out


def spread(values: list[float]) -> dict:
    """Median, min and max of ``values`` (None when empty), with the values themselves."""
    if not values:
        return {"median": None, "min": None, "max": None, "values": []}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def paired_ratios(runs: list[dict], key: str, ours: str = "ours", group: tuple[str, ...] = ()) -> dict:
    """``ours``'s ``key`` over each other engine's, within each repeat (and ``group`` fields), with spread.

    ``runs``: dicts with ``engine``, ``repeat``, the ``group`` fields and ``key``. Returns
    ``{"<group values>": {"<engine>": spread}}``, the group key joined by ``/`` ("" without groups);
    a peer never measured in the same repeat as ``ours`` (or a run without ``ours``) has no entry.
    """
    return _paired(runs, key, ours, group, lambda a, b: a / b)


def paired_differences(runs: list[dict], key: str, ours: str = "ours", group: tuple[str, ...] = ()) -> dict:
    """As :func:`paired_ratios`, with ``ours - peer`` (e.g. milliseconds of TTFT added)."""
    return _paired(runs, key, ours, group, lambda a, b: a - b)


def _paired(runs: list[dict], key: str, ours: str, group: tuple[str, ...], compare) -> dict:
    table: dict[tuple, dict[int, dict[str, float]]] = {}
    for r in runs:
        if r.get(key) is not None:
            table.setdefault(tuple(r[g] for g in group), {}).setdefault(r["repeat"], {})[r["engine"]] = r[key]
    out = {}
    for g, repeats in sorted(table.items(), key=lambda kv: tuple(map(str, kv[0]))):
        peers = sorted({e for by_engine in repeats.values() for e in by_engine} - {ours})
        values = {peer: [compare(by[ours], by[peer]) for _, by in sorted(repeats.items()) if ours in by and peer in by]
                  for peer in peers}
        out["/".join(map(str, g))] = {peer: spread(v) for peer, v in values.items() if v}
    return out


def rotated(engines: list[str], repeat: int) -> list[str]:
    """The engines in the order repeat ``repeat`` runs them: each repeat starts one later."""
    k = repeat % len(engines)
    return engines[k:] + engines[:k]
