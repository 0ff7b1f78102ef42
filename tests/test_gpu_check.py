"""``make gpu-check`` (benchmarks/gpu_check.py) rehearsed on the CPU: it refuses without CUDA, selects exactly the
tests that tests/gpu.py gates on CUDA, counts pytest's results, and turns the harness's JSON lines into
BENCHMARKS.md rows carrying device, date, commit and command, within its time budget."""

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import gpu_check, harness  # noqa: E402

TOY_BENCH = '''
from benchmarks.harness import measure, report

def main():
    results = [measure("slow", lambda: sorted(range(20000, 0, -1)), repeats=3, memory=False),
               measure("fast", lambda: list(range(20000)), repeats=3, memory=False)]
    report("toy", results, baseline="slow", device="cpu")

if __name__ == "__main__":
    main()
'''
TOY_TESTS = '''
import pytest
from tests.gpu import requires_cuda

def test_pass():
    pass

def test_fail():
    assert False

@requires_cuda
def test_gpu():
    pass
'''


def test_refuses_without_cuda(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    md = tmp_path / "BENCHMARKS.md"
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main(["--benchmarks-md", str(md)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs a CUDA device" in err and "torch.cuda.is_available()" in err
    assert not md.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal needs a machine without CUDA")
def test_command_refuses_on_this_machine(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--benchmarks-md",
                          str(tmp_path / "B.md")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "needs a CUDA device" in out.stderr and not (tmp_path / "B.md").exists()


def test_gpu_only_selects_the_cuda_gated_tests_and_counts_results(tmp_path):
    (tmp_path / "test_toy.py").write_text(TOY_TESTS)
    xml = tmp_path / "r.xml"
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
                          "benchmarks.gpu_check", "--gpu-only", f"--junitxml={xml}", str(tmp_path)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert "2 deselected" in out.stdout, out.stdout + out.stderr
    counts = gpu_check.junit_counts(xml)
    assert sum(counts.values()) == 1 and counts == ({"passed": 1, "failed": 0, "errors": 0, "skipped": 0}
                                                   if torch.cuda.is_available() else
                                                   {"passed": 0, "failed": 0, "errors": 0, "skipped": 1})


def test_check_appends_rows_with_device_date_commit_command(monkeypatch, tmp_path):
    """The whole flow but the CUDA check: a benchmark run through the budget, its rows into BENCHMARKS.md."""
    monkeypatch.setattr(gpu_check, "require_cuda", lambda: "Toy GPU 80GB")
    monkeypatch.setattr(harness, "RESULTS", tmp_path / "results.jsonl")
    (tmp_path / "bench_toy.py").write_text(TOY_BENCH)
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\nearlier figures\n")
    suite = {str(tmp_path / "bench_toy.py"): [], str(tmp_path / "bench_never.py"): []}
    code = gpu_check.main(["--benchmarks-md", str(md), "--skip-tests", "--budget", "20"], suite=suite)
    text = md.read_text()
    assert text.startswith("# Benchmarks\n\nearlier figures\n\n## GPU check: Toy GPU 80GB, ")
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ")][1:]  # after the head
    logged = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["name"] for r in logged] == ["slow", "fast"]  # the check's JSON lines land in the usual log too
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    for row in rows:  # benchmark | case | median ms | speed-up | peak | device | date | commit | command
        assert row[5:] == ["Toy GPU 80GB", date, harness.git_commit(), "`make gpu-check` |"]
    by_case = {row[1]: row for row in rows}
    assert by_case["skipped (--skip-tests) (wall ms)"][0] == "| GPU tests"
    for r in logged:
        assert by_case[r["name"]][:4] == ["| toy", r["name"], f"{r['median_s'] * 1e3:.2f}",
                                          f"{r['speedup_vs_baseline']:.2f}x vs slow"]
    assert by_case["exit 2 (wall ms)"][0] == "| bench_never.py"  # python could not open the file
    assert code == 1  # a benchmark that failed makes the check fail, after writing every row


def test_budget_spent_marks_the_rest_not_run(tmp_path):
    steps = gpu_check.run_benchmarks(deadline=0.0, env={}, results=tmp_path / "r.jsonl", suite={"bench_x.py": []})
    assert steps[0].code is None and steps[0].note == "not run: the budget was spent"
    section = gpu_check.markdown_section("GPU", "2026-12-02", "abc1234", gpu_check.Step("GPU tests", [],
                                         code=0, seconds=12.0, note="13 passed"), steps, 300.0)
    assert "| GPU tests | 13 passed (wall ms) | 12000 |" in section
    assert "| bench_x.py | not run: the budget was spent (wall ms) |" in section


def test_prepare_builds_the_model_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_check, "MODEL", "builtin:tiny")  # the same path as janus-pro-1b-shape, CPU-sized
    env = dict(os.environ, OSPO_FAST_CACHE=str(tmp_path), PYTHONPATH=str(ROOT))
    step = gpu_check.prepare_model(timeout=120, env=env)
    assert step.code == 0 and step.note == "built or found in the model cache"
    assert (tmp_path / "tiny-v1" / "config.json").is_file()
