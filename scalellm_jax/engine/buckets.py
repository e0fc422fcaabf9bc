"""Shape buckets: the sizes a step's batch (or a swap's page count) is padded up to, so that
serving compiles one executable per bucket at warmup and nothing afterwards."""

from __future__ import annotations


def pow2_buckets(lo: int, hi: int) -> tuple[int, ...]:
    """Powers of two from ``lo`` up to (and always including) ``hi``."""
    sizes, size = [], lo
    while size < hi:
        sizes.append(size)
        size *= 2
    return (*sizes, hi)


def step_buckets(lo: int, hi: int, fine_from: int) -> tuple[int, ...]:
    """``pow2_buckets(lo, hi)`` plus the 1.5× powers of two (24, 48, 96, ...) from ``fine_from`` up."""
    fine = {3 * p // 2 for p in pow2_buckets(lo, hi) if p >= fine_from and p & (p - 1) == 0}
    return tuple(sorted(set(pow2_buckets(lo, hi)) | {n for n in fine if lo <= n < hi}))


def bucket_for(n: int, buckets: tuple[int, ...]) -> int:
    for size in buckets:
        if n <= size:
            return size
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")
