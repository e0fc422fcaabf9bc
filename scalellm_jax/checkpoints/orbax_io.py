"""Our converted checkpoint format: ``OUT_DIR/config.json`` + ``OUT_DIR/params/`` (an orbax checkpoint).

``config.json`` is the Hugging Face config (``ModelConfig.to_hf_dict()``) plus a ``"scalellm_jax"``
block (format version and dtype), so the folder is self-describing and ``ModelConfig`` can read it.

Writing is incremental: one ``orbax ... partial.save`` call per parameter, then ``finalize``. That
keeps peak memory at one parameter no matter how large the model is (a Mixtral 8x22B does not fit in
host memory twice). Everything is written to a temporary sibling folder which is renamed to
``OUT_DIR`` only when complete; on any failure, Ctrl-C included, the temporary folder is removed, so
``OUT_DIR`` either is a complete checkpoint or does not exist.

Reading uses orbax's own dtype casting (verified: it casts on load) and places arrays with the
requested shardings. :class:`ParamReader` loads one parameter at a time (orbax partial load) for
streaming export.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
from tqdm import tqdm

from scalellm_jax.checkpoints.hf_layout import ParamPath, get_path, param_shapes, resolve_dtype
from scalellm_jax.checkpoints.safetensors_io import CheckpointError
from scalellm_jax.config import ConfigError, ModelConfig

log = logging.getLogger(__name__)

FORMAT_KEY = "scalellm_jax"
FORMAT_VERSION = 1
PARAMS_DIR = "params"
CONFIG_FILE = "config.json"


def nest(path: ParamPath, value: Any) -> dict[str, Any]:
    """('a', 'b', 'c'), x -> {'a': {'b': {'c': x}}}"""
    for key in reversed(path):
        value = {key: value}
    return value


def flatten(tree: Mapping[str, Any], prefix: ParamPath = ()) -> dict[ParamPath, Any]:
    out: dict[ParamPath, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


def progress_bar(total: int, desc: str, progress: bool) -> tqdm:
    """A tqdm bar on stderr, shown only for an interactive terminal."""
    return tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr,
                disable=not (progress and sys.stderr.isatty()))


def make_temp_sibling(out: Path) -> Path:
    """Refuse an existing ``out``; create ``out.tmp-XXXX`` next to it (same filesystem: rename is atomic)."""
    if out.exists() or out.is_symlink():
        raise CheckpointError(f"{out}: output path already exists; remove it or choose another")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))


def commit_temp(tmp: Path, out: Path) -> None:
    # os.rename would silently replace an empty directory created meanwhile; refuse instead.
    if out.exists() or out.is_symlink():
        raise CheckpointError(f"{out}: output path appeared while writing; not overwriting it")
    os.rename(tmp, out)


def write_converted(
    out_dir: str | os.PathLike[str],
    cfg: ModelConfig,
    params_iter: Iterable[tuple[ParamPath, np.ndarray]],
    dtype_name: str,
    progress: bool = True,
) -> Path:
    """Write our format at ``out_dir`` from a stream of (path, array), one orbax partial save each.

    Every param of ``param_shapes(cfg)`` must arrive exactly once with the right shape and
    ``dtype_name`` dtype. Nothing exists at ``out_dir`` unless this returns.
    """
    out = Path(out_dir)
    dtype = resolve_dtype(dtype_name)
    expected = param_shapes(cfg)
    tmp = make_temp_sibling(out)
    try:
        params_path = tmp / PARAMS_DIR
        seen: set[ParamPath] = set()
        with progress_bar(len(expected), f"converting to {out.name}", progress) as bar:
            for path, arr in params_iter:
                where = "/".join(path)
                if path not in expected or path in seen:
                    raise CheckpointError(f"{out}: unexpected or repeated param {where}")
                if arr.shape != expected[path] or arr.dtype != dtype:
                    raise CheckpointError(
                        f"{out}: param {where} is {arr.dtype.name}{list(arr.shape)}, "
                        f"expected {dtype.name}{list(expected[path])}"
                    )
                ocp.partial.save(params_path, nest(path, arr))
                seen.add(path)
                del arr
                bar.update()
        if len(seen) != len(expected):
            missing = next(p for p in expected if p not in seen)
            raise CheckpointError(f"{out}: param {'/'.join(missing)} was never written")
        ocp.partial.finalize(params_path)
        config = cfg.to_hf_dict()
        config[FORMAT_KEY] = {"format_version": FORMAT_VERSION, "dtype": dtype.name}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        commit_temp(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s (%d params, %s)", out, len(expected), dtype.name)
    return out


def is_converted(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` looks like our format (config.json with our block, and params/)."""
    path = Path(path)
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and FORMAT_KEY in config and (path / PARAMS_DIR).is_dir()


def read_config(path: str | os.PathLike[str]) -> tuple[ModelConfig, dict[str, Any]]:
    """(ModelConfig, our format block) of a converted checkpoint; CheckpointError when it is not one."""
    path = Path(path)
    config_path = path / CONFIG_FILE
    if not is_converted(path):
        raise CheckpointError(f"{path}: not a converted scalellm_jax checkpoint (no {CONFIG_FILE} with "
                              f"a {FORMAT_KEY!r} block, or no {PARAMS_DIR}/)")
    data = json.loads(config_path.read_text())
    block = data[FORMAT_KEY]
    if block.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{config_path}: format_version {block.get('format_version')!r} is not supported "
                              f"(this code reads {FORMAT_VERSION})")
    try:
        cfg = ModelConfig.from_hf_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{config_path}: {exc}") from exc
    return cfg, block


def stored_metadata(path: Path, cfg: ModelConfig) -> dict[ParamPath, Any]:
    """Flat orbax metadata of ``path/params``, checked against ``param_shapes(cfg)``."""
    params_path = path / PARAMS_DIR
    try:
        meta = flatten(ocp.metadata(params_path).metadata)
    except Exception as exc:  # orbax raises assorted types for a damaged folder
        raise CheckpointError(f"{params_path}: cannot read orbax metadata ({exc})") from exc
    expected = param_shapes(cfg)
    for p, shape in expected.items():
        if p not in meta:
            raise CheckpointError(f"{params_path}: param {'/'.join(p)} is missing")
        if tuple(meta[p].shape) != shape:
            raise CheckpointError(f"{params_path}: param {'/'.join(p)} has shape {list(meta[p].shape)}, "
                                  f"expected {list(shape)}")
    extra = [p for p in meta if p not in expected]
    if extra:
        raise CheckpointError(f"{params_path}: unexpected param {'/'.join(extra[0])}")
    return meta


def partial_load_context() -> ocp.Context:
    ctx = ocp.Context()
    ctx.pytree.loading.partial_load = True
    return ctx


def read_converted(
    path: str | os.PathLike[str],
    dtype: str | np.dtype | None = None,
    shardings: Any = None,
) -> tuple[ModelConfig, dict[str, Any]]:
    """Load (ModelConfig, params as a nested dict of jax arrays).

    ``dtype``: None keeps the stored dtype, otherwise orbax casts while loading.
    ``shardings``: None (default device), one ``jax.sharding.Sharding`` for every param, or a
    pytree matching params with one Sharding (or None: the default device) per leaf.
    """
    path = Path(path)
    cfg, _ = read_config(path)
    meta = stored_metadata(path, cfg)
    target = resolve_dtype(dtype)
    # local_devices, not devices: under jax.distributed, devices()[0] belongs to process 0.
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract: dict[str, Any] = {}
    for p, leaf in meta.items():
        if shardings is None:
            sharding = default
        elif isinstance(shardings, jax.sharding.Sharding):
            sharding = shardings
        else:
            sharding = get_path(shardings, p) or default
        leaf_abstract = jax.ShapeDtypeStruct(tuple(leaf.shape), target or leaf.dtype, sharding=sharding)
        node = abstract
        for key in p[:-1]:
            node = node.setdefault(key, {})
        node[p[-1]] = leaf_abstract
    params = ocp.load(path / PARAMS_DIR, abstract)
    return cfg, params


class ParamReader:
    """``reader(path) -> np.ndarray``: one param at a time from a converted checkpoint (orbax partial load).

    Loads as numpy (host memory, no device transfer), in the stored dtype.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.cfg, block = read_config(self.path)
        self.dtype_name: str = block.get("dtype", "")
        self.meta = stored_metadata(self.path, self.cfg)
        self._ctx = partial_load_context()

    def __call__(self, p: ParamPath) -> np.ndarray:
        with self._ctx:
            tree = ocp.load(self.path / PARAMS_DIR, nest(p, self.meta[p]))
        return np.asarray(get_path(tree, p))
