"""CPU thread policy (ospo_fast.threads): passive OpenMP wait and a thread count from the affinity mask (not the
load), set only where the user has not, and applied by the CLI entry before torch loads OpenMP."""

import os
import subprocess
import sys

import pytest

from ospo_fast.threads import available_cpus, configure_cpu_threads, cpu_thread_count


@pytest.mark.parametrize("available, expected", [(2, 2), (8, 8), (1, 1), (0, 1)])
def test_thread_count_is_the_affinity_cpus_whatever_the_load(available, expected, monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (40.0, 40.0, 40.0))
    assert cpu_thread_count(available) == expected
    assert cpu_thread_count() == available_cpus()


def test_available_cpus_follows_the_affinity_mask():
    assert available_cpus() == len(os.sched_getaffinity(0))


def test_user_settings_win():
    env = {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "3"}
    applied = configure_cpu_threads(env)
    assert applied == {"KMP_BLOCKTIME": "0"}
    assert env == {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "3", "KMP_BLOCKTIME": "0"}


def test_unset_environment_gets_the_policy():
    env: dict[str, str] = {}
    applied = configure_cpu_threads(env)
    assert env == applied and env["OMP_WAIT_POLICY"] == "PASSIVE" and env["KMP_BLOCKTIME"] == "0"
    assert 1 <= int(env["OMP_NUM_THREADS"]) <= available_cpus()


def test_cli_entry_sets_it_before_torch_loads():
    """In a fresh process without thread settings, ``ospo-fast config`` runs with the policy in its environment and
    torch then starts with the chosen thread count."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "KMP_BLOCKTIME", "OMP_NUM_THREADS")}
    code = ("import os, sys\n"
            "from ospo_fast.cli import main\n"
            "assert 'torch' not in sys.modules\n"
            "main(['config', '--preset', 'tiny'])\n"
            "import torch\n"
            "print(os.environ['OMP_WAIT_POLICY'], os.environ['OMP_NUM_THREADS'], torch.get_num_threads())\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         timeout=120).stdout.strip().splitlines()[-1]
    policy, chosen, threads = out.split()
    assert policy == "PASSIVE" and int(chosen) == int(threads) and 1 <= int(threads) <= available_cpus()
