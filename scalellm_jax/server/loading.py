"""Building the served model: the engine (as ``LLM`` builds it, warmed up) in its own thread."""

from __future__ import annotations

import dataclasses
import logging
import time

from scalellm_jax.engine.async_engine import AsyncEngine
from scalellm_jax.engine.boundary import EngineInfo
from scalellm_jax.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ServedModel:
    """The model the server serves: the engine behind its thread, the tokenizer the server uses on its own
    side (the same the engine detokenizes with), and the engine's plain description (``EngineInfo``), which
    is all the server reads about the engine."""

    name: str
    engine: AsyncEngine
    tokenizer: Tokenizer
    info: EngineInfo
    created: int  # unix time, for /v1/models

    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len

    @property
    def simulated_device(self) -> str | None:
        """The engine runs on this simulated device (random output tokens); None on a real one."""
        return self.info.simulated_device

    @classmethod
    def wrap(cls, name: str, engine: AsyncEngine, tokenizer: Tokenizer) -> ServedModel:
        if tokenizer is None or not engine.info.has_tokenizer:
            raise ValueError("the served engine needs a tokenizer")
        return cls(name, engine, tokenizer, engine.info, int(time.time()))


def build_served_model(name: str, model: str, *, dtype: str, seed: int = 0, tensor_parallel_size: int = 1,
                       expert_parallel_size: int = 1, simulate_device: str | None = None,
                       simulate_lengths: str | None = None, **engine_options) -> ServedModel:
    """Load (or, for a preset name, randomly initialize) the model, warm the engine up, start its thread.
    ``simulate_device``/``simulate_lengths``: a simulated device instead (see ``LLM``).

    Raises ``OSError`` / ``ValueError`` (``ConfigError``) with one line naming the problem.
    """
    start = time.perf_counter()
    llm = build_llm(model, dtype=dtype, seed=seed, tensor_parallel_size=tensor_parallel_size,
                    expert_parallel_size=expert_parallel_size, simulate_device=simulate_device,
                    simulate_lengths=simulate_lengths, **engine_options)
    loaded = time.perf_counter()
    llm.engine.warmup(progress=False)
    logger.info("model %s loaded in %.1f s, engine warmed up (every step shape compiled) in %.1f s",
                name, loaded - start, time.perf_counter() - loaded)
    return ServedModel.wrap(name, AsyncEngine(llm.engine), llm.tokenizer)


def build_llm(model: str, **options):
    """The ``LLM`` every process of the server builds alike (``build_served_model``'s arguments), not warmed up:
    a multi-process leader's warmup runs on every process (``lockstep``)."""
    from scalellm_jax.engine.llm import LLM  # imports JAX: keep `--help` fast

    return LLM(model, warmup=False, **options)
