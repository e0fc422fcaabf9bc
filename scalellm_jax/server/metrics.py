"""Prometheus metrics (``GET /metrics``), in a registry owned by one app, not the global one.

Latencies are measured where the client sees them: from the moment the HTTP request arrived to
the moment the event loop got the engine's output. The per-token ones are kept by the event loop
without locks (``loop_metrics``). Queue sizes, KV usage and preemptions are
read from the engine's latest stats snapshot at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from scalellm_jax.engine.boundary import EngineStats
from scalellm_jax.server.loop_metrics import LoopMetrics

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
            20.0, 40.0, 80.0)
_TOKEN_LATENCY = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                  0.4, 0.5, 0.75, 1.0, 2.5)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    def __init__(self, stats: Callable[[], EngineStats | None], simulated_device: str | None = None):
        """``simulated_device``: the engine runs on that simulated device; exported so no dashboard
        mistakes its numbers for a real device's."""
        self.registry = registry = CollectorRegistry()
        if simulated_device is not None:
            Info("scalellm_simulated_device", "The engine runs on a simulated device: latencies are modelled, "
                 "outputs are random tokens.", registry=registry).info({"device": simulated_device})
        self.ttft = Histogram("scalellm_time_to_first_token_seconds", "Time from request arrival to its first token.",
                              buckets=_LATENCY, registry=registry)
        per_token = LoopMetrics(registry)  # updated once per token of every stream: no lock per update
        self.itl = per_token.histogram("scalellm_inter_token_latency_seconds",
                                       "Time between consecutive output tokens.", _TOKEN_LATENCY)
        self.e2e = Histogram("scalellm_e2e_request_latency_seconds", "Time from request arrival to its last token.",
                             buckets=_LATENCY, registry=registry)
        self.queue_time = Histogram("scalellm_request_queue_time_seconds",
                                    "Time from submission to the engine until first scheduled.",
                                    buckets=_LATENCY, registry=registry)
        self.prompt_tokens = Counter("scalellm_prompt_tokens", "Prompt tokens of finished requests.",
                                     registry=registry)
        self.generation_tokens = per_token.counter("scalellm_generation_tokens", "Generated tokens.")
        self.requests = Counter("scalellm_requests_finished", "Finished engine requests, by finish reason.",
                                ["finish_reason"], registry=registry)
        # One per HTTP response, counted when its status line is sent (a stream's 200 included): the 4xx, 5xx and
        # 429 rates. ``route`` is the matched route's pattern ("unmatched" for 404s and 405s): its values are bounded.
        # A connection refused by --max-connections gets its 503 before any request exists: logged, not counted.
        self.http_responses = Counter("scalellm_http_responses", "HTTP responses sent, by status code and route.",
                                      ["code", "route"], registry=registry)
        registry.register(_EngineCollector(stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def count_response(self, request: web.BaseRequest, response: web.StreamResponse) -> None:
        resource = request.match_info.route.resource if isinstance(request, web.Request) else None
        route = resource.canonical if resource is not None else "unmatched"
        self.http_responses.labels(str(response.status), route).inc()

    def tracker(self, arrival: float) -> RequestTracker:
        return RequestTracker(self, arrival)


class RequestTracker:
    """Latency bookkeeping for one engine request (one choice of an HTTP request)."""

    __slots__ = ("_m", "_arrival", "_last", "_tokens")

    def __init__(self, metrics: ServerMetrics, arrival: float):
        self._m = metrics
        self._arrival = arrival
        self._last: float | None = None
        self._tokens = 0

    def on_output(self, num_tokens: int, queue_time: float | None, now: float) -> None:
        new = num_tokens - self._tokens
        if new <= 0:
            return
        self._m.generation_tokens.inc(new)
        if self._last is None:
            self._m.ttft.observe(now - self._arrival)
            if queue_time is not None:
                self._m.queue_time.observe(queue_time)
        else:  # several tokens in one output (a consumer that fell behind): spread the interval
            self._m.itl.observe((now - self._last) / new, new)
        self._tokens, self._last = num_tokens, now

    def on_finish(self, num_prompt_tokens: int, finish_reason: str | None, now: float) -> None:
        self._m.e2e.observe(now - self._arrival)
        self._m.prompt_tokens.inc(num_prompt_tokens)
        self._m.requests.labels(finish_reason or "unknown").inc()


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], EngineStats | None]):
        self._stats = stats

    def collect(self):
        s = self._stats()
        running, waiting = (s.num_running, s.num_waiting) if s else (0, 0)
        yield GaugeMetricFamily("scalellm_num_requests_running", "Requests in the running batch.", value=running)
        yield GaugeMetricFamily("scalellm_num_requests_waiting", "Requests waiting (new or preempted).",
                                value=waiting)
        yield GaugeMetricFamily("scalellm_num_requests_swapped", "Preempted requests whose KV is in host swap space.",
                                value=s.num_swapped if s else 0)
        yield GaugeMetricFamily("scalellm_kv_cache_usage_ratio", "Fraction of usable KV cache pages in use.",
                                value=s.kv_cache_usage if s else 0.0)
        yield GaugeMetricFamily("scalellm_kv_cache_pages_in_use", "KV cache pages held by requests.",
                                value=s.kv_pages_in_use if s else 0)
        # vLLM's names (vllm:prefix_cache_queries/hits): counted in tokens; hits / queries is the hit rate
        yield CounterMetricFamily("scalellm_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                  value=s.prefix_cache_queries if s else 0)
        yield CounterMetricFamily("scalellm_prefix_cache_hits", "Looked-up prompt tokens found in the prefix cache.",
                                  value=s.prefix_cache_hits if s else 0)
        yield GaugeMetricFamily("scalellm_kv_cache_pages_cached",
                                "KV cache pages in the prefix cache (held or reclaimable).",
                                value=s.kv_pages_cached if s else 0)
        yield CounterMetricFamily("scalellm_num_preemptions", "Requests preempted (KV dropped, recomputed later).",
                                  value=s.num_preemptions if s else 0)

    def describe(self):
        return list(self.collect())
