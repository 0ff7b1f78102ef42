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


@pytest.mark.slow  # about 30 s on an idle core, a minute or two on a loaded one
def test_compiled_decode_step_with_capture_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--batch", "16", "--layers", "2", "--capture"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "decode attention in the graph: True" in proc.stdout
    assert "all compiled" in proc.stdout
