"""The benchmark harness and its pytest-benchmark front end (benchmarks/harness.py, benchmarks/conftest.py).

A tiny benchmark file written like the real ones (argparse ``main()``, ``measure`` + ``report``) is collected by
the real conftest in a subprocess: each reported case must become a pytest-benchmark entry whose round times are
the harness's own (same median as the JSON line), ``--benchmark-json`` and ``--benchmark-compare`` must work, and
the harness's ratio table must still be printed.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import harness  # noqa: E402

TOY = '''
import argparse
from benchmarks.harness import measure, report


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=3000)
    n = parser.parse_args().n
    results = [measure("sorted copy", lambda: sorted(range(n, 0, -1)), repeats=3, memory=False),
               measure("in-place sort", lambda: list(range(n, 0, -1)).sort(), repeats=3, memory=False)]
    report("toy_sort", results, baseline="sorted copy", config={"n": n})
    report("toy_sort", results[:1], baseline="sorted copy", config={"model": "builtin:x"})  # a table per model


if __name__ == "__main__":
    main()
'''


def _pytest(suite: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OSPO_FAST_BENCH_RESULTS=str(suite / "results.jsonl"))
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", str(suite), "--benchmark-only",
                           f"--benchmark-storage={suite / 'store'}", *args], capture_output=True, text=True,
                          env=env, cwd=suite, timeout=300)


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Path:
    suite = tmp_path_factory.mktemp("suite")
    shutil.copy(ROOT / "benchmarks" / "conftest.py", suite / "conftest.py")
    (suite / "bench_toy.py").write_text(TOY)
    return suite


def test_pytest_benchmark_collects_each_reported_case(suite):
    out = _pytest(suite, f"--benchmark-json={suite / 'run.json'}", "--benchmark-autosave")
    assert out.returncode == 0, out.stdout + out.stderr
    entries = {b["name"]: b for b in json.loads((suite / "run.json").read_text())["benchmarks"]}
    assert set(entries) == {"toy_sort: sorted copy", "toy_sort: in-place sort", "toy_sort [builtin:x]: sorted copy"}
    assert entries["toy_sort [builtin:x]: sorted copy"]["group"] == "bench_toy: toy_sort [builtin:x]"
    lines = {r["name"]: r for r in map(json.loads, (suite / "results.jsonl").read_text().splitlines())
             if r["config"].get("n")}
    for name, entry in entries.items():
        if "builtin:x" in name:
            continue
        row = lines[name.removeprefix("toy_sort: ")]
        assert entry["group"] == "bench_toy: toy_sort"
        assert entry["stats"]["rounds"] == 3 and entry["stats"]["data"] == row["times"]
        assert entry["stats"]["median"] == pytest.approx(row["median_s"], rel=1e-12)
        assert entry["extra_info"]["speedup_vs_baseline"] == row["speedup_vs_baseline"]
    assert entries["toy_sort: sorted copy"]["extra_info"]["speedup_vs_baseline"] == 1.0
    summary = out.stdout.split("benchmark tables")[-1]
    assert "== toy_sort" in summary and "speed-up" in summary and "in-place sort" in summary
    assert "not used" not in out.stdout + out.stderr  # pytest-benchmark's unused-fixture warning


def test_pytest_benchmark_compare_against_a_saved_run(suite):
    if not list((suite / "store").rglob("*.json")):
        test_pytest_benchmark_collects_each_reported_case(suite)
    out = _pytest(suite, "--benchmark-compare")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "NOW" in out.stdout and "toy_sort: in-place sort" in out.stdout


def test_report_names_a_missing_baseline(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "RESULTS", tmp_path / "r.jsonl")
    results = [harness.Measurement("a", 1.0, None, 1)]
    with pytest.raises(ValueError, match="baseline 'b' is not among the cases"):
        harness.report("t", results, baseline="b")


def test_append_rows_stamps_each_row(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "RESULTS", tmp_path / "r.jsonl")
    seen = []
    monkeypatch.setattr(harness, "LISTENERS", [lambda *args: seen.append(args)])
    harness.append_rows("aot", [{"kernel": "k", "registers": 40}], "| table |", config={"archs": [80]})
    row = json.loads((tmp_path / "r.jsonl").read_text())
    assert row["bench"] == "aot" and row["kernel"] == "k" and row["config"] == {"archs": [80]}
    assert {"device", "commit", "date"} <= set(row)
    assert seen[0][0] == "aot" and seen[0][1] == [] and seen[0][2] == "| table |"
