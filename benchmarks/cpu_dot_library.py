"""Which XLA:CPU dot library a step should compile with: YNNPACK (XLA's default) or XLA's own Eigen dots.

    python -m benchmarks.cpu_dot_library            # JSON to benchmarks/runs/cpu_dot_library-<date>.json

Measures, alternating the two libraries over ``--repeats``, (1) the MoE expert SwiGLU (three
matmuls against every expert's weights, the decode step's largest cost) at several rows per expert
and the LM head at several rows, in float32 and bfloat16; (2) whole decode steps of the offline
benchmark's model (``bench:medium``) through the engine's runner, every step on YNNPACK against
few-token float32 steps on Eigen, with the engine's choice for this host (``PlatformChoices.for_platform``)
named per row.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import pathlib
import statistics
import sys

from benchmarks.engine_profile import median_ms
from benchmarks.provenance import cpu_description, git_state, write_result


def kernels(config, repeats: int, reps: int) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from scalellm_jax.engine.step_program import CPU_FEW_TOKEN_OPTIONS

    libraries = {"ynnpack": None, "eigen": dict(CPU_FEW_TOKEN_OPTIONS)}
    e, h, f, v = config.num_experts, config.hidden_size, config.intermediate_size, config.vocab_size
    rows = []
    for dtype in (jnp.float32, jnp.bfloat16):
        key = jax.random.key(0)
        w_gate = (0.02 * jax.random.normal(key, (e, h, f))).astype(dtype)
        w_up, w_down = w_gate * 1.1, (0.02 * jax.random.normal(key, (e, f, h))).astype(dtype)
        head = jax.random.normal(key, (h, v), dtype)

        def swiglu(x, w_gate, w_up, w_down, dtype=dtype):
            gate = jnp.matmul(x, w_gate, preferred_element_type=jnp.float32)
            up = jnp.matmul(x, w_up, preferred_element_type=jnp.float32)
            return jnp.matmul((jax.nn.silu(gate) * up).astype(dtype), w_down, preferred_element_type=jnp.float32)

        def lm_head(x, head):
            return jnp.matmul(x, head, preferred_element_type=jnp.float32)

        cases = [("experts", n, swiglu, (jax.random.normal(key, (e, n, h), dtype), w_gate, w_up, w_down))
                 for n in (8, 24, 48, 96, 192)]
        cases += [("lm_head", n, lm_head, (jax.random.normal(key, (n, h), dtype), head)) for n in (8, 64, 256)]
        for op, n, fn, args in cases:
            times = {name: [] for name in libraries}
            compiled = {name: jax.jit(fn, compiler_options=opts) for name, opts in libraries.items()}
            for repeat in range(repeats):
                for name in (list(libraries) if repeat % 2 == 0 else list(libraries)[::-1]):
                    times[name].append(median_ms(compiled[name], *args, reps=reps))
            row = {"op": op, "rows" if op == "lm_head" else "rows_per_expert": n, "dtype": jnp.dtype(dtype).name,
                   **{f"{name}_ms": statistics.median(t) for name, t in times.items()}}
            row["eigen_speedup"] = row["ynnpack_ms"] / row["eigen_ms"]
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def decode_steps(config, repeats: int) -> list[dict]:
    from benchmarks.engine_profile import decode_step_ms
    from scalellm_jax.config import EngineConfig
    from scalellm_jax.engine.resolved import resolve
    from scalellm_jax.engine.runner import ModelRunner
    from scalellm_jax.engine.step_program import CPU_FEW_TOKEN_OPTIONS, CPU_FEW_TOKENS, PlatformChoices
    from scalellm_jax.loader import Model

    model = Model.random(config, seed=0, dtype="float32")
    base = PlatformChoices.for_platform("cpu", dtype=model.dtype)
    eigen = dataclasses.replace(base, few_token_options=CPU_FEW_TOKEN_OPTIONS, few_tokens=CPU_FEW_TOKENS)
    resolved = resolve(EngineConfig(page_size=16, num_pages=2049, max_model_len=512, max_num_seqs=64,
                                    max_num_batched_tokens=512), config, dtype=model.dtype, budget_bytes=None)
    runners = {name: ModelRunner(model, resolved, choices=choices)
               for name, choices in (("ynnpack", dataclasses.replace(base, few_token_options=())), ("eigen", eigen))}
    rows = []
    for n, context in ((16, 100), (64, 100), (64, 300)):
        times = {name: [] for name in runners}
        for repeat in range(repeats):
            for name in (list(runners) if repeat % 2 == 0 else list(runners)[::-1]):
                times[name].append(decode_step_ms(runners[name], n, context))
        row = {"op": "decode_step", "rows": n, "context": context, "dtype": "float32",
               **{f"{name}_ms": statistics.median(t) for name, t in times.items()}}
        row["eigen_speedup"] = row["ynnpack_ms"] / row["eigen_ms"]
        row["engine_choice"] = "eigen" if base.few(n) else "ynnpack"
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cpu_dot_library", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=4, help="alternating A/B rounds per case")
    parser.add_argument("--reps", type=int, default=10, help="timed calls per round (median)")
    parser.add_argument("--model", default="medium", help="bench model shape (benchmarks/random_checkpoint.py)")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.reps < 1:
        parser.error("--repeats and --reps must be >= 1")
    git = git_state()
    import jax

    from benchmarks.random_checkpoint import bench_config

    config = bench_config(args.model)
    result = {"benchmark": "cpu_dot_library", "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "git": git, "command": "python -m benchmarks.cpu_dot_library " + " ".join(argv or sys.argv[1:]),
              "device": {"kind": "cpu", **cpu_description()}, "jax": jax.__version__, "model": args.model,
              "kernels": kernels(config, args.repeats, args.reps), "decode_steps": decode_steps(config, args.repeats)}
    write_result("cpu_dot_library", result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
