"""One small served engine for all server tests, and HTTP servers around it in background threads.

The engine is the ``tiny`` preset (random weights, real Mixtral tokenizer) with few shape buckets
and a short context, so warmup takes seconds and every generation is short.
"""

from __future__ import annotations

import pytest
from server_helpers import ENGINE, MODEL

from scalellm_jax.server import ServedModel, ServerConfig, create_app
from scalellm_jax.server.background import BackgroundServer


@pytest.fixture(scope="session")
def served():
    from scalellm_jax import LLM
    from scalellm_jax.engine.async_engine import AsyncEngine

    llm = LLM("tiny", dtype="float32", **ENGINE)
    model = ServedModel.wrap(MODEL, AsyncEngine(llm.engine), llm.tokenizer)
    yield model
    model.engine.shutdown()


@pytest.fixture(scope="session")
def server(served):
    """The default server: no API key, a queue deep enough for every test."""
    with BackgroundServer(create_app(ServerConfig(model_name=MODEL, max_queued_requests=512), served)) as running:
        yield running


@pytest.fixture
def make_server(served):
    """``make_server(served=..., **ServerConfig fields)`` → a started server, stopped after the test."""
    started = []

    def make(model=served, **config):
        app = create_app(ServerConfig(model_name=MODEL, **config), model)
        started.append(BackgroundServer(app).start())
        return started[-1]

    yield make
    for running in started:
        running.stop()
