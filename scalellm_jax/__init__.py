"""ScaleLLM-JAX: a JAX serving engine for Mixtral-class mixture-of-experts models."""

from scalellm_jax.config import PRESETS, ConfigError, ModelConfig, preset
from scalellm_jax.generate import generate
from scalellm_jax.loader import Model, load

__all__ = ["PRESETS", "ConfigError", "Model", "ModelConfig", "generate", "load", "preset"]
