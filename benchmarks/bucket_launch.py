"""Run a module with the engine's step buckets cut down to a few (fewer executables to compile at warmup).

    python -m benchmarks.bucket_launch --seq 64 --tokens 256 -- scalellm_jax.server --model mixtral-8x7b ...

A Mixtral-8x7B step compiles as one 32-layer executable per shape bucket, tens of seconds each on an
H200 host, and serving warms ~15 of them: more than a 5-minute GPU stage holds. ``benchmarks.gpu_suite``
starts the server and its in-process baseline through this launcher so that both warm (and serve with)
the same few buckets. Every batch still fits a bucket: the largest of the engine's own is always kept,
so a step pads up to the next kept size (on a GPU a decode step is memory-bound on the expert weights,
so padding rows costs little).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import runpy
import sys


def keep(buckets: tuple[int, ...], wanted) -> tuple[int, ...]:
    """The engine's buckets that are in ``wanted``, plus its largest (None: all of them)."""
    if wanted is None:
        return tuple(buckets)
    return tuple(sorted({b for b in buckets if b in set(wanted)} | {max(buckets)}))


def warm_restricted(runner, progress: bool = True) -> None:
    """``ModelRunner.warmup`` over the runner's (restricted) bucket attributes."""
    import jax

    del progress
    for n in runner.seq_buckets:
        jax.block_until_ready(runner.execute(runner._empty(True, n, n)))
    for n in runner.token_buckets:
        jax.block_until_ready(runner.execute(runner._empty(False, n, runner.max_num_seqs)))
    if runner.swapper is not None:
        runner.pools = runner.swapper.warmup(runner.pools)
    logging.getLogger(__name__).info("warmup compiled %d executables: decode buckets %s, mixed buckets %s (cut by "
                                     "benchmarks.bucket_launch)", runner.num_compilations(), runner.seq_buckets,
                                     runner.token_buckets)


@contextlib.contextmanager
def restricted_buckets(seq=None, tokens=None):
    """Every ``ModelRunner`` built inside keeps only these decode (``seq``) and mixed (``tokens``) buckets."""
    from scalellm_jax.engine.runner import ModelRunner

    original_init, original_warmup = ModelRunner.__init__, ModelRunner.warmup

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.seq_buckets = keep(self.seq_buckets, seq)
        self.token_buckets = keep(self.token_buckets, tokens)

    ModelRunner.__init__, ModelRunner.warmup = init, warm_restricted
    try:
        yield
    finally:
        ModelRunner.__init__, ModelRunner.warmup = original_init, original_warmup


def _sizes(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bucket_launch", description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=_sizes, help="decode buckets to keep, e.g. 16,64 (default: all)")
    parser.add_argument("--tokens", type=_sizes, help="mixed-step token buckets to keep (default: all)")
    args = parser.parse_args(argv[:split])
    module, *rest = argv[split + 1:] or [""]
    if not module:
        parser.error("name the module to run after --")
    sys.argv = [module, *rest]
    with restricted_buckets(args.seq, args.tokens):
        runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
