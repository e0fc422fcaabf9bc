"""Flax Mixtral: layers, attention (with its KV-cache backend switch) and the MoE block."""

from scalellm_jax.model.attention import (
    AttentionBackend,
    CausalAttention,
    DenseCacheAttention,
    masked_attention,
)
from scalellm_jax.model.mixtral import DecoderLayer, Mixtral
from scalellm_jax.model.moe import SparseMoE, dense_moe_reference, grouped_experts, route

__all__ = [
    "AttentionBackend",
    "CausalAttention",
    "DecoderLayer",
    "DenseCacheAttention",
    "Mixtral",
    "SparseMoE",
    "dense_moe_reference",
    "grouped_experts",
    "masked_attention",
    "route",
]
