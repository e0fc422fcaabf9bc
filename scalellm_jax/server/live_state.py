"""``GET /state``: the server's state now, as a small JSON document (what the playground's live panel polls).

The same numbers ``/metrics`` exports, read from the engine's latest stats snapshot and the event loop's own
counters, without rendering the whole Prometheus exposition: a browser tab polling it costs the event loop one
small JSON body per poll. Like ``/metrics`` it needs no API key (it says nothing that ``/metrics`` does not).
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, Field


class RequestCounts(BaseModel):
    running: int = Field(description="requests in the running batch")
    waiting: int = Field(description="requests waiting (new or preempted)")
    swapped: int = Field(description="preempted requests whose KV is in host swap space")


class KVCacheState(BaseModel):
    usage: float = Field(description="fraction of the usable KV cache pages in use (0..1)")
    pages_in_use: int = Field(description="KV cache pages held by requests (0 once every request ended)")
    pages_cached: int = Field(description="pages in the prefix cache, held or reclaimable")


class PrefixCacheState(BaseModel):
    queries: int = Field(description="prompt tokens looked up in the prefix cache since start")
    hits: int = Field(description="of those, tokens found cached")
    hit_rate: float | None = Field(description="hits / queries; null before any lookup (or with prefix caching off)")


class ServerStateView(BaseModel):
    status: Literal["ok", "loading", "shutting down", "engine stopped"] = Field(
        description="what GET /health says, in words")
    model: str
    simulated_device: str | None = Field(None, description="the engine runs on this simulated device")
    time: float = Field(description="Unix time of this snapshot")
    max_num_seqs: int | None = Field(description="the running batch's size limit (null while loading)")
    requests: RequestCounts
    kv_cache: KVCacheState
    prefix_cache: PrefixCacheState
    preemptions: int = Field(description="requests preempted since start")
    generation_tokens: int = Field(description="tokens generated since start (the rate is the difference between "
                                               "two snapshots over their time difference)")


def snapshot(*, model: str, simulated_device: str | None, served, draining: bool,
             generation_tokens: float) -> ServerStateView:
    """The state now of a server for ``model`` whose loaded model is ``served`` (None while loading), with
    its metrics' ``generation_tokens`` (call on the event loop: the per-token counters belong to it)."""
    stats = served.engine.stats if served is not None else None
    if draining:
        status = "shutting down"
    elif served is None:
        status = "loading"
    elif served.engine.error is not None:
        status = "engine stopped"
    else:
        status = "ok"
    queries = stats.prefix_cache_queries if stats else 0
    hits = stats.prefix_cache_hits if stats else 0
    return ServerStateView(
        status=status, model=model, simulated_device=simulated_device,
        time=time.time(), max_num_seqs=served.info.max_num_seqs if served is not None else None,
        requests=RequestCounts(running=stats.num_running if stats else 0, waiting=stats.num_waiting if stats else 0,
                               swapped=stats.num_swapped if stats else 0),
        kv_cache=KVCacheState(usage=stats.kv_cache_usage if stats else 0.0,
                              pages_in_use=stats.kv_pages_in_use if stats else 0,
                              pages_cached=stats.kv_pages_cached if stats else 0),
        prefix_cache=PrefixCacheState(queries=queries, hits=hits, hit_rate=hits / queries if queries else None),
        preemptions=stats.num_preemptions if stats else 0,
        generation_tokens=int(generation_tokens),
    )
