"""What a native CPU MoE kernel buys: ``python -m benchmarks.native_moe`` (JSON to benchmarks/runs/).

Builds ``benchmarks/native_moe.cc`` (a fused MoE SwiGLU as an XLA FFI custom call, see its header) with
the host's g++ for the host's vector width, checks it against the engine's CPU experts
(``moe.grouped_experts_chunked``) and times both, alternating, on the offline benchmark's shape
(hidden 512, intermediate 1792, 8 experts, top-2) at decode and prefill sizes, float32 and bfloat16.
The engine does not use the kernel: this measures how far a straightforward native kernel closes the
gap to vLLM's CPU MoE kernel (``benchmarks/results/step_profile-*.json``) and what it would still need.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import functools
import hashlib
import json
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile

from benchmarks.engine_profile import median_ms
from benchmarks.provenance import cpu_description, git_state, write_result

SOURCE = pathlib.Path(__file__).with_suffix(".cc")
TARGET = "scalellm_native_moe"


class BuildError(RuntimeError):
    pass


def compiler_flags() -> list[str]:
    """g++ flags for this host: 64-byte vectors with AVX-512, 32-byte with AVX2, else the baseline."""
    from scalellm_jax.cpu_features import host_cpu

    flags = host_cpu()[1]
    if "avx512f" in flags:
        return ["-march=x86-64-v4", "-mprefer-vector-width=512", "-DSLJ_VEC_BYTES=64"]
    if "avx2" in flags and "fma" in flags:
        return ["-march=x86-64-v3", "-DSLJ_VEC_BYTES=32"]
    return ["-DSLJ_VEC_BYTES=32"]


@functools.lru_cache(maxsize=1)
def register() -> pathlib.Path:
    """Compile the kernel (cached by source and flags) and register it with XLA:CPU; the library's path."""
    import jax

    compiler = shutil.which("g++")
    if compiler is None:
        raise BuildError("g++ not found: the native MoE probe needs a C++17 compiler")
    # -ffast-math for the compile only (vectorised expf): linked with it, g++ adds crtfastmath, whose
    # loading sets flush-to-zero for the whole process and so changes every float computation in it.
    flags = ["-O3", "-std=c++17", "-fPIC", "-ffast-math", "-fopenmp-simd", *compiler_flags(),
             f"-I{jax.ffi.include_dir()}"]
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:16]
    library = pathlib.Path(tempfile.gettempdir()) / f"scalellm-native-moe-{key}.so"
    if not library.exists():
        partial = library.with_suffix(".partial.so")
        for command in ([compiler, *flags, "-c", str(SOURCE), "-o", str(partial.with_suffix(".o"))],
                        [compiler, "-shared", str(partial.with_suffix(".o")), "-o", str(partial), "-lmvec"]):
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                raise BuildError(f"g++ failed ({done.returncode}): {done.stderr[-2000:]}")
        partial.replace(library)
    handle = ctypes.cdll.LoadLibrary(str(library))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(handle.ScalellmCpuMoe), platform="cpu")
    return library


def native_moe(x, weights, experts, w_gate, w_up, w_down):
    """Same contract as ``moe.grouped_experts_chunked`` (result in ``x``'s dtype), through the kernel."""
    import jax
    import jax.numpy as jnp

    register()
    out = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(x.shape, jnp.float32))(
        x, experts.astype(jnp.int32), weights.astype(jnp.float32), w_gate, w_up, w_down)
    return out.astype(x.dtype)


def _routed(impl, x, params):
    from scalellm_jax.model.moe import route

    router, w_gate, w_up, w_down = params
    return impl(x, *route(x, router, 2), w_gate, w_up, w_down)


def measure(rows: tuple[int, ...], repeats: int, reps: int) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from scalellm_jax.model.moe import grouped_experts_chunked

    hidden, inter, experts = 512, 1792, 8
    impls = {name: jax.jit(functools.partial(_routed, impl))
             for name, impl in (("xla", grouped_experts_chunked), ("native", native_moe))}
    out = []
    for dtype in (jnp.float32, jnp.bfloat16):
        keys = jax.random.split(jax.random.key(0), 5)
        w_gate, w_up = ((0.02 * jax.random.normal(keys[i], (experts, hidden, inter))).astype(dtype) for i in (0, 1))
        w_down = (0.02 * jax.random.normal(keys[2], (experts, inter, hidden))).astype(dtype)
        router = (0.02 * jax.random.normal(keys[3], (hidden, experts))).astype(dtype)
        for n in rows:
            x = jax.random.normal(keys[4], (n, hidden)).astype(dtype)
            params = (router, w_gate, w_up, w_down)
            want, got = (impls[k](x, params).astype(jnp.float32) for k in ("xla", "native"))
            error = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
            times = {k: [] for k in impls}
            for repeat in range(repeats):
                for k in (list(impls) if repeat % 2 == 0 else list(impls)[::-1]):
                    times[k].append(median_ms(impls[k], x, params, reps=reps))
            row = {"dtype": jnp.dtype(dtype).name, "rows": n, "max_rel_error": error,
                   **{f"{k}_ms": statistics.median(t) for k, t in times.items()}, "runs_ms": times}
            row["native_speedup"] = row["xla_ms"] / row["native_ms"]
            print(json.dumps({k: v for k, v in row.items() if k != "runs_ms"}), flush=True)
            out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.native_moe", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,8,64,512", help="tokens per MoE call")
    parser.add_argument("--repeats", type=int, default=4, help="alternating rounds")
    parser.add_argument("--reps", type=int, default=20, help="timed calls per round (median)")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    try:
        rows = tuple(int(r) for r in args.rows.split(","))
    except ValueError:
        parser.error(f"--rows: expected comma-separated integers, got {args.rows!r}")
    if args.repeats < 1 or args.reps < 1 or min(rows) < 1:
        parser.error("--rows, --repeats and --reps must be >= 1")
    try:
        library = register()
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import jax

    result = {"benchmark": "native_moe", "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "git": git_state(), "command": "python -m benchmarks.native_moe " + " ".join(argv or sys.argv[1:]),
              "device": {"kind": "cpu", **cpu_description()}, "jax": jax.__version__,
              "compiler_flags": compiler_flags(), "library": library.name,
              "shape": {"hidden": 512, "intermediate": 1792, "experts": 8, "top_k": 2},
              "results": measure(rows, args.repeats, args.reps)}
    write_result("native_moe", result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
