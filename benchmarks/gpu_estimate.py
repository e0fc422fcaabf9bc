"""Predicted wall time of each ``benchmarks.gpu_suite`` stage on one H200, with the basis of every figure.

    python -m benchmarks.gpu_suite --estimate [--compile-check PATH]

Device speeds are datasheet figures times conservative efficiencies; compile times come from the newest
``benchmarks/results/gpu_compile_check-*.json`` (programs compiled for an H200 on a CPU host), else from
stated fallbacks. Answers are taken at their cap and prompts at their longest (AlpacaEval's Mixtral
answers: ~70% reach a 256-token cap, prompts average ~45 tokens), so the figures are upper bounds for
the measured loops. Stage limits: 4 minutes for stage 1 (any GPU run must yield kernel results), 5 for
the others. The stages' own deadlines make a wrong estimate cost skipped measurements, not a lost run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

from benchmarks.provenance import RESULTS  # compile checks are read from the recorded ones
from device_models import DEVICES, ModelShape

LIMITS_S = {"kernels": 240, "decode": 300, "serving": 300, "hf": 300}

HBM_BPS = DEVICES["h200"].memory_bps
MATMUL_FLOPS = DEVICES["h200"].bf16_flops  # (measured on these hosts: ~790 TFLOP/s)
# Stage estimates are upper bounds, so below the device cost model's calibration.
HBM_EFF = 0.5  # fraction of HBM bandwidth a whole decode step reaches (target: 0.6 at batch 64)
MATMUL_EFF = 0.4  # fraction of the dense bf16 rate a prefill step reaches (MoE, ragged shapes)

FALLBACK = {  # used when no compile check exists; each with its basis
    "kernel_compile_s": (2.5, "assumed: trace + Triton compile of one Pallas kernel, or one XLA reference"),
    "decode_compile_s": (45.0, "assumed: one unrolled 32-layer XLA:GPU step with 64 Pallas calls, GEMM autotuning"),
    "mixed_compile_s": (60.0, "assumed: as a decode step, plus the ragged prefill kernel and more GEMM shapes"),
}
DEVICELESS_FACTOR = 1.25  # the compile check compiles without the device: no GEMM autotuning, which the host adds
PROCESS_START_S = 10.0  # python, import jax, start the CUDA client (+ torch and transformers for HF: 20)
CACHE_LOAD_S = 5.0  # one step executable read back from XLA's persistent compilation cache
HOST_STEP_S = 0.005  # engine + HTTP work per step at 64 streams, not hidden behind the device
HF_LAYER_OVERHEAD_S = 0.0015  # HF eager decode: Python and kernel launches per layer per step
TIMING_S = 0.5  # one kernel timing: ~0.2 s of timed calls, warm calls, output copy


@dataclasses.dataclass
class Item:
    what: str
    seconds: float
    basis: str


# ---------------------------------------------------------------------------------------------- model costs


def step_bytes(config, batch: int, context: int, itemsize: int, kv_itemsize: int) -> dict:
    """Bytes a decode step must read (``device_models``' accounting): dense weights, the experts ``batch``
    tokens can reach, the LM head, the KV."""
    s = ModelShape.of(config)
    experts_hit = s.experts_touched(batch)
    weights = (s.num_layers * (s.dense_layer_params + experts_hit * s.expert_params) + s.lm_head_params) * itemsize
    kv = batch * context * s.kv_bytes_per_token(kv_itemsize)
    return {"weights": weights, "kv": kv, "total": weights + kv, "experts_hit_per_layer": experts_hit}


def num_params(c) -> int:
    return ModelShape.of(c).num_params


def active_params(c) -> int:
    """Parameters one token multiplies: attention, its top-k experts, the LM head."""
    s = ModelShape.of(c)
    return s.num_layers * (s.attention_params + s.num_experts_per_tok * s.expert_params) + s.lm_head_params


def decode_step_s(c, batch: int, context: int) -> float:
    return step_bytes(c, batch, context, 2, 2)["total"] / (HBM_BPS * HBM_EFF)


def prefill_s(c, tokens: int) -> float:
    """Time of ``tokens`` prompt tokens (compute-bound; at least the weights' read per 2048-token chunk)."""
    chunks = max(1, math.ceil(tokens / 2048))
    return max(2 * active_params(c) * tokens / (MATMUL_FLOPS * MATMUL_EFF), chunks * decode_step_s(c, 256, 0))


def model_init_s(c) -> Item:
    n = num_params(c)
    seconds = 10.0 + 10 * n / (HBM_BPS * 0.25)
    return Item("random weights", seconds, f"{n / 1e9:.1f}B parameters drawn in f32 and cast to bf16 (~10 B of HBM "
                f"traffic each at 25% of {HBM_BPS / 1e12:.1f} TB/s) + 10 s of eager dispatch and ~10 small compiles")


# ---------------------------------------------------------------------------------------------- compile times


def _ok_rows(path: pathlib.Path) -> tuple[str | None, list[dict]]:
    data = json.loads(path.read_text())
    return data.get("jax"), [r for r in data.get("rows", [])
                             if isinstance(r.get("compile_s"), int | float) and not r.get("error")]


def compile_times(path: pathlib.Path | str | None = None) -> dict:
    """``{"kernel_compile_s", "decode_compile_s", "mixed_compile_s": (seconds, basis)}`` from a compile
    check (``path``; "none": the fallbacks). By default, from every compile check in ``benchmarks/results`` made
    with the newest one's jax: each of the newest one's programs at its fastest compile, because a busy host only
    ever slows a compile down and the slowest program's time decides the estimate."""
    if str(path) == "none":
        return dict(FALLBACK)
    if path is not None:
        path = pathlib.Path(path)
        rows = _ok_rows(path)[1]
        src = f"{path.name} x {DEVICELESS_FACTOR} (GEMM autotuning the CPU-host compile skips)"
    else:
        found = sorted(RESULTS.glob("gpu_compile_check-*.json"), key=lambda p: (p.name, p.stat().st_mtime))
        if not found:
            return dict(FALLBACK)
        jax_version, rows = _ok_rows(found[-1])
        same = [p for p in found if _ok_rows(p)[0] == jax_version]
        fastest: dict[tuple, float] = {}
        for other in same:
            for r in _ok_rows(other)[1]:
                key = (r.get("group"), r.get("program"))
                fastest[key] = min(fastest.get(key, math.inf), r["compile_s"])
        rows = [dict(r, compile_s=fastest[(r.get("group"), r.get("program"))]) for r in rows]
        src = (f"fastest of {len(same)} compile checks with jax {jax_version} (newest {found[-1].name}) x "
               f"{DEVICELESS_FACTOR} (GEMM autotuning the CPU-host compile skips)")
    times = dict(FALLBACK)

    def slowest(group: str, kind: str | None = None) -> float | None:
        found = [r["compile_s"] for r in rows if r.get("group") == group
                 and (kind is None or kind in str(r.get("program", "")).lower())]
        return max(found) if found else None

    kernel = slowest("kernel")
    if kernel is not None:
        times["kernel_compile_s"] = (kernel * DEVICELESS_FACTOR, f"slowest kernel compile in {src}")
    for key, kind in (("decode_compile_s", "decode"), ("mixed_compile_s", "mixed")):
        full = slowest("engine_full", kind) or slowest("engine_full")
        two = slowest("engine_2layer", kind) or slowest("engine_2layer")
        if full is not None:
            times[key] = (full * DEVICELESS_FACTOR, f"32-layer {kind} step in {src}")
        elif two is not None:  # unrolled layers: compile time grows about linearly with their number
            times[key] = (two * 16 * DEVICELESS_FACTOR, f"2-layer {kind} step x 16 layers, {src}")
    return times


# ---------------------------------------------------------------------------------------------- stages


def kernels_items(cfg, ct) -> list[Item]:
    kc, kc_basis = ct["kernel_compile_s"]
    n_dec, n_pre = len(cfg.kernel_decode_configs), len(cfg.kernel_prefill_configs)
    rows = 6 + (n_dec - 1) + (n_pre - 1)  # default config on 3 KV cases x 2 kernels, then every other config
    sweep = len(cfg.kernel_decode) * (n_dec + 2) + len(cfg.kernel_prefill) * (n_pre + 1)
    return [
        Item("start", PROCESS_START_S, "python, import jax, CUDA client"),
        Item("ceilings", 2 * kc + 2 * 1.2, "2 compiles (as a kernel's) + 2 timings"),
        Item(f"correctness, {rows} rows", (rows + 6) * kc + rows * 0.2,
             f"{rows} kernel + 6 reference compiles at {kc:.1f} s ({kc_basis})"),
        Item(f"sweep, {sweep} timings", sweep * (kc + TIMING_S) + 0.5 * (len(cfg.kernel_decode) + len(
            cfg.kernel_prefill)), f"{len(cfg.kernel_decode)} decode shapes x ({n_dec} configs + XLA + jax's kernel), "
             f"{len(cfg.kernel_prefill)} prefill shapes x ({n_pre} configs + XLA); a compile and {TIMING_S} s each"),
    ]


def decode_items(cfg, ct, c) -> tuple[list[Item], list[Item]]:
    dc, dc_basis = ct["decode_compile_s"]
    mc, mc_basis = ct["mixed_compile_s"]
    core, optional = cfg.batches[:cfg.decode_core], cfg.batches[cfg.decode_core:]
    measure = sum(11 * decode_step_s(c, b, cfg.context) for b in core)
    check_tokens = cfg.check_requests * min(512, cfg.max_num_batched_tokens)
    items = [
        Item("start", PROCESS_START_S, "python, import jax, CUDA client"),
        model_init_s(c),
        Item(f"compile {len(core)} decode buckets {core}", len(core) * dc, dc_basis),
        Item(f"compile the {cfg.max_num_batched_tokens}-token mixed bucket", mc, mc_basis),
        Item("decode timings", measure + 2, f"11 steps per batch at the roofline / {HBM_EFF}, + copy bandwidth"),
        Item(f"zero-compile check, {cfg.check_requests} requests", prefill_s(c, check_tokens) + 8 * decode_step_s(
            c, 64, 512) + 2, f"{check_tokens} prompt tokens at {MATMUL_EFF:.0%} of {MATMUL_FLOPS / 1e12:.0f} "
             "TFLOP/s, 8 decode steps"),
    ]
    extra = [Item(f"batch {b} (if the deadline allows)", dc + 11 * decode_step_s(c, b, cfg.context), dc_basis)
             for b in optional]
    return items, extra


def serving_buckets(cfg) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The decode and mixed buckets the serving stage's engines warm (``serving_engine_options``'s
    ``decode_buckets`` / ``token_buckets`` plus the largest, or the engine's full set)."""
    from scalellm_jax import EngineConfig
    from scalellm_jax.engine.step_program import StepShapes

    config = EngineConfig(**serving_engine_options(cfg))
    shapes = StepShapes(config.max_num_seqs, config.max_num_batched_tokens, 1,
                        decode_sizes=config.decode_buckets, token_sizes=config.token_buckets)
    return shapes.seq_buckets, shapes.token_buckets


def serving_engine_options(cfg) -> dict:
    """The serving stage's ``EngineConfig`` fields, for the server (as flags) and its in-process baseline (JSON).

    No host swap: at this load the KV cache holds every stream several times over, so nothing is preempted,
    and the swap executables (two per page-count bucket) would only lengthen warmup.
    """
    options = dict(max_num_seqs=cfg.serving_max_num_seqs, max_num_batched_tokens=cfg.serving_max_num_batched_tokens,
                   max_model_len=cfg.serving_max_model_len, swap_space_gb=0)
    if cfg.serving_seq_buckets is not None:
        options["decode_buckets"] = list(cfg.serving_seq_buckets)
    if cfg.serving_token_buckets is not None:
        options["token_buckets"] = list(cfg.serving_token_buckets)
    return options


def in_process_start_s(cfg) -> float:
    """The in-process baseline's start: process, random weights, engine, executables from the cache."""
    from scalellm_jax import preset

    buckets = sum(map(len, serving_buckets(cfg)))
    return PROCESS_START_S + 2 + model_init_s(preset(cfg.model)).seconds + 2 + buckets * CACHE_LOAD_S


def serving_items(cfg, ct, c) -> list[Item]:
    dc, _ = ct["decode_compile_s"]
    mc, _ = ct["mixed_compile_s"]
    n_seq, n_tok = map(len, serving_buckets(cfg))
    waves = math.ceil(cfg.num_prompts / cfg.concurrency)
    step = decode_step_s(c, cfg.concurrency, 512) + HOST_STEP_S
    workload = waves * cfg.max_tokens * step + prefill_s(c, cfg.num_prompts * 512)
    warm_requests = cfg.max_tokens * step  # the load client's 4 warm-up requests, padded to a decode bucket
    basis = (f"{waves} waves of {cfg.concurrency} streams x {cfg.max_tokens} tokens at {1e3 * step:.0f} ms/step "
             f"(roofline / {HBM_EFF} + {1e3 * HOST_STEP_S:.0f} ms host), + 4 warm-up requests, prompts at 512 tokens")
    init = model_init_s(c)
    return [
        Item("server start", PROCESS_START_S + init.seconds + 2, f"start + {init.basis}"),
        Item(f"server warmup, {n_seq} decode + {n_tok} mixed buckets", n_seq * dc + n_tok * mc,
             "compile times above; " + ("the engine's full set" if cfg.serving_seq_buckets is None and
                                        cfg.serving_token_buckets is None else "--decode-buckets/--token-buckets")),
        Item("load client", 12 + warm_requests + workload, "start + tokenize, " + basis),
        Item("server stop", 5, "terminate, wait"),
        Item("in-process baseline", in_process_start_s(cfg) + warm_requests + workload, "start, init, warmup from "
             f"the shared compilation cache ({CACHE_LOAD_S} s per executable), same workload"),
    ]


def hf_items(cfg, c) -> list[Item]:
    batches = math.ceil(cfg.num_prompts / cfg.hf_batch)
    step = step_bytes(c, cfg.hf_batch, 512, 2, 2)["total"] / (HBM_BPS * HBM_EFF) + c.num_layers * HF_LAYER_OVERHEAD_S
    prefill = 3 * prefill_s(c, cfg.hf_batch * 512)  # padded batch; HF's expert loop at a third of our efficiency
    return [
        Item("start", 2 * PROCESS_START_S, "python, torch, transformers, tokenizer"),
        Item("workload", 3, "tokenize the prompts"),
        Item("build", 10 + num_params(c) * 2 / (HBM_BPS * 0.1), "random init on the device, module construction"),
        Item(f"generate, {batches} batches of {cfg.hf_batch}", batches * (cfg.max_tokens * step + prefill),
             f"{cfg.max_tokens} steps per batch at {1e3 * step:.0f} ms (weights at {HBM_EFF} of HBM + "
             f"{1e3 * HF_LAYER_OVERHEAD_S} ms per layer of Python and launches) + padded prefill at 1/3 efficiency"),
    ]


def estimate(cfg, compile_check=None) -> dict:
    """``{stage: {"items", "optional", "total_s", "limit_s", "fits"}}`` plus the compile-time sources."""
    from scalellm_jax import preset

    c = preset(cfg.model)
    ct = compile_times(compile_check)
    decode, extra = decode_items(cfg, ct, c)
    stages = {"kernels": (kernels_items(cfg, ct), []), "decode": (decode, extra),
              "serving": (serving_items(cfg, ct, c), []), "hf": (hf_items(cfg, c), [])}
    out = {"compile_times": {k: {"seconds": v[0], "basis": v[1]} for k, v in ct.items()}}
    for name, (items, optional) in stages.items():
        total = sum(i.seconds for i in items)
        out[name] = {"items": [dataclasses.asdict(i) for i in items], "optional": [dataclasses.asdict(i)
                     for i in optional], "total_s": total, "limit_s": LIMITS_S[name], "fits": total <= LIMITS_S[name]}
    return out


def report(est: dict) -> str:
    lines = ["Predicted wall time per stage on one H200 (upper bounds; basis in brackets)", "", "Compile times:"]
    lines += [f"  {k}: {v['seconds']:.1f} s [{v['basis']}]" for k, v in est["compile_times"].items()]
    for number, name in enumerate(LIMITS_S, 1):
        s = est[name]
        verdict = "fits" if s["fits"] else "OVER"
        lines += ["", f"stage {number} --stage {name}: {s['total_s']:.0f} s of {s['limit_s']} s  {verdict}"]
        lines += [f"  {i['seconds']:7.1f} s  {i['what']} [{i['basis']}]" for i in s["items"]]
        lines += [f"  {i['seconds']:7.1f} s  + {i['what']} [{i['basis']}]" for i in s["optional"]]
    return "\n".join(lines)
