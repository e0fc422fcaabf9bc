"""Calibrating the device cost model from a GPU suite decode stage."""

import dataclasses
import json

import pytest

from device_models import DeviceCostModel, StepWork, device_profile, load_calibration, model_shape
from device_models import calibration as cal


def suite_result(efficiency: float, overhead_s: float) -> dict:
    """A decode stage as ``benchmarks.gpu_suite`` writes it, timed on a device with these factors."""
    m = DeviceCostModel(device_profile("h200"), model_shape("mixtral-8x7b"))
    rows = []
    for batch in (1, 8, 64, 256):
        bytes_ = m.weight_bytes_read(batch) + StepWork.decode(batch, 512).kv_tokens * m.kv_bytes_per_token
        rows.append({"batch": batch, "context": 512, "bytes": bytes_,
                     "step_ms": 1e3 * (bytes_ / (4.8e12 * efficiency) + overhead_s)})
    return {"device": "NVIDIA H200", "date": "2026-12-02", "git": {"commit": "abc123"}, "decode": {"rows": rows}}


def test_fit_recovers_bandwidth_efficiency_and_overhead():
    eff, overhead = cal.fit_decode_rows(suite_result(0.62, 0.002)["decode"]["rows"], 4.8e12)
    assert eff == pytest.approx(0.62, rel=1e-6)
    assert overhead == pytest.approx(0.002, rel=1e-6)


def test_fit_needs_two_sizes():
    rows = suite_result(0.6, 0.001)["decode"]["rows"][:1]
    with pytest.raises(ValueError, match="two or more"):
        cal.fit_decode_rows(rows, 4.8e12)


def test_cli_writes_a_calibration_that_says_it_was_measured(tmp_path, capsys):
    suite = tmp_path / "gpu_suite-decode.json"
    suite.write_text(json.dumps(suite_result(0.55, 0.003)))
    out = tmp_path / "h200.json"
    assert cal.main(["--gpu-suite", str(suite), "--out", str(out)]) == 0
    measured = load_calibration("h200", out)
    assert measured.memory_efficiency == pytest.approx(0.55)
    assert measured.measured and "gpu_suite-decode.json" in measured.source["memory_efficiency"]
    datasheet = load_calibration("h200")
    assert measured.compute_efficiency == datasheet.compute_efficiency  # not measured: kept, with its source
    assert measured.source["compute_efficiency"] == datasheet.source["compute_efficiency"]


def test_cli_refuses_a_result_without_decode_rows(tmp_path, capsys):
    suite = tmp_path / "gpu_suite-kernels.json"
    suite.write_text(json.dumps({"kernels": {}}))
    assert cal.main(["--gpu-suite", str(suite), "--out", str(tmp_path / "x.json")]) == 2
    assert "no decode rows" in capsys.readouterr().err


def test_a_calibration_must_name_every_source_and_its_device(tmp_path):
    base = load_calibration("h200")
    with pytest.raises(ValueError, match="missing"):
        dataclasses.replace(base, source={})
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        dataclasses.replace(base, memory_efficiency=1.5)
    wrong = tmp_path / "h100.json"
    wrong.write_text(json.dumps(base.to_json()))
    with pytest.raises(ValueError, match="calibrates 'h200'"):
        load_calibration("h100", wrong)
