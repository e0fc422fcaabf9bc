"""The result-file policy (``benchmarks/provenance.py``): ``benchmarks/results/`` holds exactly the runs the README
cites and the files they need; every other run goes to the ignored ``benchmarks/runs/``."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess

import pytest

from benchmarks import provenance

ROOT = pathlib.Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
CODE = ("benchmarks", "scalellm_jax", "device_models")  # their dated result names are citations
# (tests' are examples in temporary folders: from them only the names of files that exist count, files they read)
# A result named in the README's backticks: `name-YYYYMMDD-HHMMSS[.ext]`, optionally under benchmarks/results/.
FULL = r"`(?:benchmarks/results/)?([A-Za-z][\w.]*(?:-[A-Za-z][\w.]*)*)-(\d{8})-(\d{6})(\.(?:json|md|png))?`"
# Its shorthand, `-HHMMSS` or `-YYYYMMDD-HHMMSS`: the name (and date) of the full citation before it.
SHORT = r"`-(?:(\d{8})-)?(\d{6})`"
DATED = re.compile(r"\b([A-Za-z][\w.]*(?:-[A-Za-z][\w.]*)*-\d{8}-\d{6})(\.(?:json|md|png))?\b")


def readme_citations(text: str) -> list[str]:
    """Every result the text cites, shorthands expanded; without an extension, a stem (all its files)."""
    cited, last = [], None
    for m in re.finditer(f"{FULL}|{SHORT}", text):
        if m.group(1):
            last = m.group(1), m.group(2)
            cited.append(f"{m.group(1)}-{m.group(2)}-{m.group(3)}{m.group(4) or ''}")
        else:
            assert last, f"{m.group(0)} follows no full citation"
            cited.append(f"{last[0]}-{m.group(5) or last[1]}-{m.group(6)}")
    return cited


def code_text(folders=CODE) -> str:
    return "\n".join(p.read_text(errors="ignore") for d in folders for p in sorted((ROOT / d).rglob("*"))
                     if p.suffix in (".py", ".cc", ".md") and RESULTS not in p.parents)


def stem(name: str) -> str:
    return re.sub(r"\.(json|md|png)$", "", name)


def referenced_inside(path: pathlib.Path) -> str:
    """The text of a result that can name other results: not its ``git.changes`` (the uncommitted files of the
    tree it ran in, which include other results without needing them)."""
    if path.suffix == ".md":
        return path.read_text()
    if path.suffix != ".json":
        return ""
    data = json.loads(path.read_text())
    if isinstance(data, dict) and isinstance(data.get("git"), dict):
        data["git"].pop("changes", None)
    return json.dumps(data)


def kept_files() -> set[str]:
    """The README's citations and the results the code names, each with the files beside it (same stem), and
    every result a kept one names (a ``--baseline``, an earlier run it compares with)."""
    files = sorted(p.name for p in RESULTS.iterdir())
    wanted = {stem(c) for c in readme_citations((ROOT / "README.md").read_text())}
    code = code_text()
    everywhere = code + code_text(("tests",))
    wanted |= {stem(f) for f in files if f in everywhere}  # e.g. scheduler_sim-calibration.json (an input)
    wanted |= {m.group(1) for m in DATED.finditer(code)}
    kept = {f for f in files if stem(f) in wanted}
    todo = list(kept)
    while todo:
        text = referenced_inside(RESULTS / todo.pop())
        for name in files:
            if name not in kept and name in text:
                kept.add(name)
                todo.append(name)
    return kept


def test_every_result_the_readme_cites_exists():
    files = {p.name for p in RESULTS.iterdir()}
    stems = {stem(f) for f in files}
    cited = readme_citations((ROOT / "README.md").read_text())
    assert len(cited) > 50  # the citations were found
    missing = [c for c in cited if c not in files and c not in stems]
    assert missing == []


def test_every_result_the_code_names_exists():
    stems = {stem(p.name) for p in RESULTS.iterdir()}
    named = {m.group(1) for m in DATED.finditer(code_text())}
    assert named - stems == set()


def test_every_committed_result_is_cited_or_needed_by_a_cited_one():
    kept = kept_files()
    assert [p.name for p in sorted(RESULTS.iterdir()) if p.name not in kept] == []


def test_shorthand_citations_take_the_name_before_them():
    text = "`serving-20261121-111524.json`, `-112625`, then `gpu_check-jax0.1-20261202-174436` and `-20261203-093442`"
    assert readme_citations(text) == ["serving-20261121-111524.json", "serving-20261121-112625",
                                      "gpu_check-jax0.1-20261202-174436", "gpu_check-jax0.1-20261203-093442"]


@pytest.mark.parametrize("value, folder", [(None, "runs"), ("", "runs"), ("0", "runs"), ("1", "results")])
def test_new_runs_go_to_the_ignored_folder_unless_recorded(monkeypatch, tmp_path, value, folder):
    monkeypatch.setattr(provenance, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(provenance, "RUNS", tmp_path / "runs")
    if value is None:
        monkeypatch.delenv(provenance.RECORD_ENV, raising=False)
    else:
        monkeypatch.setenv(provenance.RECORD_ENV, value)
    out = provenance.write_result("probe", {"x": 1})
    assert out.parent == tmp_path / folder and json.loads(out.read_text()) == {"x": 1}
    assert provenance.write_result("probe", {"x": 2}, tmp_path / "given.json") == tmp_path / "given.json"


def test_the_runs_folder_is_ignored_by_git():
    done = subprocess.run(["git", "check-ignore", "-q", "benchmarks/runs/serving-20990101-000000.json"], cwd=ROOT)
    assert done.returncode == 0


def test_no_benchmark_writes_into_the_results_folder_by_itself():
    """Default output paths come from ``provenance.output_dir()``; ``RESULTS`` is only read (the simulator's
    calibration, the committed compile checks)."""
    uses = sorted(f"{p.relative_to(ROOT)}: {line.strip()}" for p in (ROOT / "benchmarks").rglob("*.py")
                  for line in p.read_text().splitlines() if re.search(r"\bRESULTS\s*/", line))
    assert uses == ['benchmarks/simulator/scheduler_sim.py: DEFAULT_CALIBRATION = RESULTS / '
                    '"scheduler_sim-calibration.json"']
