"""pytest-benchmark front end of the benchmark suite.

    pytest benchmarks/ --benchmark-only                          # CPU-sized (run_all.CPU arguments)
    pytest benchmarks/ --benchmark-only --benchmark-json out.json
    pytest benchmarks/ --benchmark-only --benchmark-autosave   # then --benchmark-compare
    pytest benchmarks/ --benchmark-only --bench-gpu             # Janus-Pro-1B shapes on CUDA (run_all.GPU)

Every ``benchmarks/bench_*.py`` is collected as one test, ``bench_x.py::test_bench``, that runs the file's own
``main()`` with the arguments ``run_all.py`` gives it: the files need no pytest code and still run alone with
``python benchmarks/bench_x.py``. Timing stays the harness's (warm-up excluded, median of repeats, baseline in the
same run); each case the harness reports becomes a pytest-benchmark entry with those round times, named
``<table> [<model>]: <case>`` in the group of its table, its speed-up, peak memory and config in ``extra_info``. The
harness's ratio tables are printed again at the end of the session. ``pytest tests`` (CI) never collects this
folder (``testpaths = ["tests"]``).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks import harness, run_all  # noqa: E402

_TABLES: list[str] = []


def pytest_addoption(parser):
    parser.addoption("--bench-gpu", action="store_true",
                     help="run each benchmark with run_all.GPU arguments (Janus-Pro-1B shapes on CUDA)")


def pytest_collect_file(file_path: Path, parent):
    if file_path.parent == HERE and file_path.name.startswith("bench_") and file_path.suffix == ".py":
        return BenchFile.from_parent(parent, path=file_path)
    return None


def bench_args(name: str, gpu: bool) -> list[str] | None:
    """The command-line arguments of benchmark file ``name``; None where the GPU suite leaves it out."""
    suite = run_all.GPU if gpu else run_all.CPU
    if gpu:
        return suite.get(name)
    return suite.get(name, [])


class BenchFile(pytest.Module):
    """A bench_*.py file: one test that runs its ``main()`` (the file defines no test functions)."""

    def collect(self):
        path = self.path

        def test_bench(benchmark, request):
            args = bench_args(path.name, request.config.getoption("--bench-gpu"))
            if args is None:
                pytest.skip(f"{path.name} is not part of the GPU suite (run_all.GPU)")
            recorder = _Recorder(request)
            run_main(self.obj, path, args, recorder)
            if recorder.seen:  # the cases are its entries: tell pytest-benchmark the fixture served (no warning)
                benchmark._mode = "benchmarks/harness.py"

        return [pytest.Function.from_parent(self, name="test_bench", callobj=test_bench)]


@contextmanager
def _argv(argv: list[str]):
    saved = sys.argv
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = saved


def run_main(module, path: Path, args: list[str], listener) -> None:
    """``python path *args`` in this process: the module's ``main()``, ``listener`` told of every table."""
    harness.LISTENERS.append(listener)
    try:
        with _argv([str(path), *args]):
            code = module.main()
    except SystemExit as exit_:
        code = exit_.code
    finally:
        harness.LISTENERS.remove(listener)
    if code:
        raise AssertionError(f"{path.name} {' '.join(args)} exited with {code}")


@dataclass
class _Case:
    """What pytest-benchmark's ``Metadata`` reads from a fixture: one reported case."""

    name: str
    fullname: str
    group: str
    extra_info: dict
    param: str | None = None
    params: dict | None = None
    cprofile_stats: object = None
    has_error: bool = False


@dataclass
class _Recorder:
    """A harness listener that turns each reported case into a pytest-benchmark entry of this test."""

    request: pytest.FixtureRequest
    seen: dict = field(default_factory=dict)

    def __call__(self, bench: str, results: list, table: str, rows: list[dict]) -> None:
        from pytest_benchmark.stats import Metadata

        _TABLES.append(f"[{self.request.node.nodeid}]\n{table}")
        session = self.request.config._benchmarksession  # as pytest-benchmark's own `benchmark` fixture reads it
        if session.disabled:
            return
        model = rows[0]["config"].get("model") if rows else None
        table = f"{bench} [{model}]" if model else bench  # one table per model in some files
        for result, row in zip(results, rows):
            label = f"{table}: {result.name}"
            self.seen[label] = self.seen.get(label, 0) + 1
            if self.seen[label] > 1:  # the same table twice in one file
                label += f" #{self.seen[label]}"
            extra = {k: row[k] for k in ("speedup_vs_baseline", "baseline", "peak_mib", "device", "commit",
                                         "config", "extra")}
            case = _Case(name=label, fullname=f"{self.request.node.nodeid}[{label}]",
                         group=f"{Path(self.request.node.fspath).stem}: {table}", extra_info=extra)
            meta = Metadata(case, iterations=1, options={"timer": "time.perf_counter", "harness": "median",
                                                         "repeats": result.repeats})
            for seconds in result.times or [result.median_s]:
                meta.stats.update(seconds)
            session.benchmarks.append(meta)


def pytest_terminal_summary(terminalreporter):
    if _TABLES:
        terminalreporter.write_sep("=", "benchmark tables (ratios against the baseline of the same run)")
        for table in _TABLES:
            terminalreporter.write_line(table)
