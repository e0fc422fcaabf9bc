"""Measuring the output-length predictor: dataset rows, rank metrics, and the ``eval`` CLI.

    python -m scalellm_jax.length_predictor eval --train TRAIN.jsonl --test TEST.jsonl [--json]
    python -m scalellm_jax.length_predictor eval --data ROWS.jsonl --split 0.5 --seed 0
    python -m scalellm_jax.length_predictor eval --data ROWS.jsonl --folds 5 --seed 0

Rows are JSON objects with string fields ``instruction`` (the prompt) and ``output`` (what the
model answered); lengths are counted in Mixtral tokenizer tokens. The predictor sees only the
prompt. Reported: Kendall's tau-b, Spearman's rho and mean absolute error (tokens) on the test
rows, beside the MAE of predicting the training mean. With ``--folds`` every row is tested once
and the numbers are fold means (per-fold values under ``folds``).

Cost: ``cpu_ms_per_prompt_batch1`` is the CPU time of predicting from raw text one prompt per call
(a lone arrival, what a serving host pays at a modest request rate), ``cpu_ms_per_prompt_batched``
the same in batches of ``--timing-batch`` (``AsyncPredictor``'s batch when requests queue up); both
with nothing cached, on up to ``--timing-prompts`` test prompts. ``predict_cpu_ms_per_prompt``
is the older figure: every test prompt encoded in one batch.

``stream`` drives a ``TieredPredictor`` (fast default encoders, accurate ``MINILM_ENCODERS``) in
real time: per fold it learns the other folds, then the fold's prompts arrive as a Poisson stream
at each ``--rates`` value; each request's prediction is read ``--read-after-ms`` after it arrived
(as a scheduler would) and it finishes, is forgotten and observed ``--lifetime-s`` after arrival.
Reported per rate: the fraction of requests on the accurate tier by each read, the Kendall tau of
the values read then (none yet = the policy's default, 256), the fast tier's latency and the CPU
each tier's thread spent per prompt.

    python -m scalellm_jax.length_predictor stream --data ROWS.jsonl --folds 5 --rates 5,10,20,40 [--json]

``--inner-folds K --lambda-grid A,B,..`` picks the ridge lambda inside each training set by
K-fold CV on it (best mean Kendall's tau), so no test row influences the choice.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import numpy as np

from scalellm_jax.length_predictor.dataset import load_rows
from scalellm_jax.length_predictor.predictor import (
    DEFAULT_ENCODERS,
    MINILM_ENCODERS,
    REGRESSORS,
    OutputLengthPredictor,
    PredictorConfig,
)


def rank_metrics(predicted, actual) -> dict:
    """Kendall's tau-b, Spearman's rho and MAE (tokens) of ``predicted`` against ``actual``."""
    from scipy.stats import kendalltau, spearmanr

    predicted, actual = np.asarray(predicted, np.float64), np.asarray(actual, np.float64)
    constant = np.ptp(predicted) == 0 or np.ptp(actual) == 0
    return {
        "kendall_tau": float("nan") if constant else float(kendalltau(predicted, actual)[0]),
        "spearman_rho": float("nan") if constant else float(spearmanr(predicted, actual)[0]),
        "mae_tokens": float(np.mean(np.abs(predicted - actual))),
    }


def evaluate(config: PredictorConfig, train: tuple[list[str], list[int]], test: tuple[list[str], list[int]],
             encoders=None) -> dict:
    """Fit a fresh predictor on ``train`` and score it on ``test`` (plus the predict-the-mean baseline)."""
    predictor = OutputLengthPredictor(config, encoders)
    start = time.perf_counter()
    predictor.fit(*train)
    fit_s = time.perf_counter() - start
    start, cpu_start = time.perf_counter(), time.process_time()
    predicted = predictor.predict_many(test[0])
    predict_s, predict_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    result = rank_metrics(predicted, test[1])
    result["baseline_mae_tokens"] = float(np.mean(np.abs(np.mean(train[1]) - np.asarray(test[1], np.float64))))
    result.update(n_train=len(train[0]), n_test=len(test[0]), fit_seconds=round(fit_s, 3),
                  predict_ms_per_prompt=round(1e3 * predict_s / len(test[0]), 3),
                  predict_cpu_ms_per_prompt=round(1e3 * predict_cpu_s / len(test[0]), 3))
    return result


def measure_cost(config: PredictorConfig, encoders, train: tuple[list[str], list[int]], texts: list[str],
                 batch_size: int) -> dict:
    """Wall and CPU ms per prompt of ``predict_many`` from raw text with the feature cache off: one prompt
    per call, then ``batch_size`` prompts per call. ``encoders`` must be real ones, not precomputed."""
    predictor = OutputLengthPredictor(dataclasses.replace(config, feature_cache_size=0), encoders).fit(*train)
    predictor.predict_many(texts[:1])  # first-call costs (lazy imports, allocator) are not per prompt

    def timed(batches) -> tuple[float, float]:
        start, cpu_start = time.perf_counter(), time.process_time()
        for batch in batches:
            predictor.predict_many(batch)
        return 1e3 * (time.perf_counter() - start) / len(texts), 1e3 * (time.process_time() - cpu_start) / len(texts)

    wall1, cpu1 = timed([[text] for text in texts])
    wall, cpu = timed([texts[i:i + batch_size] for i in range(0, len(texts), batch_size)])
    return {"cpu_ms_per_prompt_batch1": round(cpu1, 4), "cpu_ms_per_prompt_batched": round(cpu, 4),
            "wall_ms_per_prompt_batch1": round(wall1, 4), "wall_ms_per_prompt_batched": round(wall, 4),
            "timing": {"prompts": len(texts), "batch_size": batch_size, "cache": "off"}}


def select_lambda(config: PredictorConfig, train: tuple[list[str], list[int]], grid: list[float], folds: int,
                  seed: int, encoders) -> tuple[float, dict]:
    """The ridge lambda in ``grid`` with the best mean Kendall's tau over ``folds`` folds of ``train`` only."""
    order = np.random.default_rng(seed).permutation(len(train[0]))
    scores = {}
    for value in grid:
        candidate = dataclasses.replace(config, ridge_lambda=value)
        scores[value] = float(np.mean([evaluate(candidate, _subset(train, np.setdiff1d(order, order[f::folds])),
                                                _subset(train, order[f::folds]), encoders)["kendall_tau"]
                                       for f in range(folds)]))
    return max(grid, key=lambda v: scores[v]), scores


class _Precomputed:
    """An encoder that looks rows up (the folds of one file share a single encoding pass)."""

    def __init__(self, encoder, texts: list[str]):
        self.name, self.dim = encoder.name, encoder.dim
        self._rows = dict(zip(texts, encoder.encode(texts), strict=True))

    def encode(self, texts):
        return np.stack([self._rows[t] for t in texts]) if len(texts) else np.zeros((0, self.dim), np.float32)


def _precompute(encoders, texts: list[str]) -> tuple[list[_Precomputed], tuple[float, float]]:
    """Encoders that serve ``texts`` from memory, and the batched encoding cost per prompt (wall, CPU ms)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    out = [_Precomputed(encoder, texts) for encoder in encoders]
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return out, (1e3 * wall / len(texts), 1e3 * cpu / len(texts))


def _subset(rows, index):
    return [rows[0][i] for i in index], [rows[1][i] for i in index]


def _parse_encoders(spec: str) -> tuple[tuple[str, float], ...]:
    """``minilm,hashed:0.5`` -> (("minilm", 1.0), ("hashed", 0.5)); default weights from the presets."""
    defaults = dict(MINILM_ENCODERS) | dict(DEFAULT_ENCODERS)
    out = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, weight = part.partition(":")
        try:
            out.append((name, float(weight) if weight else defaults.get(name, 1.0)))
        except ValueError:
            raise ValueError(f"--encoders: bad weight in {part!r}") from None
    return tuple(out)


class _Primed:
    """An encoder that serves known (training) texts from memory and encodes the rest for real."""

    def __init__(self, encoder, rows: dict):
        self.name, self.dim, self._encoder, self._rows = encoder.name, encoder.dim, encoder, rows

    def encode(self, texts):
        if all(t in self._rows for t in texts):
            return np.stack([self._rows[t] for t in texts]) if len(texts) else np.zeros((0, self.dim), np.float32)
        return self._encoder.encode(texts)


def _finite(x) -> float | None:
    return float(x) if np.isfinite(x) else None


def stream_eval(fast_config: PredictorConfig, accurate_config: PredictorConfig, rows, folds: int, seed: int,
                rates: list[float], read_after_ms: list[float], lifetime_s: float, refine_order: str = "newest",
                observe: bool = True, default_len: float = 256.0) -> dict:
    """Real-time ``TieredPredictor`` runs on Poisson streams of each fold's prompts (see the module doc)."""
    import heapq

    from scalellm_jax.length_predictor.tiered import ACCURATE, TieredPredictor

    order = np.random.default_rng(seed).permutation(len(rows[0]))
    encoders = {"fast": fast_config.build_encoders(), "accurate": accurate_config.build_encoders()}
    tables = {tier: [dict(zip(rows[0], e.encode(rows[0]), strict=True)) for e in encs]
              for tier, encs in encoders.items()}  # training rows' features, computed once
    configs = {"fast": fast_config, "accurate": accurate_config}
    per_rate = {rate: [] for rate in rates}
    offline = {"fast": [], "accurate": []}
    for f in range(folds):
        train, test = _subset(rows, np.setdiff1d(order, order[f::folds])), _subset(rows, order[f::folds])
        train_set = set(train[0])

        def predictor(tier, train=train, train_set=train_set):
            primed = [_Primed(e, {t: r for t, r in table.items() if t in train_set})
                      for e, table in zip(encoders[tier], tables[tier], strict=True)]
            return OutputLengthPredictor(configs[tier], primed).fit(*train)

        for tier in offline:
            full = [_Primed(e, table) for e, table in zip(encoders[tier], tables[tier], strict=True)]
            offline[tier].append(evaluate(configs[tier], train, test, full)["kendall_tau"])
        for rate in rates:
            rng = np.random.default_rng([seed, f, int(rate * 1000)])
            arrivals = np.cumsum(rng.exponential(1.0 / rate, len(test[0])))
            events = []
            for i, t in enumerate(arrivals):
                events.append((t, 0, i, None))
            heapq.heapify(events)
            reads = {d: [None] * len(arrivals) for d in read_after_ms}
            infos, lags = [None] * len(arrivals), []
            tiers = TieredPredictor(predictor("fast"), predictor("accurate"), refine_order=refine_order)
            start = time.monotonic()
            while events:
                t, kind, i, d = heapq.heappop(events)
                delay = start + t - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                else:
                    lags.append(-delay)
                if kind == 0:  # reads and the finish count from when the submit really happened
                    tiers.submit(i, test[0][i])
                    now = time.monotonic() - start
                    for d in read_after_ms:
                        heapq.heappush(events, (now + d / 1e3, 1, i, d))
                    heapq.heappush(events, (now + lifetime_s, 2, i, None))
                elif kind == 1:
                    reads[d][i] = (tiers.get(i), tiers.tier(i))
                else:
                    infos[i] = tiers.info(i)
                    tiers.forget(i)
                    if observe:
                        tiers.observe(test[0][i], test[1][i])
            wall = time.monotonic() - start
            tiers.flush(60, refine=False)
            stats = tiers.stats()
            tiers.close()
            per_rate[rate].append(dict(reads=reads, infos=infos, lengths=test[1], stats=stats, wall=wall,
                                       lags=lags))
    out = {"offline_tau": {tier: float(np.mean(v)) for tier, v in offline.items()}, "rates": []}
    for rate, runs in per_rate.items():
        infos = [info for run in runs for info in run["infos"]]
        fast_ms = np.array([1e3 * (i.fast_at - i.submitted) for i in infos if i is not None])
        acc_ms = np.array([1e3 * (i.accurate_at - i.submitted) if i is not None and i.accurate_at else np.inf
                           for i in infos])
        result = {"rate_per_s": rate, "requests": len(infos),
                  "fast_latency_ms": {"p50": float(np.percentile(fast_ms, 50)),
                                      "p99": float(np.percentile(fast_ms, 99)), "max": float(fast_ms.max())},
                  "accurate_latency_ms_p50": _finite(np.percentile(acc_ms, 50)),
                  "accurate_latency_ms_p90": _finite(np.percentile(acc_ms, 90)),
                  "accurate_before_finish": float(np.isfinite(acc_ms).mean()), "by_read": {}}
        for d in read_after_ms:
            taus, accurate, none = [], 0, 0
            for run in runs:
                values = [default_len if r is None or r[0] is None else r[0] for r in run["reads"][d]]
                taus.append(rank_metrics(values, run["lengths"])["kendall_tau"])
                accurate += sum(r is not None and r[1] == ACCURATE for r in run["reads"][d])
                none += sum(r is None or r[0] is None for r in run["reads"][d])
            result["by_read"][f"{d:g}ms"] = {"kendall_tau": float(np.mean(taus)),
                                           "fraction_accurate": accurate / len(infos),
                                           "fraction_none": none / len(infos),
                                           "fraction_accurate_by_timestamp": float((acc_ms <= d).mean())}
        final = [rank_metrics([i.value for i in run["infos"]], run["lengths"])["kendall_tau"] for run in runs]
        n_fast = sum(run["stats"]["fast_predictions"] for run in runs)
        n_refined = sum(run["stats"]["refined"] for run in runs)
        lags = [lag for run in runs for lag in run["lags"]]
        result.update(
            kendall_tau_at_finish=float(np.mean(final)),
            fast_cpu_ms_per_prompt=1e3 * sum(run["stats"]["fast_cpu_s"] for run in runs) / max(n_fast, 1),
            refine_cpu_ms_per_prompt=1e3 * sum(run["stats"]["refine_cpu_s"] for run in runs) / max(n_refined, 1),
            refine_skipped=sum(run["stats"]["refine_skipped"] for run in runs),
            observes_dropped=sum(run["stats"]["observes_dropped"] for run in runs),
            stream_wall_s=round(sum(run["wall"] for run in runs), 2),
            driver_late_ms_p99=float(1e3 * np.percentile(lags, 99)) if lags else 0.0)
        out["rates"].append(result)
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m scalellm_jax.length_predictor",
                                     description="Output-length predictor tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("eval", help="fit on training rows, report rank metrics on test rows")
    ev.add_argument("--train", help="JSONL rows to learn from")
    ev.add_argument("--test", help="JSONL rows to score")
    ev.add_argument("--data", help="one JSONL file to split instead of --train/--test")
    ev.add_argument("--split", type=float, default=None, help="with --data: fraction used for training")
    ev.add_argument("--folds", type=int, default=None, help="with --data: k-fold cross-validation")
    ev.add_argument("--seed", type=int, default=0, help="shuffle seed for --split/--folds")
    ev.add_argument("--encoders", default=None, help="comma list of name[:weight], "
                    f"default {','.join(f'{n}:{w:g}' for n, w in DEFAULT_ENCODERS)}")
    ev.add_argument("--regressor", choices=REGRESSORS, default=None)
    ev.add_argument("--ridge-lambda", type=float, default=None)
    ev.add_argument("--minilm-layer", type=int, default=None)
    ev.add_argument("--knn-threshold", type=float, default=None, help="alise: similarity where retrieval starts")
    ev.add_argument("--inner-folds", type=int, default=None,
                    help="choose --lambda-grid's ridge lambda by this many folds inside each training set")
    ev.add_argument("--lambda-grid", default="0.5,1,2,4,8", help="comma list of ridge lambdas for --inner-folds")
    ev.add_argument("--timing-prompts", type=int, default=200,
                    help="test prompts timed one per call and batched (0: skip the timing)")
    ev.add_argument("--timing-batch", type=int, default=32, help="prompts per call in the batched timing")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    st = sub.add_parser("stream", help="drive the two-tier predictor in real time on Poisson arrivals")
    st.add_argument("--data", required=True, help="JSONL rows, split into --folds")
    st.add_argument("--folds", type=int, default=5)
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--rates", default="5,10,20,40", help="comma list of arrival rates (requests/s)")
    st.add_argument("--read-after-ms", default="10,50,200,1000", help="when each prediction is read")
    st.add_argument("--lifetime-s", type=float, default=4.0, help="arrival to finish (forget + observe)")
    st.add_argument("--refine-order", choices=("newest", "oldest"), default="newest")
    st.add_argument("--no-observe", action="store_true", help="finished requests teach nothing")
    st.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _run_stream(args) -> dict:
    try:
        rates = [float(v) for v in args.rates.split(",") if v.strip()]
        reads = [float(v) for v in args.read_after_ms.split(",") if v.strip()]
    except ValueError:
        raise ValueError("--rates and --read-after-ms take comma lists of numbers") from None
    if not rates or min(rates) <= 0 or not reads or min(reads) < 0 or args.lifetime_s <= max(reads) / 1e3:
        raise ValueError("need positive --rates, non-negative --read-after-ms, and --lifetime-s after the last read")
    rows = load_rows(args.data)
    if not 2 <= args.folds <= len(rows[0]):
        raise ValueError(f"--folds must be in [2, {len(rows[0])}], got {args.folds}")
    fast, accurate = PredictorConfig(), PredictorConfig(encoders=MINILM_ENCODERS)
    out = stream_eval(fast, accurate, rows, args.folds, args.seed, rates, reads, args.lifetime_s,
                      args.refine_order, not args.no_observe)
    out.update(folds=args.folds, seed=args.seed, lifetime_s=args.lifetime_s, refine_order=args.refine_order,
               observe=not args.no_observe, n_rows=len(rows[0]),
               fast_encoders=fast.encoders, accurate_encoders=accurate.encoders)
    return out


def _run_eval(args) -> dict:
    overrides = {k: v for k, v in dict(regressor=args.regressor, ridge_lambda=args.ridge_lambda,
                                       minilm_layer=args.minilm_layer,
                                       knn_threshold=args.knn_threshold).items() if v is not None}
    if args.encoders is not None:
        overrides["encoders"] = _parse_encoders(args.encoders)
    config = PredictorConfig(**overrides)
    if args.timing_prompts < 0 or args.timing_batch < 1:
        raise ValueError("--timing-prompts must be >= 0 and --timing-batch >= 1")
    grid = None
    if args.inner_folds is not None:
        if args.inner_folds < 2:
            raise ValueError(f"--inner-folds must be >= 2, got {args.inner_folds}")
        try:
            grid = [float(v) for v in args.lambda_grid.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"--lambda-grid: not a comma list of numbers: {args.lambda_grid!r}") from None
        if not grid or min(grid) <= 0:
            raise ValueError("--lambda-grid needs positive numbers")
    real_encoders = config.build_encoders()  # fails fast (e.g. no MiniLM package) before reading any file

    def run(train, test, encoders):
        chosen = config
        if grid is not None:
            best, scores = select_lambda(config, train, grid, args.inner_folds, args.seed, encoders)
            chosen = dataclasses.replace(config, ridge_lambda=best)
        result = evaluate(chosen, train, test, encoders)
        if grid is not None:
            result.update(ridge_lambda=best, inner_tau=scores)
        return result

    if args.data is not None:
        if args.train or args.test:
            raise ValueError("give either --data (with --split or --folds) or --train and --test, not both")
        if (args.split is None) == (args.folds is None):
            raise ValueError("--data needs exactly one of --split FRACTION or --folds K")
        rows = load_rows(args.data)
        order = np.random.default_rng(args.seed).permutation(len(rows[0]))
        if args.split is not None:
            if not 0 < args.split < 1:
                raise ValueError(f"--split must be in (0, 1), got {args.split}")
            cut = int(round(args.split * len(order)))
            if not 0 < cut < len(order):
                raise ValueError(f"--split {args.split} leaves no training or no test rows of {len(order)}")
            index_pairs = [(order[:cut], order[cut:])]
        else:
            if not 2 <= args.folds <= len(order):
                raise ValueError(f"--folds must be in [2, {len(order)}], got {args.folds}")
            index_pairs = [(np.setdiff1d(order, order[f::args.folds]), order[f::args.folds])
                           for f in range(args.folds)]
        pairs = [(_subset(rows, tr), _subset(rows, te)) for tr, te in index_pairs]
    else:
        if not (args.train and args.test):
            raise ValueError("eval needs --train and --test (or --data with --split/--folds)")
        if args.split is not None or args.folds is not None:
            raise ValueError("--split/--folds only apply to --data")
        pairs = [(load_rows(args.train), load_rows(args.test))]
    all_texts = list(dict.fromkeys(text for pair in pairs for rows_ in pair for text in rows_[0]))
    encoders, encode_ms = _precompute(real_encoders, all_texts)
    results = [run(train, test, encoders) for train, test in pairs]
    for result in results:  # the runs share one encoding pass; charge its cost to every prediction
        for key, extra in zip(("predict_ms_per_prompt", "predict_cpu_ms_per_prompt"), encode_ms, strict=True):
            result[key] = round(result[key] + extra, 3)
    keys = ("kendall_tau", "spearman_rho", "mae_tokens", "baseline_mae_tokens", "predict_ms_per_prompt",
            "predict_cpu_ms_per_prompt")
    summary = {k: float(np.mean([r[k] for r in results])) for k in keys}
    summary.update(n_train=results[0]["n_train"], n_test=sum(r["n_test"] for r in results),
                   config=dataclasses.asdict(config))
    if args.timing_prompts:  # the first run's model, timed on its own test prompts
        train, test = pairs[0]
        summary.update(measure_cost(config, real_encoders, train, test[0][:args.timing_prompts], args.timing_batch))
    if len(results) > 1:
        summary["kendall_tau_std"] = float(np.std([r["kendall_tau"] for r in results]))
        summary["folds"] = results
    return summary


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        summary = _run_stream(args) if args.command == "stream" else _run_eval(args)
    except (ValueError, ImportError, OSError) as exc:  # DatasetError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.command == "stream":
        print(json.dumps(summary) if args.json else json.dumps(summary, indent=1))
        return 0
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"rows: {summary['n_train']} train, {summary['n_test']} test; "
          f"encoders {summary['config']['encoders']}; regressor {summary['config']['regressor']}")
    print(f"{'':22s}{'predictor':>12s}{'mean baseline':>16s}")
    print(f"{'Kendall tau':22s}{summary['kendall_tau']:12.3f}{'-':>16s}")
    print(f"{'Spearman rho':22s}{summary['spearman_rho']:12.3f}{'-':>16s}")
    print(f"{'MAE (tokens)':22s}{summary['mae_tokens']:12.1f}{summary['baseline_mae_tokens']:16.1f}")
    print(f"predict cost: {summary['predict_ms_per_prompt']:.2f} ms/prompt wall, "
          f"{summary['predict_cpu_ms_per_prompt']:.2f} ms CPU (all test prompts in one batch, nothing cached)")
    if "cpu_ms_per_prompt_batch1" in summary:
        print(f"CPU ms/prompt: {summary['cpu_ms_per_prompt_batch1']:.3f} one per call, "
              f"{summary['cpu_ms_per_prompt_batched']:.3f} in batches of {summary['timing']['batch_size']} "
              f"({summary['timing']['prompts']} prompts, nothing cached)")
    return 0
