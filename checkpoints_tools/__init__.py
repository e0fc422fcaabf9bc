"""Checkpoint tools: Hugging Face Mixtral safetensors <-> our orbax format.

``python -m checkpoints_tools.convert`` / ``python -m checkpoints_tools.export`` are the CLIs. The readers and
writers they use live in ``scalellm_jax.checkpoints`` (the model loader needs them too), so this package depends on
``scalellm_jax`` and never the other way round; the names below are re-exported from there.

Names are resolved lazily (PEP 562): importing the package must not import ``convert``/``export``,
otherwise ``python -m checkpoints_tools.convert`` warns that the module was already imported, and
``import checkpoints_tools`` would pull in jax and orbax for callers that only need the name map.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CheckpointError": "scalellm_jax.checkpoints.safetensors_io",
    "HFCheckpoint": "scalellm_jax.checkpoints.safetensors_io",
    "DTYPES": "scalellm_jax.checkpoints.hf_layout",
    "FUSED": "scalellm_jax.checkpoints.hf_layout",
    "LEGACY": "scalellm_jax.checkpoints.hf_layout",
    "detect_layout": "scalellm_jax.checkpoints.hf_layout",
    "iter_hf_tensors": "scalellm_jax.checkpoints.hf_layout",
    "iter_params_from_hf": "scalellm_jax.checkpoints.hf_layout",
    "param_shapes": "scalellm_jax.checkpoints.hf_layout",
    "validate_hf": "scalellm_jax.checkpoints.hf_layout",
    "ParamReader": "scalellm_jax.checkpoints.orbax_io",
    "is_converted": "scalellm_jax.checkpoints.orbax_io",
    "read_config": "scalellm_jax.checkpoints.orbax_io",
    "read_converted": "scalellm_jax.checkpoints.orbax_io",
    "write_converted": "scalellm_jax.checkpoints.orbax_io",
    "convert_checkpoint": "checkpoints_tools.convert",
    "export_checkpoint": "checkpoints_tools.export",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
