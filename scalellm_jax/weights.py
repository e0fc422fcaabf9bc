"""Every weight of the Mixtral model, declared once.

A :class:`Weight` says where a tensor sits in the parameter tree, its logical axes (which give its shape from the
``ModelConfig`` and, through ``parallel.param_specs``, its sharding), its initializer, and which Hugging Face tensor
holds it. Everything else is derived from :data:`WEIGHTS`: the Flax modules create their parameters from it
(``model/layers.declared_params``), ``parallel`` shards them, ``checkpoints/hf_layout`` imports and exports them and
``checkpoints/orbax_io`` checks converted checkpoints against it. Adding a weight is one entry here (plus the
computation that uses it).

Numpy- and jax-free on purpose: the checkpoint tools read it without building a model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator

from scalellm_jax.config import ModelConfig

ParamPath = tuple[str, ...]

# Logical axis -> the ModelConfig field that sizes it.
AXIS_SIZES = {
    "vocab": "vocab_size",
    "hidden": "hidden_size",
    "heads": "num_heads",
    "kv_heads": "num_kv_heads",
    "head_dim": "head_dim",
    "experts": "num_experts",
    "ffn": "intermediate_size",  # each expert's SwiGLU width
}
INITIALIZERS = ("normal", "ones", "zeros")  # normal: std 0.02, Mixtral's initializer_range


@dataclasses.dataclass(frozen=True)
class HFTensor:
    """Where a weight lives in a Hugging Face checkpoint.

    ``name`` may hold ``{layer}`` and, for a weight whose first axis is ``experts``, ``{expert}``: one tensor per
    expert. ``axes`` lists the HF tensor's dimensions as groups of our axes (a group is flattened into one HF
    dimension), without the experts axis; our array is the HF one reshaped and transposed accordingly.
    ``fused = (part, parts)``: one tensor holds every expert stacked on a leading axis, and ``parts`` weights
    concatenated along its next dimension, of which this weight is number ``part`` (transformers 5's
    ``gate_up_proj``).
    """

    name: str
    axes: tuple[tuple[str, ...], ...]
    fused: tuple[int, int] | None = None

    def __post_init__(self):
        if self.fused is not None and "{expert}" in self.name:
            raise ValueError(f"{self.name}: a fused tensor holds every expert; drop {{expert}} from its name")


@dataclasses.dataclass(frozen=True)
class Weight:
    module: str  # the Flax module (scope name) that owns it: unique across the table
    name: str  # the parameter's name inside that module
    axes: tuple[str, ...]  # logical axes, keys of AXIS_SIZES
    hf: HFTensor  # the per-expert ("legacy") layout, which save_pretrained writes and export writes
    hf_fused: HFTensor | None = None  # transformers 5's in-memory layout, where it names the tensor differently
    sharded: tuple[str, ...] = ()  # axes split over the mesh (parallel.MESH_AXIS_OF says onto which mesh axis)
    # sharded axes zero-padded up to a multiple of their mesh axis when it does not divide them; the padding is
    # never read (padded logits are cut off before anything sees them) and never saved
    padded: tuple[str, ...] = ()
    init: str = "normal"
    per_layer: bool = True  # one per decoder layer (path layers_{i}/module/name), else once per model
    present: Callable[[ModelConfig], bool] | None = None  # None: always

    def __post_init__(self):
        unknown = [a for a in self.axes + self.sharded if a not in AXIS_SIZES]
        if unknown:
            raise ValueError(f"{self.module}/{self.name}: unknown axis {unknown[0]!r}; known: {', '.join(AXIS_SIZES)}")
        if not set(self.padded) <= set(self.sharded):
            raise ValueError(f"{self.module}/{self.name}: padded axes {self.padded} must be sharded axes")
        if self.init not in INITIALIZERS:
            raise ValueError(f"{self.module}/{self.name}: init must be one of {INITIALIZERS}, got {self.init!r}")
        for hf in (self.hf, self.hf_fused):
            if hf is not None and sorted(a for group in hf.axes for a in group) != sorted(self.piece_axes):
                raise ValueError(f"{self.module}/{self.name}: {hf.name} axes {hf.axes} do not cover {self.piece_axes}")

    @property
    def per_expert(self) -> bool:
        """Stored one expert at a time in HF checkpoints (its first axis is ``experts``)."""
        return self.axes[0] == "experts"

    @property
    def piece_axes(self) -> tuple[str, ...]:
        """The axes of one HF piece: all of ours, less the experts axis of a per-expert weight."""
        return self.axes[1:] if self.per_expert else self.axes

    def shape(self, config: ModelConfig) -> tuple[int, ...]:
        return axes_shape(self.axes, config)

    def path(self, layer: int | None = None) -> ParamPath:
        return (f"layers_{layer}", self.module, self.name) if self.per_layer else (self.module, self.name)

    def hf_tensor(self, layout_fused: bool) -> HFTensor:
        return self.hf_fused if layout_fused and self.hf_fused is not None else self.hf

    def exists(self, config: ModelConfig) -> bool:
        return self.present is None or self.present(config)


def axes_shape(axes: tuple[str, ...], config: ModelConfig) -> tuple[int, ...]:
    return tuple(getattr(config, AXIS_SIZES[a]) for a in axes)


def hf_shape(hf: HFTensor, config: ModelConfig) -> tuple[int, ...]:
    """One piece's HF shape (one expert's, for a per-expert weight)."""
    return tuple(math.prod(axes_shape(group, config)) for group in hf.axes)


def _untied(config: ModelConfig) -> bool:
    return not config.tie_word_embeddings


def _layer(suffix: str) -> str:
    return "model.layers.{layer}." + suffix


_EXPERT_OUT_IN = (("ffn",), ("hidden",))  # HF's w1/w3 (gate/up): [ffn, hidden]
_EXPERT_IN_OUT = (("hidden",), ("ffn",))  # w2 (down): [hidden, ffn]

# In the parameter tree's order (the order of converted and exported checkpoints): the per-layer weights are
# expanded, layer by layer, where the first of them stands.
WEIGHTS: tuple[Weight, ...] = (
    Weight("embed", "embedding", ("vocab", "hidden"), HFTensor("model.embed_tokens.weight", (("vocab",), ("hidden",))),
           per_layer=False),
    Weight("attn_norm", "scale", ("hidden",), HFTensor(_layer("input_layernorm.weight"), (("hidden",),)), init="ones"),
    Weight("attn", "wq", ("hidden", "heads", "head_dim"),
           HFTensor(_layer("self_attn.q_proj.weight"), (("heads", "head_dim"), ("hidden",))), sharded=("heads",)),
    Weight("attn", "wk", ("hidden", "kv_heads", "head_dim"),
           HFTensor(_layer("self_attn.k_proj.weight"), (("kv_heads", "head_dim"), ("hidden",))), sharded=("kv_heads",)),
    Weight("attn", "wv", ("hidden", "kv_heads", "head_dim"),
           HFTensor(_layer("self_attn.v_proj.weight"), (("kv_heads", "head_dim"), ("hidden",))), sharded=("kv_heads",)),
    Weight("attn", "wo", ("heads", "head_dim", "hidden"),
           HFTensor(_layer("self_attn.o_proj.weight"), (("hidden",), ("heads", "head_dim"))), sharded=("heads",)),
    Weight("mlp_norm", "scale", ("hidden",), HFTensor(_layer("post_attention_layernorm.weight"), (("hidden",),)),
           init="ones"),
    Weight("moe", "router", ("hidden", "experts"),
           HFTensor(_layer("block_sparse_moe.gate.weight"), (("experts",), ("hidden",))),
           hf_fused=HFTensor(_layer("mlp.gate.weight"), (("experts",), ("hidden",)))),
    Weight("moe", "w_gate", ("experts", "hidden", "ffn"),
           HFTensor(_layer("block_sparse_moe.experts.{expert}.w1.weight"), _EXPERT_OUT_IN),
           hf_fused=HFTensor(_layer("mlp.experts.gate_up_proj"), _EXPERT_OUT_IN, fused=(0, 2)),
           sharded=("experts", "ffn")),
    Weight("moe", "w_up", ("experts", "hidden", "ffn"),
           HFTensor(_layer("block_sparse_moe.experts.{expert}.w3.weight"), _EXPERT_OUT_IN),
           hf_fused=HFTensor(_layer("mlp.experts.gate_up_proj"), _EXPERT_OUT_IN, fused=(1, 2)),
           sharded=("experts", "ffn")),
    Weight("moe", "w_down", ("experts", "ffn", "hidden"),
           HFTensor(_layer("block_sparse_moe.experts.{expert}.w2.weight"), _EXPERT_IN_OUT),
           hf_fused=HFTensor(_layer("mlp.experts.down_proj"), _EXPERT_IN_OUT, fused=(0, 1)),
           sharded=("experts", "ffn")),
    Weight("final_norm", "scale", ("hidden",), HFTensor("model.norm.weight", (("hidden",),)), init="ones",
           per_layer=False),
    Weight("lm_head", "kernel", ("hidden", "vocab"), HFTensor("lm_head.weight", (("vocab",), ("hidden",))),
           sharded=("vocab",), padded=("vocab",), per_layer=False, present=_untied),
)


def weights_of(module: str, config: ModelConfig) -> list[Weight]:
    """The weights the Flax module named ``module`` owns, in table order."""
    return [w for w in WEIGHTS if w.module == module and w.exists(config)]


def find(module: str, name: str) -> Weight:
    for w in WEIGHTS:
        if w.module == module and w.name == name:
            return w
    raise KeyError(f"no weight {module}/{name}")


def iter_weights(config: ModelConfig) -> Iterator[tuple[ParamPath, Weight, int | None]]:
    """Every parameter of the model as (path, declaration, layer or None), in the parameter tree's order."""
    layer_weights = [w for w in WEIGHTS if w.per_layer and w.exists(config)]
    layers_done = False
    for w in WEIGHTS:
        if not w.exists(config):
            continue
        if not w.per_layer:
            yield w.path(), w, None
        elif not layers_done:
            layers_done = True
            for i in range(config.num_layers):
                for lw in layer_weights:
                    yield lw.path(i), lw, i


def param_shapes(config: ModelConfig) -> dict[ParamPath, tuple[int, ...]]:
    """Every parameter of our tree, flat, in canonical order, with its shape."""
    return {path: w.shape(config) for path, w, _ in iter_weights(config)}


def check_table(weights: tuple[Weight, ...]) -> None:
    """Each (module, name) once, and a module either in every layer or outside them."""
    seen: dict[tuple[str, str], Weight] = {}
    scope: dict[str, bool] = {}
    for w in weights:
        if (w.module, w.name) in seen:
            raise ValueError(f"weight {w.module}/{w.name} is declared twice")
        seen[(w.module, w.name)] = w
        if scope.setdefault(w.module, w.per_layer) != w.per_layer:
            raise ValueError(f"module {w.module} has weights both per layer and per model")


check_table(WEIGHTS)
