"""OpenAI-compatible HTTP server: ``python -m scalellm_jax.server [--model PATH] [--port 8000] ...``.

Without ``--model`` it serves a built-in demo: a small Mixtral-architecture model with random
weights (fixed seed) and the real Mixtral tokenizer. The server listens at once (``/health`` is 503
while the model loads and the engine compiles its step shapes) and logs when it is ready.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from aiohttp import web

from scalellm_jax.config import PRESETS, ConfigError, EngineConfig
from scalellm_jax.engine.memory import configure_allocator
from scalellm_jax.server import multiprocess
from scalellm_jax.server.app import STATE, create_app, start_runner
from scalellm_jax.server.config import DEMO_ENGINE_OPTIONS, DEMO_MODEL_NAME, DEMO_PRESET, ServerConfig
from scalellm_jax.server.log_limits import install as limit_client_logs
from scalellm_jax.server.shutdown import drain

logger = logging.getLogger("scalellm_jax.server")


def _sizes(text: str) -> tuple[int, ...]:
    """``"16,64,256"`` → ``(16, 64, 256)`` (range checks are EngineConfig's)."""
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 16,64,256, got {text!r}") from None
    return sizes


_ENGINE_OPTIONS = {  # flag → (EngineConfig field, type, help)
    "--max-num-seqs": ("max_num_seqs", int, "most sequences in one step (the running batch)"),
    "--max-num-batched-tokens": ("max_num_batched_tokens", int, "per-step token budget (also the prefill chunk)"),
    "--max-model-len": ("max_model_len", int, "context length limit (default: the model's)"),
    "--page-size": ("page_size", int, "tokens per KV cache page"),
    "--num-pages": ("num_pages", int, "KV cache pages (default: sized from device memory)"),
    "--kv-cache-dtype": ("kv_cache_dtype", str, "auto (the model dtype) or int8"),
    "--gpu-memory-utilization": ("gpu_memory_utilization", float, "fraction of device memory to use"),
    "--scheduling-policy": ("scheduling_policy", str, "which waiting request runs first: fcfs, priority, alise"),
    "--aging-rate": ("aging_rate", float, "alise: seconds of estimated work forgiven per second waited"),
    "--length-predictor-data": ("length_predictor_data", str, "alise: JSONL of instruction/output rows to warm-start "
                                "the output-length predictor"),
    "--swap-space-gb": ("swap_space_gb", float, "host memory for preempted requests' KV (0: recompute instead)"),
    "--decode-buckets": ("decode_buckets", _sizes, "decode-step row counts to compile at warmup, e.g. 16,64,256 "
                         "(default: the engine's full set; --max-num-seqs is always added): fewer executables and a "
                         "faster warmup, at the cost of padding each step up to the next size"),
    "--token-buckets": ("token_buckets", _sizes, "mixed-step token counts to compile at warmup, e.g. 256,2048 "
                        "(default: the engine's full set; --max-num-batched-tokens is always added)"),
}


class CLIError(Exception):
    """Bad command-line input: one line naming the option."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line (no usage block): "error: argument --port: invalid int value"
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(prog="python -m scalellm_jax.server", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="Hugging Face or converted checkpoint folder, or a preset name "
                        f"({', '.join(PRESETS)}: random weights). Default: the built-in demo model")
    parser.add_argument("--served-model-name", help="the name in /v1/models and in requests' model field")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--dtype", default="auto", help="auto (float32 on CPU, else bfloat16), bfloat16, float32, ...")
    parser.add_argument("--seed", type=int, default=0, help="engine seed (and the demo's weight seed)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--expert-parallel-size", type=int, default=1)
    for flag, (_, kind, text) in _ENGINE_OPTIONS.items():
        parser.add_argument(flag, type=kind, default=None, help=text, metavar="N,N,..." if kind is _sizes else None)
    parser.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false", default=None,
                        help="prefill every prompt from its first token (by default the KV of prompt prefixes "
                        "already computed is reused)")
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                        help="vLLM's spelling: --no-enable-prefix-caching is --no-prefix-caching")
    parser.add_argument("--simulate-device", default=None, metavar="DEVICE",
                        help="run on a simulated device instead of this host's (one of h200, h100, a100-40gb): "
                        "everything is real but the model step, which takes the device_models cost model's time "
                        "and returns random tokens; --model needs only its config")
    parser.add_argument("--simulate-lengths", default=None, metavar="JSONL",
                        help="with --simulate-device: rows of instruction/output; a completion prompt equal to an "
                        "instruction ends after as many tokens as its output had")
    parser.add_argument("--api-key", default=os.environ.get("SCALELLM_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1/* (default: $SCALELLM_API_KEY)")
    parser.add_argument("--max-queued-requests", type=int, default=ServerConfig.max_queued_requests,
                        help="requests that may wait beyond the running batch; more get HTTP 429")
    parser.add_argument("--compilation-cache-dir", default=str(_default_cache_dir()),
                        help="XLA's persistent compilation cache: later starts skip most compiling ('' = off)")
    parser.add_argument("--stream-interval-ms", type=float, default=0.0,
                        help="send each stream at most one chunk per interval (0: every token); a chunk carries all "
                             "tokens since the last, which lowers per-token overhead at high concurrency")
    parser.add_argument("--shutdown-grace-s", type=float, default=ServerConfig.shutdown_grace_s,
                        help="after SIGTERM/SIGINT, requests in flight get this long to finish (new ones get 503, "
                             "/health 503); then the rest are ended; a second signal exits at once")
    parser.add_argument("--keepalive-timeout-s", type=float, default=ServerConfig.keepalive_timeout_s,
                        help="close a connection idle this long (between requests, or still sending its headers)")
    parser.add_argument("--request-read-timeout-s", type=float, default=ServerConfig.request_read_timeout_s,
                        help="a request body must arrive within this (else 408)")
    parser.add_argument("--max-connections", type=int, default=ServerConfig.max_connections,
                        help="open connections at most; a new one past this gets 503 and is closed")
    parser.add_argument("--event-loop", default="auto", choices=["auto", "uvloop", "asyncio"],
                        help="auto: uvloop when installed")
    parser.add_argument("--allowed-origins", type=_origins, default=(), metavar="ORIGINS",
                        help="browser origins allowed to call the API (CORS): comma-separated or a JSON list "
                             "(vLLM's form), '*' for any; default none")
    parser.add_argument("--allow-credentials", action="store_true",
                        help="CORS requests may carry cookies or HTTP authentication")
    parser.add_argument("--access-log", action="store_true", help="log every HTTP request")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser.parse_args(argv)


def _origins(text: str) -> tuple[str, ...]:
    if text.lstrip().startswith("["):
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"not a JSON list: {exc}") from None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise argparse.ArgumentTypeError("a JSON list of strings, e.g. '[\"https://example.com\"]'")
        return tuple(value)
    return tuple(v.strip() for v in text.split(",") if v.strip())


def engine_options(args: argparse.Namespace) -> dict:
    """EngineConfig fields from the flags (demo defaults without --model), validated now, not after loading."""
    options = {} if args.model else dict(DEMO_ENGINE_OPTIONS)
    for field in [f for f, _, _ in _ENGINE_OPTIONS.values()] + ["enable_prefix_caching"]:
        value = getattr(args, field)
        if value is not None:
            options[field] = value
    try:
        EngineConfig(seed=args.seed, **options)
    except ConfigError as exc:
        raise _flag_error(exc) from None
    return options


def _flag_error(exc: ConfigError) -> CLIError:
    """"EngineConfig.max_num_seqs must be ..." or "tensor_parallel_size 8 must ..." → the flag's name first."""
    message = str(exc).removeprefix("EngineConfig.")
    field = message.split(" ", 1)[0]
    return CLIError(f"--{field.replace('_', '-')}: {message}")


def check_against_model(args: argparse.Namespace, options: dict) -> None:
    """The checks that need the model's config (a preset, or a checkpoint's config file: no weights), so
    that a flag the model cannot take fails now, naming it, not after minutes of loading."""
    from scalellm_jax.loader import check_options_against_model, model_config_of
    from scalellm_jax.parallel import ParallelConfig

    try:
        model_config = model_config_of(args.model or DEMO_PRESET)
    except (OSError, ValueError):
        return  # an unreadable checkpoint: loading says why, in one line
    parallel = ParallelConfig(tensor_parallel_size=args.tensor_parallel_size,
                              expert_parallel_size=args.expert_parallel_size)
    try:
        check_options_against_model(model_config, EngineConfig(seed=args.seed, **options), parallel)
    except ConfigError as exc:
        raise _flag_error(exc) from None


def server_config(args: argparse.Namespace) -> ServerConfig:
    if args.model and args.model not in PRESETS and not Path(args.model).is_dir():
        raise CLIError(f"--model: {args.model} is not a checkpoint folder or a preset ({', '.join(PRESETS)})")
    for flag in ("tensor_parallel_size", "expert_parallel_size"):
        if getattr(args, flag) < 1:
            raise CLIError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not 0 <= args.port < 65536:
        raise CLIError(f"--port must be in [0, 65535], got {args.port}")
    check_simulation(args)
    name = args.served_model_name or (Path(args.model).name if args.model else DEMO_MODEL_NAME)
    try:
        return ServerConfig(model_name=name, api_key=args.api_key, max_queued_requests=args.max_queued_requests,
                            stream_interval_s=args.stream_interval_ms / 1e3, simulated_device=args.simulate_device,
                            allowed_origins=args.allowed_origins, allow_credentials=args.allow_credentials,
                            shutdown_grace_s=args.shutdown_grace_s, keepalive_timeout_s=args.keepalive_timeout_s,
                            request_read_timeout_s=args.request_read_timeout_s, max_connections=args.max_connections)
    except ValueError as exc:
        field = str(exc).split(" ", 1)[0]
        flag = "--stream-interval-ms" if field == "stream_interval_s" else "--" + field.replace("_", "-")
        raise CLIError(f"{flag}: {exc}") from None


def check_simulation(args: argparse.Namespace) -> None:
    if args.simulate_device is not None:
        from device_models import DEVICES

        if args.simulate_device not in DEVICES:
            raise CLIError(f"--simulate-device: unknown device {args.simulate_device!r}; choose one of "
                           f"{', '.join(DEVICES)}")
    if args.simulate_lengths is not None:
        if args.simulate_device is None:
            raise CLIError("--simulate-lengths: only with --simulate-device")
        if not Path(args.simulate_lengths).is_file():
            raise CLIError(f"--simulate-lengths: {args.simulate_lengths} is not a file")


def _default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "scalellm_jax" / "xla"


def llm_options(args: argparse.Namespace, options: dict) -> dict:
    """``build_llm``'s keyword arguments from the flags (also sets up JAX's compilation cache)."""
    import jax

    if args.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", args.compilation_cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

    on_cpu = jax.default_backend() == "cpu" and args.simulate_device is None  # a simulated GPU serves bfloat16
    dtype = args.dtype if args.dtype != "auto" else ("float32" if on_cpu else "bfloat16")
    return dict(dtype=dtype, seed=args.seed, tensor_parallel_size=args.tensor_parallel_size,
                expert_parallel_size=args.expert_parallel_size, simulate_device=args.simulate_device,
                simulate_lengths=args.simulate_lengths, **options)


def load(args: argparse.Namespace, name: str, options: dict):
    from scalellm_jax.server.loading import build_served_model

    return build_served_model(name, args.model or DEMO_PRESET, **llm_options(args, options))


async def serve(args: argparse.Namespace, config: ServerConfig, options: dict) -> int:
    start = time.perf_counter()
    app = create_app(config)
    runner = await start_runner(app, access_log=logger if args.access_log else None)
    try:
        await web.TCPSite(runner, args.host, args.port).start()
    except OSError as exc:
        await runner.cleanup()
        raise CLIError(f"--port: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    host, port = runner.addresses[0][:2]
    logger.info("listening on http://%s:%d (model %s loading; GET /health is 503 until ready)", host, port,
                config.model_name)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        if not stop.is_set():
            stop.set()
            return
        logger.warning("%s again: exiting now, without finishing the requests in flight", sig.name)
        logging.shutdown()
        os._exit(1)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    loaded: asyncio.Future = loop.create_future()

    def load_in_thread():  # a daemon thread: Ctrl-C during a long load must not wait for it
        try:
            result = load(args, config.model_name, options)
        except BaseException as exc:  # handed to the event loop, reported there
            loop.call_soon_threadsafe(_settle, loaded, None, exc)
        else:
            loop.call_soon_threadsafe(_settle, loaded, result, None)

    threading.Thread(target=load_in_thread, name="scalellm-load", daemon=True).start()
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait([loaded, stopping], return_when=asyncio.FIRST_COMPLETED)
    served = None
    try:
        if not loaded.done():
            multiprocess.abandon()
            return 0
        try:
            served = loaded.result()
        except Exception as exc:  # one line, no stack trace: the model or its options are wrong
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            print(f"error: --model: cannot load {args.model or DEMO_PRESET}: {message}", file=sys.stderr)
            return 1
        app[STATE].ready(served)
        simulated = f", on a SIMULATED {served.simulated_device}" if served.simulated_device else ""
        logger.info("ready in %.1f s: http://%s:%d/v1 serves %s (max_model_len %d%s)", time.perf_counter() - start,
                    host, port, served.name, served.max_model_len, simulated)
        failed = multiprocess.watch_engine(served.engine, loop)
        await asyncio.wait([stopping, failed], return_when=asyncio.FIRST_COMPLETED)
        if failed.done():  # the engine spans processes and lost one: every process stops
            print(f"error: {failed.result()}", file=sys.stderr)
            return 1
        finished = await drain(app[STATE], config.shutdown_grace_s)
        logger.info("shut down%s", "" if finished else " (requests still running at the end of the grace ended)")
        return 0
    finally:
        stopping.cancel()
        await runner.cleanup()
        if served is not None:
            served.engine.shutdown()


def _settle(future: asyncio.Future, result, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is None:
        future.set_result(result)
    else:
        future.set_exception(exc)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    limit_client_logs()
    try:
        options = engine_options(args)
        config = server_config(args)
        check_against_model(args, options)
        # before the loading thread's first JAX call starts the backends
        configure_allocator(options.get("gpu_memory_utilization", EngineConfig.gpu_memory_utilization))
        try:
            leader = multiprocess.join()
        except ConfigError as exc:
            raise CLIError(str(exc)) from None
        if not leader:  # a follower process: no HTTP, it repeats process 0's steps
            return multiprocess.finish(multiprocess.follow(args.model or DEMO_PRESET,
                                                           lambda: llm_options(args, options)))
        with _event_loop(args.event_loop) as runner:
            return multiprocess.finish(runner.run(serve(args, config, options)))
    except CLIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


@contextlib.contextmanager
def _event_loop(kind: str):
    """uvloop when asked or (auto) installed: less per-event overhead than asyncio's own loop."""
    factory = None
    if kind != "asyncio":
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                raise CLIError("--event-loop uvloop: uvloop is not installed (pip install uvloop)") from None
        else:
            factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        yield runner


if __name__ == "__main__":
    sys.exit(main())
