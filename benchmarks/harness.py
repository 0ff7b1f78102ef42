"""The shared benchmark harness: every benchmarks/bench_*.py times its cases with ``measure`` and reports with
``report``. Warm-up runs are excluded, the median of repeats is taken, peak memory is recorded (CUDA: allocator
peak; CPU: peak of tensors allocated by the case, traced through the CPU allocator profiler), a baseline is
measured in the same run and the ratio printed, and every result is appended as a JSON line (device, commit,
date) to ``benchmarks/results.jsonl``.
"""

from __future__ import annotations

import datetime
import json
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results.jsonl"


@dataclass
class Measurement:
    """One timed case: median seconds per call, peak memory in MiB (None where it cannot be measured)."""

    name: str
    median_s: float
    peak_mib: float | None
    repeats: int
    extra: dict = field(default_factory=dict)


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
    return Measurement(name=name, median_s=statistics.median(times), peak_mib=peak, repeats=repeats, extra=extra)


def report(bench: str, results: list[Measurement], baseline: str, device: torch.device | str = "cpu",
           config: dict | None = None) -> None:
    """Print a table with ratios against ``baseline`` (a name in ``results``) and append JSON lines."""
    base = next(r for r in results if r.name == baseline)
    print(f"\n== {bench} on {device_name(device)} (baseline: {baseline})")
    if config:
        print("   " + ", ".join(f"{k}={v}" for k, v in config.items()))
    print(f"   {'case':<34}{'median ms':>12}{'speed-up':>10}{'peak MiB':>11}{'mem ratio':>11}")
    for r in results:
        speedup = base.median_s / r.median_s if r.median_s > 0 else float("inf")
        mem = f"{r.peak_mib:.1f}" if r.peak_mib is not None else "-"
        mem_ratio = (f"{r.peak_mib / base.peak_mib:.3f}" if r.peak_mib is not None and base.peak_mib else "-")
        print(f"   {r.name:<34}{r.median_s * 1e3:>12.2f}{speedup:>9.2f}x{mem:>11}{mem_ratio:>11}")
    stamp = {"bench": bench, "device": device_name(device), "commit": git_commit(),
             "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "baseline": baseline, "config": config or {}}
    with open(RESULTS, "a", encoding="utf-8") as handle:
        for r in results:
            row = dict(stamp, **asdict(r), speedup_vs_baseline=base.median_s / r.median_s if r.median_s else None)
            handle.write(json.dumps(row) + "\n")
