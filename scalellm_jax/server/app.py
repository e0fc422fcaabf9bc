"""The aiohttp application: routes, API-key check, error bodies, readiness.

The app starts without a model (``/health`` answers 503 while it loads) and serves once
``ServerState.ready`` is called. Handlers never block the event loop: tokenization runs in a
thread pool and the engine in its own thread. Run it with ``handler_cancellation=True`` (as
``run_server`` does): a client that disconnects cancels its handler, which aborts its engine
requests, so their KV pages are freed at the engine's next step.
"""

from __future__ import annotations

import hmac
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web
from pydantic import ValidationError

from scalellm_jax.server import protocol
from scalellm_jax.server.config import ServerConfig
from scalellm_jax.server.errors import APIError, from_validation_error
from scalellm_jax.server.generation import Generator
from scalellm_jax.server.loading import ServedModel
from scalellm_jax.server.metrics import CONTENT_TYPE, ServerMetrics
from scalellm_jax.server.openapi import openapi_document

logger = logging.getLogger(__name__)


class ServerState:
    """What the routes serve: nothing until the model is ready, then one ``ServedModel``."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.served: ServedModel | None = None
        self.generator: Generator | None = None
        self.executor = ThreadPoolExecutor(config.tokenizer_threads, thread_name_prefix="scalellm-tokenize")
        self.metrics = ServerMetrics(lambda: self.served.engine.stats if self.served else None,
                                     simulated_device=config.simulated_device)

    def ready(self, served: ServedModel) -> None:
        if served.name != self.config.model_name:
            raise ValueError(f"served model {served.name!r} is not the configured {self.config.model_name!r}")
        if served.simulated_device != self.config.simulated_device:
            raise ValueError(f"served model runs on simulated device {served.simulated_device!r}, "
                             f"configured {self.config.simulated_device!r}")
        limit = served.engine.engine.config.max_num_seqs + self.config.max_queued_requests
        self.generator = Generator(served, self.metrics, self.executor, limit, self.config.retry_after_s,
                                   self.config.stream_interval_s)
        self.served = served

    def live_generator(self) -> Generator:
        if self.generator is None:
            raise APIError(503, "the model is still loading; GET /health turns 200 when it is ready")
        if self.served.engine.error is not None:
            raise APIError(503, f"the engine stopped: {self.served.engine.error!r}")
        return self.generator


STATE = web.AppKey("scalellm_state", ServerState)
OPENAPI = web.AppKey("scalellm_openapi", dict)


def create_app(config: ServerConfig, served: ServedModel | None = None) -> web.Application:
    state = ServerState(config)
    if served is not None:
        state.ready(served)
    app = web.Application(middlewares=[_errors_middleware, _auth_middleware(config.api_key)],
                          client_max_size=16 * 2**20)
    app[STATE] = state
    app[OPENAPI] = openapi_document(config.model_name, secured=config.api_key is not None)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/openapi.json", _openapi)
    app.on_cleanup.append(_cleanup)
    return app


def _json(body: dict, status: int = 200) -> web.Response:
    return web.json_response(body, status=status)


async def _cleanup(app: web.Application) -> None:
    app[STATE].executor.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------------------------------------- middleware


@web.middleware
async def _errors_middleware(request: web.Request, handler):
    """Every error leaves as an OpenAI-style JSON body; an unexpected one is a 500, never a dead server."""
    try:
        return await handler(request)
    except APIError as exc:
        return exc.response()
    except web.HTTPException as exc:  # aiohttp's own: unknown route (404), wrong method (405), body too large
        if exc.status < 400:
            raise
        return APIError(exc.status, exc.reason, headers={k: v for k, v in exc.headers.items()
                                                         if k.lower() == "allow"}).response()
    except ConnectionResetError:
        raise  # the client is gone: nothing to answer
    except Exception as exc:
        logger.exception("unhandled error in %s %s", request.method, request.path)
        return APIError(500, f"internal error: {exc!r}").response()


def _auth_middleware(api_key: str | None):
    expected = None if api_key is None else f"Bearer {api_key}".encode()

    @web.middleware
    async def check(request: web.Request, handler):
        if expected is not None and request.path.startswith("/v1/"):
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):  # constant time: no key-guessing by timing
                raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                               headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    return check


# ---------------------------------------------------------------------------------------------- routes


async def _completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, protocol.CompletionRequest, chat=False)


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, protocol.ChatCompletionRequest, chat=True)


async def _generate(request: web.Request, schema, chat: bool) -> web.StreamResponse:
    arrival = time.monotonic()
    body = await request.read()
    try:
        req = schema.model_validate_json(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from None
    generator = request.app[STATE].live_generator()
    generator.check_model(req)
    with generator.admit(req.num_engine_requests()):
        job = await (generator.chat_job(req) if chat else generator.completion_job(req))
        return await generator.run(job, request, arrival)


async def _models(request: web.Request) -> web.Response:
    served = request.app[STATE].live_generator().served
    card = protocol.ModelCard(id=served.name, created=served.created, max_model_len=served.max_model_len,
                              simulated_device=served.simulated_device)
    body = protocol.ModelList(data=[card]).model_dump_json(exclude_none=True)
    return web.Response(body=body, content_type="application/json")


async def _health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.served is None:
        return _json({"status": "loading"}, 503)
    if state.served.engine.error is not None:
        return _json({"status": "engine stopped", "error": repr(state.served.engine.error)}, 503)
    return _json({"status": "ok"})


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[STATE].metrics.render(), headers={"Content-Type": CONTENT_TYPE})


async def _openapi(request: web.Request) -> web.Response:
    return _json(request.app[OPENAPI])
