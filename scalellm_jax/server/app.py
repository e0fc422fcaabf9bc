"""The aiohttp application: routes, API-key check, error bodies, readiness.

The app starts without a model (``/health`` answers 503 while it loads) and serves once
``ServerState.ready`` is called. Handlers never block the event loop: tokenization runs in a
thread pool and the engine in its own thread. Run it through ``start_runner``: a client that
disconnects then cancels its handler, which aborts its engine requests, so their KV pages are freed
at the engine's next step.
"""

from __future__ import annotations

import hmac
import importlib.metadata
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web
from pydantic import ValidationError

from scalellm_jax.server import live_state, protocol
from scalellm_jax.server.body import read_json_body
from scalellm_jax.server.config import ServerConfig
from scalellm_jax.server.connections import limit_connections
from scalellm_jax.server.errors import APIError, from_validation_error
from scalellm_jax.server.generation import Generator
from scalellm_jax.server.loading import ServedModel
from scalellm_jax.server.metrics import CONTENT_TYPE, ServerMetrics
from scalellm_jax.server.openapi import openapi_document
from scalellm_jax.server.playground import Playground

logger = logging.getLogger(__name__)
try:
    _VERSION = importlib.metadata.version("scalellm-jax")
except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
    _VERSION = "0+unknown"


class ServerState:
    """What the routes serve: nothing until the model is ready, then one ``ServedModel``."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.served: ServedModel | None = None
        self.generator: Generator | None = None
        self.draining = False  # shutting down: /health is 503 and no new request is admitted
        self.executor = ThreadPoolExecutor(config.tokenizer_threads, thread_name_prefix="scalellm-tokenize")
        self.metrics = ServerMetrics(lambda: self.served.engine.stats if self.served else None,
                                     simulated_device=config.simulated_device)

    def ready(self, served: ServedModel) -> None:
        if served.name != self.config.model_name:
            raise ValueError(f"served model {served.name!r} is not the configured {self.config.model_name!r}")
        if served.simulated_device != self.config.simulated_device:
            raise ValueError(f"served model runs on simulated device {served.simulated_device!r}, "
                             f"configured {self.config.simulated_device!r}")
        limit = served.info.max_num_seqs + self.config.max_queued_requests
        self.generator = Generator(served, self.metrics, self.executor, limit, self.config.retry_after_s,
                                   self.config.stream_interval_s)
        self.served = served

    def begin_drain(self) -> Generator | None:
        """Shutdown starts: ``/health`` turns 503 (a load balancer stops sending here) and new generation
        requests get 503 with Retry-After; those in flight go on. Returns the generator, if the model loaded."""
        self.draining = True
        if self.generator is not None:
            self.generator.closing = True
        return self.generator

    def live_generator(self) -> Generator:
        if self.generator is None:
            raise APIError(503, "the model is still loading; GET /health turns 200 when it is ready")
        if self.served.engine.error is not None:  # what failed is in the log, never in a response
            raise APIError(503, "the engine stopped after an internal error; the server must be restarted")
        return self.generator


class _OncePerName:
    """One warning per unknown field name (vLLM's behaviour), for at most ``limit`` names: a client that
    sends made-up names cannot flood the log or grow this set without bound."""

    def __init__(self, limit: int = 100):
        self._seen: set[str] = set()
        self._limit = limit

    def warn(self, name: str, path: str) -> None:
        if name in self._seen or len(self._seen) > self._limit:
            return
        self._seen.add(name)
        if len(self._seen) > self._limit:
            logger.warning("more than %d unknown request fields seen; no more are logged", self._limit)
        else:
            logger.warning("ignoring unknown field %r in a request to %s (this server does not know it)",
                           name[:100], path)


_UNKNOWN_FIELDS = _OncePerName()

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
    app.router.add_get("/v1/models/{model_id:.+}", _model)
    app.router.add_post("/tokenize", _tokenize)
    app.router.add_post("/detokenize", _detokenize)
    app.router.add_get("/tokenizer_info", _tokenizer_info)
    app.router.add_get("/version", _version)
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/openapi.json", _openapi)
    app.router.add_get("/state", _state)
    Playground().add_routes(app)
    app.on_response_prepare.append(_count_response)
    app.on_cleanup.append(_cleanup)
    if config.allowed_origins:
        _enable_cors(app, config)
    return app


async def start_runner(app: web.Application, access_log: logging.Logger | None = None) -> web.AppRunner:
    """The app's runner, set up as every server here runs it: a client that disconnects cancels its handler
    (which aborts its engine requests, freeing their KV pages), and the ServerConfig's idle timeout and
    connection cap apply. Cleanup waits 1 s for handlers: ``shutdown.drain`` has let them finish before.
    A refused request's unread body is drained for at most 2 s (aiohttp's lingering close, 10 s by default,
    which lets the client read the refusal) before the connection closes. An app without a ServerState (a
    test's scripted app) gets ServerConfig's defaults."""
    state = app.get(STATE)
    config = state.config if state is not None else ServerConfig(model_name="")
    runner = web.AppRunner(app, handler_cancellation=True, access_log=access_log,
                           keepalive_timeout=config.keepalive_timeout_s, shutdown_timeout=1.0, lingering_time=2.0)
    await runner.setup()
    limit_connections(runner.server, config.max_connections, config.retry_after_s)
    return runner


def _enable_cors(app: web.Application, config: ServerConfig) -> None:
    """CORS on every route for the configured origins (preflight answered by aiohttp-cors): a browser app on
    one of them may call the API, and read its errors too."""
    import aiohttp_cors

    options = aiohttp_cors.ResourceOptions(allow_credentials=config.allow_credentials, expose_headers="*",
                                           allow_headers="*", allow_methods="*", max_age=600)
    cors = aiohttp_cors.setup(app, defaults={origin: options for origin in config.allowed_origins})
    for route in list(app.router.routes()):
        cors.add(route)


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
    except Exception:
        logger.exception("unhandled error in %s %s", request.method, request.path)
        return APIError(500, "internal error (logged by the server)").response()


_GUARDED = ("/v1/", "/tokenize", "/detokenize", "/tokenizer_info")


def _auth_middleware(api_key: str | None):
    expected = None if api_key is None else api_key.encode()

    @web.middleware
    async def check(request: web.Request, handler):
        # A CORS preflight (OPTIONS) never carries credentials: browsers send them with the request that follows.
        if expected is not None and request.path.startswith(_GUARDED) and request.method != "OPTIONS":
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            # constant time (no key-guessing by timing); the scheme's name is case-insensitive (RFC 9110)
            if not (hmac.compare_digest(token.strip().encode(), expected) & (scheme.lower() == "bearer")):
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
    req = await _parse(request, schema)
    generator = request.app[STATE].live_generator()
    generator.check_model(req)
    with generator.admit(req.num_engine_requests()):
        job = await (generator.chat_job(req) if chat else generator.completion_job(req))
        return await generator.run(job, request, arrival)


def _card(served: ServedModel) -> protocol.ModelCard:
    return protocol.ModelCard(id=served.name, created=served.created, max_model_len=served.max_model_len,
                              simulated_device=served.simulated_device)


async def _models(request: web.Request) -> web.Response:
    served = request.app[STATE].live_generator().served
    body = protocol.ModelList(data=[_card(served)]).model_dump_json(exclude_none=True)
    return web.Response(body=body, content_type="application/json")


async def _model(request: web.Request) -> web.Response:
    served = request.app[STATE].live_generator().served
    model_id = request.match_info["model_id"]
    if model_id != served.name:
        raise APIError(404, f"model: unknown model {model_id!r}; this server serves {served.name!r}", param="model")
    return web.Response(body=_card(served).model_dump_json(exclude_none=True), content_type="application/json")


async def _parse(request: web.Request, schema):
    raw = await read_json_body(request, request.app[STATE].config.request_read_timeout_s)
    try:
        req = schema.model_validate_json(raw)
    except ValidationError as exc:
        raise from_validation_error(exc) from None
    unimplemented = req.unimplemented_field()
    if unimplemented is not None:
        raise APIError(400, unimplemented[1], param=unimplemented[0])
    for name in req.unknown_fields():
        _UNKNOWN_FIELDS.warn(name, request.path)
    return req


async def _parse_tokenizer_request(request: web.Request, schema):
    """A /tokenize or /detokenize body and the generator; as in vLLM, ``model`` may be left out."""
    req = await _parse(request, schema)
    generator = request.app[STATE].live_generator()
    if req.model is not None:
        generator.check_model(req)
    return req, generator


async def _tokenize(request: web.Request) -> web.Response:
    """vLLM's ``/tokenize``: the ids a completion's prompt (or chat messages) would become."""
    req, generator = await _parse_tokenizer_request(request, protocol.TokenizeRequest)
    ids = await generator.tokenize(req)
    strs = [generator.served.tokenizer.decode([t]) for t in ids] if req.return_token_strs else None
    body = protocol.TokenizeResponse(count=len(ids), max_model_len=generator.served.max_model_len, tokens=ids,
                                     token_strs=strs)
    return web.Response(body=body.model_dump_json(), content_type="application/json")


async def _detokenize(request: web.Request) -> web.Response:
    req, generator = await _parse_tokenizer_request(request, protocol.DetokenizeRequest)
    text = await generator.detokenize(req.tokens)
    return web.Response(body=protocol.DetokenizeResponse(prompt=text).model_dump_json(),
                        content_type="application/json")


async def _tokenizer_info(request: web.Request) -> web.Response:
    """vLLM's ``/tokenizer_info``, which lm-eval's ``tokenizer_backend=remote`` reads before it tokenizes through
    ``/tokenize``. Special tokens are left out: ``/tokenize`` encodes text, so it could not turn their names
    back into their ids; the chat template is applied here, never sent."""
    served = request.app[STATE].live_generator().served
    return _json({"tokenizer_class": type(served.tokenizer).__name__, "vocab_size": served.tokenizer.vocab_size,
                  "model_max_length": served.max_model_len, "bos_token": None, "eos_token": None,
                  "pad_token": None, "chat_template": None})


async def _version(request: web.Request) -> web.Response:
    return _json({"version": _VERSION})


async def _health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.draining:
        return _json({"status": "shutting down"}, 503)
    if state.served is None:
        return _json({"status": "loading"}, 503)
    if state.served.engine.error is not None:  # the error itself is in the log, not for anyone who asks
        return _json({"status": "engine stopped"}, 503)
    return _json({"status": "ok"})


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[STATE].metrics.render(), headers={"Content-Type": CONTENT_TYPE})


async def _state(request: web.Request) -> web.Response:
    state = request.app[STATE]
    view = live_state.snapshot(model=state.config.model_name, simulated_device=state.config.simulated_device,
                               served=state.served, draining=state.draining,
                               generation_tokens=state.metrics.generation_tokens.value)
    return web.Response(body=view.model_dump_json(), content_type="application/json")


async def _count_response(request: web.Request, response: web.StreamResponse) -> None:
    request.app[STATE].metrics.count_response(request, response)


async def _openapi(request: web.Request) -> web.Response:
    return _json(request.app[OPENAPI])
