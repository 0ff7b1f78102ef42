"""Benchmark of the CPU thread policy (``ospo_fast.threads``) under an artificial competing load.

Run alone: ``.venv/bin/python benchmarks/bench_threads.py`` (one to four minutes on 2 cores: a case is cut off after
``--timeout`` seconds and then reported as a bound; ``--steps`` scales the work).

The same work, a KV-cached decode shaped like the toy model's image generation (6 layers, hidden 256, 16 images
with CFG = 32 rows, ``--steps`` steps), runs in a fresh process per case, because OpenMP reads its wait policy
only once, when torch loads it. Cases: torch's defaults (one thread per CPU, libgomp spins), passive waiting with
one thread (what shrinking the pool under load would do), and ospo_fast's policy (``cpu_thread_count()`` threads,
one per CPU of the affinity mask; passive waiting only when ``machine_busy()``, i.e. beside the competitors).
Each runs with no added load and beside ``--competitors`` busy processes (default: one per CPU). Printed: median
seconds, the slow-down that the added load causes, and each case's speed against torch's defaults in the same
condition; the machine's load average before the run is printed too (on a shared machine it is part of the
conditions).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

THREAD_ENV = ("OMP_WAIT_POLICY", "KMP_BLOCKTIME", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "GOMP_SPINCOUNT")
CASES = ("torch defaults", "passive, 1 thread", "ospo_fast policy")


def decode_work(steps: int, rows: int = 32, hidden: int = 256, layers: int = 6, heads: int = 4) -> None:
    """A KV-cached decode: per step and layer q/k/v/o projections, attention over the cache, a 3x MLP; a head and
    a multinomial draw per step. (rows, 1, hidden) activations, as the toy model's image decode."""
    import torch

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    w = [[torch.randn(hidden, hidden, generator=g) * 0.05 for _ in range(4)] for _ in range(layers)]
    mlp = [(torch.randn(hidden, 3 * hidden, generator=g) * 0.05, torch.randn(3 * hidden, hidden, generator=g) * 0.05)
           for _ in range(layers)]
    head = torch.randn(hidden, 512, generator=g) * 0.05
    d = hidden // heads
    cache_k = [torch.zeros(rows, heads, steps + 16, d) for _ in range(layers)]
    cache_v = [torch.zeros(rows, heads, steps + 16, d) for _ in range(layers)]
    x = torch.randn(rows, 1, hidden, generator=g)
    with torch.no_grad():
        for t in range(steps):
            h = x
            for i in range(layers):
                q, k, v = (torch.nn.functional.rms_norm(h, (hidden,)) @ w[i][j] for j in range(3))
                cache_k[i][:, :, t] = k.view(rows, heads, d)
                cache_v[i][:, :, t] = v.view(rows, heads, d)
                q = q.view(rows, 1, heads, d).transpose(1, 2)  # (rows, H, 1, d)
                att = torch.nn.functional.scaled_dot_product_attention(
                    q, cache_k[i][:, :, :t + 1], cache_v[i][:, :, :t + 1])  # (rows, H, 1, d)
                h = h + att.transpose(1, 2).reshape(rows, 1, hidden) @ w[i][3]
                up = torch.nn.functional.gelu(torch.nn.functional.rms_norm(h, (hidden,)) @ mlp[i][0])
                h = h + up @ mlp[i][1]
            probs = torch.softmax((h[:, 0] @ head).float(), dim=-1)  # (rows, 512)
            token = torch.multinomial(probs, 1)  # (rows, 1)
            x = h + 0.01 * token.float().unsqueeze(-1) / 512


def child(steps: int, repeats: int) -> None:
    """Runs in the fresh process: applies the case's policy (already in the environment), times the work."""
    if os.environ.get("BENCH_THREADS_POLICY") == "ospo_fast":
        from ospo_fast.threads import configure_cpu_threads

        configure_cpu_threads()
    import torch

    decode_work(max(2, steps // 8))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        decode_work(steps)
        times.append(time.perf_counter() - start)
    print(json.dumps({"median_s": statistics.median(times), "times": times, "threads": torch.get_num_threads()}))


def case_env(case: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_ENV}
    if case == "passive, 1 thread":
        env.update(OMP_WAIT_POLICY="PASSIVE", KMP_BLOCKTIME="0", OMP_NUM_THREADS="1")
    if case == "ospo_fast policy":
        env["BENCH_THREADS_POLICY"] = "ospo_fast"
    return env


def run_case(case: str, steps: int, repeats: int, timeout: float) -> dict:
    """The case's median seconds in a fresh process; a case that runs past ``timeout`` seconds is reported as
    taking at least that long per run (``lower_bound``), so that one pathological case cannot stall the benchmark."""
    cmd = [sys.executable, __file__, "--child", "--steps", str(steps), "--repeats", str(repeats)]
    try:
        done = subprocess.run(cmd, env=case_env(case), capture_output=True, text=True, check=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"median_s": timeout / (repeats + 1), "lower_bound": True, "threads": -1, "times": []}
    return dict(json.loads(done.stdout.strip().splitlines()[-1]), lower_bound=False)


def start_competitors(n: int) -> list[subprocess.Popen]:
    """``n`` busy processes (pure Python loops: one CPU each), stopped by ``stop_competitors``."""
    busy = "import time\nend = time.time() + 600\nwhile time.time() < end:\n    pass\n"
    return [subprocess.Popen([sys.executable, "-c", busy]) for _ in range(n)]


def stop_competitors(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait(timeout=30)


def main(argv: list[str] | None = None) -> None:
    from ospo_fast.threads import available_cpus

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=32, help="decode steps per timed run")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=40.0, help="seconds per case before it is cut off")
    parser.add_argument("--competitors", type=int, default=0, help="busy processes (default: one per CPU)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.steps, args.repeats)
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so that the competitors are stopped (finally)
    cpus = available_cpus()
    competitors = args.competitors or cpus
    load_before = os.getloadavg()
    results: dict[tuple[str, str], dict] = {}
    for condition in ("no added load", f"{competitors} busy processes"):
        procs = start_competitors(competitors) if condition != "no added load" else []
        try:
            time.sleep(1.0 if procs else 0.0)
            for case in CASES:
                results[(condition, case)] = r = run_case(case, args.steps, args.repeats, args.timeout)
                print(f"{condition}: {case}: {'>=' if r['lower_bound'] else ''}{r['median_s']:.3f} s "
                      f"({r['threads']} threads)", flush=True)
        finally:
            stop_competitors(procs)
    table = format_table(results, cpus, load_before)
    print(table)
    from harness import append_rows

    rows = [{"condition": c, "case": k, **v} for (c, k), v in results.items()]
    append_rows("cpu_thread_policy", rows, table, config={"cpus": cpus, "competitors": competitors,
                                                           "steps": args.steps, "load_before": load_before})


def format_table(results: dict[tuple[str, str], dict], cpus: int, load_before: tuple[float, ...]) -> str:
    lines = [f"cpus={cpus}, load average before the run: {', '.join(f'{x:.2f}' for x in load_before)}",
             f"{'condition':<22}{'case':<20}{'threads':>8}{'median s':>10}{'vs defaults':>13}{'load slow-down':>16}"]
    conditions = list(dict.fromkeys(c for c, _ in results))
    for condition in conditions:
        base = results[(condition, CASES[0])]["median_s"]
        for case in CASES:
            r = results[(condition, case)]
            idle = results[(conditions[0], case)]["median_s"]
            cut = ">=" if r["lower_bound"] else ""
            lines.append(f"{condition:<22}{case:<20}{r['threads']:>8}{cut:>3}{r['median_s']:>7.3f}"
                         f"{base / r['median_s']:>12.2f}x{r['median_s'] / idle:>15.2f}x")
    lines.append("(>=: cut off after --timeout; threads -1: not reached; its ratios are bounds)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
