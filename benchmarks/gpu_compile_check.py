"""Compile every GPU program for an H200 on a CPU machine, and fail on any compile error or register spill.

    make gpu-compile-check                      # installs the CUDA plugin and ptxas, then runs this
    JAX_PLATFORMS=cpu PYTHONPATH=<plugin dir> python -m benchmarks.gpu_compile_check [--quick]

JAX's deviceless topology (``../shared/gpu/h200.txtpb``, see its README) lets XLA run the real
Triton compiler and ptxas for sm_90a without a GPU. Compiled, at Mixtral-8x7B shapes (32 query
heads, 8 KV heads, head_dim 128, page 16, bfloat16):

* ``kernel``: both attention kernels in every variant the engine can select (bfloat16 and int8 KV,
  sliding window) at every decode and prefill bucket, and every tuning configuration the kernel
  benchmark sweeps (``benchmarks.kernel_tuning``);
* ``engine_2layer``: the engine's jitted steps (``scalellm_jax.engine.step_program``) for every
  bucket the engine compiles at warmup on a GPU, with 2 layers and the GPU choices taken
  explicitly (``PlatformChoices.for_platform("gpu")``), never the compiling host's;
* ``engine_full``: once, the full 32-layer decode and mixed steps.

Registers and spills come from ptxas's own report (XLA logs it at verbosity 3), shared memory from
XLA's thunk sequence dump. One table (program, shape, registers, shared memory, compile seconds)
goes to ``benchmarks/runs/gpu_compile_check-jax<version>-<date>.{json,md}``.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import datetime
import json
import os
import pathlib
import re
import shutil
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
TARGET_CONFIG = ROOT.parent / "shared" / "gpu" / "h200.txtpb"
DUMP_DIR = pathlib.Path(tempfile.gettempdir()) / f"gpu_compile_check-{os.getpid()}"

# The GPU engine configuration compiled: up to 256 sequences, 2048-token steps, 32k context.
MAX_NUM_SEQS, MAX_NUM_BATCHED_TOKENS, MAX_MODEL_LEN, PAGE_SIZE = 256, 2048, 32768, 16
SLIDING_WINDOW = 4096  # Mixtral-8x7B has none; Mistral-style checkpoints do, and the kernels support it


# Our Pallas kernels (the ``name=`` of their pallas_call): their rows in the table carry their registers and
# shared memory. A spill anywhere, ours or in one of XLA's own fusions, fails the check.
OUR_KERNELS = ("paged_decode_attention", "ragged_prefill_attention")


def configure_environment() -> None:
    """Before jax is imported: CPU runtime, ptxas's register report in the log, XLA's dump for shared memory."""
    if "jax" in sys.modules:
        raise RuntimeError("benchmarks.gpu_compile_check must configure XLA before jax is imported")
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
    os.environ["TF_CPP_VMODULE"] = "subprocess_compilation=3,ptx_compiler_impl=3,nvptx_compiler=1"
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_dump_to={DUMP_DIR}".strip()


# ---------------------------------------------------------------------------------------------- reports


@dataclasses.dataclass
class Kernel:
    name: str
    registers: int | None = None
    spill_stores: int = 0
    spill_loads: int = 0
    shared_memory: int | None = None


def parse_ptxas(log: str) -> dict[str, Kernel]:
    """ptxas ``-v`` output → per entry function: registers and spill bytes."""
    kernels: dict[str, Kernel] = {}
    current = None
    for line in log.splitlines():
        if re.match(r"[IWEF]\d{4} ", line):  # a new log message: XLA runs ptxas on several threads
            current = None
        if m := re.search(r"(?:Compiling entry function|Function properties for) '?([^' ]+)'?", line):
            current = kernels.setdefault(m.group(1), Kernel(m.group(1)))
        elif current is not None and (m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            current.spill_stores, current.spill_loads = int(m.group(1)), int(m.group(2))
        elif current is not None and (m := re.search(r"Used (\d+) registers", line)):
            current.registers = int(m.group(1))
    return kernels


def parse_thunks(text: str) -> dict[str, int]:
    """XLA's thunk sequence → shared memory bytes per launched kernel."""
    return {m.group(1): int(m.group(2))
            for m in re.finditer(r"(\S+) grid: \[[^\]]*\] threads: \[[^\]]*\]\s+shared_memory: (\d+) bytes", text)}


@contextlib.contextmanager
def captured_stderr():
    """The process's file descriptor 2 (where XLA's C++ logging goes) into a string, via a temp file."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        box = {"text": ""}
        try:
            yield box
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            box["text"] = sink.read().decode(errors="replace")


def compile_program(group: str, program: str, shape: str, fn, args) -> dict:
    """Compile ``fn(*args)`` (abstract arguments) for the H200; one table row."""
    shutil.rmtree(DUMP_DIR, ignore_errors=True)
    row = {"group": group, "program": program, "shape": shape}
    start = time.perf_counter()
    error = None
    with captured_stderr() as log:
        try:
            fn.lower(*args).compile()
        except Exception as exc:  # noqa: BLE001 - a failed compile is a result of this check
            error = f"{type(exc).__name__}: {str(exc).strip()[:2000]}"
    row["compile_s"] = round(time.perf_counter() - start, 3)
    kernels = parse_ptxas(log["text"])
    for path in DUMP_DIR.glob("*thunk_sequence*.txt"):
        for name, smem in parse_thunks(path.read_text()).items():
            kernels.setdefault(name, Kernel(name)).shared_memory = smem
    ours = [k for k in kernels.values() if k.name in OUR_KERNELS]
    spilled = {k.name: max(k.spill_stores, k.spill_loads) for k in kernels.values() if k.spill_stores or k.spill_loads}
    if error is None and spilled:
        error = "register spill in " + ", ".join(f"{name} ({n} bytes)" for name, n in spilled.items())
    if error is None and not kernels:
        error = "no ptxas report in XLA's log: is the CUDA plugin on PYTHONPATH and ptxas found?"
    row.update(
        registers=max((k.registers or 0 for k in ours), default=None) if ours else None,
        shared_memory_bytes=max((k.shared_memory or 0 for k in ours), default=None) if ours else None,
        max_registers_any=max((k.registers or 0 for k in kernels.values()), default=None),
        kernels={k.name: dataclasses.asdict(k) for k in ours},
        spills=spilled,
        error=error,
    )
    if error:  # the compiler's own words, for the one reading the CI log
        row["log_tail"] = "\n".join(line for line in log["text"].splitlines()
                                    if "error" in line.lower() or "warning" in line.lower())[-2000:]
    return row


# ---------------------------------------------------------------------------------------------- programs


def h200_mesh(target_config: pathlib.Path):
    """A one-device mesh of the deviceless H200 topology."""
    import jax
    from jax.experimental import topologies

    text = target_config.read_text()
    try:
        topology = topologies.get_topology_desc(platform="cuda", topology="1x1x1", target_config=text)
    except Exception:  # noqa: BLE001 - jaxlib 0.10.2's proto lacks this field (see shared/gpu/README.md)
        text = "\n".join(line for line in text.splitlines() if "collective_memory_granularity" not in line)
        topology = topologies.get_topology_desc(platform="cuda", topology="1x1x1", target_config=text)
    return jax.sharding.Mesh(topology.devices, ("x",))


def _abstract(mesh, tree):
    """Arrays / (shape, dtype) / ShapeDtypeStructs → ShapeDtypeStructs placed on ``mesh``'s device."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    sharding = NamedSharding(mesh, PartitionSpec())

    def one(x):
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

    return jax.tree.map(one, tree)


KV_VARIANTS = {"bf16": ("bfloat16", None), "int8": ("int8", None), "bf16-window": ("bfloat16", SLIDING_WINDOW)}


def kernel_program(kernel: str, variant: str, n: int, tuning: dict | None = None, label: str | None = None):
    """``(program, shape, jitted fn, abstract args)`` of one attention kernel at Mixtral-8x7B shapes.

    ``kernel``: ``paged_decode`` (``n`` sequences) or ``ragged_prefill`` (``n`` tokens over ``MAX_NUM_SEQS``
    rows); ``variant``: a key of ``KV_VARIANTS``; ``tuning``: the kernel's tuning keyword arguments.
    """

    import jax
    import jax.numpy as jnp

    import pallas_kernels as pk
    from scalellm_jax.config import preset

    c = preset("mixtral-8x7b")
    kv_dtype, window = KV_VARIANTS[variant]
    sds = jax.ShapeDtypeStruct
    pool = sds((c.num_kv_heads, h200_kv_pages(), PAGE_SIZE, c.head_dim), kv_dtype)
    scales = sds(pool.shape[:3], jnp.float32)
    cache = (pool, pool, scales, scales) if kv_dtype == "int8" else (pool, pool)
    rows = n if kernel == "paged_decode" else MAX_NUM_SEQS
    table, lengths = sds((rows, MAX_MODEL_LEN // PAGE_SIZE), jnp.int32), sds((rows,), jnp.int32)
    q = sds((n, c.num_heads, c.head_dim), jnp.bfloat16)
    common = dict(scale=c.head_dim**-0.5, sliding_window=window, **(tuning or {}))

    def decode(q, k, v, table, lengths, *scales):
        kw = dict(zip(("k_scales", "v_scales"), scales, strict=False))
        return pk.paged_decode_attention(q, k, v, table, lengths, **kw, **common)

    def prefill(q, k, v, table, lengths, cu, *scales):
        kw = dict(zip(("k_scales", "v_scales"), scales, strict=False))
        return pk.ragged_prefill_attention(q, k, v, table, lengths, cu, **kw, **common)

    if kernel == "paged_decode":
        fn, args, shape = decode, (q, *cache[:2], table, lengths, *cache[2:]), f"{n} seqs"
    else:
        cu = sds((rows + 1,), jnp.int32)
        fn, args, shape = prefill, (q, *cache[:2], table, lengths, cu, *cache[2:]), f"{n} tokens, {rows} seqs"
    name = f"{kernel}[{variant}" + (f", tuning {label}]" if label else "]")
    return name, shape, jax.jit(fn), args


def kernel_programs(mesh, quick: bool):
    """Both kernels in every variant at every engine bucket, and every tuning configuration the kernel
    benchmark sweeps (at a 64-sequence decode and a full-budget prefill, in bf16 and int8 KV)."""
    from benchmarks import kernel_tuning
    from scalellm_jax.engine.step_program import StepShapes

    shapes = StepShapes(MAX_NUM_SEQS, MAX_NUM_BATCHED_TOKENS, MAX_MODEL_LEN // PAGE_SIZE)
    variants = list(KV_VARIANTS)[:2] if quick else list(KV_VARIANTS)
    seq_buckets = shapes.seq_buckets[::4] if quick else shapes.seq_buckets
    token_buckets = shapes.token_buckets[::4] if quick else shapes.token_buckets
    programs = []
    for variant in variants:
        programs += [kernel_program("paged_decode", variant, n) for n in seq_buckets]
        programs += [kernel_program("ragged_prefill", variant, n) for n in token_buckets]
    for kernel, configs, n in (("paged_decode", kernel_tuning.DECODE, 64),
                               ("ragged_prefill", kernel_tuning.PREFILL, MAX_NUM_BATCHED_TOKENS)):
        tunings = [name for name in configs if name != "default"]  # the defaults are compiled above
        for label in tunings[:1] if quick else tunings:
            programs += [kernel_program(kernel, variant, n, configs[label], label) for variant in ("bf16", "int8")]
    return [(name, shape, fn, _abstract(mesh, args)) for name, shape, fn, args in programs]


def compile_one_kernel(kernel: str, variant: str, n: int, tuning: dict) -> dict:
    """Configure, build the H200 mesh and compile one kernel program: a row (for tests and ad-hoc checks)."""
    configure_environment()
    import jax

    mesh = h200_mesh(TARGET_CONFIG)
    name, shape, fn, args = kernel_program(kernel, variant, n, tuning, label="custom")
    with jax.set_mesh(mesh):
        return compile_program("kernel", name, shape, fn, _abstract(mesh, args))


def h200_kv_pages() -> int:
    """KV pages per layer that the engine's memory plan gives Mixtral-8x7B on one H200."""
    import numpy as np

    from scalellm_jax.config import EngineConfig, preset
    from scalellm_jax.engine.memory import plan_memory

    config = EngineConfig(max_num_seqs=MAX_NUM_SEQS, max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
                          max_model_len=MAX_MODEL_LEN, page_size=PAGE_SIZE)
    plan = plan_memory(preset("mixtral-8x7b"), config, dtype=np.dtype("bfloat16"), budget_bytes=h200_budget(config),
                       max_pages_per_seq=MAX_MODEL_LEN // PAGE_SIZE)
    return plan.num_pages


def h200_budget(config) -> int:
    """``gpu_memory_utilization`` of the H200's memory (``device_memory_size`` in the target config)."""
    text = TARGET_CONFIG.read_text() if TARGET_CONFIG.is_file() else ""
    m = re.search(r"device_memory_size:\s*(\d+)", text)
    return int(int(m.group(1)) * config.gpu_memory_utilization) if m else int(141 * 2**30 * 0.9)


def engine_programs(mesh, num_layers: int | None, buckets: list[tuple[bool, int, int]] | None, kv_cache_dtype="auto"):
    """The engine's step programs (decode / mixed) for ``buckets`` (default: every warmup bucket)."""
    import dataclasses as dc

    import jax
    import jax.numpy as jnp

    from scalellm_jax.config import preset
    from scalellm_jax.engine.logit_controls import history_shapes
    from scalellm_jax.engine.step_program import PlatformChoices, StepBatch, StepShapes, pool_shapes, step_functions
    from scalellm_jax.model import CausalAttention, Mixtral

    config = preset("mixtral-8x7b")
    if num_layers is not None:
        config = dc.replace(config, num_layers=num_layers)
    dtype = jnp.bfloat16
    choices = PlatformChoices.for_platform("gpu")
    functions = step_functions(config, dtype, choices)
    module = Mixtral(config, CausalAttention(config.sliding_window, 1.0), dtype)
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    params = jax.eval_shape(lambda t: module.init(jax.random.key(0), t, t), tokens)["params"]
    pools = pool_shapes(config, h200_kv_pages(), PAGE_SIZE, dtype, kv_cache_dtype)
    history = history_shapes(MAX_NUM_SEQS, config.vocab_size)
    shapes = StepShapes(MAX_NUM_SEQS, MAX_NUM_BATCHED_TOKENS, MAX_MODEL_LEN // PAGE_SIZE)
    programs = []
    for decode_only, num_tokens, rows in buckets or shapes.warmup():
        batch = StepBatch.empty(decode_only, num_tokens, rows, shapes.max_pages_per_seq)
        kind = "decode" if decode_only else "mixed"
        name = f"{kind}_step[{config.num_layers} layers, {choices.kernels}, {choices.moe_impl}, kv {kv_cache_dtype}]"
        programs.append((name, f"{num_tokens} tokens, {rows} seqs", functions[decode_only, False],
                         _abstract(mesh, batch.args(params, pools, history))))
    return programs


# ---------------------------------------------------------------------------------------------- report


def markdown(result: dict) -> str:
    lines = [f"# GPU compile check: {result['target']} — jax {result['jax']} — {result['date']} — commit "
             f"{result['git']['commit'][:12]}", "",
             f"{len(result['rows'])} programs, {result['failures']} failed, {result['wall_s']:.0f} s.", "",
             "| group | program | shape | registers | shared memory (bytes) | compile s | result |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        status = "ok" if not r["error"] else r["error"].splitlines()[0][:120].replace("|", "/")
        lines.append(f"| {r['group']} | {r['program']} | {r['shape']} | {r['registers'] or '—'} | "
                     f"{r['shared_memory_bytes'] if r['shared_memory_bytes'] is not None else '—'} | "
                     f"{r['compile_s']:.2f} | {status} |")
    return "\n".join(lines) + "\n"


def all_programs(mesh, quick: bool, skip_full: bool):
    """``(group, program, shape, jitted fn, abstract args)`` of everything the check compiles, in order."""
    full_buckets = [(True, MAX_NUM_SEQS, MAX_NUM_SEQS), (False, MAX_NUM_BATCHED_TOKENS, MAX_NUM_SEQS)]
    quick_buckets = [(True, 8, 8), (False, 128, MAX_NUM_SEQS)]
    groups = [("kernel", kernel_programs(mesh, quick)),
              ("engine_2layer", engine_programs(mesh, 2, quick_buckets if quick else None)),
              ("engine_2layer", engine_programs(mesh, 2, full_buckets, kv_cache_dtype="int8"))]
    if not (quick or skip_full):
        groups.append(("engine_full", engine_programs(mesh, None, full_buckets)))
    return [(group, *program) for group, programs in groups for program in programs]


def compile_shard(shard: int, num_shards: int, quick: bool, skip_full: bool) -> list[dict]:
    """Compile every ``num_shards``-th program from ``shard`` on; rows carry their index in the full list."""
    import jax

    mesh = h200_mesh(TARGET_CONFIG)
    rows = []
    with jax.set_mesh(mesh):
        for index, (group, program, shape, fn, fn_args) in enumerate(all_programs(mesh, quick, skip_full)):
            if index % num_shards != shard:
                continue
            row = {"index": index, **compile_program(group, program, shape, fn, fn_args)}
            rows.append(row)
            status = "ok" if not row["error"] else f"FAILED: {row['error'].splitlines()[0][:200]}"
            smem = row["shared_memory_bytes"]
            print(f"{group:14} {program:58} {shape:26} regs {row['registers'] or '-':>4} "
                  f"smem {smem if smem is not None else '-':>6} {row['compile_s']:7.2f}s {status}", flush=True)
    return rows


def compile_in_workers(argv: list[str], jobs: int) -> list[dict]:
    """Run ``jobs`` copies of this command, each on its own shard of the programs (compiles are mostly
    single-threaded: ptxas, LLVM), and merge their rows in program order."""
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        parts = [pathlib.Path(tmp) / f"shard{k}.json" for k in range(jobs)]
        workers = [subprocess.Popen([sys.executable, "-m", "benchmarks.gpu_compile_check", *argv,
                                     "--shard", f"{k}/{jobs}", "--out", str(part)], cwd=ROOT)
                   for k, part in enumerate(parts)]
        codes = [w.wait() for w in workers]
        rows = []
        for k, (code, part) in enumerate(zip(codes, parts, strict=True)):
            if not part.is_file():
                raise RuntimeError(f"compile worker {k}/{jobs} exited with {code} and wrote no result")
            rows += json.loads(part.read_text())["rows"]
    return sorted(rows, key=lambda r: r["index"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_compile_check", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few buckets and no full model (for tests)")
    parser.add_argument("--skip-full", action="store_true", help="skip the 32-layer Mixtral-8x7B steps")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile worker processes")
    parser.add_argument("--shard", help=argparse.SUPPRESS)  # "k/n": a worker's share (set by --jobs)
    parser.add_argument("--out", type=pathlib.Path, help="result JSON (default benchmarks/runs/...)")
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(raw)
    if not TARGET_CONFIG.is_file():
        print(f"error: {TARGET_CONFIG} not found (the H200 target description)", file=sys.stderr)
        return 2
    configure_environment()
    atexit.register(shutil.rmtree, DUMP_DIR, True)
    import jax

    from benchmarks.provenance import git_state, output_dir

    try:
        h200_mesh(TARGET_CONFIG)
    except Exception as exc:  # noqa: BLE001 - the one missing piece is almost always the plugin
        print(f"error: cannot build the deviceless H200 topology ({type(exc).__name__}: {exc}); install the CUDA "
              "plugin and ptxas (make gpu-compile-check does)", file=sys.stderr)
        return 2
    stamp = datetime.datetime.now(datetime.UTC)
    start = time.perf_counter()
    if args.shard:
        shard, num_shards = map(int, args.shard.split("/"))
        rows = compile_shard(shard, num_shards, args.quick, args.skip_full)
    elif args.jobs > 1:
        rows = compile_in_workers(_without_option(raw, "--out"), args.jobs)
    else:
        rows = compile_shard(0, 1, args.quick, args.skip_full)
    out = args.out or output_dir() / f"gpu_compile_check-jax{jax.__version__}-{stamp:%Y%m%d-%H%M%S}.json"
    result = {"benchmark": "gpu_compile_check", "date": stamp.isoformat(timespec="seconds"),
              "target": "NVIDIA H200 (sm_90a, deviceless)", "jax": jax.__version__, "git": git_state(),
              "command": " ".join(["python -m benchmarks.gpu_compile_check", *raw]),
              "config": {"max_num_seqs": MAX_NUM_SEQS, "max_num_batched_tokens": MAX_NUM_BATCHED_TOKENS,
                         "max_model_len": MAX_MODEL_LEN, "page_size": PAGE_SIZE, "dtype": "bfloat16",
                         "kv_pages_per_layer": h200_kv_pages(), "jobs": args.jobs},
              "wall_s": round(time.perf_counter() - start, 1),
              "failures": sum(1 for r in rows if r["error"]), "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if args.shard:
        return 0  # the parent reports
    out.with_suffix(".md").write_text(markdown(result))
    print(f"{len(rows)} programs compiled for the H200, {result['failures']} failed, {result['wall_s']:.0f} s; "
          f"wrote {out} and {out.with_suffix('.md')}")
    return 1 if result["failures"] else 0


def _without_option(argv: list[str], name: str) -> list[str]:
    """``argv`` less ``name VALUE`` / ``name=VALUE``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


if __name__ == "__main__":
    sys.exit(main())
