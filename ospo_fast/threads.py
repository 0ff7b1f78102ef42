"""CPU threads on a shared machine.

torch's OpenMP threads spin after each parallel region (libgomp's default wait policy). On an idle machine that
saves a wake-up per op (the toy model's decode ran 1.8x slower with passive waiting); on a loaded one the
spinning threads take the cores that the other processes and torch's own main thread need, so a job slows far
more than the load explains (``make demo``: 72 minutes instead of about 5 at load 6-9 on 2 cores).
``configure_cpu_threads`` sets, before torch is imported and only where the user has not:

- ``OMP_NUM_THREADS``: the CPUs this process may run on (``os.sched_getaffinity``), whatever the load, so float32
  reductions, hence results and resumes, do not depend on what else the machine is doing (``cpu_thread_count``);
- on a busy machine only (``machine_busy``: the processes runnable right now besides this one keep at least one
  CPU busy), ``OMP_WAIT_POLICY=PASSIVE`` (libgomp, the OpenMP of torch's Linux wheels) and
  ``KMP_BLOCKTIME=0`` (Intel's libiomp): a waiting thread sleeps at once instead of spinning. On an idle machine
  the spinning default stays, since it is faster there.

``benchmarks/bench_threads.py`` measures both conditions. The CLI entry (``ospo_fast.cli.main``) calls it first; a
library user who wants it calls it before ``import torch``.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import MutableMapping

PASSIVE_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask; os.cpu_count() where the platform has no mask)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def cpu_thread_count(available: int | None = None) -> int:
    """Threads for torch's intra-op pool: the ``available`` CPUs (default ``available_cpus()``), at least 1."""
    return max(1, available_cpus() if available is None else available)


def machine_load(samples: int = 5, interval_s: float = 0.01) -> float:
    """Other work on this machine right now, in CPUs: the median over ``samples`` readings ``interval_s`` apart of
    the processes runnable besides this one (``/proc/loadavg``'s 4th field). Not the load average, which lags by a
    minute both ways (a job that has just ended would still count, one that has just started would not). Where
    there is no /proc/loadavg, the 1-minute load average."""
    readings = []
    for i in range(samples):
        try:
            with open("/proc/loadavg", encoding="ascii") as f:
                readings.append(int(f.read().split()[3].split("/")[0]) - 1)
        except (OSError, IndexError, ValueError):
            try:
                return os.getloadavg()[0]
            except (AttributeError, OSError):  # no load figure on this platform
                return 0.0
        if i + 1 < samples:
            time.sleep(interval_s)
    return float(statistics.median(readings))


def machine_busy(load: float | None = None) -> bool:
    """True when other work keeps at least one CPU busy (``load``: default ``machine_load()``)."""
    return (machine_load() if load is None else load) >= 1.0


def configure_cpu_threads(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set the thread count and, on a busy machine, the passive wait policy in ``environ`` (default
    ``os.environ``) where they are unset; returns what it set. Call before torch is imported: OpenMP reads these
    once, when torch loads it. If torch is already imported, the thread count is applied with
    ``torch.set_num_threads`` (the wait policy cannot be)."""
    environ = os.environ if environ is None else environ
    chosen = dict(PASSIVE_ENV if machine_busy() else {}, OMP_NUM_THREADS=str(cpu_thread_count()))
    applied = {key: value for key, value in chosen.items() if key not in environ}
    environ.update(applied)
    if "OMP_NUM_THREADS" in applied and "torch" in sys.modules and environ is os.environ:
        sys.modules["torch"].set_num_threads(int(applied["OMP_NUM_THREADS"]))
    return applied
