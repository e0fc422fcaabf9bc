"""``Model`` (config + parameters) and ``load``: from a Hugging Face folder or our converted format."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from scalellm_jax.config import PRESETS, ModelConfig, check_fits_model, preset
from scalellm_jax.model import CausalAttention, Mixtral

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}


def dtype_name(dtype: str | Any) -> str:
    """Normalise a dtype given as a name or a numpy/jax dtype to one of ``DTYPES``' keys."""
    name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return name


class Model:
    """A Mixtral model's config and parameters, with a jitted full causal forward.

    ``params`` is the Flax parameter tree (``{'params': ...}`` is *not* wrapped: use
    :meth:`variables` for ``module.apply``).
    """

    def __init__(self, config: ModelConfig, params: dict, dtype: str | Any = "bfloat16", mesh=None):
        self.config = config
        self.params = params
        self.dtype = DTYPES[dtype_name(dtype)]
        self.mesh = mesh  # a tensor/expert-parallel mesh the params are sharded over, or None
        module = self.module(CausalAttention(config.sliding_window, config.head_dim**-0.5))

        def forward(params, tokens):
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
            return module.apply({"params": params}, tokens, positions)[0]

        self._logits = jax.jit(forward)

    def module(self, backend) -> Mixtral:
        return Mixtral(self.config, backend, self.dtype, mesh=self.mesh)

    def sharded(self, parallel) -> Model:
        """This model with its params placed on a (expert, tensor) mesh; see ``scalellm_jax.parallel``."""
        from scalellm_jax.parallel import build_mesh, shard_params

        parallel.check(self.config)
        mesh = build_mesh(parallel)
        return Model(self.config, shard_params(self.params, self.config, mesh), self.dtype, mesh)

    @property
    def variables(self) -> dict:
        return {"params": self.params}

    def logits(self, token_ids) -> jax.Array:
        """int [batch, seq] → logits [batch, seq, vocab]: full causal forward, no cache."""
        tokens = np.asarray(token_ids)
        if tokens.ndim != 2 or tokens.shape[1] == 0:
            raise ValueError(f"token_ids must be a non-empty [batch, seq] array, got shape {tokens.shape}")
        if not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"token_ids must be integers, got {tokens.dtype}")
        check_token_range(tokens, self.config.vocab_size)
        return self._logits(self.params, jnp.asarray(tokens, jnp.int32))

    @classmethod
    def random(cls, config: ModelConfig, seed: int = 0, dtype: str | Any = "bfloat16") -> Model:
        """Random weights of the right shapes (norm scales = 1), e.g. for tests and benchmarks."""
        name = dtype_name(dtype)
        module = Mixtral(config, CausalAttention(config.sliding_window, 1.0), DTYPES[name])
        dummy = jnp.zeros((1, 1), jnp.int32)
        shapes = jax.eval_shape(module.init, jax.random.key(0), dummy, dummy)["params"]
        leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
        keys = jax.random.split(jax.random.key(seed), len(leaves))

        def make(path, leaf, key):
            if path[-1].key == "scale":
                return jnp.ones(leaf.shape, leaf.dtype)
            return (0.02 * jax.random.normal(key, leaf.shape, jnp.float32)).astype(leaf.dtype)

        params = [make(path, leaf, key) for (path, leaf), key in zip(leaves, keys, strict=True)]
        return cls(config, jax.tree_util.tree_unflatten(treedef, params), name)


def check_token_range(tokens: np.ndarray, vocab_size: int) -> None:
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        bad = tokens[(tokens < 0) | (tokens >= vocab_size)].flat[0]
        raise ValueError(f"token id {int(bad)} is outside the vocabulary [0, {vocab_size})")


def _nest(flat: dict[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def read_model_config(path: str | Path) -> ModelConfig:
    """The ``ModelConfig`` of a checkpoint folder (Hugging Face or converted), without reading weights."""
    from scalellm_jax.checkpoints.orbax_io import is_converted, read_config

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a checkpoint folder")
    return read_config(path)[0] if is_converted(path) else ModelConfig.from_json_file(path / "config.json")


def model_config_of(model: str | Path) -> ModelConfig:
    """A preset's config, or a checkpoint folder's (``read_model_config``: no weights)."""
    return preset(model) if model in PRESETS else read_model_config(model)


def check_options_against_model(model_config: ModelConfig, engine, parallel) -> None:
    """Every check of the engine (``EngineConfig``) and parallel (``ParallelConfig``) options that needs the
    model's config, before anything loads: ``ConfigError`` naming the option."""
    parallel.check(model_config)
    check_fits_model(engine, model_config)


def load(path: str | Path, dtype: str | Any = "bfloat16", parallel=None) -> Model:
    """Load a Hugging Face Mixtral folder (safetensors, single or sharded) or a converted folder.

    With ``parallel`` (a :class:`scalellm_jax.parallel.ParallelConfig`), every tensor goes straight
    to its shards on the mesh as it is read: no device ever holds the whole model. After
    ``scalellm_jax.distributed.initialize_from_env`` the mesh spans every process; each process
    must call ``load`` with the same arguments and places only its own devices' shards (outputs
    such as ``logits`` are then global arrays: gather them with
    ``jax.experimental.multihost_utils.process_allgather``).
    """
    from scalellm_jax.checkpoints.hf_layout import get_path, iter_params_from_hf
    from scalellm_jax.checkpoints.orbax_io import is_converted, read_converted
    from scalellm_jax.checkpoints.safetensors_io import HFCheckpoint
    from scalellm_jax.parallel import build_mesh, pad_for_mesh, param_shardings, placed_shape, put_global
    from scalellm_jax.weights import iter_weights

    name = dtype_name(dtype)
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a checkpoint folder")
    converted = is_converted(path)
    config = read_model_config(path)
    mesh = shardings = None
    if parallel is not None and parallel.num_devices > 1:
        parallel.check(config)
        mesh = build_mesh(parallel)
        shardings = param_shardings(config, mesh)
    declared = {p: weight for p, weight, _ in iter_weights(config)}
    # weights padded on this mesh (parallel.placed_shape) are read whole, then padded and placed
    padded = {p for p, weight in declared.items() if mesh is not None and
              placed_shape(weight, config, mesh) != weight.shape(config)}

    def place(p, array):
        return put_global(pad_for_mesh(array, declared[p], config, mesh), get_path(shardings, p))

    if converted:
        direct = shardings if not padded else _nest({p: None if p in padded else get_path(shardings, p)
                                                     for p in declared})
        _, params = read_converted(path, dtype=name, shardings=direct)
        for p in padded:
            parent = get_path(params, p[:-1])
            parent[p[-1]] = place(p, np.asarray(parent[p[-1]]))
        return Model(config, params, name, mesh)
    checkpoint = HFCheckpoint(path)
    flat = {}
    for p, array in iter_params_from_hf(checkpoint, config, dtype=name):
        flat[p] = place(p, array) if shardings is not None else jnp.asarray(array)
    logger.info("loaded %d tensors from %s", len(flat), path)
    return Model(config, _nest(flat), name, mesh)

