"""The shared benchmark harness: every benchmarks/bench_*.py times its cases with ``measure`` and reports with
``report``. Warm-up runs are excluded, the median of repeats is taken, peak memory is recorded (CUDA: allocator
peak; CPU: peak of tensors allocated by the case, traced through the CPU allocator profiler), a baseline is
measured in the same run and the ratio printed, and every result is appended as a JSON line (device, commit,
date) to ``benchmarks/results.jsonl``. Results that are not timings (e.g. the AOT kernel resources) go through
``append_rows``.

Under pytest (``pytest benchmarks/ --benchmark-only``, see ``benchmarks/conftest.py``) every reported case also
becomes a pytest-benchmark entry: ``LISTENERS`` are told of each table, with the same figures.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

# JSON lines go here; OSPO_FAST_BENCH_RESULTS points them elsewhere (tests, a GPU check's own log)
RESULTS = Path(os.environ.get("OSPO_FAST_BENCH_RESULTS", Path(__file__).resolve().parent / "results.jsonl"))


@dataclass
class Measurement:
    """One timed case: median seconds per call, peak memory in MiB (None where it cannot be measured)."""

    name: str
    median_s: float
    peak_mib: float | None
    repeats: int
    extra: dict = field(default_factory=dict)
    times: list[float] = field(default_factory=list)  # seconds of each timed repeat (empty where not kept)


# Called as listener(bench, results, table, rows) after each table: results are the Measurements (empty for
# append_rows), table the printed text, rows the JSON lines written. benchmarks/conftest.py adds one per test.
LISTENERS: list[Callable[[str, list[Measurement], str, list[dict]], None]] = []


def device_name(device: torch.device | str = "cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_peak_mib(fn: Callable[[], object]) -> float:
    """Peak bytes of live CPU tensors during one call of ``fn`` (torch's memory profiler): each allocation and
    free is counted once, at the op that makes it (``self_cpu_memory_usage``), in time order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    for event in events:
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak / 2**20


def measure(name: str, fn: Callable[[], object], device: torch.device | str = "cpu", warmup: int = 1,
            repeats: int = 5, memory: bool = True, **extra) -> Measurement:
    """Time ``fn`` (median of ``repeats`` after ``warmup`` calls) and its peak memory on ``device``."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = None
    if memory:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            fn()
            _sync(device)
            peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        else:
            peak = cpu_peak_mib(fn)
    return Measurement(name=name, median_s=statistics.median(times), peak_mib=peak, repeats=repeats, extra=extra,
                       times=times)


def stamp(bench: str, device: torch.device | str = "cpu", config: dict | None = None) -> dict:
    """The fields every JSON line carries: bench, device, commit, UTC date, config."""
    return {"bench": bench, "device": device_name(device), "commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "config": config or {}}


def _append(rows: list[dict]) -> None:
    with open(RESULTS, "a", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def _notify(bench: str, results: list[Measurement], table: str, rows: list[dict]) -> None:
    for listener in LISTENERS:
        listener(bench, results, table, rows)


def append_rows(bench: str, rows: list[dict], table: str, device: torch.device | str = "cpu",
                config: dict | None = None) -> None:
    """Print ``table`` and append ``rows`` (dicts of figures that are not timings) as stamped JSON lines."""
    print(f"\n== {bench} on {device_name(device)}\n{table}")
    stamped = [dict(stamp(bench, device, config), **row) for row in rows]
    _append(stamped)
    _notify(bench, [], table, stamped)


def format_report(bench: str, results: list[Measurement], baseline: str, device: torch.device | str = "cpu",
                  config: dict | None = None) -> str:
    """The printed table: median time, speed-up and memory ratio against ``baseline`` (a name in ``results``)."""
    base = _baseline(results, baseline)
    lines = [f"== {bench} on {device_name(device)} (baseline: {baseline})"]
    if config:
        lines.append("   " + ", ".join(f"{k}={v}" for k, v in config.items()))
    lines.append(f"   {'case':<34}{'median ms':>12}{'speed-up':>10}{'peak MiB':>11}{'mem ratio':>11}")
    for r in results:
        speedup = base.median_s / r.median_s if r.median_s > 0 else float("inf")
        mem = f"{r.peak_mib:.1f}" if r.peak_mib is not None else "-"
        mem_ratio = (f"{r.peak_mib / base.peak_mib:.3f}" if r.peak_mib is not None and base.peak_mib else "-")
        lines.append(f"   {r.name:<34}{r.median_s * 1e3:>12.2f}{speedup:>9.2f}x{mem:>11}{mem_ratio:>11}")
    return "\n".join(lines)


def _baseline(results: list[Measurement], baseline: str) -> Measurement:
    base = next((r for r in results if r.name == baseline), None)
    if base is None:
        raise ValueError(f"baseline {baseline!r} is not among the cases {[r.name for r in results]}")
    return base


def report(bench: str, results: list[Measurement], baseline: str, device: torch.device | str = "cpu",
           config: dict | None = None) -> None:
    """Print a table with ratios against ``baseline`` (a name in ``results``) and append JSON lines."""
    table = format_report(bench, results, baseline, device, config)
    print("\n" + table)
    base = _baseline(results, baseline)
    head = dict(stamp(bench, device, config), baseline=baseline)
    rows = [dict(head, **asdict(r), speedup_vs_baseline=base.median_s / r.median_s if r.median_s else None)
            for r in results]
    _append(rows)
    _notify(bench, results, table, rows)
