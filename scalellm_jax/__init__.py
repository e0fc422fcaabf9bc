"""ScaleLLM-JAX: a JAX serving engine for Mixtral-class mixture-of-experts models."""

from scalellm_jax.config import PRESETS, ConfigError, EngineConfig, ModelConfig, preset
from scalellm_jax.engine.llm import LLM
from scalellm_jax.engine.request import SamplingParams
from scalellm_jax.generate import generate
from scalellm_jax.loader import Model, load

__all__ = [
    "LLM",
    "PRESETS",
    "ConfigError",
    "EngineConfig",
    "Model",
    "ModelConfig",
    "SamplingParams",
    "generate",
    "load",
    "preset",
]
