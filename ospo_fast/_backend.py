"""Which compute backends are live. Nothing here runs at import time: every answer is computed on call.

Backends of an op:
- ``ref``: plain PyTorch, runs everywhere; the test oracle.
- ``cpp``: the compiled extension ``ospo_fast._C`` (CPU, OpenMP).
- ``triton``: Triton kernels; on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before
  triton was imported (how CI tests them).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os

import torch

BACKENDS = ("auto", "ref", "cpp", "triton")


@functools.cache
def cpp_available() -> bool:
    """True when the compiled extension imports (its ops are then in ``torch.ops.ospo_fast_C``)."""
    try:
        importlib.import_module("ospo_fast._C")
    except ImportError:
        return False
    return True


@functools.cache
def triton_available() -> bool:
    """True when triton imports."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        importlib.import_module("triton")
    except Exception:  # a broken triton install is reported as "not available", not raised
        return False
    return True


def triton_interpret() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def pick_backend(backend: str, tensor: torch.Tensor) -> str:
    """Resolve ``backend`` ("auto", "ref", "cpp", "triton") for an op whose input is ``tensor``.

    "auto" picks Triton on CUDA, the C++ extension on CPU where built, else the reference. An explicit choice
    that cannot run raises a ValueError saying why and what to use instead.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        if tensor.is_cuda and triton_available():
            return "triton"
        if tensor.device.type == "cpu" and cpp_available():
            return "cpp"
        return "ref"
    if backend == "cpp":
        if not cpp_available():
            raise ValueError("backend='cpp' but the extension ospo_fast._C is not built; reinstall with "
                             "`pip install --no-build-isolation -e .` (without OSPO_FAST_NO_EXT=1) or use 'ref'")
        if tensor.device.type != "cpu":
            raise ValueError(f"backend='cpp' runs on CPU tensors, got device {tensor.device}; use 'triton' or 'auto'")
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' but triton does not import; `pip install triton` or use 'ref'")
        if not tensor.is_cuda and not triton_interpret():
            raise ValueError("backend='triton' on a CPU tensor needs TRITON_INTERPRET=1 set before importing "
                             "triton; use 'auto' to pick the CPU backend")
    return backend


def backend_report() -> dict[str, object]:
    """What `ospo-fast env` prints: versions and which backends are live."""
    import transformers

    report: dict[str, object] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cpp_ops": cpp_available(),
        "triton": triton_available(),
        "triton_interpret": triton_interpret(),
        "flash_attn": flash_attn_available(),
    }
    if cpp_available():
        report["cpp_op_names"] = cpp_op_names()
    return report


def cpp_op_names() -> list[str]:
    """The ops the extension registered in the ``ospo_fast_C`` torch.library namespace (``dir(torch.ops.X)``
    lists only ops already looked up, so ask the dispatcher)."""
    prefix = "ospo_fast_C::"
    return sorted(n[len(prefix):] for n in torch._C._dispatch_get_all_op_names() if n.startswith(prefix))
