"""The built-in model cache: two processes building ``builtin:tiny`` into a fresh cache at once (what torchrun ranks
do) both get one whole model, and no temporary directory is left."""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import pytest


def _resolve(cache: str, barrier, results) -> None:
    os.environ["OSPO_FAST_CACHE"] = cache
    import torch

    torch.set_num_threads(1)
    from ospo_fast.models.loader import resolve_model_path

    barrier.wait()  # both processes ask at the same moment
    results.put(resolve_model_path("builtin:tiny"))


def test_two_processes_build_a_fresh_cache_at_once(tmp_path):
    cache = tmp_path / "cache"
    (cache / "tiny-v1.tmp4242").mkdir(parents=True)  # left by a build killed under the older naming
    (cache / ".tiny-v1.tmp_killed").mkdir()
    (cache / "tiny-v1").mkdir()  # an incomplete cache entry: no config.json
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_resolve, args=(str(cache), barrier, results)) for _ in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=300)
    assert [proc.exitcode for proc in procs] == [0, 0]
    paths = {results.get(timeout=5) for _ in procs}
    assert paths == {str(cache / "tiny-v1")}
    assert sorted(p.name for p in cache.iterdir()) == ["tiny-v1", "tiny-v1.lock"]  # no temp dirs left

    from ospo_fast.models import load_janus

    assert load_janus(str(cache / "tiny-v1"), device="cpu").num_image_tokens == 64  # whole and loadable


def test_a_failed_build_leaves_nothing_and_the_next_one_publishes(tmp_path):
    from ospo_fast.models.loader import build_cached

    target = tmp_path / "m-v1"

    def failing(tmp: Path) -> None:
        (tmp / "half-written").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        build_cached(target, failing)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-v1.lock"]
    build_cached(target, lambda tmp: (tmp / "config.json").write_text("{}"))
    assert (target / "config.json").is_file()
    build_cached(target, lambda tmp: pytest.fail("rebuilt a published cache entry"))
