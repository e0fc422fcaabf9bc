"""CPU serving attention (``pallas_kernels.xla``): query tiles and key-block sizes, on the offline preset's shapes.

    python -m benchmarks.cpu_attention            # table + JSON in benchmarks/runs/
    python -m benchmarks.cpu_attention --quick    # fewer repetitions (a smoke run)

The ``xla`` backend is what CPU serving runs (the Pallas kernels need a GPU). Shapes: 8 query heads,
2 KV heads, head_dim 64, 16-token pages, float32 (``benchmarks.offline_throughput``'s model); a
512-token mixed step and a 64-row decode step. Ragged prefill is timed at ``tile=1`` (one query
token per tile: every token gathers its own key blocks, the layout before tiles) and at larger
tiles; every variant is checked against the jnp reference. Times are medians of interleaved
rounds, because this kind of machine drifts.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.provenance import git_state, output_dir
from pallas_kernels import reference, xla

HEADS, KV_HEADS, HEAD_DIM, PAGE, MAX_PAGES, SEQS, TOKENS = 8, 2, 64, 16, 32, 64, 512

# (name, new tokens per sequence, tokens already cached per sequence); rows past these are empty
PREFILL_MIXES = {
    "8 prompts x 64": ([64] * 8, [0] * 8),
    "2 prompts x 256": ([256] * 2, [0] * 2),
    "1 prompt x 512": ([512], [0]),
    "449-token prompt + 63 decode rows at 200": ([449] + [1] * 63, [0] + [199] * 63),
    "100-token chunk at 300 + 63 decode rows at 400": ([100] + [1] * 63, [300] + [399] * 63),
}
PREFILL_VARIANTS = {"tile 1 (per token)": dict(tile=1, pages_per_block=8),
                    "tile 8, 2-page blocks": dict(tile=8, pages_per_block=2),
                    "tile 16, 4-page blocks": dict(tile=16, pages_per_block=4)}
# decode batches: label → context length of each of the 64 rows. The skewed one is what the engine
# sees (one long prompt among short rows): the cost must follow each row's length, not the longest.
DECODE_CONTEXTS = {"100": [100] * SEQS, "250": [250] * SEQS, "512": [512] * SEQS,
                   "63 at 100 + 1 at 384": [100] * (SEQS - 1) + [384]}
DECODE_BLOCKS = (1, 2, 4, 8)


def pools(key):
    shape = (KV_HEADS, SEQS * MAX_PAGES + 1, PAGE, HEAD_DIM)
    k_key, v_key = jax.random.split(key)
    return jax.random.normal(k_key, shape), jax.random.normal(v_key, shape)


def page_table():
    return jnp.asarray(1 + np.arange(SEQS * MAX_PAGES).reshape(SEQS, MAX_PAGES), jnp.int32)


def prefill_args(q_lens, cached, key):
    q_lens = np.array(q_lens + [0] * (SEQS - len(q_lens)))
    cached = np.array(cached + [0] * (SEQS - len(cached)))
    kv_lens = np.where(q_lens > 0, cached + q_lens, 0).astype(np.int32)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    q = jax.random.normal(key, (TOKENS, HEADS, HEAD_DIM))
    return q, jnp.asarray(kv_lens), jnp.asarray(cu)


def interleaved_ms(fns: dict, rounds: int, reps: int) -> dict:
    """Median over ``rounds`` of each function's mean ms over ``reps`` back-to-back calls."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(reps):
                out = fn()
            jax.block_until_ready(out)
            samples[name].append(1e3 * (time.perf_counter() - start) / reps)
    return {name: statistics.median(v) for name, v in samples.items()}


def run(rounds: int, reps: int) -> dict:
    key = jax.random.key(0)
    k_pages, v_pages = pools(key)
    table = page_table()
    prefill = []
    for label, (q_lens, cached) in PREFILL_MIXES.items():
        q, kv_lens, cu = prefill_args(q_lens, cached, key)
        args = (q, k_pages, v_pages, table, kv_lens, cu)
        ref = np.asarray(reference.ragged_prefill_attention(*args, scale=0.125))
        fns = {name: (lambda kw=kw, args=args: xla.ragged_prefill_attention(*args, scale=0.125, **kw))
               for name, kw in PREFILL_VARIANTS.items()}
        errors = {name: float(np.max(np.abs(np.asarray(fn()) - ref))) for name, fn in fns.items()}
        times = interleaved_ms(fns, rounds, reps)
        prefill.append({"mix": label, "ms": times, "max_abs_err_vs_reference": errors,
                        "speedup_vs_tile_1": {n: times["tile 1 (per token)"] / t for n, t in times.items()}})
    decode = []
    q = jax.random.normal(key, (SEQS, HEADS, HEAD_DIM))
    for label, contexts in DECODE_CONTEXTS.items():
        lengths = jnp.minimum(jnp.asarray(contexts, jnp.int32), MAX_PAGES * PAGE)
        args = (q, k_pages, v_pages, table, lengths)
        ref = np.asarray(reference.paged_decode_attention(*args, scale=0.125))
        fns = {f"{b}-page blocks": (lambda b=b, args=args: xla.paged_decode_attention(*args, scale=0.125,
                                                                                     pages_per_block=b))
               for b in DECODE_BLOCKS}
        errors = {name: float(np.max(np.abs(np.asarray(fn()) - ref))) for name, fn in fns.items()}
        decode.append({"rows": SEQS, "context": label, "ms": interleaved_ms(fns, rounds, reps),
                       "max_abs_err_vs_reference": errors})
    return {"prefill_512_tokens": prefill, "decode_64_rows": decode}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of 1 call (smoke run)")
    parser.add_argument("--out", type=pathlib.Path,
                        help="JSON path (default: benchmarks/runs/cpu_attention-<stamp>.json)")
    raw_argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(raw_argv)
    git = git_state()  # before the run, like the other benchmarks
    rounds, reps = (2, 1) if args.quick else (7, 3)
    result = run(rounds, reps)
    for row in result["prefill_512_tokens"]:
        cells = "  ".join(f"{n}: {t:6.1f} ms" for n, t in row["ms"].items())
        print(f"prefill {row['mix']:>48}  {cells}")
    for row in result["decode_64_rows"]:
        cells = "  ".join(f"{n}: {t:5.2f} ms" for n, t in row["ms"].items())
        print(f"decode 64 rows, context {row['context']:>20}  {cells}")
    now = datetime.datetime.now(datetime.UTC)
    out = args.out or output_dir() / f"cpu_attention-{now.strftime('%Y%m%d-%H%M%S')}.json"
    record = {"benchmark": "cpu_attention", "date": now.isoformat(timespec="seconds"), "git": git,
              "command": " ".join(["python -m benchmarks.cpu_attention", *raw_argv]),
              "device": f"{jax.devices()[0].platform} ({jax.device_count()} devices)", "jax": jax.__version__,
              "shapes": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "page_size": PAGE,
                         "dtype": jnp.dtype(jnp.float32).name, "tokens": TOKENS, "rows": SEQS},
              "rounds": rounds, "reps": reps, **result}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
