"""Read-only access to a Hugging Face checkpoint folder (``config.json`` + safetensors).

Why not just ``safetensors.safe_open`` everywhere:

* A truncated or corrupt shard should fail *before* we write anything, with one line that names
  the file (and the tensor whose bytes are missing). So every shard header is parsed here, by hand,
  up front, and checked against the file size. That costs one small read per shard.
* ``safe_open`` memory-maps the whole file; every page touched stays resident until the file is
  closed. Converting a 90 GB model through one long-lived handle would therefore look like (and,
  under memory pressure, behave like) loading the whole model. :meth:`HFCheckpoint.read` opens,
  reads one tensor (or one slice of it, via ``get_slice``) and closes again, so resident memory is
  bounded by the tensor being read. Opening costs well under a millisecond.

Every failure is a :class:`CheckpointError` whose message is one line naming the file and,
where there is one, the tensor.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import safe_open

from scalellm_jax.config import ModelConfig

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"

# safetensors dtype code -> numpy dtype (bfloat16 / float8 through ml_dtypes).
ST_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
NP_TO_ST: dict[np.dtype, str] = {v: k for k, v in ST_DTYPES.items()}

# A header bigger than this is certainly not a real safetensors header (the Rust library uses the same cap).
MAX_HEADER_BYTES = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match the model configuration.

    The message is a single line naming the offending file (and tensor, where there is one).
    """


def is_floating(dtype: np.dtype) -> bool:
    """True for IEEE and ml_dtypes floating types (numpy does not count bfloat16 as np.floating)."""
    return np.issubdtype(dtype, np.floating) or dtype in (
        np.dtype(ml_dtypes.bfloat16), np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2)
    )


def read_header(path: Path) -> dict[str, dict[str, Any]]:
    """Parse and validate one safetensors file's header against the file's size.

    Returns ``{tensor_name: {"dtype": np.dtype, "shape": tuple, "offsets": (begin, end)}}``.
    Only the header bytes are read.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(
                    f"{path}: truncated or corrupt safetensors file (header claims {n} bytes, file has {size})"
                )
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from exc

    data_len = size - 8 - n
    out: dict[str, dict[str, Any]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            code, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: tensor {name} has a malformed header entry") from exc
        if code not in ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {code}")
        dtype = ST_DTYPES[code]
        if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
            raise CheckpointError(
                f"{path}: tensor {name} has byte range [{begin}, {end}) inconsistent with "
                f"shape {list(shape)} and dtype {code}"
            )
        if end > data_len:
            raise CheckpointError(
                f"{path}: truncated file: tensor {name} needs {8 + n + end} bytes but the file has {size}"
            )
        out[name] = {"dtype": dtype, "shape": shape, "offsets": (begin, end)}
    return out


class HFCheckpoint:
    """A Hugging Face checkpoint folder: ``config.json`` plus one or many safetensors files.

    Construction validates every shard header (cheap); tensors are read lazily with :meth:`read`.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a directory")
        config_path = self.path / CONFIG_FILE
        if not config_path.is_file():
            raise CheckpointError(f"{config_path}: config.json not found")
        self.config_path = config_path
        self._config: ModelConfig | None = None

        single, index = self.path / SINGLE_FILE, self.path / INDEX_FILE
        if single.is_file():
            files = [single]
            self.source = single
        elif index.is_file():
            files = self._files_from_index(index)
            self.source = index
        else:
            raise CheckpointError(f"{self.path}: no {SINGLE_FILE} or {INDEX_FILE} found")

        self._where: dict[str, Path] = {}
        self._info: dict[str, dict[str, Any]] = {}
        for file in files:
            for name, info in read_header(file).items():
                if name in self._where:
                    raise CheckpointError(f"{file}: tensor {name} also appears in {self._where[name]}")
                self._where[name] = file
                self._info[name] = info
        if index.is_file() and self.source == index:
            self._check_index(index)

    def _files_from_index(self, index: Path) -> list[Path]:
        try:
            data = json.loads(index.read_text())
            weight_map = data["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: invalid index file ({exc})") from exc
        self._weight_map: dict[str, str] = weight_map
        files = []
        for fname in sorted(set(weight_map.values())):
            file = self.path / fname
            if not file.is_file():
                some = next(n for n, f in weight_map.items() if f == fname)
                raise CheckpointError(f"{file}: shard listed in {index.name} (e.g. for tensor {some}) is missing")
            files.append(file)
        return files

    def _check_index(self, index: Path) -> None:
        for name, fname in self._weight_map.items():
            where = self._where.get(name)
            if where is None or where.name != fname:
                raise CheckpointError(f"{self.path / fname}: tensor {name} listed in {index.name} is not in this file")

    # ------------------------------------------------------------------ queries

    @property
    def config(self) -> ModelConfig:
        """The ModelConfig from ``config.json`` (ConfigError when it does not describe a Mixtral)."""
        if self._config is None:
            self._config = ModelConfig.from_json_file(self.config_path)
        return self._config

    def names(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def file_of(self, name: str) -> Path:
        try:
            return self._where[name]
        except KeyError:
            raise CheckpointError(f"{self.source}: tensor {name} is missing") from None

    def shape(self, name: str) -> tuple[int, ...]:
        self.file_of(name)
        return self._info[name]["shape"]

    def dtype(self, name: str) -> np.dtype:
        self.file_of(name)
        return self._info[name]["dtype"]

    def nbytes(self, name: str) -> int:
        begin, end = self._info[name]["offsets"]
        return end - begin

    def read(self, name: str, index: tuple | None = None) -> np.ndarray:
        """Read one tensor, or ``tensor[index]`` via ``get_slice`` without reading the rest.

        The file is opened and closed around the read so its memory map never accumulates.
        """
        file = self.file_of(name)
        try:
            with safe_open(str(file), framework="np") as f:
                if index is None:
                    arr = f.get_tensor(name)
                else:
                    arr = f.get_slice(name)[index]
        except CheckpointError:
            raise
        except Exception as exc:  # the Rust binding raises its own exception types
            raise CheckpointError(f"{file}: cannot read tensor {name} ({exc})") from exc
        return np.ascontiguousarray(arr)

    def __repr__(self) -> str:
        return f"HFCheckpoint({str(self.path)!r}, {len(self._where)} tensors)"
