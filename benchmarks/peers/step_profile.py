"""Where a decode step's time goes, ours against vLLM's CPU engine: ``python -m benchmarks.peers.step_profile``.

    python -m benchmarks.peers.step_profile --peer-python .venv-peers/bin/python   # JSON to benchmarks/runs/

- **ours**: the median time of one decode step of ``--rows`` sequences at ``--context`` tokens through the
  engine's runner (``benchmarks.engine_profile.decode_step_ms``), whole and with one part removed at a
  time: the experts (the MoE layer returns its input), the LM head (logits broadcast from one hidden
  unit) or paged attention (returns its queries). Each variant compiles in its own process, patched
  before the model is traced; a part's cost is the whole step minus the step without it (parts
  interact, so the costs need not add up to the whole).
- **vLLM**: the peers workload generated once under torch's profiler, with the engine in-process so
  that its kernels are seen; the self time per call of its kernels (fused MoE, oneDNN matmuls, paged
  attention, greedy argmax), averaged over decode calls of ``--rows`` − 8 to ``--rows`` rows.

Variants alternate over ``--repeats``; both engines use the peers checkpoint and workload
(``benchmarks/peers/workload.py``, built on first use).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

from benchmarks.peers.offline_engine import RESULT_PREFIX
from benchmarks.provenance import cpu_description, git_state, write_result

ROOT = pathlib.Path(__file__).resolve().parents[2]
VARIANTS = ("whole", "no_experts", "no_lm_head", "no_attention")
# vLLM's CPU kernels, by the part of a step they do (oneDNN matmuls are split by their output width).
VLLM_KERNELS = {"_C::cpu_fused_moe": "experts", "_C::cpu_attention_with_kv_cache": "attention",
                "_C::greedy_argmax": "sampling", "_C::onednn_mm": "projections"}


def remove(part: str) -> None:
    """Patch one part of our model out, before anything is traced."""
    import jax.numpy as jnp

    if part == "no_experts":
        import scalellm_jax.model.moe as moe

        def no_experts(x, weights, experts, *args, out_dtype=None, **kwargs):
            return x.astype(out_dtype or x.dtype)

        moe.grouped_experts_chunked = no_experts
    elif part == "no_lm_head":
        import scalellm_jax.model.mixtral as mixtral

        def project(self, hidden):
            return jnp.broadcast_to(hidden[..., :1].astype(jnp.float32), (*hidden.shape[:-1], self.config.vocab_size))

        mixtral.Mixtral.project = project
    elif part == "no_attention":
        from pallas_kernels import xla

        xla.paged_decode_attention = lambda q, *a, **k: q


def run_ours(args) -> dict:
    remove(args.variant)
    from benchmarks.engine_profile import decode_step_ms
    from scalellm_jax import LLM

    llm = LLM(str(args.model_dir), dtype=args.dtype, warmup=False, max_num_seqs=max(64, args.rows),
              max_num_batched_tokens=512, max_model_len=512, page_size=16)
    return {"step_ms": decode_step_ms(llm.engine.runner, args.rows, args.context, reps=args.reps)}


def run_vllm(args) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process, under the profiler
    import time

    import torch

    from benchmarks.peers import offline_engine

    work = json.loads(pathlib.Path(args.workload).read_text())
    engine_args = argparse.Namespace(model_dir=str(args.model_dir), dtype=args.dtype, max_model_len=512,
                                     max_num_seqs=64, max_num_batched_tokens=512)
    _, generate, versions = offline_engine.run_vllm(engine_args, work["prompts"], work["lengths"])
    generate(work["prompts"][:4], [8] * 4)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        start = time.perf_counter()
        generate(work["prompts"], work["lengths"])
        wall = time.perf_counter() - start
    totals: dict[str, float] = {}
    vocab = json.loads((pathlib.Path(args.model_dir) / "config.json").read_text())["vocab_size"]
    steps = 0
    for event in prof.key_averages(group_by_input_shape=True):
        part = VLLM_KERNELS.get(event.key)
        shapes = event.input_shapes
        if part is None or not shapes or not shapes[0] or not args.rows - 8 <= shapes[0][0] <= args.rows:
            continue
        if part == "projections" and shapes[0][-1] == vocab:
            part = "lm_head"
            steps += event.count  # one vocabulary projection per decode step
        totals[part] = totals.get(part, 0.0) + event.self_cpu_time_total / 1e3
    return {"wall_s": wall, "tokens_per_s": sum(work["lengths"]) / wall, **versions, "decode_steps": steps,
            "per_step_ms": {part: total / max(steps, 1) for part, total in totals.items()}}


def child(args, engine: str, dtype: str, variant: str = "whole") -> dict:
    python = sys.executable if engine == "ours" else args.peer_python
    cmd = [python, "-m", "benchmarks.peers.step_profile", "--child", engine, "--dtype", dtype,
           "--rows", str(args.rows), "--context", str(args.context), "--reps", str(args.reps),
           "--model-dir", str(args.model_dir), "--workload", str(args.workload), "--variant", variant]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if engine == "vllm":
        from benchmarks.peers.__main__ import vllm_env

        env.update(vllm_env(args.peer_python)[0])
    done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                          timeout=1800)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise RuntimeError(f"{engine} {variant}: no result (exit {done.returncode})")


def profile_dtype(args, dtype: str) -> dict:
    """Both engines at one dtype: our variants and a vLLM profile per repeat, alternating."""
    steps: dict[str, list[float]] = {v: [] for v in VARIANTS}
    vllm_runs = []
    for repeat in range(args.repeats):
        if repeat % 2:
            vllm_runs.append(child(args, "vllm", dtype))
        for variant in VARIANTS if repeat % 2 == 0 else VARIANTS[::-1]:
            steps[variant].append(child(args, "ours", dtype, variant)["step_ms"])
            print(f"{dtype} ours {variant}: {steps[variant][-1]:.1f} ms", flush=True)
        if not repeat % 2:
            vllm_runs.append(child(args, "vllm", dtype))
        print(f"{dtype} vllm per step: {json.dumps(vllm_runs[-1]['per_step_ms'])}", flush=True)
    median = {v: statistics.median(t) for v, t in steps.items()}
    parts = sorted({part for run in vllm_runs for part in run["per_step_ms"]})
    return {"ours": {"step_ms": steps, "median_ms": median, "parts_ms": ours_parts(median)},
            "vllm": {"runs": vllm_runs,
                     "median_per_step_ms": {p: statistics.median(r["per_step_ms"].get(p, 0.0) for r in vllm_runs)
                                            for p in parts}}}


def ours_parts(step: dict[str, float]) -> dict[str, float]:
    parts = {"experts": step["whole"] - step["no_experts"], "lm_head": step["whole"] - step["no_lm_head"],
             "attention": step["whole"] - step["no_attention"]}
    return {**parts, "rest": step["whole"] - sum(parts.values())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers.step_profile",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--peer-python", default=".venv-peers/bin/python")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--rows", type=int, default=64, help="sequences in the decode step")
    parser.add_argument("--context", type=int, default=150, help="tokens per sequence (ours)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--reps", type=int, default=20, help="timed steps per process (median)")
    parser.add_argument("--model-dir", type=pathlib.Path, default=None, help="peers checkpoint (default: built)")
    parser.add_argument("--workload", type=pathlib.Path, default=None)
    parser.add_argument("--out", type=pathlib.Path, default=None)
    parser.add_argument("--child", choices=("ours", "vllm"), help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS, default="whole", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = run_ours(args) if args.child == "ours" else run_vllm(args)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return 0
    if args.repeats < 1 or args.reps < 1 or args.rows < 1:
        parser.error("--repeats, --reps and --rows must be >= 1")
    if not pathlib.Path(args.peer_python).is_file():
        parser.error(f"--peer-python: {args.peer_python} not found; `make bench-peers` builds it")
    if (args.model_dir is None) != (args.workload is None):
        parser.error("--model-dir and --workload go together")
    git = git_state()
    with tempfile.TemporaryDirectory(prefix="step-profile-") as folder:
        if args.model_dir is None:
            from benchmarks.peers.workload import prepare

            args.model_dir, args.workload, _ = prepare(pathlib.Path(folder), num_prompts=64, max_prompt_len=256,
                                                       max_tokens=128)
        by_dtype = {dtype: profile_dtype(args, dtype) for dtype in args.dtypes.split(",")}
    result = {"benchmark": "step_profile", "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "git": git, "command": "python -m benchmarks.peers.step_profile " + " ".join(argv or sys.argv[1:]),
              "device": {"kind": "cpu", **cpu_description()}, "rows": args.rows, "context": args.context,
              "dtypes": by_dtype}
    write_result("step_profile", result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
