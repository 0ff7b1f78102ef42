"""The process group and this rank's device, one definition for synthesis (``pipeline``) and training (``train``).

Alone (no ``WORLD_SIZE`` > 1 in the environment), nothing is initialised: rank 0 of 1 on ``model.device``.
Under torchrun every rank joins the group from the environment. The backend follows the devices each rank really
has: nccl on ``cuda:LOCAL_RANK`` only when every rank on this host has a CUDA device of its own
(``LOCAL_WORLD_SIZE <= torch.cuda.device_count()``), gloo on the CPU otherwise; so two ranks on a one-GPU host
run on the CPU rather than asking for a device 1 that does not exist.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ospo_fast.config import ConfigError


@dataclass
class Dist:
    """This process's place in the run: ``rank`` of ``world``, ``local_rank`` on its host, its ``device``;
    ``owns_group``: this object created the process group (and ``close`` destroys it)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        """Destroy the process group if this object created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def single_device(preference: str) -> torch.device:
    """The device of a lone process: "auto" -> cuda when available, else cpu; anything else as given."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


def rank_device(preference: str, local_rank: int, local_world: int) -> torch.device:
    """The device of rank ``local_rank`` among ``local_world`` ranks on one host.

    "auto": ``cuda:local_rank`` when every local rank has its own CUDA device, else cpu. "cuda": the same, but
    too few devices is an error. "cpu": cpu. A device index ("cuda:1") is refused: each rank takes its local rank.
    Errors are ``ConfigError`` (the CLI prints them as one line).
    """
    if preference == "cpu":
        return torch.device("cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    enough = local_world <= count
    if preference == "auto":
        return torch.device("cuda", local_rank) if enough else torch.device("cpu")
    if preference == "cuda":
        if not enough:
            raise ConfigError(f"model.device=cuda with {local_world} processes on this host needs {local_world} CUDA "
                             f"devices, found {count}; launch with --nproc_per_node={max(1, count)} or set "
                             "model.device=auto (CPU when devices are short) or cpu")
        return torch.device("cuda", local_rank)
    raise ConfigError(f"model.device={preference!r} cannot be shared by {local_world} processes: under torchrun "
                     "use auto, cuda (rank i takes cuda:LOCAL_RANK) or cpu")


def backend_for(device: torch.device) -> str:
    """nccl for CUDA ranks, gloo for CPU ranks."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(device: str = "auto") -> Dist:
    """Join the torchrun process group when launched by torchrun (or use the one already initialised); a lone
    process otherwise. ``device``: the config's ``model.device`` ("auto" | "cpu" | "cuda", alone also "cuda:i")."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not dist.is_initialized():
        return Dist(device=single_device(device))
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    rank_dev = rank_device(device, local_rank, local_world)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend=backend_for(rank_dev))
        owns = True
    if rank_dev.type == "cuda":
        torch.cuda.set_device(rank_dev)
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, device=rank_dev,
                owns_group=owns)
