"""The whole GPU evaluation in one command: ceilings, kernels, decode roofline, warmup, serving, HF baseline.

    python -m benchmarks.gpu_suite                      # on a GPU host: Mixtral-8x7B-shaped random bf16 weights
    python -m benchmarks.gpu_suite --preset small       # CPU: the same sections at toy sizes (tested in CI)

Sections, each recorded (or its error, so one failure never loses the others) in one JSON under
``benchmarks/results/`` with a markdown table next to it:

1. ``ceilings``: measured device copy bandwidth and bf16 matmul rate.
2. ``kernels``: our Pallas paged decode / ragged prefill against XLA and jax's bundled kernel
   (``benchmarks.kernels``), a reduced grid.
3. ``decode``: the serving engine's decode step at batch 1, 16, 64, 128, 256 against the memory
   roofline: bytes that must be read per step (dense weights, the experts the batch can touch —
   ``E · (1 − (1 − k/E)^batch)`` per layer under uniform routing — and the KV of every row) over the
   measured copy bandwidth. Also the warmup (compile) time and a check that a mixed workload after
   warmup compiles nothing.
4. ``serving``: ``python -m scalellm_jax.server`` with the same model, loaded by the serving load
   client (``benchmarks.serving``) at 64 concurrent streams with AlpacaEval-derived lengths; then,
   the server stopped, the same workload through an in-process ``AsyncEngine``
   (``benchmarks.serving --in-process``): HTTP/in-process tokens/s and added TTFT p50 are the
   server's overhead (targets: >= 0.95x, <= +5 ms).
5. ``hf``: the same workload through Hugging Face ``generate`` (torch, bf16 on GPU, batch 64 with
   padding), the baseline a researcher would otherwise use.

The in-process engine is released before the server starts, and the server stopped before the
HF model is built: Mixtral-8x7B in bf16 (~94 GB) fits an H200 once, not twice.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import pathlib
import subprocess
import sys
import time
import traceback

from benchmarks.provenance import git_state

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DATA = ROOT.parent / "shared" / "data" / "alpaca_eval_mixtral_8x7b_instruct.jsonl"


@dataclasses.dataclass(frozen=True)
class SuiteConfig:
    """Sizes of one suite run (``PRESETS`` below)."""

    model: str  # a scalellm_jax preset name (random weights)
    dtype: str
    batches: tuple[int, ...]  # decode batch sizes
    context: int  # tokens per row in the decode measurement
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    kernel_batches: tuple[int, ...]
    kernel_contexts: tuple[int, ...]
    kernel_prompts: tuple[tuple[int, ...], ...]
    copy_bytes: int
    matmul_n: int
    concurrency: int
    num_prompts: int
    max_tokens: int  # cap on each request's answer length
    hf_batch: int


PRESETS = {
    "mixtral-8x7b": SuiteConfig(
        model="mixtral-8x7b", dtype="bfloat16", batches=(1, 16, 64, 128, 256), context=512, max_num_seqs=256,
        max_num_batched_tokens=2048, max_model_len=2048, kernel_batches=(1, 64, 256), kernel_contexts=(4096,),
        kernel_prompts=((4096,), (1024,) * 4), copy_bytes=2 << 30, matmul_n=8192, concurrency=64, num_prompts=192,
        max_tokens=256, hf_batch=64,
    ),
    "small": SuiteConfig(
        model="tiny", dtype="float32", batches=(1, 4), context=32, max_num_seqs=4, max_num_batched_tokens=32,
        max_model_len=128, kernel_batches=(2,), kernel_contexts=(64,), kernel_prompts=((24, 8),),
        copy_bytes=16 << 20, matmul_n=256, concurrency=4, num_prompts=6, max_tokens=8, hf_batch=4,
    ),
}


def section(results: dict, name: str, fn, *args):
    """Run one section into ``results[name]``; an exception is recorded, not raised."""
    start = time.perf_counter()
    print(f"== {name}", flush=True)
    try:
        results[name] = fn(*args)
    except Exception as exc:  # noqa: BLE001 - one failing section must not lose the others
        traceback.print_exc()
        results[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
    results[name]["section_s"] = round(time.perf_counter() - start, 2)
    return results[name]


# ---------------------------------------------------------------------------------------------- sections


def ceilings(cfg: SuiteConfig) -> dict:
    from benchmarks.kernels import copy_bandwidth, matmul_rate

    return {"copy_bandwidth_GBps": copy_bandwidth(cfg.copy_bytes) / 1e9,
            "bf16_matmul_TFLOPs": matmul_rate(cfg.matmul_n) / 1e12}


def kernels(cfg: SuiteConfig, copy_bw: float, flops: float) -> dict:
    import jax
    import numpy as np

    from benchmarks.kernels import bench_decode, bench_prefill

    interpret = jax.devices()[0].platform != "gpu"
    rng = np.random.default_rng(0)
    return {
        "interpret": interpret,
        "decode": [bench_decode(rng, b, c, interpret, copy_bw)
                   for b in cfg.kernel_batches for c in cfg.kernel_contexts],
        "prefill": [bench_prefill(rng, list(p), interpret, flops) for p in cfg.kernel_prompts],
    }


def step_bytes(config, batch: int, context: int, itemsize: int, kv_itemsize: int) -> dict:
    """Bytes a decode step must read: dense weights, the experts ``batch`` tokens can reach, the KV."""
    c = config
    h, e, k = c.hidden_size, c.num_experts, c.num_experts_per_tok
    attn = h * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim + c.num_heads * c.head_dim * h
    dense = c.num_layers * (attn + h * e + 2 * h) + 2 * c.vocab_size * h + h  # + embeddings rows (tiny) ignored
    expert = 3 * h * c.intermediate_size
    experts_hit = e * (1 - (1 - k / e) ** batch)  # expected distinct experts per layer, uniform routing
    kv = batch * context * c.num_layers * 2 * c.num_kv_heads * c.head_dim * kv_itemsize
    weights = (dense + c.num_layers * experts_hit * expert) * itemsize
    return {"weights": weights, "kv": kv, "total": weights + kv, "experts_hit_per_layer": experts_hit}


def decode(cfg: SuiteConfig, copy_bw: float) -> dict:
    import jax
    import numpy as np

    from benchmarks.engine_profile import decode_step_ms
    from scalellm_jax import EngineConfig, Model, SamplingParams, preset
    from scalellm_jax.engine.engine import LLMEngine

    start = time.perf_counter()
    model = Model.random(preset(cfg.model), seed=0, dtype=cfg.dtype)
    jax.block_until_ready(model.params)
    init_s = time.perf_counter() - start
    engine = LLMEngine(model, EngineConfig(
        max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens,
        max_model_len=cfg.max_model_len, swap_space_gb=0,
    ))
    start = time.perf_counter()
    engine.warmup(progress=False)
    warmup_s = time.perf_counter() - start
    compiled = engine.runner.num_compilations()
    itemsize = np.dtype(model.params["embed"]["embedding"].dtype).itemsize
    rows = []
    for batch in cfg.batches:
        ms = decode_step_ms(engine.runner, batch, cfg.context)
        need = step_bytes(model.config, batch, cfg.context, itemsize, itemsize)
        roofline_ms = 1e3 * need["total"] / copy_bw
        rows.append({"batch": batch, "context": cfg.context, "step_ms": ms, "bytes": need["total"],
                     "roofline_ms": roofline_ms, "roofline_fraction": roofline_ms / ms,
                     "tokens_per_s": batch / ms * 1e3})
        print(f"  decode batch {batch:4d}: {ms:8.2f} ms, roofline {roofline_ms:7.2f} ms "
              f"({100 * roofline_ms / ms:5.1f}%)", flush=True)
    # A mixed workload after warmup (random lengths, sampling, an abort) must compile nothing.
    rng = np.random.default_rng(0)
    ids = [engine.add_request(rng.integers(3, 1000, int(rng.integers(1, cfg.max_num_batched_tokens))).tolist(),
                              SamplingParams(max_tokens=int(rng.integers(1, 8)), temperature=float(rng.choice([0, 1]))))
           for _ in range(2 * cfg.max_num_seqs if cfg.max_num_seqs <= 8 else 24)]
    engine.abort(ids[-1])
    while engine.has_unfinished():
        engine.step()
    result = {"model_init_s": init_s, "warmup_s": warmup_s, "compilations_after_warmup":
              engine.runner.num_compilations() - compiled, "rows": rows}
    del engine, model
    gc.collect()
    return result


def serving(cfg: SuiteConfig, out_dir: pathlib.Path, timeout: float) -> dict:
    """The server under the load client, then (the server stopped: one copy of the model fits) the same
    workload through an in-process ``AsyncEngine``; their ratio is the HTTP path's overhead."""
    from benchmarks.serving import overhead_report, start_server, stop_server

    options = dict(max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens,
                   max_model_len=cfg.max_model_len)
    workload = ["--concurrency", str(cfg.concurrency), "--num-prompts", str(cfg.num_prompts),
                "--max-tokens", str(cfg.max_tokens), "--dataset", str(DATA), "--no-plot"]
    start = time.perf_counter()
    process, url, command = start_server(cfg.model, cfg.dtype, options, out_dir / "gpu_suite-server.log",
                                         timeout=timeout)
    try:
        ready_s = time.perf_counter() - start
        client_out = out_dir / "gpu_suite-serving.json"
        subprocess.run([sys.executable, "-m", "benchmarks.serving", "--url", url, "--out", str(client_out), *workload],
                       check=True, cwd=ROOT, timeout=timeout)
        measured = json.loads(client_out.read_text())
    finally:
        stop_server(process)
    result = {"server_command": command, "server_ready_s": ready_s, "client": measured}
    in_process_out = out_dir / "gpu_suite-serving-in-process.json"
    try:  # the baseline failing must not lose the server's own numbers (the HF comparison uses them)
        subprocess.run([sys.executable, "-m", "benchmarks.serving", "--in-process", "--model", cfg.model, "--dtype",
                        cfg.dtype, "--engine", json.dumps(options), "--out", str(in_process_out), *workload],
                       check=True, cwd=ROOT, timeout=timeout)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        result["in_process_error"] = str(exc)
        return result
    result["in_process"] = json.loads(in_process_out.read_text())
    result["overhead"] = overhead_report(measured["runs"] + result["in_process"]["runs"])[str(cfg.concurrency)]
    return result


def hf_baseline(cfg: SuiteConfig) -> dict:
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    from benchmarks.offline_throughput import load_workload, run_hf
    from scalellm_jax import preset
    from scalellm_jax.tokenizer import MistralTokenizer

    work = load_workload(DATA, MistralTokenizer(), cfg.num_prompts, 512, cfg.max_tokens)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    hf_config = MixtralConfig(**preset(cfg.model).to_hf_dict())
    start = time.perf_counter()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialize in bf16: a float32 init of Mixtral-8x7B (~188 GB) would not fit
    try:
        with torch.device(device):  # random init straight on the device: no host copy of ~94 GB
            hf = MixtralForCausalLM(hf_config).eval()
    finally:
        torch.set_default_dtype(previous)
    build_s = time.perf_counter() - start
    stats, _ = run_hf(hf, work, cfg.hf_batch, device)  # useful tokens; padding rows' extra steps are HF's cost
    return {"device": device, "torch": torch.__version__, "build_s": build_s,
            **{k: stats[k] for k in ("wall_s", "output_tokens", "tokens_per_s", "batch_size", "generate_steps")}}


# ---------------------------------------------------------------------------------------------- report


def summary(results: dict) -> dict:
    """The headline numbers and the issue's targets."""
    out: dict = {}
    rows = {r["batch"]: r for r in results.get("decode", {}).get("rows", [])}
    if 64 in rows:
        out["decode_b64_roofline_fraction"] = rows[64]["roofline_fraction"]
        out["decode_b64_target_met"] = rows[64]["roofline_fraction"] >= 0.6
    if "warmup_s" in results.get("decode", {}):
        out["warmup_s"] = results["decode"]["warmup_s"]
        out["warmup_target_met"] = results["decode"]["warmup_s"] < 180
        out["zero_compilations_after_warmup"] = results["decode"]["compilations_after_warmup"] == 0
    runs = results.get("serving", {}).get("client", {}).get("runs", [])
    ours = next((r["summary"] for r in runs if r["load"] == results["config"]["concurrency"]), None)
    hf = results.get("hf", {}).get("tokens_per_s")
    if ours is not None:
        tps = ours["output_tokens_per_s"]
        out["serving_output_tokens_per_s"] = tps
        out["serving_ttft_p50_ms"] = ours["ttft_ms"]["p50"]
        out["serving_tpot_p50_ms"] = ours["tpot_ms"]["p50"]
        out["serving_e2e_p50_ms"] = ours["e2e_ms"]["p50"]
        overhead = results["serving"].get("overhead")
        if "in_process_error" in results["serving"]:
            out["http_overhead_error"] = results["serving"]["in_process_error"][:300]
        if overhead:
            out["http_vs_in_process_tokens_per_s"] = overhead["throughput_ratio"]
            out["http_added_ttft_p50_ms"] = overhead["ttft_p50_added_ms"]
            out["http_overhead_target_met"] = overhead["meets_target"]
        if hf:
            out["hf_output_tokens_per_s"] = hf
            out["serving_vs_hf"] = tps / hf
            out["serving_vs_hf_target_met"] = tps / hf >= 10
    return out


def markdown(results: dict) -> str:
    lines = [f"# GPU suite: {results['device']} — {results['date']} — commit {results['git']['commit'][:12]}", ""]
    c = results.get("ceilings", {})
    if "copy_bandwidth_GBps" in c:
        lines += [f"Ceilings: copy {c['copy_bandwidth_GBps']:.0f} GB/s, "
                  f"bf16 matmul {c['bf16_matmul_TFLOPs']:.1f} TFLOP/s", ""]
    d = results.get("decode", {})
    if "rows" in d:
        lines += [f"Model init {d['model_init_s']:.0f} s, warmup {d['warmup_s']:.0f} s, "
                  f"compilations after warmup: {d['compilations_after_warmup']}", "",
                  "| batch | step ms | roofline ms | fraction | tokens/s |", "|---|---|---|---|---|"]
        lines += [f"| {r['batch']} | {r['step_ms']:.2f} | {r['roofline_ms']:.2f} "
                  f"| {100 * r['roofline_fraction']:.0f}% | {r['tokens_per_s']:.0f} |" for r in d["rows"]]
        lines.append("")
    lines += ["| check | value |", "|---|---|"]
    lines += [f"| {k} | {v:.3g} |" if isinstance(v, float) else f"| {k} | {v} |"
              for k, v in results["summary"].items()]
    errors = [f"- {name}: {r['error']}" for name, r in results.items() if isinstance(r, dict) and "error" in r]
    if errors:
        lines += ["", "Errors:", *errors]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_suite", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="mixtral-8x7b")
    parser.add_argument("--skip", nargs="*", default=[], choices=["kernels", "decode", "serving", "hf"])
    parser.add_argument("--out", type=pathlib.Path,
                        help="result JSON (default benchmarks/results/gpu_suite-<preset>-<date>.json)")
    parser.add_argument("--server-timeout", type=float, default=600.0, help="seconds to wait for the server")
    args = parser.parse_args(argv)
    raw_argv = sys.argv[1:] if argv is None else list(argv)
    git = git_state()
    if not DATA.is_file() and not {"serving", "hf"} <= set(args.skip):
        print(f"error: workload data not found: {DATA} (needed by serving and hf; or --skip serving hf)",
              file=sys.stderr)
        return 2
    import jax

    cfg = PRESETS[args.preset]
    device = jax.devices()[0]
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    out = args.out or RESULTS / f"gpu_suite-{args.preset}-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    results: dict = {"benchmark": "gpu_suite", "date": now,
                     "device": device.device_kind, "platform": device.platform, "jax": jax.__version__,
                     "git": git, "command": " ".join(["python -m benchmarks.gpu_suite", *raw_argv]),
                     "config": dataclasses.asdict(cfg)}
    start = time.perf_counter()
    ceil = section(results, "ceilings", ceilings, cfg)
    copy_bw = ceil.get("copy_bandwidth_GBps", 1.0) * 1e9
    flops = ceil.get("bf16_matmul_TFLOPs", 1.0) * 1e12
    if "kernels" not in args.skip:
        section(results, "kernels", kernels, cfg, copy_bw, flops)
    if "decode" not in args.skip:
        section(results, "decode", decode, cfg, copy_bw)
    if "serving" not in args.skip:
        section(results, "serving", serving, cfg, out.parent, args.server_timeout)
    if "hf" not in args.skip:
        section(results, "hf", hf_baseline, cfg)
    results["wall_s"] = time.perf_counter() - start
    results["summary"] = summary(results)
    out.write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    out.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    failed = [name for name, r in results.items() if isinstance(r, dict) and ("error" in r or "in_process_error" in r)]
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
