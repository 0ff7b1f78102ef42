"""Shared fixtures: offline Janus models are built once per session into a temporary cache; the shipped toy model
and its recorded figures are loaded once per test module."""

import os

from ospo_fast.threads import configure_cpu_threads

# Before torch loads OpenMP: passive wait and threads from the affinity mask and the load (OMP_NUM_THREADS, where
# unset); on a loaded machine spinning OpenMP threads made tests many times slower (ospo_fast/threads.py).
configure_cpu_threads()

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.gpu import DEVICES  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    if "OSPO_FAST_CACHE" not in os.environ:
        os.environ["OSPO_FAST_CACHE"] = str(tmp_path_factory.mktemp("ospo_cache"))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # the user's, or configure_cpu_threads' choice
    yield


@pytest.fixture(scope="session")
def tiny_bundle():
    """The tiny random Janus (8x8 grid), float32, eager-capable, on CPU."""
    from ospo_fast.models import load_janus

    return load_janus("builtin:tiny", device="cpu")


@pytest.fixture(scope="module")
def toy():
    """The shipped ``builtin:toy`` Janus on CPU, loaded once per test module (a module may change it)."""
    from ospo_fast.models import load_janus

    return load_janus("builtin:toy", device="cpu")


@pytest.fixture(scope="module")
def metrics() -> dict:
    """The shipped ``builtin:toy`` build's own figures (``assets/toy_janus/metrics.json``)."""
    import json

    from ospo_fast.models.loader import ASSET_DIR

    return json.loads((ASSET_DIR / "toy_janus" / "metrics.json").read_text())


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Run the test once on "cpu" and, where a CUDA device exists, once on "cuda"."""
    return torch.device(request.param)
