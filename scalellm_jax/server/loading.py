"""Building the served model: the engine (as ``LLM`` builds it, warmed up) in its own thread."""

from __future__ import annotations

import dataclasses
import logging
import time

from scalellm_jax.engine.async_engine import AsyncEngine
from scalellm_jax.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ServedModel:
    name: str
    engine: AsyncEngine
    tokenizer: Tokenizer
    max_model_len: int
    created: int  # unix time, for /v1/models
    simulated_device: str | None = None  # the engine runs on a simulated device (random output tokens)

    @classmethod
    def wrap(cls, name: str, engine: AsyncEngine) -> ServedModel:
        if engine.engine.tokenizer is None:
            raise ValueError("the served engine needs a tokenizer")
        simulated = engine.engine.simulated
        return cls(name, engine, engine.engine.tokenizer, engine.engine.max_model_len, int(time.time()),
                   simulated.device if simulated is not None else None)


def build_served_model(name: str, model: str, *, dtype: str, seed: int = 0, tensor_parallel_size: int = 1,
                       expert_parallel_size: int = 1, simulate_device: str | None = None,
                       simulate_lengths: str | None = None, **engine_options) -> ServedModel:
    """Load (or, for a preset name, randomly initialize) the model, warm the engine up, start its thread.
    ``simulate_device``/``simulate_lengths``: a simulated device instead (see ``LLM``).

    Raises ``OSError`` / ``ValueError`` (``ConfigError``) with one line naming the problem.
    """
    from scalellm_jax.engine.llm import LLM  # imports JAX: keep `--help` fast

    start = time.perf_counter()
    llm = LLM(model, dtype=dtype, seed=seed, tensor_parallel_size=tensor_parallel_size,
              expert_parallel_size=expert_parallel_size, simulate_device=simulate_device,
              simulate_lengths=simulate_lengths, warmup=False, **engine_options)
    loaded = time.perf_counter()
    llm.engine.warmup(progress=False)
    logger.info("model %s loaded in %.1f s, engine warmed up (every step shape compiled) in %.1f s",
                name, loaded - start, time.perf_counter() - loaded)
    return ServedModel.wrap(name, AsyncEngine(llm.engine))
