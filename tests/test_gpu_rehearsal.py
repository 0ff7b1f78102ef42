"""Inductor's CUDA code generation for the compiled decode step, rehearsed on the CPU (tests/rehearsal/): the
whole step, the decode attention (an extern op in the graph) and the in-flight capture included, at Janus-Pro-1B
widths cut to 2 layers; every generated Triton kernel compiled to an sm_90 cubin by ptxas. The first GPU run's
crash ("Scalar 2654435761 is out of range for type int32") was of this class."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "rehearsal" / "rehearse_decode.py"


@pytest.mark.slow  # about 30-40 s each on an idle core, a minute or two on a loaded one
@pytest.mark.parametrize("window", [0, 16], ids=["sequential", "jacobi"])
def test_compiled_decode_step_with_capture_compiles_for_sm90(window):
    """The sequential step (one query: the decode attention over filled slots) and the Jacobi step (W + 1 queries:
    SDPA with its log-sum-exp, the capture staged), each with the in-flight capture."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--batch", "16", "--layers", "2", "--capture",
                           "--window", str(window)], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"decode attention in the graph: {window == 0}" in proc.stdout
    assert "all compiled" in proc.stdout
