"""CPU threads on a shared machine.

torch's OpenMP threads spin after each parallel region (libgomp's default wait policy). On an idle machine that
saves a wake-up; on a loaded one the spinning threads take the cores that the other processes and torch's own
main thread need, so a job slows far more than the load explains (``make demo``: 72 minutes instead of about 5
at load 6-9 on 2 cores). ``configure_cpu_threads`` sets, before torch is imported and only where the user has not:

- ``OMP_WAIT_POLICY=PASSIVE`` (libgomp, the OpenMP of torch's Linux wheels) and ``KMP_BLOCKTIME=0`` (Intel's
  libiomp): a waiting thread sleeps at once instead of spinning;
- ``OMP_NUM_THREADS``: the CPUs this process may run on (``os.sched_getaffinity``), not the machine's CPU count
  (``cpu_thread_count``). It does not shrink with the load: with passive waiting, two threads beside two busy
  processes ran 1.8x faster than one thread (``bench_threads.py``), and a count fixed by the affinity mask keeps
  float32 reductions, hence results and resumes, the same whatever else the machine is doing.

``benchmarks/bench_threads.py`` measures the effect under an artificial competing load. The CLI entry
(``ospo_fast.cli.main``) calls it first; a library user who wants it calls it before ``import torch``.
"""

from __future__ import annotations

import os
import sys
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


def configure_cpu_threads(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set the wait policy and thread count in ``environ`` (default ``os.environ``) where they are unset; returns
    what it set. Call before torch is imported: OpenMP reads these once, when torch loads it. If torch is
    already imported, the thread count is applied with ``torch.set_num_threads`` (the wait policy cannot be)."""
    environ = os.environ if environ is None else environ
    chosen = dict(PASSIVE_ENV, OMP_NUM_THREADS=str(cpu_thread_count()))
    applied = {key: value for key, value in chosen.items() if key not in environ}
    environ.update(applied)
    if "OMP_NUM_THREADS" in applied and "torch" in sys.modules and environ is os.environ:
        sys.modules["torch"].set_num_threads(int(applied["OMP_NUM_THREADS"]))
    return applied
