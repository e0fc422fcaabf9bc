"""Model configuration: a frozen dataclass read from a Hugging Face ``config.json``.

The field names follow our code, not Hugging Face; ``from_hf_dict``/``to_hf_dict`` are the only
places that know the Hugging Face spelling (including the transformers 5 ``rope_parameters`` block).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A model configuration that cannot describe a working Mixtral model."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    num_experts_per_tok: int
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-5
    sliding_window: int | None = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2

    def __post_init__(self) -> None:
        positive = (
            "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
            "num_kv_heads", "head_dim", "num_experts", "num_experts_per_tok",
            "max_position_embeddings",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if self.num_experts_per_tok > self.num_experts:
            raise ConfigError(
                f"ModelConfig.num_experts_per_tok ({self.num_experts_per_tok}) exceeds "
                f"num_experts ({self.num_experts})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"ModelConfig.head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not self.rope_theta > 0:
            raise ConfigError(f"ModelConfig.rope_theta must be > 0, got {self.rope_theta!r}")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"ModelConfig.rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        if self.sliding_window is not None and (
            not isinstance(self.sliding_window, int) or self.sliding_window < 1
        ):
            raise ConfigError(
                f"ModelConfig.sliding_window must be a positive integer or None, got {self.sliding_window!r}"
            )

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    # ------------------------------------------------------------------ Hugging Face I/O

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from the dict of a Hugging Face MixtralConfig ``config.json``."""
        model_type = hf.get("model_type", "mixtral")
        if model_type != "mixtral":
            raise ConfigError(f"config.json model_type must be 'mixtral', got {model_type!r}")
        required = {
            "vocab_size": "vocab_size",
            "hidden_size": "hidden_size",
            "intermediate_size": "intermediate_size",
            "num_layers": "num_hidden_layers",
            "num_heads": "num_attention_heads",
        }
        missing = [hf_name for hf_name in required.values() if hf_name not in hf]
        if missing:
            raise ConfigError(f"config.json is missing required field(s): {', '.join(missing)}")
        num_heads = hf["num_attention_heads"]
        hidden = hf["hidden_size"]
        head_dim = hf.get("head_dim") or (hidden // num_heads if isinstance(hidden, int) and num_heads else 0)
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise ConfigError(f"config.json rope_type {rope_type!r} is not supported (only 'default')")
        rope_theta = rope.get("rope_theta", hf.get("rope_theta", 1e6))
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"config.json hidden_act {act!r} is not supported (only 'silu')")
        eos = hf.get("eos_token_id", 2)
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            num_experts=hf.get("num_local_experts", 8),
            num_experts_per_tok=hf.get("num_experts_per_tok", 2),
            rope_theta=float(rope_theta),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            sliding_window=hf.get("sliding_window"),
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id", 1),
            eos_token_id=eos,
        )

    @classmethod
    def from_json_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config.json not found")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: invalid JSON ({exc})") from exc
        try:
            return cls.from_hf_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc

    def to_hf_dict(self) -> dict[str, Any]:
        """The Hugging Face ``config.json`` contents (transformers 5 spelling, readable by 4.x too)."""
        return {
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "num_local_experts": self.num_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
            "rms_norm_eps": self.rms_norm_eps,
            "sliding_window": self.sliding_window,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, ModelConfig] = {
    # Small enough for CPU tests, but with Mixtral's real vocabulary so the real tokenizer works.
    "tiny": ModelConfig(
        vocab_size=32000, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=4096,
    ),
    "mixtral-8x7b": ModelConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, num_experts=8, num_experts_per_tok=2,
        rope_theta=1e6, max_position_embeddings=32768,
    ),
    "mixtral-8x22b": ModelConfig(
        vocab_size=32768, hidden_size=6144, intermediate_size=16384, num_layers=56, num_heads=48,
        num_kv_heads=8, head_dim=128, num_experts=8, num_experts_per_tok=2,
        rope_theta=1e6, max_position_embeddings=65536,
    ),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}") from None


ATTENTION_KERNELS = ("auto", "pallas", "xla")
KV_CACHE_DTYPES = ("auto", "int8")
SCHEDULING_POLICIES = ("fcfs", "priority", "alise")
SWAP_COMPRESSIONS = ("none", "int8")
# ALISE's aging (engine/policies.py, AliseConfig): tuned with benchmarks/simulator on AlpacaEval/Mixtral
# lengths at loads 0.9-1.2: 0.3 rather than 0.2 keeps alise's p99 latency within 1.2x fcfs's under overload.
DEFAULT_AGING_RATE = 0.3


@dataclasses.dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """Serving-engine knobs. ``None`` fields are resolved against the model and device by the engine."""

    page_size: int = 16
    num_pages: int | None = None  # None: sized from device memory (GPU) or 64 pages per sequence slot (CPU)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512  # per-step token budget, also the prefill chunk size
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    kv_cache_dtype: str = "auto"  # "auto" = the model dtype; "int8" = quantized pages
    attention_kernels: str = "auto"  # "auto" = pallas on GPU, xla elsewhere
    gpu_memory_utilization: float = 0.9
    scheduling_policy: str = "fcfs"  # fcfs | priority | alise (predicted shortest remaining time first)
    aging_rate: float = DEFAULT_AGING_RATE  # alise: seconds of estimated work forgiven per second waited
    length_predictor_data: str | None = None  # alise: JSONL of instruction/output rows to warm-start from
    swap_space_gb: float = 4.0  # host memory for preempted requests' KV; 0 = always recompute
    swap_compression: str = "none"  # "int8": compress swapped float KV 2-4× (resumed KV then rounded)
    # Reuse the KV of full prompt pages already computed (kv_manager): a shared prefix is prefilled once.
    enable_prefix_caching: bool = True
    # Shape buckets compiled at warmup (None: the engine's defaults, 17 at the default sizes, 25 at 256 seqs and
    # 2048 tokens). Fewer warm up faster (each is one executable: tens of seconds for a 32-layer step on a GPU),
    # but a step pads up to the next kept size. The largest default (max_num_seqs rows / max_num_batched_tokens
    # tokens) is always kept, so every batch fits a bucket.
    decode_buckets: tuple[int, ...] | None = None  # decode steps: rows, each <= max_num_seqs
    token_buckets: tuple[int, ...] | None = None  # mixed steps: tokens, each <= max_num_batched_tokens
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("page_size", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"EngineConfig.{name} must be a positive integer, got {value!r}")
        for name in ("num_pages", "max_model_len"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 2):
                raise ConfigError(f"EngineConfig.{name} must be an integer ≥ 2 or None, got {value!r}")
        for name, choices in (("attention_kernels", ATTENTION_KERNELS), ("kv_cache_dtype", KV_CACHE_DTYPES),
                              ("scheduling_policy", SCHEDULING_POLICIES), ("swap_compression", SWAP_COMPRESSIONS)):
            value = getattr(self, name)
            if value not in choices:
                raise ConfigError(f"EngineConfig.{name} must be one of {choices}, got {value!r}")
        for name in ("aging_rate", "swap_space_gb"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value < float("inf"):
                raise ConfigError(f"EngineConfig.{name} must be a finite number >= 0, got {value!r}")
        if not isinstance(self.enable_prefix_caching, bool):
            raise ConfigError(
                f"EngineConfig.enable_prefix_caching must be true or false, got {self.enable_prefix_caching!r}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ConfigError(f"EngineConfig.max_num_batched_tokens must be >= max_num_seqs ({self.max_num_seqs}) so "
                              f"every running sequence's decode fits in a step, got {self.max_num_batched_tokens}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(
                f"EngineConfig.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}"
            )
        for name, limit in (("decode_buckets", "max_num_seqs"), ("token_buckets", "max_num_batched_tokens")):
            object.__setattr__(self, name, _bucket_sizes(name, getattr(self, name), limit, getattr(self, limit)))


def check_fits_model(engine: EngineConfig, model: ModelConfig) -> None:
    """The engine options' checks against the model's config (read before any weight loads)."""
    if engine.max_model_len is not None and engine.max_model_len > model.max_position_embeddings:
        raise ConfigError(f"EngineConfig.max_model_len {engine.max_model_len} is over the model's context of "
                          f"{model.max_position_embeddings} positions (max_position_embeddings)")


def _bucket_sizes(name: str, value, limit_name: str, limit: int) -> tuple[int, ...] | None:
    """``value`` (None or a list/tuple of positive ints <= ``limit``) as a sorted tuple of unique sizes."""
    if value is None:
        return None
    if isinstance(value, str | bytes) or not isinstance(value, list | tuple | set | frozenset):
        raise ConfigError(f"EngineConfig.{name} must be a list of positive integers or None, got {value!r}")
    if not value:
        raise ConfigError(f"EngineConfig.{name} must name at least one size (None: the defaults), got {value!r}")
    for size in value:
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ConfigError(f"EngineConfig.{name} must hold positive integers, got {size!r} in {value!r}")
        if size > limit:
            raise ConfigError(f"EngineConfig.{name} sizes must be <= {limit_name} ({limit}), got {size}")
    return tuple(sorted(set(value)))
