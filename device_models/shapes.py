"""Model shapes: the sizes a step's weight reads, KV traffic and FLOPs follow from.

Field names match ``scalellm_jax.config.ModelConfig``, so :meth:`ModelShape.of` takes any such
config, and ``dataclasses.asdict`` of a shape builds one. The MLP is gated (three matrices per
expert), as in Mixtral.

``opt-13b`` stands for the dense 13B model of the ALISE and vLLM papers' experiments (OPT-13B on
an A100): OPT-13B's layer count, width, heads and so its KV bytes per token, and a gated MLP of
LLaMA-13B's width, which gives the same parameter count (13B) in the layer form this engine runs.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ModelShape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int = 1
    num_experts_per_tok: int = 1
    tie_word_embeddings: bool = False

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type == "int" and not (isinstance(value, int) and value >= 1):
                raise ValueError(f"ModelShape.{field.name} must be a positive integer, got {value!r}")
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError("ModelShape.num_experts_per_tok exceeds num_experts")

    @classmethod
    def of(cls, config) -> ModelShape:
        """The shape of any object with ``ModelConfig``'s size fields (e.g. a ``ModelConfig``)."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})

    # Parameters, counted per layer where it matters.

    @property
    def attention_params(self) -> int:  # per layer: q, k, v, o
        h, d = self.hidden_size, self.head_dim
        return h * (self.num_heads + 2 * self.num_kv_heads) * d + self.num_heads * d * h

    @property
    def expert_params(self) -> int:  # one expert's gate, up and down projections
        return 3 * self.hidden_size * self.intermediate_size

    @property
    def dense_layer_params(self) -> int:  # per layer, every token reads these: attention, router, norms
        router = self.hidden_size * self.num_experts if self.num_experts > 1 else 0
        return self.attention_params + router + 2 * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else self.lm_head_params
        layers = self.num_layers * (self.dense_layer_params + self.num_experts * self.expert_params)
        return layers + embed + head + self.hidden_size

    def kv_bytes_per_token(self, kv_itemsize: int) -> int:
        """K and V of one token over all layers; int8 adds a float32 scale per head and token."""
        scales = 2 * self.num_kv_heads * 4 if kv_itemsize == 1 else 0
        return self.num_layers * (2 * self.num_kv_heads * self.head_dim * kv_itemsize + scales)

    def experts_touched(self, num_tokens: int) -> float:
        """Expected distinct experts per layer that ``num_tokens`` tokens route to (uniform routing)."""
        e, k = self.num_experts, self.num_experts_per_tok
        if num_tokens <= 0:
            return 0.0
        return e * (1.0 - (1.0 - k / e) ** num_tokens)


MODELS = {
    "mixtral-8x7b": ModelShape(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32,
                               num_heads=32, num_kv_heads=8, head_dim=128, num_experts=8, num_experts_per_tok=2),
    "mixtral-8x22b": ModelShape(vocab_size=32768, hidden_size=6144, intermediate_size=16384, num_layers=56,
                                num_heads=48, num_kv_heads=8, head_dim=128, num_experts=8, num_experts_per_tok=2),
    "opt-13b": ModelShape(vocab_size=50272, hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40,
                          num_kv_heads=40, head_dim=128),
}


def model_shape(name: str) -> ModelShape:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}") from None
