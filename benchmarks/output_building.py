"""Host work per engine step for building outputs: whole outputs copied every step against deltas.

Many requests with long outputs run on a simulated device (the step sleeps the cost model's time, so
the engine thread's CPU is all host work), and every step's outputs are returned as ``LLMEngine.step``
returns them. Two source trees are compared side by side, alternating over rounds (ABBA order), each
in its own process: ``--old`` (default ``/work/main``: copies every running request's whole output,
token ids, logprobs and top logprobs, every step) and ``--new`` (this tree: per-step deltas folded into
whole outputs at the cost of the new tokens). Each worker runs every case (logprobs off, then on) in
one process and reports, per case, the output work (``_emit_pending`` and, where present,
``_accumulate``), the engine thread's CPU per step and the wall time, over the whole run and over its
last tenth of steps (the longest outputs).

    python -m benchmarks.output_building                     # 64 requests x 2,000 tokens, 3 rounds
    python -m benchmarks.output_building --requests 16 --tokens 200 --rounds 1   # a quick look
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUTPUT_METHODS = ("_emit_pending", "_accumulate")  # the output work, in whichever tree has them


def worker(args) -> dict:
    """Run every case in the tree on ``sys.path[0]`` and return its timings."""
    from scalellm_jax import LLM, SamplingParams

    llm = LLM("tiny", simulate_device=args.device, max_num_seqs=args.requests,
              max_num_batched_tokens=max(2048, args.requests), max_model_len=args.prompt_tokens + args.tokens + 8,
              scheduling_policy="fcfs", swap_space_gb=0, seed=0)
    engine = llm.engine
    timer = {"s": 0.0}
    for name in OUTPUT_METHODS:
        method = getattr(engine, name, None)
        if method is not None:
            setattr(engine, name, _timed(method, timer))
    cases = []
    for case in ("warmup", False, True):  # the warm-up (tokenizer, first steps) is not reported
        logprobs = case is True
        params = SamplingParams(max_tokens=8 if case == "warmup" else args.tokens, ignore_eos=True,
                                logprobs=logprobs, top_logprobs=args.top_logprobs if logprobs else 0)
        for i in range(args.requests):
            prompt = [1] + [300 + (7 * i + j) % 20000 for j in range(args.prompt_tokens - 1)]
            engine.add_request(prompt, params, request_id=f"{case}-{i}")
        steps = []
        total = time.perf_counter()
        while engine.has_unfinished():
            timer["s"] = 0.0
            wall, cpu = time.perf_counter(), time.thread_time()
            engine.step()
            steps.append((time.perf_counter() - wall, time.thread_time() - cpu, timer["s"]))
        total = time.perf_counter() - total
        if case == "warmup":
            continue
        tail = steps[-max(1, len(steps) // 10):]
        cases.append({
            "logprobs": logprobs, "top_logprobs": args.top_logprobs if logprobs else 0, "steps": len(steps),
            "wall_s": total,
            "output_work_s": sum(s[2] for s in steps),
            "output_work_ms_per_step": 1e3 * statistics.fmean(s[2] for s in steps),
            "output_work_ms_per_step_last_tenth": 1e3 * statistics.fmean(s[2] for s in tail),
            "cpu_ms_per_step": 1e3 * statistics.fmean(s[1] for s in steps),
            "cpu_ms_per_step_last_tenth": 1e3 * statistics.fmean(s[1] for s in tail),
            "wall_ms_per_step": 1e3 * statistics.fmean(s[0] for s in steps),
        })
    return {"cases": cases}


def _timed(method, timer):
    def timed(*a, **k):
        start = time.perf_counter()
        try:
            return method(*a, **k)
        finally:
            timer["s"] += time.perf_counter() - start
    return timed


def run_tree(tree: Path, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--tree", str(tree),
           "--requests", str(args.requests), "--tokens", str(args.tokens), "--prompt-tokens", str(args.prompt_tokens),
           "--top-logprobs", str(args.top_logprobs), "--device", args.device]
    env = dict(os.environ, PYTHONPATH=str(tree), JAX_PLATFORMS="cpu")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tree, check=False)
    if done.returncode != 0:
        raise SystemExit(f"worker in {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def tree_commit(tree: Path) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def summarize(runs: list[dict]) -> list[dict]:
    """Per case: each tree's medians over rounds and the old/new ratios per round (rounds pair in order)."""
    rows = []
    keys = ("output_work_ms_per_step", "output_work_ms_per_step_last_tenth", "cpu_ms_per_step",
            "cpu_ms_per_step_last_tenth", "wall_ms_per_step", "wall_s")
    rounds = sorted({r["round"] for r in runs})
    for c, case in enumerate(runs[0]["result"]["cases"]):
        row = {"logprobs": case["logprobs"], "top_logprobs": case["top_logprobs"]}
        for key in keys:
            per_tree = {t: [r["result"]["cases"][c][key] for r in runs if r["tree"] == t] for t in ("old", "new")}
            ratios = []
            for k in rounds:
                old = [r["result"]["cases"][c][key] for r in runs if r["tree"] == "old" and r["round"] == k]
                new = [r["result"]["cases"][c][key] for r in runs if r["tree"] == "new" and r["round"] == k]
                if old and new and new[0] > 0:
                    ratios.append(old[0] / new[0])
            row[key] = {"old_median": statistics.median(per_tree["old"]),
                        "new_median": statistics.median(per_tree["new"]), "old": per_tree["old"],
                        "new": per_tree["new"], "old_over_new_per_round": ratios,
                        "old_over_new_median": statistics.median(ratios) if ratios else None}
        rows.append(row)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=2000, help="output tokens per request")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--top-logprobs", type=int, default=5, help="alternatives per token when logprobs are on")
    parser.add_argument("--device", default="h200", help="the simulated device")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--old", type=Path, default=Path("/work/main"), help="the tree that copies whole outputs")
    parser.add_argument("--new", type=Path, default=ROOT, help="the tree with deltas")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tree", type=Path, help=argparse.SUPPRESS)
    raw = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(raw)
    if args.worker:
        print(json.dumps(worker(args)))
        return

    from benchmarks.provenance import cpu_description, git_state, output_dir, write_result

    git = git_state()
    trees = {"old": args.old.resolve(), "new": args.new.resolve()}
    runs = []
    start = time.perf_counter()
    for k in range(args.rounds):
        for name in ("old", "new") if k % 2 == 0 else ("new", "old"):
            result = run_tree(trees[name], args)
            runs.append({"round": k, "tree": name, "result": result})
            lines = ", ".join(f"logprobs {'on' if c['logprobs'] else 'off'}: output work "
                              f"{c['output_work_ms_per_step']:.3f} ms/step (last tenth "
                              f"{c['output_work_ms_per_step_last_tenth']:.3f}), CPU {c['cpu_ms_per_step']:.2f} ms/step"
                              for c in result["cases"])
            print(f"round {k} {name}: {lines}", flush=True)
    summary = summarize(runs)
    for row in summary:
        w, t, cpu = (row[k] for k in ("output_work_ms_per_step", "output_work_ms_per_step_last_tenth",
                                      "cpu_ms_per_step"))
        print(f"logprobs {'on' if row['logprobs'] else 'off'}: output work {w['old_median']:.3f} -> "
              f"{w['new_median']:.3f} ms/step ({w['old_over_new_median']:.1f}x; rounds "
              f"{', '.join(f'{r:.1f}' for r in w['old_over_new_per_round'])}), last tenth {t['old_median']:.3f} -> "
              f"{t['new_median']:.3f} ms; engine CPU {cpu['old_median']:.2f} -> {cpu['new_median']:.2f} ms/step "
              f"({cpu['old_over_new_median']:.2f}x)")
    now = datetime.datetime.now(datetime.UTC)
    result = {
        "benchmark": "output_building", "date": now.isoformat(timespec="seconds"), "git": git,
        "command": " ".join(["python -m benchmarks.output_building", *raw]),
        "device": {"kind": f"simulated {args.device} (the step sleeps the cost model's time); host CPU",
                   **cpu_description()},
        "trees": {name: {"path": str(path), "commit": tree_commit(path)} for name, path in trees.items()},
        "workload": {"requests": args.requests, "output_tokens": args.tokens, "prompt_tokens": args.prompt_tokens,
                     "top_logprobs_when_on": args.top_logprobs, "model": "tiny preset (config only)",
                     "scheduling_policy": "fcfs", "detokenized": True},
        "seconds": time.perf_counter() - start,
        "summary": summary, "runs": runs,
    }
    out = args.out or output_dir() / f"output_building-{now.strftime('%Y%m%d-%H%M%S')}.json"
    write_result("output_building", result, out)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        tree = sys.argv[sys.argv.index("--tree") + 1]
        sys.path[:0] = [tree]  # the tree under test, ahead of this file's own folder
    main()
