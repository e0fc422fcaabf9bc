"""The stages of ``benchmarks.gpu_suite``: each fills ``rec.results[<stage>]``, saving after every measurement,
and checks its ``Deadline`` before anything that takes time (what it skips is recorded).

Memory: Mixtral-8x7B in bf16 (~94 GB) fits an H200 once, not twice. The serving and HF stages therefore
keep this process off the GPU (``gpu_suite`` pins its JAX to the CPU there); the server runs, and is
stopped, before the in-process baseline starts.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from benchmarks import gpu_estimate
from benchmarks.deadline import Deadline, Recorder
from benchmarks.workload_files import ALPACA_EVAL

ROOT = pathlib.Path(__file__).resolve().parent.parent
DATA = ALPACA_EVAL
# The serving and HF stages skip prompts over this many tokens, so both get the same requests (a prompt sent
# as text cannot be cut at a token); gpu_estimate prices every prompt at this length.
MAX_PROMPT_LEN = 512


@dataclasses.dataclass(frozen=True)
class Context:
    """What a stage needs besides its sizes: compile-time predictions, where to write, the workload file."""

    compile_times: dict  # gpu_estimate.compile_times(): {"kernel_compile_s": (seconds, basis), ...}
    out_dir: pathlib.Path
    dataset: pathlib.Path = DATA


def _error(exc: BaseException) -> str:
    text = str(exc).splitlines()[0][:300] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"


# ---------------------------------------------------------------------------------------------- stage 1


def kernels(cfg, rec: Recorder, deadline: Deadline, ctx: Context) -> None:
    from benchmarks import kernels as kb

    plan = kb.Plan(shapes=kb.MIXTRAL if cfg.kernel_shapes == "mixtral" else kb.SMOKE, copy_bytes=cfg.copy_bytes,
                   matmul_n=cfg.matmul_n, decode=cfg.kernel_decode, prefill=cfg.kernel_prefill,
                   decode_configs=cfg.kernel_decode_configs, prefill_configs=cfg.kernel_prefill_configs)
    section = rec.results["kernels"] = {}
    item_s = ctx.compile_times["kernel_compile_s"][0] + gpu_estimate.TIMING_S
    kb.run(plan, rec, deadline, into=section, fallback_s=item_s)
    section["failures"] = kb.failures(section)


# ---------------------------------------------------------------------------------------------- stage 2


def decode(cfg, rec: Recorder, deadline: Deadline, ctx: Context) -> None:
    """Decode step vs the memory roofline at ``cfg.batches``, compile times, and a zero-compile check.

    Only the buckets measured and the one the check needs are compiled (a 32-layer step takes tens of
    seconds to compile, and the engine's full set would not fit the stage): the first ``decode_core``
    batches, the largest mixed bucket, then the rest while the deadline allows. The check serves a
    mixed workload with the engine's buckets cut to those warmed, so any compilation it causes is a
    real batch missing a warmed executable. The full warmup is extrapolated from the compiles measured.
    """
    import jax
    import numpy as np

    from benchmarks.engine_profile import decode_step_ms
    from benchmarks.kernels import copy_bandwidth
    from scalellm_jax import EngineConfig, Model, preset
    from scalellm_jax.engine.engine import LLMEngine

    r = rec.results["decode"] = {"rows": [], "compiles": []}
    copy_bw = copy_bandwidth(cfg.copy_bytes)
    r["copy_bandwidth_GBps"] = copy_bw / 1e9
    start = time.perf_counter()
    model = Model.random(preset(cfg.model), seed=0, dtype=cfg.dtype)
    jax.block_until_ready(model.params)
    r["model_init_s"] = time.perf_counter() - start
    engine = LLMEngine(model, EngineConfig(
        max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens,
        max_model_len=cfg.max_model_len, swap_space_gb=0,
    ))
    runner = engine.runner
    full = {"decode": list(runner.seq_buckets), "mixed": list(runner.token_buckets)}
    r["engine_buckets"] = full
    rec.save()
    itemsize = np.dtype(model.params["embed"]["embedding"].dtype).itemsize
    predicted = {kind: ctx.compile_times[f"{kind}_compile_s"][0] for kind in ("decode", "mixed")}

    def compile_bucket(kind: str, size: int) -> bool:
        guess = max([c["compile_s"] for c in r["compiles"] if c["kind"] == kind] or [predicted[kind]])
        if not deadline.allows(1.2 * guess + 2):
            rec.skip(f"{kind} bucket {size}", "deadline", deadline, 1.2 * guess + 2)
            return False
        t = time.perf_counter()
        rows = size if kind == "decode" else runner.max_num_seqs
        jax.block_until_ready(runner.execute(runner._empty(kind == "decode", size, rows)))
        r["compiles"].append({"kind": kind, "size": size, "compile_s": time.perf_counter() - t})
        print(f"  compiled {kind} bucket {size}: {r['compiles'][-1]['compile_s']:.1f} s", flush=True)
        rec.save()
        return True

    def measure(batch: int) -> None:
        if not compile_bucket("decode", batch):
            return
        ms = decode_step_ms(runner, batch, cfg.context)
        need = gpu_estimate.step_bytes(model.config, batch, cfg.context, itemsize, itemsize)
        roofline_ms = 1e3 * need["total"] / copy_bw
        r["rows"].append({"batch": batch, "context": cfg.context, "step_ms": ms, "bytes": need["total"],
                          "experts_hit_per_layer": need["experts_hit_per_layer"], "roofline_ms": roofline_ms,
                          "roofline_fraction": roofline_ms / ms, "tokens_per_s": batch / ms * 1e3})
        r["rows"].sort(key=lambda row: row["batch"])
        print(f"  decode batch {batch:4d}: {ms:8.2f} ms, roofline {roofline_ms:7.2f} ms "
              f"({100 * roofline_ms / ms:5.1f}%)", flush=True)
        rec.save()

    core, optional = cfg.batches[:cfg.decode_core], cfg.batches[cfg.decode_core:]
    measure(core[0])
    if compile_bucket("mixed", cfg.max_num_batched_tokens):
        zero_compile_check(cfg, engine, r)
        rec.save()
    for batch in (*core[1:], *optional):
        measure(batch)
    warmed = r["compiles"]
    r["warmup_s"] = sum(c["compile_s"] for c in warmed)  # of the buckets compiled here
    means = {k: float(np.mean([c["compile_s"] for c in warmed if c["kind"] == k] or [predicted[k]])) for k in full}
    r["full_warmup_estimate_s"] = sum(means[k] * len(full[k]) for k in full)
    r["warmup_note"] = (f"compiled {len(warmed)} of the engine's {len(full['decode']) + len(full['mixed'])} "
                        "buckets; full_warmup_estimate_s = mean compile time per kind (predicted where none was "
                        "compiled) x the engine's bucket count")


def zero_compile_check(cfg, engine, r: dict) -> None:
    """A mixed workload (random lengths, greedy and sampled, an abort) on the warmed buckets only."""
    import numpy as np

    from scalellm_jax import SamplingParams

    runner = engine.runner
    warmed = {"decode": sorted({c["size"] for c in r["compiles"] if c["kind"] == "decode"}),
              "mixed": sorted({c["size"] for c in r["compiles"] if c["kind"] == "mixed"})}
    runner.seq_buckets, runner.token_buckets = tuple(warmed["decode"]), tuple(warmed["mixed"])
    n = cfg.check_requests
    if cfg.max_num_seqs > max(warmed["decode"]):  # never more running rows than the largest warmed bucket
        n = min(n, max(warmed["decode"]))
    rng = np.random.default_rng(0)
    before = runner.num_compilations()
    start = time.perf_counter()
    longest = min(512, cfg.max_num_batched_tokens)
    ids = [engine.add_request(rng.integers(3, 1000, int(rng.integers(1, longest))).tolist(),
                              SamplingParams(max_tokens=int(rng.integers(1, 8)), temperature=float(rng.choice([0, 1]))))
           for _ in range(n)]
    engine.abort(ids[-1])
    while engine.has_unfinished():
        engine.step()
    r["zero_compile_check"] = {"requests": n, "buckets": warmed, "wall_s": time.perf_counter() - start,
                               "compilations": runner.num_compilations() - before}
    r["compilations_after_warmup"] = r["zero_compile_check"]["compilations"]
    print(f"  zero-compile check: {n} requests, {r['compilations_after_warmup']} compilations", flush=True)


# ---------------------------------------------------------------------------------------------- stage 3


def start_server(cmd: list[str], log_path: pathlib.Path, deadline: Deadline, rec: Recorder) -> tuple:
    """Start the server (its port chosen here) and wait for /health until the deadline."""
    from benchmarks.serving import wait_ready

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [*cmd, "--port", str(port)]
    with open(log_path, "w") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    rec.children.append(process)
    url = f"http://127.0.0.1:{port}"
    if wait_ready(process, url, log_path, time.monotonic() + deadline.remaining()):
        return process, url, " ".join(cmd)
    process.kill()
    raise TimeoutError(f"server not ready before the stage's deadline; see {log_path}")


def serving(cfg, rec: Recorder, deadline: Deadline, ctx: Context) -> None:
    """The server under the load client, then (server stopped) the same workload in-process."""
    from benchmarks.serving import overhead_report, server_flags
    from benchmarks.serving import stop_server as stop

    # Both engines warm (and serve with) only the configured buckets (a 32-layer step compiles in tens of seconds
    # on an H200: the engine's full set would not fit the stage), and no host swap (see serving_engine_options).
    options = gpu_estimate.serving_engine_options(cfg)
    workload = ["--concurrency", str(cfg.concurrency), "--num-prompts", str(cfg.num_prompts),
                "--max-tokens", str(cfg.max_tokens), "--max-prompt-len", str(MAX_PROMPT_LEN),
                "--dataset", str(ctx.dataset), "--no-plot"]
    seq, tokens = gpu_estimate.serving_buckets(cfg)
    r = rec.results["serving"] = {"engine_options": options, "buckets": {
        "decode": list(seq), "mixed": list(tokens),
        "cut": cfg.serving_seq_buckets is not None or cfg.serving_token_buckets is not None}}
    cache = tempfile.mkdtemp(prefix="gpu-suite-xla-")  # the in-process run reads the server's executables
    stem = rec.path.stem if rec.path else "gpu_suite-serving"
    try:
        server_cmd = [sys.executable, "-m", "scalellm_jax.server", "--model", cfg.model, "--served-model-name",
                      "bench", "--dtype", cfg.dtype, "--max-queued-requests", "100000",
                      "--compilation-cache-dir", cache, *server_flags(options)]
        start = time.perf_counter()
        process, url, r["server_command"] = start_server(server_cmd, ctx.out_dir / f"{stem}.server.log", deadline, rec)
        r["server_ready_s"] = time.perf_counter() - start
        rec.save()
        client_out = ctx.out_dir / f"{stem}.client.json"
        try:
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "benchmarks.serving", "--url", url, "--out", str(client_out),
                                   *workload], cwd=ROOT, timeout=max(1.0, deadline.remaining()))
            r["client_s"] = time.perf_counter() - start
        finally:
            stop(process)
        if done.returncode:  # the client still wrote its runs when some requests failed
            r["client_error"] = f"load client exited with {done.returncode}"
        if client_out.is_file():
            r["client"] = json.loads(client_out.read_text())
        rec.save()
        if "client" not in r:
            return
        # The baseline: a start with the server's executables read from the cache, then the client's run again.
        predicted = gpu_estimate.in_process_start_s(cfg) + r["client_s"]
        if not deadline.allows(predicted):
            rec.skip("in-process baseline", "deadline", deadline, predicted)
            return
        in_process_out = ctx.out_dir / f"{stem}.in-process.json"
        try:  # the baseline failing must not lose the server's own numbers (the HF comparison uses them)
            subprocess.run([sys.executable, "-m", "benchmarks.serving", "--in-process", "--model", cfg.model,
                            "--dtype", cfg.dtype, "--engine", json.dumps(options), "--compilation-cache-dir", cache,
                            "--out", str(in_process_out), *workload],
                           check=True, cwd=ROOT, timeout=max(1.0, deadline.remaining()))
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            r["in_process_error"] = str(exc)
            return
        r["in_process"] = json.loads(in_process_out.read_text())
        runs = r["client"]["runs"] + r["in_process"]["runs"]
        r["overhead"] = overhead_report(runs)[str(cfg.concurrency)]
    finally:
        shutil.rmtree(cache, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- stage 4


def hf(cfg, rec: Recorder, deadline: Deadline, ctx: Context) -> None:
    """Hugging Face ``generate`` on the same workload, one padded batch at a time (deadline between batches)."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    from benchmarks.offline_throughput import Workload, load_workload, run_hf
    from scalellm_jax import preset
    from scalellm_jax.tokenizer import MistralTokenizer

    work = load_workload(ctx.dataset, MistralTokenizer(), cfg.num_prompts, MAX_PROMPT_LEN, cfg.max_tokens, "skip")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    r = rec.results["hf"] = {"device": device, "torch": torch.__version__, "batches": []}
    start = time.perf_counter()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialize in bf16: a float32 init of Mixtral-8x7B (~188 GB) would not fit
    try:
        with torch.device(device):  # random init straight on the device: no host copy of ~94 GB
            model = MixtralForCausalLM(MixtralConfig(**preset(cfg.model).to_hf_dict())).eval()
    finally:
        torch.set_default_dtype(previous)
    r["build_s"] = time.perf_counter() - start
    rec.save()
    fallback = next(i.seconds for i in gpu_estimate.hf_items(cfg, preset(cfg.model)) if i.what.startswith("generate"))
    starts = range(0, len(work.prompts), cfg.hf_batch)
    for b in starts:
        guess = max([x["wall_s"] for x in r["batches"]] or [fallback / len(starts)])
        if not deadline.allows(1.2 * guess):
            rec.skip(f"HF batches from prompt {b} of {len(work.prompts)}", "deadline", deadline, 1.2 * guess)
            break
        part = Workload(work.prompts[b:b + cfg.hf_batch], work.lengths[b:b + cfg.hf_batch], 0)
        stats, _ = run_hf(model, part, cfg.hf_batch, device)  # useful tokens; padding rows' extra steps are HF's cost
        r["batches"].append({"prompts": len(part.prompts),
                             **{k: stats[k] for k in ("wall_s", "output_tokens", "generate_steps", "ms_per_step")}})
        print(f"  HF batch {len(r['batches'])}: {stats['output_tokens']} tokens in {stats['wall_s']:.1f} s", flush=True)
        rec.save()
    done = r["batches"]
    if done:
        wall, tokens = sum(x["wall_s"] for x in done), sum(x["output_tokens"] for x in done)
        r.update(wall_s=wall, output_tokens=tokens, tokens_per_s=tokens / wall, batch_size=cfg.hf_batch,
                 generate_steps=sum(x["generate_steps"] for x in done), prompts_done=sum(x["prompts"] for x in done))
