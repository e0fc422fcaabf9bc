"""Offline throughput: ``LLM.generate`` against Hugging Face ``generate`` on the same weights and workload.

    python -m benchmarks.offline_throughput                 # table, JSON to benchmarks/runs/
    python -m benchmarks.offline_throughput --json --smoke  # tiny end-to-end check, one JSON object

Workload: the first ``--num-prompts`` AlpacaEval instructions (``../shared/data``), tokenized with
Mixtral's tokenizer (BOS, truncated to ``--max-prompt-len``); each request generates exactly as many
tokens as Mixtral-8x7B-Instruct's real answer has (capped at ``--max-tokens``, EOS ignored, greedy).

Model: a small random-weight Mixtral (hidden 512, 4 layers, 8 experts, top-2, vocab 32000), float32.
Hugging Face gets the *same* weights: ours are exported to a legacy-layout safetensors folder and
loaded with ``MixtralForCausalLM.from_pretrained`` (so the comparison also exercises the export path).
Before timing, greedy outputs of the first ``--check-prompts`` prompts are compared (HF unbatched).

Throughput is requested output tokens / wall seconds. Ours excludes warmup (compilation); HF
excludes model build. HF runs ``generate`` in batches of ``--hf-batch-size`` with left padding; a
batch runs to its longest request, and the tokens beyond a request's own length are padding waste:
they are reported (``raw_output_tokens``) but not counted.

The timed engine run is lightly instrumented (``perf_counter`` around the engine's step phases, well
under 1% overhead) to report where the time goes; one decode step at the full batch is also timed
through the runner.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

from benchmarks.engine_profile import StepProfile, component_ms, decode_step_ms
from benchmarks.provenance import git_state, output_dir
from benchmarks.random_checkpoint import bench_config, write_hf_checkpoint
from benchmarks.workload_files import ALPACA_EVAL

TARGET_RATIO = 3.0

# Run-size knobs: (full benchmark, --smoke). Flags given explicitly win over both.
DEFAULTS = {
    "num_prompts": (64, 4),
    "max_prompt_len": (256, 32),
    "max_tokens": (128, 4),
    "max_num_seqs": (64, 4),
    "max_num_batched_tokens": (512, 16),
    "page_size": (16, 16),
    "max_model_len": (512, 64),
    "hf_batch_size": (64, 4),
    "check_prompts": (2, 2),
}


def model_config(smoke: bool):
    from scalellm_jax import preset

    return preset("tiny") if smoke else bench_config("medium")


# ---------------------------------------------------------------------------------------------- workload


@dataclasses.dataclass
class Workload:
    prompts: list[list[int]]
    lengths: list[int]  # output tokens per request
    truncated_prompts: int

    def summary(self) -> dict:
        p = [len(x) for x in self.prompts]
        return {
            "num_requests": len(p), "prompt_tokens": sum(p), "mean_prompt_len": sum(p) / len(p),
            "max_prompt_len": max(p), "truncated_prompts": self.truncated_prompts,
            "output_tokens": sum(self.lengths), "mean_output_len": sum(self.lengths) / len(self.lengths),
            "max_output_len": max(self.lengths),
        }


def load_workload(path: pathlib.Path, tokenizer, num_prompts: int, max_prompt_len: int, max_tokens: int,
                  too_long: str) -> Workload:
    """The first ``num_prompts`` usable rows; a prompt over ``max_prompt_len`` tokens is skipped or truncated
    as ``too_long`` says (``scalellm_jax.workloads``); answers capped at ``max_tokens``."""
    from scalellm_jax.workloads import load_rows

    rows = load_rows(path, tokenizer, max_prompt_len=max_prompt_len, too_long=too_long, first=num_prompts)
    if len(rows) < num_prompts:
        raise ValueError(f"{path}: only {len(rows)} prompts, {num_prompts} requested")
    return Workload([list(r.prompt_ids) for r in rows], [min(max_tokens, r.output_len) for r in rows],
                    sum(r.truncated for r in rows))


# ---------------------------------------------------------------------------------------------- Hugging Face


def build_hf(model, attn: str | None, experts: str | None):
    """``MixtralForCausalLM`` with our weights: export to a legacy safetensors folder, ``from_pretrained``."""
    import torch
    from transformers import MixtralForCausalLM

    options = {"dtype": torch.float32, "local_files_only": True}
    if attn:
        options["attn_implementation"] = attn
    if experts:
        options["experts_implementation"] = experts
    with tempfile.TemporaryDirectory(prefix="offline-throughput-hf-") as folder:
        hf = MixtralForCausalLM.from_pretrained(write_hf_checkpoint(model, folder), **options).eval()
    hf.generation_config.eos_token_id = None  # ignore EOS, like ours
    hf.generation_config.pad_token_id = 0
    return hf


def hf_generate(hf, prompts: list[list[int]], lengths: list[int], device: str = "cpu") -> list[list[int]]:
    """One left-padded batch on ``device``; returns ``max(lengths)`` new tokens per row."""
    import torch

    width, new = max(map(len, prompts)), max(lengths)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    with torch.inference_mode():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
    if out.shape[1] != width + new:
        raise RuntimeError(f"Hugging Face generated {out.shape[1] - width} tokens, expected {new}")
    return out[:, width:].tolist()


def run_hf(hf, work: Workload, batch_size: int, device: str = "cpu") -> tuple[dict, list[list[int]]]:
    outputs: list[list[int]] = []
    raw = steps = 0
    start = time.perf_counter()
    for b in range(0, len(work.prompts), batch_size):
        prompts, lengths = work.prompts[b:b + batch_size], work.lengths[b:b + batch_size]
        tokens = hf_generate(hf, prompts, lengths, device=device)
        outputs += [t[:n] for t, n in zip(tokens, lengths, strict=True)]
        raw += len(prompts) * max(lengths)
        steps += max(lengths)
    wall = time.perf_counter() - start
    useful = sum(len(t) for t in outputs)
    return {
        "wall_s": wall, "output_tokens": useful, "raw_output_tokens": raw, "tokens_per_s": useful / wall,
        "raw_tokens_per_s": raw / wall, "padding_waste": 1 - useful / raw, "batch_size": batch_size,
        "num_batches": -(-len(work.prompts) // batch_size), "generate_steps": steps, "ms_per_step": 1e3 * wall / steps,
    }, outputs


# ---------------------------------------------------------------------------------------------- ours


def run_ours(llm, work: Workload) -> tuple[dict, list[list[int]]]:
    from scalellm_jax import SamplingParams

    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in work.lengths]
    compilations = llm.engine.runner.num_compilations()
    profile = StepProfile(llm.engine)
    try:
        start = time.perf_counter()
        outs = llm.generate(prompt_token_ids=work.prompts, sampling_params=params)
        wall = time.perf_counter() - start
    finally:
        profile.remove()
    outputs = [o.token_ids for o in outs]
    produced = sum(map(len, outputs))
    if produced != sum(work.lengths):
        raise RuntimeError(f"engine produced {produced} tokens, expected {sum(work.lengths)}")
    return {
        "wall_s": wall, "output_tokens": produced, "tokens_per_s": produced / wall,
        "recompilations": llm.engine.runner.num_compilations() - compilations,
        "breakdown": profile.report(wall),
    }, outputs


# ---------------------------------------------------------------------------------------------- report


def print_table(r: dict) -> None:
    ours, hf = r["ours"], r["hf"]
    print(f"\noffline throughput: {r['workload']['num_requests']} requests, "
          f"{r['workload']['output_tokens']} output tokens, device {r['device']['kind']} "
          f"({r['device']['cpu_count']} CPUs)")
    print(f"{'':24}{'tok/s':>10}{'wall s':>10}{'tokens':>9}{'raw tokens':>12}")
    print(f"{'ours (LLM.generate)':24}{ours['tokens_per_s']:>10.1f}{ours['wall_s']:>10.2f}{ours['output_tokens']:>9}"
          f"{ours['output_tokens']:>12}")
    print(f"{'hf (generate, batch ' + str(hf['batch_size']) + ')':24}{hf['tokens_per_s']:>10.1f}{hf['wall_s']:>10.2f}"
          f"{hf['output_tokens']:>9}{hf['raw_output_tokens']:>12}")
    verdict = "meets" if r["meets_target"] else "below"
    print(f"ratio ours/hf: {r['ratio']:.2f}x  ({verdict} the {TARGET_RATIO:.0f}x target; "
          f"vs HF raw tokens: {r['ratio_vs_hf_raw']:.2f}x)")
    print(f"outputs match: {r['outputs_match']} (first {r['check']['prompts']} prompts, HF unbatched); "
          f"HF batched agreement {r['check']['hf_batched_agreement']:.2f}")
    b = ours["breakdown"]
    print(f"ours: warmup {ours['warmup_s']:.1f} s, {b['steps']} steps, step time {b['step_time_s']:.2f} s, "
          f"device wait {b['device_wait_s']:.2f} s, host "
          + ", ".join(f"{k[:-2]} {v:.2f} s" for k, v in b["host_phases"].items()))
    for k, v in b["by_bucket"].items():
        print(f"  {k:>12}: {v['steps']:4} steps, {v['mean_ms']:7.1f} ms/step")
    for k, v in ours["decode_step_ms"].items():
        print(f"  decode step via runner, {k}: {v:.1f} ms")
    for k, v in ours["decode_components_ms"].items():
        print(f"  outside the engine, {k}: {v:.1f} ms")
    print(f"hf: build {hf['build_s']:.1f} s, {hf['ms_per_step']:.1f} ms/generate step "
          f"(attn {hf['attn_implementation']}, experts {hf['experts_implementation']}, "
          f"{hf['torch_threads']} torch threads)")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.offline_throughput",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=pathlib.Path, default=ALPACA_EVAL, help=f"the {ALPACA_EVAL.name} file")
    for name, (full, smoke) in DEFAULTS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                            help=f"default {full} ({smoke} with --smoke)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed")
    parser.add_argument("--hf-attn", default=None, help="HF attn_implementation (default: transformers' choice)")
    parser.add_argument("--hf-experts", default=None, help="HF experts_implementation (default: transformers' choice)")
    parser.add_argument("--smoke", action="store_true", help="tiny model and workload; no results file unless --out")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help="results JSON path (default: benchmarks/runs/offline_throughput-<date>.json)")
    args = parser.parse_args(argv)
    for name, (full, smoke) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else full)
        if getattr(args, name) < (0 if name == "check_prompts" else 1):
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.max_prompt_len + args.max_tokens > args.max_model_len:
        parser.error(f"--max-model-len ({args.max_model_len}) must fit --max-prompt-len + --max-tokens "
                     f"({args.max_prompt_len} + {args.max_tokens})")
    return args


def main(argv: list[str] | None = None) -> int:
    raw_argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(raw_argv)
    git = git_state()  # before the engine is imported: the code that runs is the code recorded
    if not args.data.is_file():
        print(f"error: workload data not found: {args.data} (expected ../shared/data/{ALPACA_EVAL.name} "
              f"next to the project root, or pass --data)", file=sys.stderr)
        return 2
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print

    import jax
    import torch
    import transformers

    from scalellm_jax import LLM, Model, SamplingParams
    from scalellm_jax.tokenizer import MistralTokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    tokenizer = MistralTokenizer()
    work = load_workload(args.data, tokenizer, args.num_prompts, args.max_prompt_len, args.max_tokens, "truncate")
    config = model_config(args.smoke)
    say(f"workload: {work.summary()}")

    model = Model.random(config, seed=args.seed, dtype="float32")
    engine_options = dict(page_size=args.page_size, max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len)
    start = time.perf_counter()
    llm = LLM(model, tokenizer=tokenizer, warmup=True, **engine_options)
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    hf = build_hf(model, args.hf_attn, args.hf_experts)
    build_s = time.perf_counter() - start

    # Equivalence before timing: HF one prompt at a time (no padding) against ours.
    n_check = min(args.check_prompts, len(work.prompts))
    check_prompts, check_lengths = work.prompts[:n_check], work.lengths[:n_check]
    expected = [hf_generate(hf, [p], [n])[0] for p, n in zip(check_prompts, check_lengths, strict=True)]
    got = [o.token_ids for o in llm.generate(
        prompt_token_ids=check_prompts,
        sampling_params=[SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in check_lengths])]
    outputs_match = got == expected
    if not outputs_match:
        print("WARNING: greedy outputs differ between ours and Hugging Face on the check prompts "
              "(the weights or the models disagree; throughput numbers still follow)", file=sys.stderr)

    say("timing ours ...")
    ours, our_tokens = run_ours(llm, work)
    ours["warmup_s"] = warmup_s
    runner = llm.engine.runner
    mean_ctx = round(statistics.fmean(len(p) + n / 2 for p, n in zip(work.prompts, work.lengths, strict=True)))
    ours["decode_step_ms"] = {
        f"batch {runner.max_num_seqs}, context {ctx}": decode_step_ms(runner, runner.max_num_seqs, ctx)
        for ctx in (1, mean_ctx)
    }
    ours["decode_components_ms"] = {f"batch {runner.max_num_seqs}, {k}": v
                                    for k, v in component_ms(model, runner.max_num_seqs).items()}
    say("timing Hugging Face ...")
    hf_result, hf_tokens = run_hf(hf, work, args.hf_batch_size)
    hf_result.update(build_s=build_s, attn_implementation=hf.config._attn_implementation,
                     experts_implementation=getattr(hf.config, "_experts_implementation", None),
                     torch_threads=torch.get_num_threads())
    agreement = statistics.fmean(a == b for a, b in zip(our_tokens, hf_tokens, strict=True))

    device = jax.devices()[0]
    result = {
        "benchmark": "offline_throughput",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": {"kind": device.device_kind, "platform": device.platform, "cpu_count": os.cpu_count()},
        "versions": {"jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "git": git,
        "command": " ".join(["python -m benchmarks.offline_throughput", *raw_argv]),
        "smoke": args.smoke,
        "model_config": dataclasses.asdict(config),
        "dtype": "float32",
        "engine_config": {k: v for k, v in dataclasses.asdict(llm.engine.config).items()
                          if k not in ("gpu_memory_utilization",)} | {"num_pages": runner.num_pages},
        "workload": {"data": str(args.data), "num_prompts": args.num_prompts, "max_prompt_len": args.max_prompt_len,
                     "max_tokens": args.max_tokens, **work.summary()},
        "outputs_match": outputs_match,
        "check": {"prompts": n_check, "hf_batched_agreement": agreement},
        "ours": ours,
        "hf": hf_result,
        "ratio": ours["tokens_per_s"] / hf_result["tokens_per_s"],
        "ratio_vs_hf_raw": ours["tokens_per_s"] / hf_result["raw_tokens_per_s"],
        "target_ratio": TARGET_RATIO,
    }
    result["meets_target"] = result["ratio"] >= TARGET_RATIO

    out = args.out
    if out is None and not args.smoke:
        out = output_dir() / f"offline_throughput-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        result["results_file"] = str(out)
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
        if out is not None:
            print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
