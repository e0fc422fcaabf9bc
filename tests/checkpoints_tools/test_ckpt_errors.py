"""Bad input: exit code 1, exactly one clear stderr line naming file and tensor, nothing at OUT_DIR."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from ckpt_helpers import copy_tree, rewrite_hf

from checkpoints_tools import convert as convert_cli
from checkpoints_tools import export as export_cli
from scalellm_jax.checkpoints.hf_layout import iter_params_from_hf
from scalellm_jax.checkpoints.safetensors_io import HFCheckpoint

REPO = Path(__file__).resolve().parents[2]
Q1 = "model.layers.1.self_attn.q_proj.weight"


def run_convert(capsys, hf: Path, out: Path, *extra: str) -> str:
    """Run the CLI in-process, assert failure semantics, return the single stderr line."""
    capsys.readouterr()  # drop what fixtures printed (save_pretrained's progress bar)
    rc = convert_cli.main(["--hf", str(hf), "--out", str(out), "--no-progress", *extra])
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert rc == 1
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f"{out.name}.tmp-*")), "temporary folder left behind"


def edit_cases():
    def missing(t):
        del t["model.layers.1.self_attn.k_proj.weight"]

    def unexpected(t):
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)

    def shape(t):
        t[Q1] = np.zeros((64, 16), np.float32)

    def dtype(t):
        t[Q1] = t[Q1].astype(np.float16)

    def non_float(t):
        t[Q1] = t[Q1].astype(np.int32)

    return [
        ("missing", missing, "model.safetensors: tensor model.layers.1.self_attn.k_proj.weight is missing"),
        ("unexpected", unexpected,
         "model.safetensors: unexpected tensor model.layers.0.self_attn.rotary_emb.inv_freq"),
        ("shape", shape, f"model.safetensors: tensor {Q1} has shape [64, 16], expected [64, 32]"),
        ("dtype", dtype,
         f"model.safetensors: tensor {Q1} has dtype float16, but the rest of the checkpoint is float32"),
        ("non_float", non_float, f"model.safetensors: tensor {Q1} has non-floating dtype int32"),
    ]


@pytest.mark.parametrize("case, edit, message", edit_cases(), ids=[c[0] for c in edit_cases()])
def test_bad_tensors(base_hf, tmp_path, capsys, case, edit, message):
    bad = rewrite_hf(base_hf, tmp_path / "bad", edit)
    out = tmp_path / "out"
    line = run_convert(capsys, bad, out)
    assert line == f"error: {bad}/{message}"
    assert_nothing_written(out)


def test_truncated_shard_in_sharded_checkpoint(hf_checkpoint, tmp_path, capsys):
    folder, _ = hf_checkpoint(max_shard_size="20KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / index["weight_map"][Q1]
    size = shard.stat().st_size
    os.truncate(shard, size - 100)
    out = tmp_path / "out"
    line = run_convert(capsys, folder, out)
    assert line.startswith(f"error: {shard}: truncated file: tensor ")
    assert f"needs {size} bytes but the file has {size - 100}" in line
    assert_nothing_written(out)


def test_truncated_header(base_hf, tmp_path, capsys):
    bad = copy_tree(base_hf, tmp_path / "bad")
    os.truncate(bad / "model.safetensors", 20)
    out = tmp_path / "out"
    line = run_convert(capsys, bad, out)
    assert line.startswith(f"error: {bad}/model.safetensors: truncated or corrupt safetensors file")
    assert_nothing_written(out)


def test_shape_error_names_the_shard(hf_checkpoint, tmp_path, capsys):
    folder, _ = hf_checkpoint(max_shard_size="20KB", intermediate_size=48)
    config = json.loads((folder / "config.json").read_text())
    config["num_key_value_heads"] = 4
    (folder / "config.json").write_text(json.dumps(config))
    shard = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][
        "model.layers.0.self_attn.k_proj.weight"]
    out = tmp_path / "out"
    line = run_convert(capsys, folder, out)
    assert line == (f"error: {folder / shard}: tensor model.layers.0.self_attn.k_proj.weight "
                    f"has shape [32, 32], expected [64, 32]")
    assert_nothing_written(out)


def test_missing_config(base_hf, tmp_path, capsys):
    bad = copy_tree(base_hf, tmp_path / "bad")
    (bad / "config.json").unlink()
    out = tmp_path / "out"
    assert run_convert(capsys, bad, out) == f"error: {bad}/config.json: config.json not found"
    assert_nothing_written(out)


def test_bad_config_value(base_hf, tmp_path, capsys):
    bad = rewrite_hf(base_hf, tmp_path / "bad", config_edit=lambda c: c.update(hidden_act="gelu"))
    line = run_convert(capsys, bad, tmp_path / "out")
    assert line == f"error: {bad}/config.json: config.json hidden_act 'gelu' is not supported (only 'silu')"
    assert_nothing_written(tmp_path / "out")


def test_out_dir_exists(base_hf, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    line = run_convert(capsys, base_hf, out)
    assert line == f"error: {out}: output path already exists; remove it or choose another --out"
    assert (out / "keep.txt").read_text() == "mine"
    assert not list(tmp_path.glob("out.tmp-*"))


def test_export_errors(base_hf, tmp_path, capsys):
    # not a converted checkpoint
    capsys.readouterr()
    assert export_cli.main(["--ckpt", str(base_hf), "--hf", str(tmp_path / "x"), "--no-progress"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {base_hf}: not a converted scalellm_jax checkpoint")
    assert_nothing_written(tmp_path / "x")
    # output exists
    ours = tmp_path / "ours"
    assert convert_cli.main(["--hf", str(base_hf), "--out", str(ours), "--no-progress"]) == 0
    (tmp_path / "x").mkdir()
    capsys.readouterr()
    assert export_cli.main(["--ckpt", str(ours), "--hf", str(tmp_path / "x"), "--no-progress"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [f"error: {tmp_path / 'x'}: output path already exists; remove it or choose another --hf"]


def test_tied_checkpoint_may_carry_lm_head(base_hf, tmp_path):
    def edit(config):
        config["tie_word_embeddings"] = True

    folder = rewrite_hf(base_hf, tmp_path / "tied", config_edit=edit)
    ckpt = HFCheckpoint(folder)
    assert "lm_head.weight" in ckpt.names()
    got = dict(iter_params_from_hf(ckpt, ckpt.config, dtype="bfloat16"))
    assert ("lm_head", "kernel") not in got
    assert got[("embed", "embedding")].dtype == np.dtype(ml_dtypes.bfloat16)


def test_cli_subprocess_prints_one_line_and_no_traceback(base_hf, tmp_path):
    bad = rewrite_hf(base_hf, tmp_path / "bad", lambda t: t.__setitem__(Q1, np.zeros((64, 16), np.float32)))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "checkpoints_tools.convert", "--hf", str(bad), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"error: {bad}/model.safetensors: tensor {Q1} has shape [64, 16], expected [64, 32]"
    ], proc.stderr
    assert proc.stdout == ""
    assert_nothing_written(out)


def test_float64_checkpoint_needs_an_explicit_dtype(base_hf, tmp_path, capsys):
    def to64(t):
        for name in list(t):
            t[name] = t[name].astype(np.float64)

    bad = rewrite_hf(base_hf, tmp_path / "f64", to64)
    line = run_convert(capsys, bad, tmp_path / "out")
    assert line.startswith(f"error: {bad}/model.safetensors: checkpoint dtype float64 is not supported")
    assert_nothing_written(tmp_path / "out")
    rc = convert_cli.main(["--hf", str(bad), "--out", str(tmp_path / "out"), "--dtype", "float32", "--no-progress"])
    assert rc == 0
