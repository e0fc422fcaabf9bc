"""Measuring the output-length predictor: dataset rows, rank metrics, and the ``eval`` CLI.

    python -m scalellm_jax.engine.predictor eval --train TRAIN.jsonl --test TEST.jsonl [--json]
    python -m scalellm_jax.engine.predictor eval --data ROWS.jsonl --split 0.5 --seed 0
    python -m scalellm_jax.engine.predictor eval --data ROWS.jsonl --folds 5 --seed 0

Rows are JSON objects with string fields ``instruction`` (the prompt) and ``output`` (what the
model answered); lengths are counted in Mixtral tokenizer tokens. The predictor sees only the
prompt. Reported: Kendall's tau-b, Spearman's rho and mean absolute error (tokens) on the test
rows, beside the MAE of predicting the training mean. With ``--folds`` every row is tested once
and the numbers are fold means (per-fold values under ``folds``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from scalellm_jax.engine.predictor import DEFAULT_ENCODERS, REGRESSORS, OutputLengthPredictor, PredictorConfig


class DatasetError(ValueError):
    """A dataset file that cannot be read; the message names the file, line and field."""


def load_rows(path: str | Path, tokenizer=None) -> tuple[list[str], list[int]]:
    """Prompts and output lengths (tokens of ``tokenizer``, default Mixtral's) from a JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    texts, outputs = [], []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DatasetError(f"{path}:{number}: expected a JSON object with 'instruction' and 'output'")
            for field in ("instruction", "output"):
                if not isinstance(row.get(field), str):
                    problem = "missing" if field not in row else f"not a string ({type(row[field]).__name__})"
                    raise DatasetError(f"{path}:{number}: field '{field}' is {problem}")
            texts.append(row["instruction"])
            outputs.append(row["output"])
    if not texts:
        raise DatasetError(f"{path}: no rows")
    if tokenizer is None:
        from scalellm_jax.tokenizer import MistralTokenizer

        tokenizer = MistralTokenizer()
    return texts, [len(tokenizer.encode(text, add_bos=False)) for text in outputs]


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
    """``minilm,hashed:0.5`` -> (("minilm", 1.0), ("hashed", 0.5)); default weights from DEFAULT_ENCODERS."""
    defaults = dict(DEFAULT_ENCODERS)
    out = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, weight = part.partition(":")
        try:
            out.append((name, float(weight) if weight else defaults.get(name, 1.0)))
        except ValueError:
            raise ValueError(f"--encoders: bad weight in {part!r}") from None
    return tuple(out)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m scalellm_jax.engine.predictor",
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
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _run_eval(args) -> dict:
    overrides = {k: v for k, v in dict(regressor=args.regressor, ridge_lambda=args.ridge_lambda,
                                       minilm_layer=args.minilm_layer,
                                       knn_threshold=args.knn_threshold).items() if v is not None}
    if args.encoders is not None:
        overrides["encoders"] = _parse_encoders(args.encoders)
    config = PredictorConfig(**overrides)
    encoders = config.build_encoders()  # fails fast (e.g. no MiniLM package) before reading any file
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
            pairs = [(order[:cut], order[cut:])]
        else:
            if not 2 <= args.folds <= len(order):
                raise ValueError(f"--folds must be in [2, {len(order)}], got {args.folds}")
            pairs = [(np.setdiff1d(order, order[f::args.folds]), order[f::args.folds]) for f in range(args.folds)]
        encoders, encode_ms = _precompute(encoders, rows[0])
        results = [evaluate(config, _subset(rows, tr), _subset(rows, te), encoders) for tr, te in pairs]
        for result in results:  # the folds reuse one encoding pass; charge its cost to every prediction
            for key, extra in zip(("predict_ms_per_prompt", "predict_cpu_ms_per_prompt"), encode_ms, strict=True):
                result[key] = round(result[key] + extra, 3)
    else:
        if not (args.train and args.test):
            raise ValueError("eval needs --train and --test (or --data with --split/--folds)")
        if args.split is not None or args.folds is not None:
            raise ValueError("--split/--folds only apply to --data")
        results = [evaluate(config, load_rows(args.train), load_rows(args.test), encoders)]
    keys = ("kendall_tau", "spearman_rho", "mae_tokens", "baseline_mae_tokens", "predict_ms_per_prompt",
            "predict_cpu_ms_per_prompt")
    summary = {k: float(np.mean([r[k] for r in results])) for k in keys}
    summary.update(n_train=results[0]["n_train"], n_test=sum(r["n_test"] for r in results),
                   config=dataclasses.asdict(config))
    if len(results) > 1:
        summary["kendall_tau_std"] = float(np.std([r["kendall_tau"] for r in results]))
        summary["folds"] = results
    return summary


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        summary = _run_eval(args)
    except (ValueError, ImportError, OSError) as exc:  # DatasetError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
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
          f"{summary['predict_cpu_ms_per_prompt']:.2f} ms CPU (batched, nothing cached)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
