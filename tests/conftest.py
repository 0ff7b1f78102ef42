"""Shared fixtures: offline Janus models are built once per session into a temporary cache."""

import os

import pytest
import torch

from tests.gpu import DEVICES


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    if "OSPO_FAST_CACHE" not in os.environ:
        os.environ["OSPO_FAST_CACHE"] = str(tmp_path_factory.mktemp("ospo_cache"))
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield


@pytest.fixture(scope="session")
def tiny_bundle():
    """The tiny random Janus (8x8 grid), float32, eager-capable, on CPU."""
    from ospo_fast.models import load_janus

    return load_janus("builtin:tiny", device="cpu")


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Run the test once on "cpu" and, where a CUDA device exists, once on "cuda"."""
    return torch.device(request.param)
