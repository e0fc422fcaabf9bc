"""Random-weight Mixtral checkpoints on disk, for benchmarks that load a model the way a user's is loaded.

``BENCH_MODELS`` names model shapes between the ``tiny`` test preset and real Mixtral: ``medium``
(~107M parameters, 427 MB in float32) is the offline-throughput benchmark's model. On a 2-core CPU its
64-row decode step takes ~50 ms, i.e. ~1,300 tokens/s, the order of Mixtral-8x7B's decode rate on one
GPU, so per-token costs outside the model weigh about as much as they would there (``tiny`` steps in
~6 ms: 10,000 tokens/s, a stress test of the HTTP path rather than a serving regime).
"""

from __future__ import annotations

import json
import pathlib

BENCH_MODELS = {  # ModelConfig fields (kept as plain data: a load client need not import JAX)
    # smoke runs; head_dim 32, the smallest vLLM's CPU attention takes
    "tiny": dict(vocab_size=32000, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=32, num_experts=4, num_experts_per_tok=2, max_position_embeddings=4096),
    "medium": dict(vocab_size=32000, hidden_size=512, intermediate_size=1792, num_layers=4, num_heads=8,
                   num_kv_heads=2, head_dim=64, num_experts=8, num_experts_per_tok=2, max_position_embeddings=4096),
}


def bench_config(name: str):
    from scalellm_jax.config import ModelConfig

    return ModelConfig(**BENCH_MODELS[name])


def write_hf_checkpoint(model, folder: str | pathlib.Path) -> pathlib.Path:
    """``model`` (a ``scalellm_jax.Model``) as a legacy Hugging Face folder: float32 safetensors + config.json.

    No tokenizer files: loaders fall back to Mixtral's tokenizer from mistral-common.
    """
    import numpy as np
    from safetensors.numpy import save_file

    from scalellm_jax.checkpoints.hf_layout import iter_hf_tensors

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: np.asarray(arr, np.float32) for name, arr in iter_hf_tensors(model.params, model.config)}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    del tensors
    config = model.config.to_hf_dict()
    config["dtype"] = config["torch_dtype"] = "float32"
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def write_bench_model(name: str, folder: str | pathlib.Path, seed: int = 0) -> pathlib.Path:
    """The ``BENCH_MODELS[name]`` shape with random weights from ``seed``, written to ``folder``."""
    from scalellm_jax.loader import Model

    return write_hf_checkpoint(Model.random(bench_config(name), seed=seed, dtype="float32"), folder)
