"""The OpenAI-compatible HTTP server (aiohttp): ``python -m scalellm_jax.server --help``."""

from scalellm_jax.server.app import ServerState, create_app
from scalellm_jax.server.config import ServerConfig
from scalellm_jax.server.loading import ServedModel, build_served_model

__all__ = ["ServedModel", "ServerConfig", "ServerState", "build_served_model", "create_app"]
