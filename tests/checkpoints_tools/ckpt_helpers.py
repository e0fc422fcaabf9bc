"""Helpers for checkpoints_tools tests: tiny random-weight Mixtral checkpoints in every on-disk layout."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np

from tests.torch_reference import require_torch

# Deliberately all different (H=32, nH*D=64, I=48, V=96, E=4) so a wrong transpose cannot hide.
TINY = dict(
    vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
    max_position_embeddings=128, initializer_range=0.1,
)


def build_hf(folder: Path, dtype: str = "float32", layout: str = "legacy", max_shard_size: str | None = None,
             **overrides):
    """Random Mixtral saved at ``folder``; returns the torch model (eval mode, ``dtype``).

    layout ``legacy``: ``save_pretrained`` (per-expert tensors); ``fused``: the transformers 5
    in-memory ``state_dict`` (gate_up_proj / down_proj) saved directly with safetensors.
    """
    torch = require_torch()
    from safetensors.torch import save_file
    from transformers import MixtralConfig, MixtralForCausalLM

    seed = random.randrange(2**31)
    print(f"build_hf({folder.name}): torch seed {seed}")  # shown on failure, for reproduction
    torch.manual_seed(seed)
    config = MixtralConfig(**{**TINY, **overrides})
    model = MixtralForCausalLM(config).eval().to(getattr(torch, dtype))
    if layout == "legacy":
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(folder, safe_serialization=True, **kwargs)
    else:
        folder.mkdir(parents=True)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # shared with the embedding; safetensors refuses shared tensors
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(folder)
    return model


def rewrite_hf(src: Path, dst: Path, edit=None, config_edit=None) -> Path:
    """Copy a single-file HF checkpoint, letting ``edit(dict of numpy arrays)`` change its tensors."""
    from safetensors.numpy import load_file, save_file

    dst.mkdir(parents=True)
    config = json.loads((src / "config.json").read_text())
    if config_edit:
        config_edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(src / "model.safetensors"))
    if edit:
        edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def raw_tensors(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of an HF folder as numpy (bit-exact, any dtype)."""
    from scalellm_jax.checkpoints.safetensors_io import HFCheckpoint

    ckpt = HFCheckpoint(folder)
    return {name: ckpt.read(name) for name in ckpt.names()}


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def to_numpy(t) -> np.ndarray:
    """torch tensor -> numpy, bit-exact (bfloat16 through ml_dtypes)."""
    import ml_dtypes
    torch = require_torch()

    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def expected_params(model) -> dict[tuple[str, ...], np.ndarray]:
    """Our params computed straight from the torch model by the documented rule (independent of hf_layout)."""
    c = model.config
    H, nH, nKV, D, F = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size
    sd = {k: to_numpy(v) for k, v in model.state_dict().items()}
    out = {("embed", "embedding"): sd["model.embed_tokens.weight"]}
    for i in range(c.num_hidden_layers):
        p, L = f"model.layers.{i}.", f"layers_{i}"
        gate_up, down = sd[p + "mlp.experts.gate_up_proj"], sd[p + "mlp.experts.down_proj"]
        out.update({
            (L, "attn_norm", "scale"): sd[p + "input_layernorm.weight"],
            (L, "attn", "wq"): sd[p + "self_attn.q_proj.weight"].T.reshape(H, nH, D),
            (L, "attn", "wk"): sd[p + "self_attn.k_proj.weight"].T.reshape(H, nKV, D),
            (L, "attn", "wv"): sd[p + "self_attn.v_proj.weight"].T.reshape(H, nKV, D),
            (L, "attn", "wo"): sd[p + "self_attn.o_proj.weight"].T.reshape(nH, D, H),
            (L, "mlp_norm", "scale"): sd[p + "post_attention_layernorm.weight"],
            (L, "moe", "router"): sd[p + "mlp.gate.weight"].T,
            (L, "moe", "w_gate"): gate_up[:, :F].transpose(0, 2, 1),
            (L, "moe", "w_up"): gate_up[:, F:].transpose(0, 2, 1),
            (L, "moe", "w_down"): down.transpose(0, 2, 1),
        })
    out[("final_norm", "scale")] = sd["model.norm.weight"]
    if not c.tie_word_embeddings:
        out[("lm_head", "kernel")] = sd["lm_head.weight"].T
    return out


def bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return (a.dtype == b.dtype and a.shape == b.shape
            and np.array_equal(np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(b).view(np.uint8)))


def build_big_legacy_checkpoint(folder: Path, layers: int = 16, hidden: int = 256, inter: int = 512,
                                experts: int = 8, vocab: int = 4096, seed: int = 0) -> int:
    """A random float32 legacy-layout checkpoint, one shard per layer, written without torch.

    Returns the total tensor bytes. Memory while writing stays at one layer.
    """
    from safetensors.numpy import save_file

    heads, kv_heads, head_dim = 8, 2, hidden // 8
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    config = dict(
        architectures=["MixtralForCausalLM"], model_type="mixtral", vocab_size=vocab, hidden_size=hidden,
        intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=head_dim, num_local_experts=experts, num_experts_per_tok=2,
        max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=1e6, tie_word_embeddings=False,
    )
    (folder / "config.json").write_text(json.dumps(config))

    def rand(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    shards = [{"model.embed_tokens.weight": rand(vocab, hidden)}]
    for i in range(layers):
        p = f"model.layers.{i}."
        shard = {
            p + "input_layernorm.weight": rand(hidden),
            p + "post_attention_layernorm.weight": rand(hidden),
            p + "self_attn.q_proj.weight": rand(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": rand(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": rand(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": rand(hidden, heads * head_dim),
            p + "block_sparse_moe.gate.weight": rand(experts, hidden),
        }
        for e in range(experts):
            x = f"{p}block_sparse_moe.experts.{e}."
            shard.update({x + "w1.weight": rand(inter, hidden), x + "w3.weight": rand(inter, hidden),
                          x + "w2.weight": rand(hidden, inter)})
        shards.append(shard)
    shards.append({"model.norm.weight": rand(hidden), "lm_head.weight": rand(vocab, hidden)})
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
        total += sum(a.nbytes for a in shard.values())
    shards.clear()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return total
