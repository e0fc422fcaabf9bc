"""Run in a subprocess with 8 fake CPU devices: sharded vs single-device logits, as JSON on stdout.

Usage: python tests/parallel/sharded_check.py HF_DIR EP TP   (XLA_FLAGS must give 8 host devices)
"""

import json
import sys

import jax
import numpy as np

import scalellm_jax
from scalellm_jax import LLM, SamplingParams
from scalellm_jax.parallel import ParallelConfig


def main() -> None:
    folder, ep, tp = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    parallel = ParallelConfig(tensor_parallel_size=tp, expert_parallel_size=ep)
    single = scalellm_jax.load(folder, dtype="float32")
    sharded = scalellm_jax.load(folder, dtype="float32", parallel=parallel)
    wq = sharded.params["layers_0"]["attn"]["wq"]
    w_gate = sharded.params["layers_0"]["moe"]["w_gate"]
    tokens = np.random.default_rng().integers(0, single.config.vocab_size, (3, 11))
    a = np.asarray(single.logits(tokens))
    b = np.asarray(sharded.logits(tokens))
    prompts = [list(map(int, row[: n])) for row, n in zip(tokens, (2, 7, 11), strict=True)]
    options = dict(warmup=False, page_size=4, num_pages=64, max_num_seqs=4, max_num_batched_tokens=16)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    plain = LLM(single, **options)
    parallel_llm = LLM(folder, dtype="float32", tensor_parallel_size=tp, expert_parallel_size=ep, **options)
    engine_tokens = [[o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=params)]
                     for llm in (plain, parallel_llm)]
    # Prefix caching over sharded pools: a shared prefix computed once, then reused by later prompts.
    shared = list(map(int, tokens[2]))
    prefixed = [shared + [int(t)] for t in tokens[0][:3]]
    uncached = LLM(single, enable_prefix_caching=False, **options)
    prefix_tokens = [[o.token_ids for o in llm.generate(prompt_token_ids=batch, sampling_params=params)]
                     for llm in (uncached, parallel_llm) for batch in ([shared], prefixed)]
    # int8 KV: each layer's pools carry scales, sharded over KV heads like the pages.
    int8_llms = [LLM(m, kv_cache_dtype="int8", **options) for m in (single, sharded)]
    int8_tokens = [[o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=params)]
                   for llm in int8_llms]
    int8_pools = int8_llms[1].engine.runner.pools[0]
    print(json.dumps({
        "prefix_equal": prefix_tokens[:2] == prefix_tokens[2:],
        "prefix_hits": parallel_llm.engine.stats().prefix_cache_hits,
        "engine_equal": engine_tokens[0] == engine_tokens[1],
        "engine_mesh_shape": dict(parallel_llm.model.mesh.shape),
        "devices": jax.device_count(),
        "max_rel_err": float(np.abs(a - b).max() / np.abs(a).max()),
        "wq_shard_shape": list(wq.addressable_shards[0].data.shape),
        "w_gate_shard_shape": list(w_gate.addressable_shards[0].data.shape),
        "kv_pool_shard_shape": list(parallel_llm.engine.runner.pools[0].k_pages.addressable_shards[0].data.shape),
        "kv_pool_shape": list(parallel_llm.engine.runner.pools[0].k_pages.shape),
        "int8_engine_equal": int8_tokens[0] == int8_tokens[1],
        "int8_shard_shapes": [list(a.addressable_shards[0].data.shape) for a in jax.tree.leaves(int8_pools)],
        "generate_equal": scalellm_jax.generate(single, prompts, 8) == scalellm_jax.generate(sharded, prompts, 8),
    }))


if __name__ == "__main__":
    main()
