"""The process-group backend and each rank's device follow the devices the host really has (simulated counts)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from ospo_fast import distributed as D
from ospo_fast.config import ConfigError


def _host(monkeypatch, gpus: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)


@pytest.mark.parametrize("gpus,local_world,expected", [
    (0, 2, ["cpu", "cpu"]),        # no GPU: gloo on the CPU
    (1, 2, ["cpu", "cpu"]),        # two ranks, one GPU: no rank may ask for cuda:1
    (2, 2, ["cuda:0", "cuda:1"]),  # a device each: nccl
    (8, 2, ["cuda:0", "cuda:1"]),
    (1, 1, ["cuda:0"]),
])
def test_auto_takes_cuda_only_when_every_local_rank_has_a_device(monkeypatch, gpus, local_world, expected):
    _host(monkeypatch, gpus)
    devices = [D.rank_device("auto", rank, local_world) for rank in range(local_world)]
    assert [str(d) for d in devices] == expected
    assert {D.backend_for(d) for d in devices} == {"nccl" if gpus >= local_world else "gloo"}


def test_explicit_devices(monkeypatch):
    _host(monkeypatch, 1)
    assert D.rank_device("cpu", 1, 2) == torch.device("cpu")
    assert D.rank_device("cuda", 0, 1) == torch.device("cuda", 0)
    with pytest.raises(ConfigError, match=r"model.device=cuda with 2 processes .* needs 2 CUDA devices, found 1"):
        D.rank_device("cuda", 1, 2)
    with pytest.raises(ConfigError, match=r"model.device='cuda:1' cannot be shared"):
        D.rank_device("cuda:1", 0, 2)


def test_init_on_a_one_gpu_host_with_two_ranks_joins_gloo_on_cpu(monkeypatch):
    """What ``torchrun --nproc_per_node=2`` does on one GPU: rank 1 must not pick nccl and cuda:1."""
    _host(monkeypatch, 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    joined = {}
    state = {"up": False}

    def fake_init(backend):
        joined["backend"], state["up"] = backend, True

    monkeypatch.setattr(dist, "is_initialized", lambda: state["up"])
    monkeypatch.setattr(dist, "init_process_group", fake_init)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: pytest.fail(f"set_device({d}) on a CPU rank"))
    rank = D.init_distributed("auto")
    assert joined == {"backend": "gloo"}
    assert (rank.rank, rank.world, rank.local_rank, rank.device, rank.owns_group) == (1, 2, 1, torch.device("cpu"),
                                                                                       True)


def test_alone_nothing_is_initialised(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(dist, "init_process_group", lambda **_: pytest.fail("initialised a group for one process"))
    alone = D.init_distributed("cpu")
    assert (alone.rank, alone.world, alone.main, alone.device) == (0, 1, True, torch.device("cpu"))
    alone.barrier()  # a no-op alone
