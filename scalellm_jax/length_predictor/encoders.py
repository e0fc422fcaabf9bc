"""The prompt encoders by name (``text_encoder`` and ``static_embedding`` define them)."""

from __future__ import annotations

from scalellm_jax.length_predictor.static_embedding import StaticMiniLMEncoder
from scalellm_jax.length_predictor.text_encoder import (
    HashedNgramEncoder,
    MiniLMEncoder,
    StructureEncoder,
    TaskCueEncoder,
    TextEncoder,
)

ENCODERS = {"minilm": MiniLMEncoder, "static": StaticMiniLMEncoder, "hashed": HashedNgramEncoder,
            "structure": StructureEncoder, "cues": TaskCueEncoder}


def make_encoder(name: str, **kwargs) -> TextEncoder:
    """An encoder by name (``minilm``, ``static``, ``hashed``, ``structure``, ``cues``) built with ``kwargs``."""
    try:
        cls = ENCODERS[name]
    except KeyError:
        raise ValueError(f"encoder must be one of {sorted(ENCODERS)}, got {name!r}") from None
    return cls(**kwargs)
