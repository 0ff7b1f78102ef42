"""BackgroundWriter (ospo_fast.overlap): writes run on a worker thread beside the caller, in order, bounded,
failures surface in the caller, and leaving the block (also by an exception) commits what was submitted."""

import threading

import pytest

from ospo_fast.overlap import BackgroundWriter


def test_writes_run_beside_the_caller_in_order():
    release, done, seen = threading.Event(), [], []

    def write(i):
        release.wait(timeout=10)
        seen.append((i, threading.current_thread().name))
        done.append(i)

    with BackgroundWriter(write, depth=1) as writer:
        writer.submit(0)
        assert done == []  # submit returned while the write waits: the caller computes the next chunk meanwhile
        release.set()
        writer.submit(1)
        writer.submit(2)
    assert done == [0, 1, 2]
    assert all(name.startswith("ospo-writer") for _, name in seen)


def test_depth_bounds_the_writes_in_flight():
    lock, active, peak = threading.Lock(), [0], [0]
    queued = []

    def write(i):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        queued.append(i)
        with lock:
            active[0] -= 1

    with BackgroundWriter(write, depth=2) as writer:
        for i in range(6):
            writer.submit(i)
            assert len(writer._pending) <= 2
    assert queued == list(range(6)) and peak[0] == 1  # one worker: one write at a time


def test_a_failed_write_raises_in_the_caller():
    def write(i):
        if i == 0:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        with BackgroundWriter(write) as writer:
            writer.submit(0)
            writer.submit(1)  # waits for write 0 first: its error comes out here


def test_leaving_by_an_exception_commits_the_pending_write():
    release, done = threading.Event(), []

    def write(i):
        release.wait(timeout=10)
        done.append(i)

    with pytest.raises(KeyboardInterrupt):
        with BackgroundWriter(write) as writer:
            writer.submit(0)
            release.set()
            raise KeyboardInterrupt
    assert done == [0]


def test_disabled_writes_in_series():
    done = []
    with BackgroundWriter(lambda i: done.append((i, threading.current_thread() is threading.main_thread())),
                          enabled=False) as writer:
        writer.submit(0)
        assert done == [(0, True)]
    with pytest.raises(ValueError, match="depth=0"):
        BackgroundWriter(print, depth=0)


def test_pipeline_writes_the_same_run_with_and_without_overlap(tmp_path):
    """Stage 3 on the tiny model, 3 chunks: the overlapped writer commits byte-identical stage outputs."""
    import json

    from ospo_fast.config import load_config
    from ospo_fast.pipeline import Pipeline

    config = load_config("tiny", ["prompts.num_prompts=1", "images.batch_size=2", "filter.enabled=false",
                                  "model.device=cpu"])
    digests = []
    for overlap in (False, True):
        pipeline = Pipeline(config, tmp_path / str(overlap), progress=False)
        pipeline.overlap_writes = overlap
        pipeline.run()
        stages = json.loads((tmp_path / str(overlap) / "manifest.json").read_text())["stages"]
        digests.append({name: entry.get("sha256") for name, entry in stages.items()})
    assert digests[0] == digests[1] and digests[0]["images"]
