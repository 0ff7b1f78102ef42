"""One command for a lent GPU: ``make gpu-check`` (or ``python benchmarks/gpu_check.py``).

1. the GPU tests: every test gated by the one marker module, tests/gpu.py (``requires_cuda``, the "cuda" device
   parameter, the "triton" backend parameter), run on CUDA with the real Triton JIT (no ``TRITON_INTERPRET``);
2. the GPU benchmark suite at Janus-Pro-1B shapes (``run_all.GPU``), one file at a time;
3. appends a section to BENCHMARKS.md: one row per measured case with device, date, commit and command, and one row
   for the tests; the JSON lines also go to ``benchmarks/results.jsonl``.

The whole check keeps to ``--budget`` seconds (default 480, for one H100): each step gets what is left, a step that
runs out is recorded as timed out and the check goes on. On a machine without CUDA it refuses at once (exit 2).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

COMMAND = "make gpu-check"
TEST_SHARE = 0.3  # of the budget, at most, for the GPU tests
MODEL = "builtin:janus-pro-1b-shape"  # what run_all.GPU benchmarks load; built once into the model cache
MODEL_SHARE = 0.25  # of the budget, at most, for building it (a random init saved once; later checks load it)


@dataclass
class Step:
    """One subprocess of the check: its command, exit code (None: timed out) and wall seconds."""

    name: str
    cmd: list[str]
    code: int | None = None
    seconds: float = 0.0
    note: str = ""
    rows: list[dict] = field(default_factory=list)


def require_cuda() -> str:
    """The CUDA device's name; exits with a one-line reason where there is none."""
    import torch

    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        print(f"gpu-check needs a CUDA device, and torch {torch.__version__} ({build}) sees none "
              f"(torch.cuda.is_available() is False): run it on the lent GPU machine; on a CPU use `make test`",
              file=sys.stderr)
        sys.exit(2)
    return torch.cuda.get_device_name(0)


def _run(step: Step, timeout: float, env: dict) -> Step:
    start = time.perf_counter()
    try:
        step.code = subprocess.run(step.cmd, cwd=ROOT, env=env, timeout=max(1.0, timeout)).returncode
    except subprocess.TimeoutExpired:
        step.code, step.note = None, f"timed out after {timeout:.0f} s"
    step.seconds = time.perf_counter() - start
    return step


def junit_counts(path: Path) -> dict:
    """passed / failed / errors / skipped from pytest's --junitxml file."""
    if not path.exists():
        return {}
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    total, failed, errors, skipped = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    return {"passed": total - failed - errors - skipped, "failed": failed, "errors": errors, "skipped": skipped}


def run_gpu_tests(timeout: float, env: dict, workdir: Path) -> Step:
    xml = workdir / "gpu-tests.xml"
    step = Step("GPU tests", [sys.executable, "-m", "pytest", "-q", "tests", "-p", "benchmarks.gpu_check",
                              "--gpu-only", f"--junitxml={xml}"])
    _run(step, timeout, env)
    counts = junit_counts(xml)
    step.note = ", ".join(f"{v} {k}" for k, v in counts.items() if v) + (f"; {step.note}" if step.note else "")
    return step


def prepare_model(timeout: float, env: dict) -> Step:
    """Build (first check) or find (later checks) the random-init Janus-Pro-1B-shape model, outside the timings."""
    code = f"from ospo_fast.models.loader import resolve_model_path; print(resolve_model_path({MODEL!r}))"
    step = _run(Step(f"prepare {MODEL}", [sys.executable, "-c", code]), timeout, env)
    if step.code == 0:
        step.note = "built or found in the model cache"
    return step


def run_benchmarks(deadline: float, env: dict, results: Path, suite: dict[str, list[str]]) -> list[Step]:
    """Each benchmark file of ``suite`` (name in benchmarks/ or a path -> arguments) with what is left of the
    budget; its JSON lines (``results``) become the step's rows."""
    steps = []
    for name, args in suite.items():
        step = Step(Path(name).name, [sys.executable, str(HERE / name), *args])
        left = deadline - time.perf_counter()
        if left < 10:
            step.note = "not run: the budget was spent"
            steps.append(step)
            continue
        before = _read_rows(results)
        _run(step, left, env)
        step.rows = _read_rows(results)[len(before):]
        steps.append(step)
    return steps


def _read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_section(device: str, date: str, commit: str, tests: Step, benches: list[Step], seconds: float,
                     command: str = COMMAND) -> str:
    """The BENCHMARKS.md section of one check: a row per measured case (and per step without rows), each with
    device, date, commit and command."""
    tail = f"{device} | {date} | {commit} | `{command}`"
    lines = [f"## GPU check: {device}, {date}, commit {commit}",
             f"`{command}` ({seconds / 60:.1f} minutes; Janus-Pro-1B shapes; ratios against the baseline measured "
             f"in the same run)", "",
             "| benchmark | case | median ms | speed-up vs baseline | peak MiB | device | date | commit | command |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| GPU tests | {tests.note or 'no result'} (wall ms) | {tests.seconds * 1e3:.0f} | - | - | {tail} |"]
    for step in benches:
        timed = [r for r in step.rows if "median_s" in r]
        for r in timed:
            lines.append(f"| {r['bench']} | {r['name']} | {_fmt(r['median_s'] * 1e3, '.2f')} | "
                         f"{_fmt(r.get('speedup_vs_baseline'), '.2f')}x vs {r.get('baseline', '-')} | "
                         f"{_fmt(r.get('peak_mib'), '.1f')} | {tail} |")
        if not timed or step.code:
            status = step.note or (f"exit {step.code}" if step.code else "no timed rows")
            lines.append(f"| {step.name} | {status} (wall ms) | {step.seconds * 1e3:.0f} | - | - | {tail} |")
    return "\n".join(lines) + "\n"


def append_section(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else ""
    path.write_text(text.rstrip("\n") + "\n\n" + section if text else section)


def main(argv: list[str] | None = None, suite: dict[str, list[str]] | None = None) -> int:
    """The check; ``suite`` defaults to ``run_all.GPU``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=480, help="seconds for the whole check (8 minutes)")
    parser.add_argument("--benchmarks-md", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args(argv)
    device = require_cuda()
    from benchmarks import harness

    start = time.perf_counter()
    deadline = start + args.budget
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    with tempfile.TemporaryDirectory() as tmp:
        results = Path(tmp) / "results.jsonl"
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        # the repo first, then whatever the caller had on PYTHONPATH (e.g. packages installed with --target)
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        env.update(OSPO_FAST_BENCH_RESULTS=str(results), PYTHONPATH=path)
        tests = Step("GPU tests", [], note="skipped (--skip-tests)")
        if not args.skip_tests:
            tests = run_gpu_tests(args.budget * TEST_SHARE, env, Path(tmp))
        benches = []
        if suite is None:
            from benchmarks.run_all import GPU as suite

            benches.append(prepare_model(args.budget * MODEL_SHARE, env))
        benches += run_benchmarks(deadline, env, results, suite)
        rows = _read_rows(results)
    with open(harness.RESULTS, "a", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    section = markdown_section(device, date, harness.git_commit(), tests, benches, time.perf_counter() - start)
    append_section(args.benchmarks_md, section)
    print(f"\nappended to {args.benchmarks_md}:\n\n{section}")
    incomplete = (not args.skip_tests and tests.code != 0) or any(s.code != 0 for s in benches)
    return 1 if incomplete else 0  # a failure, a timeout or a step the budget left out


# pytest plugin (``-p benchmarks.gpu_check --gpu-only``): keep only the tests that tests/gpu.py gates on CUDA.

def pytest_addoption(parser):
    parser.addoption("--gpu-only", action="store_true", help="run only the tests gated by tests/gpu.py")


def gpu_gated(item) -> bool:
    """True for a test marked with tests/gpu.py's ``requires_cuda`` or its "triton" parameter's skip mark."""
    from tests.gpu import TRITON, requires_cuda

    gates = [requires_cuda.mark, *(m.mark if hasattr(m, "mark") else m for m in TRITON.marks)]
    return any(mark in gates for mark in item.iter_markers("skipif"))


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--gpu-only"):
        return
    keep = [item for item in items if gpu_gated(item)]
    kept = {id(item) for item in keep}
    config.hook.pytest_deselected(items=[item for item in items if id(item) not in kept])
    items[:] = keep


if __name__ == "__main__":
    sys.exit(main())
