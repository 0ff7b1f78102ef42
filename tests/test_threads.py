"""CPU thread policy (ospo_fast.threads): a thread count from the affinity mask (not the load), the passive OpenMP
wait on a busy machine only, set only where the user has not, and applied by the CLI entry before torch loads
OpenMP."""

import io
import os
import subprocess
import sys

import pytest

from ospo_fast import threads
from ospo_fast.threads import available_cpus, configure_cpu_threads, cpu_thread_count, machine_busy


@pytest.mark.parametrize("available, expected", [(2, 2), (8, 8), (1, 1), (0, 1)])
def test_thread_count_is_the_affinity_cpus_whatever_the_load(available, expected, monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (40.0, 40.0, 40.0))
    assert cpu_thread_count(available) == expected
    assert cpu_thread_count() == available_cpus()


def test_available_cpus_follows_the_affinity_mask():
    assert available_cpus() == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("load, busy", [(0.0, False), (0.5, False), (1.0, True), (7.0, True)])
def test_busy_means_a_cpu_of_other_work(load, busy):
    assert machine_busy(load) is busy


def test_idle_machine_keeps_the_spinning_default(monkeypatch):
    """Spinning is faster on an idle machine (bench_threads.py): only the thread count is set there."""
    monkeypatch.setattr(threads, "machine_load", lambda: 0.0)
    env: dict[str, str] = {}
    assert configure_cpu_threads(env) == {"OMP_NUM_THREADS": str(available_cpus())}


def test_load_is_what_runs_now_not_the_lagging_average(monkeypatch):
    """The 1-minute average lags both ways: the processes runnable right now (besides this one) are the load."""
    readings = iter(["9.00 9.00 9.00 1/120 999\n", "9.00 9.00 9.00 3/120 999\n", "9.00 9.00 9.00 1/120 999\n"])
    monkeypatch.setattr("builtins.open", lambda *a, **k: io.StringIO(next(readings)))
    assert threads.machine_load(samples=3, interval_s=0.0) == 0.0  # a job that just ended: idle
    readings = iter(["0.00 0.00 0.00 3/120 999\n"] * 3)
    assert threads.machine_load(samples=3, interval_s=0.0) == 2.0  # a job that just started: busy


def test_user_settings_win(monkeypatch):
    monkeypatch.setattr(threads, "machine_load", lambda: 3.0)
    env = {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "3"}
    applied = configure_cpu_threads(env)
    assert applied == {"KMP_BLOCKTIME": "0"}
    assert env == {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "3", "KMP_BLOCKTIME": "0"}


def test_busy_machine_gets_the_passive_policy(monkeypatch):
    monkeypatch.setattr(threads, "machine_load", lambda: 3.0)
    env: dict[str, str] = {}
    applied = configure_cpu_threads(env)
    assert env == applied and env["OMP_WAIT_POLICY"] == "PASSIVE" and env["KMP_BLOCKTIME"] == "0"
    assert 1 <= int(env["OMP_NUM_THREADS"]) <= available_cpus()


def test_cli_entry_sets_it_before_torch_loads():
    """In a fresh process without thread settings, on a machine that looks busy, ``ospo-fast config`` runs with the
    policy in its environment and torch then starts with the chosen thread count."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "KMP_BLOCKTIME", "OMP_NUM_THREADS")}
    code = ("import os, sys\n"
            "import ospo_fast.threads\n"
            "ospo_fast.threads.machine_load = lambda: 3.0\n"
            "from ospo_fast.cli import main\n"
            "assert 'torch' not in sys.modules\n"
            "main(['config', '--preset', 'tiny'])\n"
            "import torch\n"
            "print(os.environ['OMP_WAIT_POLICY'], os.environ['OMP_NUM_THREADS'], torch.get_num_threads())\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         timeout=120).stdout.strip().splitlines()[-1]
    policy, chosen, count = out.split()
    assert policy == "PASSIVE" and int(chosen) == int(count) == available_cpus()
