"""How much of each datasheet peak a real engine step reaches, and where that number came from.

One JSON file per device under ``device_models/calibrations/``. Until a GPU run exists the factors
are assumptions (``source`` says so, factor by factor); the GPU suite's decode-roofline stage
(``benchmarks.gpu_suite --stage decode``) measures decode steps at several batch sizes, and

    python -m device_models.calibration --gpu-suite benchmarks/results/gpu_suite-decode-....json

fits ``step_s = bytes / (memory_bps * memory_efficiency) + step_overhead_s`` to them and rewrites
the device's file, recording the run it came from.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

import numpy as np

from device_models.profiles import DEVICES, device_profile

CALIBRATIONS = pathlib.Path(__file__).resolve().parent / "calibrations"
FACTORS = ("memory_efficiency", "compute_efficiency", "host_link_efficiency", "interconnect_efficiency",
           "step_overhead_s")


@dataclasses.dataclass(frozen=True)
class Calibration:
    device: str
    memory_efficiency: float  # fraction of HBM bandwidth a whole step's reads and writes reach
    compute_efficiency: float  # fraction of the bf16 peak a step's matmuls and attention reach
    host_link_efficiency: float  # fraction of the host link a KV swap reaches
    interconnect_efficiency: float  # fraction of NVLink a collective reaches
    step_overhead_s: float  # fixed cost per step: kernel launches, sampling, the token copy to the host
    source: dict  # factor name -> where its value came from

    def __post_init__(self):
        for name in FACTORS[:4]:
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"Calibration.{name} must be in (0, 1], got {getattr(self, name)!r}")
        if not self.step_overhead_s >= 0:
            raise ValueError(f"Calibration.step_overhead_s must be >= 0, got {self.step_overhead_s!r}")
        missing = [name for name in FACTORS if name not in self.source]
        if missing:
            raise ValueError(f"Calibration.source must say where each factor came from; missing {missing}")

    @property
    def measured(self) -> bool:
        """Whether any factor comes from a measured run (not only the datasheet and assumptions)."""
        return any(str(s).startswith("measured") for s in self.source.values())

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Calibration:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


def calibration_path(device: str) -> pathlib.Path:
    device_profile(device)  # a clear error for an unknown name
    return CALIBRATIONS / f"{device}.json"


def load_calibration(device: str, path: str | pathlib.Path | None = None) -> Calibration:
    """The device's calibration file (``path``, default ``calibrations/<device>.json``)."""
    path = pathlib.Path(path) if path is not None else calibration_path(device)
    try:
        calibration = Calibration.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a readable calibration ({exc})") from None
    if calibration.device != device:
        raise ValueError(f"{path}: calibrates {calibration.device!r}, not {device!r}")
    return calibration


def fit_decode_rows(rows: list[dict], memory_bps: float) -> tuple[float, float]:
    """(memory_efficiency, step_overhead_s) from decode timings: ``step_ms`` against the ``bytes`` each
    step must move, by least squares (at least two distinct sizes)."""
    pts = [(float(r["bytes"]), float(r["step_ms"]) / 1e3) for r in rows if r.get("bytes") and r.get("step_ms")]
    if len({b for b, _ in pts}) < 2:
        raise ValueError("need decode timings at two or more step sizes to separate bandwidth from overhead")
    x, y = np.array([b for b, _ in pts]), np.array([s for _, s in pts])
    slope, intercept = np.polyfit(x, y, 1)
    if slope <= 0:
        raise ValueError("decode time does not grow with the bytes moved: the timings are not usable")
    efficiency = 1.0 / (slope * memory_bps)
    return float(min(efficiency, 1.0)), float(max(intercept, 0.0))


def calibrate_from_gpu_suite(result: dict, result_name: str, device: str) -> Calibration:
    """The device's calibration with its memory efficiency and step overhead refitted from a GPU suite
    decode stage (``result``: the suite's JSON; other factors keep their values and sources)."""
    rows = (result.get("decode") or {}).get("rows") or []
    if not rows:
        raise ValueError(f"{result_name}: no decode rows (run benchmarks.gpu_suite --stage decode)")
    efficiency, overhead = fit_decode_rows(rows, device_profile(device).memory_bps)
    base = load_calibration(device)
    where = (f"measured: {result_name} ({result.get('device', 'unknown device')}, {result.get('date', 'no date')}, "
             f"commit {str((result.get('git') or {}).get('commit', 'unknown'))[:12]}), decode batches "
             f"{sorted(r['batch'] for r in rows)}: least-squares fit of step time against bytes moved")
    return dataclasses.replace(base, memory_efficiency=efficiency, step_overhead_s=overhead,
                               source={**base.source, "memory_efficiency": where, "step_overhead_s": where})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m device_models.calibration", description=__doc__.splitlines()[0])
    p.add_argument("--gpu-suite", type=pathlib.Path, required=True, help="a benchmarks.gpu_suite decode-stage JSON")
    p.add_argument("--device", default="h200", choices=sorted(DEVICES))
    p.add_argument("--out", type=pathlib.Path, default=None, help="default: calibrations/<device>.json")
    args = p.parse_args(argv)
    try:
        result = json.loads(args.gpu_suite.read_text())
        calibration = calibrate_from_gpu_suite(result, args.gpu_suite.name, args.device)
    except (OSError, ValueError) as exc:
        print(f"error: --gpu-suite {args.gpu_suite}: {exc}", file=sys.stderr)
        return 2
    out = args.out or calibration_path(args.device)
    out.write_text(json.dumps(calibration.to_json(), indent=2) + "\n")
    print(f"memory efficiency {calibration.memory_efficiency:.3f}, step overhead "
          f"{1e3 * calibration.step_overhead_s:.2f} ms; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
