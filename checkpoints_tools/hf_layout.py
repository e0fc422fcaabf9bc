"""The name map between Hugging Face Mixtral tensors and our Flax parameter tree.

This file is the single place that knows both spellings. Our tree (see ``param_shapes``) is the
contract with ``scalellm_jax/model``; the HF side comes in two layouts:

* ``legacy``: per-expert tensors ``block_sparse_moe.experts.{e}.w1/w2/w3.weight`` (what
  ``save_pretrained`` writes, and what the Hub's Mixtral checkpoints contain). Export writes this.
* ``fused``: transformers 5's in-memory layout, ``mlp.experts.gate_up_proj`` [E, 2I, H] (gate rows
  first, then up) and ``mlp.experts.down_proj`` [E, H, I]. Halves are read with ``get_slice`` so the
  fused tensor is never loaded whole.

Linear weights: ``ours = hf.T.reshape(our_shape)``; inverse ``hf = ours.reshape(hf_shape[::-1]).T``.
Norms and the embedding are copied as they are.

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

from checkpoints_tools.safetensors_io import CheckpointError, HFCheckpoint, is_floating
from scalellm_jax.config import ModelConfig

log = logging.getLogger(__name__)

ParamPath = tuple[str, ...]
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


def param_shapes(cfg: ModelConfig) -> dict[ParamPath, tuple[int, ...]]:
    """Every parameter of our tree, flat, in canonical order (embed, layers, final norm, lm_head)."""
    H, nH, nKV, D = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    E, F, V = cfg.num_experts, cfg.intermediate_size, cfg.vocab_size  # F: expert FFN width
    shapes: dict[ParamPath, tuple[int, ...]] = {("embed", "embedding"): (V, H)}
    for i in range(cfg.num_layers):
        layer = f"layers_{i}"
        shapes.update({
            (layer, "attn_norm", "scale"): (H,),
            (layer, "attn", "wq"): (H, nH, D),
            (layer, "attn", "wk"): (H, nKV, D),
            (layer, "attn", "wv"): (H, nKV, D),
            (layer, "attn", "wo"): (nH, D, H),
            (layer, "mlp_norm", "scale"): (H,),
            (layer, "moe", "router"): (H, E),
            (layer, "moe", "w_gate"): (E, H, F),
            (layer, "moe", "w_up"): (E, H, F),
            (layer, "moe", "w_down"): (E, F, H),
        })
    shapes[("final_norm", "scale")] = (H,)
    if not cfg.tie_word_embeddings:
        shapes[("lm_head", "kernel")] = (H, V)
    return shapes


@dataclasses.dataclass(frozen=True)
class Piece:
    """One HF tensor (or one slice of one) that supplies all or one expert of one of our params."""

    name: str                     # HF tensor name
    hf_shape: tuple[int, ...]     # shape of the piece as read (after ``index``)
    linear: bool                  # transpose rule applies (False: identity copy)
    expert: int | None = None     # row of our stacked [E, ...] param, or None for the whole param
    index: tuple | None = None    # slicing tuple into the HF tensor (fused layout)


def pieces(cfg: ModelConfig, layout: str = LEGACY) -> dict[ParamPath, list[Piece]]:
    """For each of our params (same order as ``param_shapes``), the HF pieces that make it up."""
    H, nH, nKV, D = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    E, F, V = cfg.num_experts, cfg.intermediate_size, cfg.vocab_size  # F: expert FFN width
    out: dict[ParamPath, list[Piece]] = {
        ("embed", "embedding"): [Piece("model.embed_tokens.weight", (V, H), False)]
    }
    for i in range(cfg.num_layers):
        layer, p = f"layers_{i}", f"model.layers.{i}."
        out[(layer, "attn_norm", "scale")] = [Piece(p + "input_layernorm.weight", (H,), False)]
        out[(layer, "attn", "wq")] = [Piece(p + "self_attn.q_proj.weight", (nH * D, H), True)]
        out[(layer, "attn", "wk")] = [Piece(p + "self_attn.k_proj.weight", (nKV * D, H), True)]
        out[(layer, "attn", "wv")] = [Piece(p + "self_attn.v_proj.weight", (nKV * D, H), True)]
        out[(layer, "attn", "wo")] = [Piece(p + "self_attn.o_proj.weight", (H, nH * D), True)]
        out[(layer, "mlp_norm", "scale")] = [Piece(p + "post_attention_layernorm.weight", (H,), False)]
        if layout == LEGACY:
            x = p + "block_sparse_moe."
            out[(layer, "moe", "router")] = [Piece(x + "gate.weight", (E, H), True)]
            for ours, hf, shape in (("w_gate", "w1", (F, H)), ("w_up", "w3", (F, H)), ("w_down", "w2", (H, F))):
                out[(layer, "moe", ours)] = [
                    Piece(f"{x}experts.{e}.{hf}.weight", shape, True, expert=e) for e in range(E)
                ]
        elif layout == FUSED:
            gate_up, down = p + "mlp.experts.gate_up_proj", p + "mlp.experts.down_proj"
            out[(layer, "moe", "router")] = [Piece(p + "mlp.gate.weight", (E, H), True)]
            out[(layer, "moe", "w_gate")] = [
                Piece(gate_up, (F, H), True, expert=e, index=(e, slice(0, F))) for e in range(E)
            ]
            out[(layer, "moe", "w_up")] = [
                Piece(gate_up, (F, H), True, expert=e, index=(e, slice(F, 2 * F))) for e in range(E)
            ]
            out[(layer, "moe", "w_down")] = [
                Piece(down, (H, F), True, expert=e, index=(e,)) for e in range(E)
            ]
        else:
            raise ValueError(f"unknown layout {layout!r}")
    out[("final_norm", "scale")] = [Piece("model.norm.weight", (H,), False)]
    if not cfg.tie_word_embeddings:
        out[("lm_head", "kernel")] = [Piece("lm_head.weight", (V, H), True)]
    return out


def expected_hf_shapes(cfg: ModelConfig, layout: str = LEGACY) -> dict[str, tuple[int, ...]]:
    """Full on-disk shape of every HF tensor the layout requires."""
    E, F, H = cfg.num_experts, cfg.intermediate_size, cfg.hidden_size
    shapes: dict[str, tuple[int, ...]] = {}
    for plist in pieces(cfg, layout).values():
        for piece in plist:
            if piece.index is None:
                shapes[piece.name] = piece.hf_shape
            elif piece.name.endswith("gate_up_proj"):
                shapes[piece.name] = (E, 2 * F, H)
            else:
                shapes[piece.name] = (E, H, F)
    return shapes


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


def to_ours(hf: np.ndarray, piece: Piece, shape: tuple[int, ...]) -> np.ndarray:
    """A (possibly non-contiguous) view or copy of ``hf`` in our layout; ``shape`` is our piece shape."""
    return hf.T.reshape(shape) if piece.linear else hf.reshape(shape)


def to_hf(ours: np.ndarray, piece: Piece) -> np.ndarray:
    """Inverse of :func:`to_ours`, contiguous (ready to be written)."""
    if piece.linear:
        return np.ascontiguousarray(ours.reshape(piece.hf_shape[::-1]).T)
    return np.ascontiguousarray(ours.reshape(piece.hf_shape))


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
                arr = np.ascontiguousarray(to_ours(ckpt.read(piece.name, piece.index), piece, shape), dtype=target)
            else:
                arr = np.empty(shape, target)
                for piece in plist:
                    arr[piece.expert] = to_ours(ckpt.read(piece.name, piece.index), piece, shape[1:])
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
