"""Run in a subprocess with 8 fake CPU devices: a vocabulary that does not divide the tensor axis (padded on the
mesh) gives the single-device logits and tokens, from random weights, an HF folder and a converted folder.

Usage: python tests/parallel/awkward_shapes_check.py WORK_DIR   (XLA_FLAGS must give 8 host devices)
"""

import json
import sys
from pathlib import Path

import jax
import numpy as np
from safetensors.numpy import save_file

import scalellm_jax
from checkpoints_tools.convert import convert_checkpoint
from scalellm_jax import LLM, SamplingParams
from scalellm_jax.checkpoints.hf_layout import iter_hf_tensors
from scalellm_jax.config import ModelConfig
from scalellm_jax.parallel import ParallelConfig

CONFIG = ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=8,
                     num_kv_heads=2, head_dim=4, num_experts=8, num_experts_per_tok=2, max_position_embeddings=128)


def main() -> None:
    work = Path(sys.argv[1])
    parallel = ParallelConfig(tensor_parallel_size=8)
    single = scalellm_jax.Model.random(CONFIG, seed=3, dtype="float32")
    sharded = single.sharded(parallel)
    hf = work / "hf"
    hf.mkdir()
    tensors = {name: np.asarray(a) for name, a in iter_hf_tensors(single.params, CONFIG)}
    save_file(tensors, str(hf / "model.safetensors"))
    (hf / "config.json").write_text(json.dumps(CONFIG.to_hf_dict()))
    convert_checkpoint(hf, work / "converted", progress=False)
    loaded = {name: scalellm_jax.load(work / name, dtype="float32", parallel=parallel) for name in ("hf", "converted")}

    tokens = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (3, 9))
    want = np.asarray(single.logits(tokens))
    errors = {name: float(np.max(np.abs(np.asarray(m.logits(tokens)) - want)) / np.max(np.abs(want)))
              for name, m in [("random", sharded), *loaded.items()]}
    options = dict(warmup=False, page_size=4, num_pages=64, max_num_seqs=4, max_num_batched_tokens=16)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    prompts = [list(map(int, row[:n])) for row, n in zip(tokens, (2, 5, 9), strict=True)]
    outputs = [[o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=params)]
               for llm in (LLM(single, **options), LLM(sharded, **options),
                           LLM(str(work / "hf"), dtype="float32", tensor_parallel_size=8, **options))]
    head = sharded.params["lm_head"]["kernel"]
    print(json.dumps({
        "devices": len(jax.devices()),
        "logits_shape": list(np.asarray(sharded.logits(tokens)).shape),
        "max_rel_err": errors,
        "lm_head_shape": list(head.shape),
        "lm_head_shard_shape": list(head.addressable_shards[0].data.shape),
        "padding_is_zero": not np.any(np.asarray(head)[:, CONFIG.vocab_size:]),
        "engine_equal": outputs[0] == outputs[1] == outputs[2],
    }))


if __name__ == "__main__":
    main()
