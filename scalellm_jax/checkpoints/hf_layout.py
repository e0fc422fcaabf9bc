"""Hugging Face Mixtral tensors <-> our Flax parameter tree, derived from ``scalellm_jax.weights``.

Each declared weight names its HF tensor and how the HF dimensions group our logical axes; this module turns
that into pieces (one HF tensor, or one expert's slice of one) and converts each with a reshape and a transpose.
Two HF layouts:

* ``legacy``: per-expert tensors ``block_sparse_moe.experts.{e}.w1/w2/w3.weight`` (what
  ``save_pretrained`` writes, and what the Hub's Mixtral checkpoints contain). Export writes this.
* ``fused``: transformers 5's in-memory layout, ``mlp.experts.gate_up_proj`` [E, 2I, H] (gate rows
  first, then up) and ``mlp.experts.down_proj`` [E, H, I]. Halves are read with ``get_slice`` so the
  fused tensor is never loaded whole.

Import validates everything that the headers can tell (missing / unexpected tensors, shapes,
dtypes) *before* the first tensor is read, so a bad checkpoint fails before anything is written.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from scalellm_jax import weights
from scalellm_jax.checkpoints.safetensors_io import CheckpointError, HFCheckpoint, is_floating
from scalellm_jax.config import ModelConfig
from scalellm_jax.weights import ParamPath, param_shapes

log = logging.getLogger(__name__)

LEGACY, FUSED = "legacy", "fused"

DTYPES: dict[str, np.dtype] = {
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
}


def resolve_dtype(dtype: str | np.dtype | None) -> np.dtype | None:
    """None (keep the source dtype) or one of ``DTYPES`` (by name or numpy dtype)."""
    if dtype is None:
        return None
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    if name not in DTYPES:
        raise CheckpointError(f"unsupported dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclasses.dataclass(frozen=True)
class Piece:
    """One HF tensor (or one slice of one) that supplies all or one expert of one of our params."""

    name: str                     # HF tensor name
    hf_shape: tuple[int, ...]     # shape of the piece as read (after ``index``)
    perm: tuple[int, ...]         # our piece's axes, in the order the HF tensor's dimensions hold them
    our_shape: tuple[int, ...]    # shape of our piece (one expert's slice for a per-expert param)
    expert: int | None = None     # row of our stacked [E, ...] param, or None for the whole param
    index: tuple | None = None    # slicing tuple into the HF tensor (fused layout)
    full_shape: tuple[int, ...] | None = None  # the whole HF tensor's shape, when the piece is a slice of it


def _pieces_of(weight: weights.Weight, cfg: ModelConfig, layer: int | None, fused: bool) -> list[Piece]:
    hf = weight.hf_tensor(fused)
    axes = weight.piece_axes
    perm = tuple(axes.index(a) for group in hf.axes for a in group)
    shape, our_shape = weights.hf_shape(hf, cfg), weights.axes_shape(axes, cfg)
    name = hf.name.replace("{layer}", str(layer))
    if not weight.per_expert:
        return [Piece(name, shape, perm, our_shape)]
    if hf.fused is None:
        return [Piece(name.replace("{expert}", str(e)), shape, perm, our_shape, expert=e)
                for e in range(cfg.num_experts)]
    part, parts = hf.fused
    rows = shape[0]
    full = (cfg.num_experts, parts * rows) + shape[1:]
    return [Piece(name, shape, perm, our_shape, expert=e, index=(e, slice(part * rows, (part + 1) * rows)),
                  full_shape=full) for e in range(cfg.num_experts)]


def pieces(cfg: ModelConfig, layout: str = LEGACY) -> dict[ParamPath, list[Piece]]:
    """For each of our params (same order as ``param_shapes``), the HF pieces that make it up."""
    if layout not in (LEGACY, FUSED):
        raise ValueError(f"unknown layout {layout!r}")
    return {path: _pieces_of(w, cfg, layer, layout == FUSED) for path, w, layer in weights.iter_weights(cfg)}


def expected_hf_shapes(cfg: ModelConfig, layout: str = LEGACY) -> dict[str, tuple[int, ...]]:
    """Full on-disk shape of every HF tensor the layout requires."""
    return {piece.name: piece.full_shape or piece.hf_shape for plist in pieces(cfg, layout).values() for piece in plist}


def detect_layout(names: Any, source: object = "checkpoint") -> str:
    """``legacy`` or ``fused`` from the tensor names; a mix of both is an error."""
    names = list(names)
    legacy = next((n for n in names if ".block_sparse_moe." in n), None)
    fused = next((n for n in names if ".mlp.experts." in n or ".mlp.gate." in n), None)
    if legacy and fused:
        raise CheckpointError(
            f"{source}: mixes MoE layouts: tensor {fused} (fused) and tensor {legacy} (per-expert)"
        )
    return FUSED if fused else LEGACY


def validate_hf(ckpt: HFCheckpoint, cfg: ModelConfig) -> tuple[str, np.dtype]:
    """Check names, shapes and dtypes from the headers alone. Returns (layout, checkpoint dtype)."""
    names = set(ckpt.names())
    layout = detect_layout(names, ckpt.source)
    expected = expected_hf_shapes(cfg, layout)

    missing = [n for n in expected if n not in names]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{ckpt.source}: tensor {missing[0]} is missing{more}")
    extra = sorted(names - expected.keys())
    if cfg.tie_word_embeddings and "lm_head.weight" in extra:
        # Some tied checkpoints still store the (identical) head; the model uses the embedding.
        log.warning("%s: ignoring lm_head.weight because tie_word_embeddings is set", ckpt.file_of("lm_head.weight"))
        extra.remove("lm_head.weight")
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise CheckpointError(f"{ckpt.file_of(extra[0])}: unexpected tensor {extra[0]}{more}")

    for name, shape in expected.items():
        if ckpt.shape(name) != shape:
            raise CheckpointError(
                f"{ckpt.file_of(name)}: tensor {name} has shape {list(ckpt.shape(name))}, expected {list(shape)}"
            )

    # The checkpoint's dtype is what most of its bytes are; anything else is a mistake.
    weight: collections.Counter[np.dtype] = collections.Counter()
    for name in expected:
        weight[ckpt.dtype(name)] += ckpt.nbytes(name)
    main = weight.most_common(1)[0][0]
    for name in expected:
        dt = ckpt.dtype(name)
        if not is_floating(dt):
            raise CheckpointError(f"{ckpt.file_of(name)}: tensor {name} has non-floating dtype {dt.name}")
        if dt != main:
            raise CheckpointError(
                f"{ckpt.file_of(name)}: tensor {name} has dtype {dt.name}, "
                f"but the rest of the checkpoint is {main.name}"
            )
    return layout, main


def target_dtype(ckpt: HFCheckpoint, source: np.dtype, dtype: str | np.dtype | None) -> np.dtype:
    """The dtype params are written in: ``dtype`` when given, else the checkpoint's own (if we support it)."""
    target = resolve_dtype(dtype)
    if target is None:
        if source.name not in DTYPES:
            raise CheckpointError(f"{ckpt.source}: checkpoint dtype {source.name} is not supported; "
                                  f"choose a dtype to cast to ({', '.join(DTYPES)})")
        target = source
    return target


def to_ours(hf: np.ndarray, piece: Piece) -> np.ndarray:
    """A (possibly non-contiguous) view or copy of ``hf`` in our layout (``piece.our_shape``)."""
    return hf.reshape([piece.our_shape[i] for i in piece.perm]).transpose(np.argsort(piece.perm))


def to_hf(ours: np.ndarray, piece: Piece) -> np.ndarray:
    """Inverse of :func:`to_ours`, contiguous (ready to be written)."""
    return np.ascontiguousarray(ours.transpose(piece.perm).reshape(piece.hf_shape))


def iter_params_from_hf(
    ckpt: HFCheckpoint, cfg: ModelConfig, dtype: str | np.dtype | None = None
) -> Iterator[tuple[ParamPath, np.ndarray]]:
    """Validate ``ckpt`` now (raises CheckpointError), then stream our params one at a time.

    Stacked expert params are filled one expert at a time into a preallocated array of the target
    dtype, so peak memory is one of our params plus one HF tensor.
    """
    layout, source_dtype = validate_hf(ckpt, cfg)
    target = target_dtype(ckpt, source_dtype, dtype)
    plan = pieces(cfg, layout)
    shapes = param_shapes(cfg)
    log.info("%s: %s layout, dtype %s -> %s", ckpt.path, layout, source_dtype.name, target.name)

    def stream() -> Iterator[tuple[ParamPath, np.ndarray]]:
        for path, plist in plan.items():
            shape = shapes[path]
            if len(plist) == 1 and plist[0].expert is None:
                piece = plist[0]
                arr = np.ascontiguousarray(to_ours(ckpt.read(piece.name, piece.index), piece), dtype=target)
            else:
                arr = np.empty(shape, target)
                for piece in plist:
                    arr[piece.expert] = to_ours(ckpt.read(piece.name, piece.index), piece)
            yield path, arr

    return stream()


Reader = Callable[[ParamPath], Any]


def hf_tensor_specs(cfg: ModelConfig) -> list[tuple[ParamPath, Piece]]:
    """Export order: (our param, legacy HF piece) pairs, exactly as :func:`iter_hf_tensors` yields them."""
    return [(path, piece) for path, plist in pieces(cfg, LEGACY).items() for piece in plist]


def get_path(tree: Mapping[str, Any], path: ParamPath) -> Any:
    node: Any = tree
    for key in path:
        node = node[key]
    return node


def iter_hf_tensors(
    params_or_reader: Mapping[str, Any] | Reader, cfg: ModelConfig
) -> Iterator[tuple[str, np.ndarray]]:
    """Inverse map for export: yield (HF name, array) in the legacy per-expert layout.

    ``params_or_reader`` is our nested params dict, or a callable ``path -> array`` that is called
    once per param (so a reader backed by a checkpoint holds one param in memory at a time).
    """
    read = params_or_reader if callable(params_or_reader) else (lambda p: get_path(params_or_reader, p))
    shapes = param_shapes(cfg)
    for path, plist in pieces(cfg, LEGACY).items():
        arr = np.asarray(read(path))
        if arr.shape != shapes[path]:
            raise CheckpointError(f"param {'/'.join(path)} has shape {list(arr.shape)}, expected {list(shapes[path])}")
        for piece in plist:
            yield piece.name, to_hf(arr if piece.expert is None else arr[piece.expert], piece)
        del arr
