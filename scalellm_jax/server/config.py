"""Server settings and the built-in demo model."""

from __future__ import annotations

import dataclasses
import math
import re

_ORIGIN = re.compile(r"https?://[^/\s:]+(:\d{1,5})?")

# `python -m scalellm_jax.server` without --model: the `tiny` Mixtral-architecture preset with random
# weights (seed 0) and the real Mixtral tokenizer. Its output is gibberish; every stage is real.
DEMO_PRESET = "tiny"
DEMO_MODEL_NAME = "mixtral-tiny-random-demo"
# Few shape buckets (1, 2, 4, 8, 16 sequences; 16, 32 tokens): warmup compiles each once (tens of
# seconds on a small CPU the first time; later starts reuse XLA's persistent compilation cache).
DEMO_ENGINE_OPTIONS = dict(max_num_seqs=16, max_num_batched_tokens=32, max_model_len=2048)


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """HTTP-side knobs (the engine's are ``EngineConfig``)."""

    model_name: str
    api_key: str | None = None  # /v1/* needs "Authorization: Bearer <api_key>" when set
    # Requests may wait beyond the engine's running slots (max_num_seqs); past that, HTTP 429.
    max_queued_requests: int = 1024
    retry_after_s: int = 1
    # Streams send at most one chunk per interval (0: one per engine step). A chunk then carries
    # every token generated since the last, which saves per-chunk work at high concurrency.
    stream_interval_s: float = 0.0
    tokenizer_threads: int = 2
    simulated_device: str | None = None  # said in /v1/models and /metrics: the outputs are not a model's
    # Browser origins allowed to call the API (CORS); none by default, "*" for any.
    allowed_origins: tuple[str, ...] = ()
    allow_credentials: bool = False  # CORS requests may carry cookies / HTTP auth (the origin is then echoed)
    # Shutdown: requests in flight get this long to finish after the first SIGTERM/SIGINT (Kubernetes sends
    # SIGKILL 30 s after SIGTERM by default).
    shutdown_grace_s: float = 30.0
    # An idle connection (between requests, or one still sending its request headers: aiohttp's timer runs
    # from the connection's start and from each response) is closed after this long.
    keepalive_timeout_s: float = 5.0
    request_read_timeout_s: float = 30.0  # a request body must arrive within this (else 408)
    max_connections: int = 4096  # open connections; a new one past this gets a 503 and is closed

    def __post_init__(self):
        for origin in self.allowed_origins:
            if origin != "*" and not _ORIGIN.fullmatch(origin):
                raise ValueError(f"allowed_origins: {origin!r} is not '*' or an origin like https://example.com[:port]")
        if self.allow_credentials and not self.allowed_origins:
            raise ValueError("allow_credentials: only with allowed_origins")
        if self.max_queued_requests < 0:
            raise ValueError(f"max_queued_requests must be >= 0, got {self.max_queued_requests}")
        if self.stream_interval_s < 0:
            raise ValueError(f"stream_interval_s must be >= 0, got {self.stream_interval_s}")
        if not (math.isfinite(self.shutdown_grace_s) and self.shutdown_grace_s >= 0):
            raise ValueError(f"shutdown_grace_s must be a finite number >= 0, got {self.shutdown_grace_s}")
        for name in ("keepalive_timeout_s", "request_read_timeout_s"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)}")
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {self.max_connections}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty")
