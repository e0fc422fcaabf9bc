"""Checkpoint tools: Hugging Face Mixtral safetensors <-> our orbax format.

``python -m checkpoints_tools.convert`` / ``python -m checkpoints_tools.export`` are the CLIs;
model loading uses :func:`read_converted` (and :func:`is_converted` to tell the formats apart).

Names are resolved lazily (PEP 562): importing the package must not import ``convert``/``export``,
otherwise ``python -m checkpoints_tools.convert`` warns that the module was already imported, and
``import checkpoints_tools`` would pull in jax and orbax for callers that only need the name map.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CheckpointError": "safetensors_io",
    "HFCheckpoint": "safetensors_io",
    "DTYPES": "hf_layout",
    "FUSED": "hf_layout",
    "LEGACY": "hf_layout",
    "detect_layout": "hf_layout",
    "iter_hf_tensors": "hf_layout",
    "iter_params_from_hf": "hf_layout",
    "param_shapes": "hf_layout",
    "validate_hf": "hf_layout",
    "ParamReader": "orbax_io",
    "is_converted": "orbax_io",
    "read_config": "orbax_io",
    "read_converted": "orbax_io",
    "write_converted": "orbax_io",
    "convert_checkpoint": "convert",
    "export_checkpoint": "export",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
