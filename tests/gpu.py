"""The one module that says where a test's tensors live; GPU-only tests skip through it.

- ``requires_cuda``: skip without a CUDA device; ``requires_two_gpus``: skip with fewer than two (NCCL tests).
- ``CUDA_GATES``: these marks; ``make gpu-check`` runs the tests they (or ``TRITON``) gate.
- ``DEVICES`` / the ``device`` fixture (tests/conftest.py): "cpu" always, "cuda" when a device exists.
- ``triton_device()``: where a Triton kernel's inputs must live: CPU tensors under ``TRITON_INTERPRET=1`` (how CI
  runs the kernels), CUDA tensors otherwise; None when neither can run (no triton, or no CUDA and no interpreter).
- ``backend_device(backend)``: the device for an op's ``backend`` parameter ("triton" as above, others CPU).
- ``TRITON``: the "triton" entry of a backend parametrisation, skipped where ``triton_device()`` is None.
"""

from __future__ import annotations

import os

import pytest
import torch

from ospo_fast._backend import triton_available

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
requires_two_gpus = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                       reason="needs two CUDA devices")
CUDA_GATES = (requires_cuda, requires_two_gpus)

DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


def triton_device() -> torch.device | None:
    if not triton_available():
        return None
    if os.environ.get("TRITON_INTERPRET") == "1":
        return torch.device("cpu")
    return torch.device("cuda") if torch.cuda.is_available() else None


def backend_device(backend: str) -> torch.device:
    if backend == "triton":
        device = triton_device()
        if device is None:
            pytest.skip("triton needs a CUDA device or TRITON_INTERPRET=1")
        return device
    return torch.device("cpu")


TRITON = pytest.param("triton", marks=pytest.mark.skipif(
    triton_device() is None, reason="triton needs a CUDA device or TRITON_INTERPRET=1"))

# For a test that is about the CPU itself (CPU autocast, CPU profiler op counts): "triton" only through the
# interpreter, with CPU tensors.
TRITON_ON_CPU = pytest.param("triton", marks=pytest.mark.skipif(
    triton_device() != torch.device("cpu"), reason="a CPU test of triton needs TRITON_INTERPRET=1"))
