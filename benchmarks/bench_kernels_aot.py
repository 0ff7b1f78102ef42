"""AOT report of the Triton kernels: registers, spills and shared memory of every kernel in kernels/, compiled for
sm_80 (A100) and sm_90 (H100) at Janus-Pro-1B/7B shapes, on any machine (no GPU needed: the Triton wheel ships
ptxas and cuobjdump). Run alone: ``.venv/bin/python benchmarks/bench_kernels_aot.py``.

Columns per arch: registers per thread, spill bytes per thread (local memory + stack, from ``cuobjdump
--dump-resource-usage``), shared memory per block in bytes (what Triton requests at launch). A row per kernel,
input dtype and autotune configuration (warps).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ospo_fast.kernels import aot  # noqa: E402

from benchmarks.harness import append_rows  # noqa: E402

FIELDS = ("module", "kernel", "case", "arch", "num_warps", "meta", "registers", "local", "stack", "shared",
          "static_shared", "cubin_bytes", "compile_s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(aot.ARCHS), help="compute capabilities")
    args = parser.parse_args()
    rows = aot.compile_in_subprocess(tuple(args.arch))
    compile_s = sum(r["compile_s"] for r in rows)
    append_rows("kernels_aot", [{k: r[k] for k in FIELDS} for r in rows], aot.format_table(rows),
                config={"archs": args.arch, "V": aot.V_JANUS, "P": aot.P_JANUS, "variants": len(rows),
                        "compile_s": round(compile_s, 1)})
    print(f"\n{len(rows)} cubins in {compile_s:.1f} s of compilation; "
          f"spilling: {sum(1 for r in rows if r['local'] or r['stack'])}")


if __name__ == "__main__":
    main()
