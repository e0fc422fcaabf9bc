"""Host swap: moving a preempted request's KV pages between the device pools and host memory.

The scheduler decides *which* pages move (``SwapOp``s, accounted in ``KVManager``); this module
moves the bytes. A swap-out gathers the request's pages from every layer's pools in one jitted
call, optionally compressing float pages to int8 with one scale per (head, token) (the same
absmax scheme as int8 KV pools, ``pallas_kernels.kv_cache``), and copies them to host memory.
A swap-in scatters them back into the pages the request was given on readmission.

Shapes are bucketed by page count (powers of two up to ``max_pages_per_seq``) and compiled at
warmup, so swapping compiles nothing while serving. Padding entries of a swap-in point past the
pool and are dropped by the scatter, so they write nothing anywhere.

Exactness: without compression (or with int8 pools, whose bytes move as they are) a resumed
request continues from bit-identical KV, so it produces exactly the tokens it would have.
``compress=True`` on float pools halves (bf16) or quarters (float32) host memory and transfer
at the cost of int8 rounding error in the resumed request's KV (at most max|x|/254 per element).
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.kv_cache import dequantize_int8, quantize_int8
from scalellm_jax.engine.buckets import bucket_for
from scalellm_jax.model.kv_pool import LayerKV

logger = logging.getLogger(__name__)


def _gather(pools, page_ids, *, compress: bool):
    """Every layer's pools at ``page_ids`` (page axis 1), float pages int8-compressed if asked."""
    out = []
    for layer in pools:
        taken = jax.tree.map(lambda a: a[:, page_ids], layer)
        if compress and not layer.quantized:
            (kq, ks), (vq, vs) = (quantize_int8(a.astype(jnp.float32)) for a in (taken.k_pages, taken.v_pages))
            taken = LayerKV(kq, vq, ks, vs)
        out.append(taken)
    return tuple(out)


def _scatter(pools, page_ids, data):
    """``pools`` with ``data`` (as produced by ``_gather``) written at ``page_ids``; ids past the pool are dropped."""
    out = []
    for layer, saved in zip(pools, data, strict=True):
        if saved.quantized and not layer.quantized:  # compressed float pages
            saved = LayerKV(dequantize_int8(saved.k_pages, saved.k_scales, layer.k_pages.dtype),
                            dequantize_int8(saved.v_pages, saved.v_scales, layer.v_pages.dtype))
        out.append(jax.tree.map(lambda a, s: a.at[:, page_ids].set(s.astype(a.dtype), mode="drop"), layer, saved))
    return tuple(out)


def page_bytes(pools, compress: bool) -> int:
    """Host bytes one swapped page takes, over all layers."""
    total = 0
    for layer in pools:
        for a in jax.tree.leaves(layer):
            per_page = a.size // a.shape[1] * a.dtype.itemsize
            if compress and not layer.quantized:  # int8 values plus a float32 scale per (head, token)
                per_page = a.size // a.shape[1] + a.size // a.shape[1] // a.shape[-1] * 4
            total += per_page
    return total


class KVSwapper:
    """Device↔host copies of whole pages, with the host copies kept per request id."""

    def __init__(self, num_pages: int, page_buckets: tuple[int, ...], *, compress: bool):
        self.num_pages = num_pages
        self.compress = compress
        self.buckets = page_buckets  # page counts a swap is padded up to (the largest: max pages per request)
        # partial: a distinct callable per swapper, so its jit cache (and compile count) is its own
        self._gather = jax.jit(functools.partial(_gather, compress=compress))
        self._scatter = jax.jit(functools.partial(_scatter), donate_argnums=(0,))
        # request id → (page count, per layer a LayerKV of numpy or in-flight device arrays)
        self._host: dict[str, tuple] = {}
        self._in_flight: list[str] = []
        self.num_swap_outs = 0
        self.num_swap_ins = 0

    def swap_out(self, pools, request_id: str, pages: tuple[int, ...]) -> None:
        """Start copying ``pages`` (in sequence order) of every layer to host memory.

        Dispatched before the step that may reuse the pages; JAX orders the step's in-place
        writes after this read. ``finish_transfers`` later turns the copies into numpy arrays.
        """
        n = len(pages)
        ids = np.zeros(bucket_for(n, self.buckets), np.int32)  # pad with the null page: read, then sliced off
        ids[:n] = pages
        data = self._gather(pools, ids)
        for leaf in jax.tree.leaves(data):
            leaf.copy_to_host_async()
        self._host[request_id] = (n, data)
        self._in_flight.append(request_id)
        self.num_swap_outs += 1

    @property
    def has_in_flight(self) -> bool:
        """Swap-outs dispatched and not yet landed in host memory."""
        return bool(self._in_flight)

    def finish_transfers(self) -> None:
        """Bring swapped-out pages into numpy (trimmed to their real page count), freeing device memory."""
        for request_id in self._in_flight:
            if request_id in self._host:
                n, data = self._host[request_id]
                self._host[request_id] = (n, jax.tree.map(lambda a, n=n: _to_host(a, n), data))
        self._in_flight.clear()

    def swap_in(self, pools, request_id: str, pages: tuple[int, ...]):
        """Write a request's swapped pages into ``pages`` of every layer; returns the new pools (donated)."""
        n, data = self._host.pop(request_id)
        if len(pages) != n:
            raise ValueError(f"{request_id!r} swapped {n} pages out but {len(pages)} come back")
        bucket = bucket_for(n, self.buckets)
        ids = np.full(bucket, self.num_pages, np.int32)  # past the pool: dropped by the scatter
        ids[:n] = pages
        data = jax.tree.map(lambda a: _pad_pages(a, n, bucket), data)
        self.num_swap_ins += 1
        return self._scatter(pools, ids, data)

    def drop(self, request_id: str) -> None:
        """Forget a request's host copy (it was aborted while swapped out)."""
        self._host.pop(request_id, None)

    @property
    def num_swapped(self) -> int:
        return len(self._host)

    def warmup(self, pools):
        """Compile every bucket's gather and scatter; returns the pools (unchanged in content)."""
        for bucket in self.buckets:
            data = self._gather(pools, np.zeros(bucket, np.int32))
            pools = self._scatter(pools, np.full(bucket, self.num_pages, np.int32), data)
        jax.block_until_ready(pools)
        return pools

    def num_compilations(self) -> int:
        return self._gather._cache_size() + self._scatter._cache_size()


@dataclasses.dataclass(frozen=True)
class LocalShards:
    """The host copy of a swapped array that spans other processes' devices (a multi-process engine):
    this process's shards only, each trimmed to the real page count; the other processes hold theirs."""

    sharding: jax.sharding.Sharding
    shape: tuple[int, ...]  # the global shape, page axis trimmed
    shards: tuple[tuple[jax.Device, np.ndarray], ...]

    def padded(self, bucket: int) -> jax.Array:
        """Back on the devices, as one global array with ``bucket`` pages (zero-padded)."""
        shape = (self.shape[0], bucket, *self.shape[2:])
        arrays = [jax.device_put(_pad_host(data, bucket), device) for device, data in self.shards]
        return jax.make_array_from_single_device_arrays(shape, self.sharding, arrays)


def _to_host(a: jax.Array, n: int):
    """``a``'s first ``n`` pages in host memory: numpy, or this process's shards of an array spanning processes."""
    if a.is_fully_addressable:
        return np.asarray(a)[:, :n]
    shards = tuple((s.device, np.asarray(s.data)[:, :n]) for s in a.addressable_shards)
    return LocalShards(a.sharding, (a.shape[0], n, *a.shape[2:]), shards)


def _pad_host(a: np.ndarray, bucket: int) -> np.ndarray:
    pad = [(0, 0)] * a.ndim
    pad[1] = (0, bucket - a.shape[1])
    return np.pad(a, pad)


def _pad_pages(a, n: int, bucket: int):
    """Pad the page axis (1) of a host or device array from ``n`` to ``bucket`` entries."""
    if isinstance(a, LocalShards):
        return a.padded(bucket)
    if a.shape[1] == bucket:
        return a
    if isinstance(a, np.ndarray):
        return _pad_host(a, bucket)
    return a  # still the padded device array of the swap-out (swapped out and in within one step)
