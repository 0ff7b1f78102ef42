"""Run the whole benchmark suite with one command and print every table (figures and ratios against the
baselines measured in the same run). Each benchmark also appends JSON lines (device, commit, date) to
benchmarks/results.jsonl.

    python benchmarks/run_all.py            # CPU-sized defaults
    python benchmarks/run_all.py --gpu      # Janus-Pro-1B shapes on CUDA
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

CPU = {
    "bench_kernels_aot.py": [],
    "bench_object_masks.py": [],
    "bench_simpo_loss.py": ["--small"],
    "bench_image_gen.py": ["--prompts", "4"],
    "bench_vqa.py": ["--images", "8"],
    "bench_train.py": ["--pairs", "4"],
    "bench_pipeline.py": ["--prompts", "8"],
    "bench_decode_attention.py": ["--threads", "1"],
    "bench_jacobi.py": ["--images", "8", "--batch", "8", "--windows", "4", "16", "--repeats", "2"],
}
GPU = {  # Janus-Pro-1B shapes; `make gpu-check` (benchmarks/gpu_check.py) is the time-boxed table for a lent GPU
    "bench_decode_attention.py": ["--device", "cuda", "--images", "16", "64", "256"],
    "bench_jacobi.py": ["--device", "cuda", "--shape", "janus-pro-1b-shape", "--images", "16", "--batch", "16",
                        "--guidance", "5", "--windows", "4", "16", "--compile"],
    "bench_object_masks.py": ["--device", "cuda", "--model", "janus-pro-1b-shape"],
    "bench_simpo_loss.py": ["--full", "--device", "cuda", "--dtype", "bfloat16"],
    "bench_image_gen.py": ["--model", "janus-pro-1b-shape", "--device", "cuda", "--dtype", "bfloat16",
                           "--prompts", "16"],
    "bench_vqa.py": ["--model", "janus-pro-1b-shape", "--device", "cuda", "--dtype", "bfloat16"],
    "bench_train.py": ["--model", "janus-pro-1b-shape", "--device", "cuda", "--pairs", "16", "--checkpointing"],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--only", nargs="*", help="benchmark files to run (default: all)")
    args = parser.parse_args()
    suite = GPU if args.gpu else CPU
    failed = []
    for name, extra in suite.items():
        if args.only and name not in args.only:
            continue
        print(f"\n##### {name} {' '.join(extra)}", flush=True)
        start = time.perf_counter()
        code = subprocess.run([sys.executable, str(HERE / name), *extra]).returncode
        print(f"##### {name}: exit {code}, {time.perf_counter() - start:.0f} s", flush=True)
        if code:
            failed.append(name)
    if failed:
        print(f"failed: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
