"""Two gloo processes (DDP with LoRA, FSDP2 with full fine-tuning) give the same run as one process with the same
global batch; a two-process FSDP2 run killed mid-run resumes from its sharded (torch.distributed.checkpoint)
checkpoint to the same loss curve and weights as the uninterrupted two-process run."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.test_trainer import read_metrics, tiny_config, write_pairs

STEPS = 3
MODES = ("ddp", "fsdp")  # LoRA under DDP, full fine-tuning under FSDP2


def _config(mode: str, per_device: int):
    lora = mode == "ddp"
    # float32: the comparison with one process is about the sharding, not about bf16 autocast's rounding
    config = tiny_config(max_steps=STEPS, per_device_batch=per_device, grad_accum=2, save_every=STEPS, lora=lora,
                         distributed=mode, lr=1e-2 if lora else 1e-3, bf16=False)
    return config


def _worker(rank: int, world: int, ports: list[int], root: str) -> None:
    torch.set_num_threads(1)
    from ospo_fast.train import train

    for mode, port in zip(MODES, ports):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                          WORLD_SIZE=str(world))
        out = Path(root, mode, "two")
        result = train(_config(mode, per_device=2), Path(root, "pairs.jsonl"), out)
        if rank == 0:
            (out / "result.json").write_text(json.dumps({"checkpoint": str(result.checkpoint_dir)}))
    _kill_then_resume(rank, world, ports[len(MODES):], Path(root))


class _Kill(RuntimeError):
    pass


def _kill_then_resume(rank: int, world: int, ports: list[int], root: Path) -> None:
    """FSDP2, checkpoints every step; both ranks die at the first micro-batch of the last step, then resume."""
    from ospo_fast.train import train, trainer

    config = _config("fsdp", per_device=2)
    config.train.save_every = 1
    original, calls = trainer.forward_loss, {"n": 0}

    def killed(model, batch):
        calls["n"] += 1
        if calls["n"] == config.train.grad_accum * (STEPS - 1) + 1:
            raise _Kill(f"simulated kill in step {STEPS}")
        return original(model, batch)

    out = root / "fsdp" / "resumed"
    for port, forward in zip(ports, (killed, original)):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                          WORLD_SIZE=str(world))
        trainer.forward_loss = forward
        try:
            result = train(config, root / "pairs.jsonl", out)
        except _Kill:
            continue
        finally:
            trainer.forward_loss = original
        if rank == 0:
            (out / "result.json").write_text(json.dumps({"checkpoint": str(result.checkpoint_dir)}))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _weights(result_dir: Path, lora: bool) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    name = "adapter_model.safetensors" if lora else "model.safetensors"
    weights = load_file(str(result_dir / name))
    return {k: v for k, v in weights.items() if lora or ".language_model.layers." in k}


@pytest.mark.slow  # one spawn of two gloo ranks, four tiny trainings each: about 100 s on 2 loaded cores
def test_two_processes_equal_one(tmp_path):
    """One spawn of two gloo ranks runs both modes; each is compared with a one-process run of 4 pairs/step."""
    from ospo_fast.train import train

    pairs = write_pairs(tmp_path / "pairs.jsonl", 6, seed=4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        singles = {mode: train(_config(mode, per_device=4), pairs, tmp_path / mode / "one") for mode in MODES}
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_worker, args=(2, [_free_port() for _ in range(len(MODES) + 2)], str(tmp_path)), nprocs=2, join=True)
    for mode in MODES:
        _compare(singles[mode], tmp_path / mode / "two", lora=mode == "ddp")
    _compare_resumed(tmp_path / "fsdp")


def _compare_resumed(root: Path) -> None:
    """The killed run left sharded checkpoints at steps 1..STEPS-1; resumed, it equals the uninterrupted run."""
    from ospo_fast.train.checkpoint import SHARDED_DIR, list_checkpoints

    resumed = root / "resumed"
    assert [p.name for p in list_checkpoints(resumed)] == [f"step-{s:06d}" for s in range(1, STEPS + 1)]
    shards = resumed / "checkpoints" / f"step-{STEPS - 1:06d}" / SHARDED_DIR
    assert sorted(p.name for p in shards.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (shards.parent / "optimizer.pt").exists()  # no gathered optimizer state
    a, b = read_metrics(root / "two" / "metrics.jsonl"), read_metrics(resumed / "metrics.jsonl")
    assert [m["step"] for m in b] == [m["step"] for m in a] == list(range(1, STEPS + 1))
    for key in ("loss", "margin", "grad_norm", "lr"):
        torch.testing.assert_close(torch.tensor([m[key] for m in b]), torch.tensor([m[key] for m in a]),
                                   atol=1e-6, rtol=1e-5)
    wa = _weights(Path(json.loads((root / "two" / "result.json").read_text())["checkpoint"]), lora=False)
    wb = _weights(Path(json.loads((resumed / "result.json").read_text())["checkpoint"]), lora=False)
    assert wa.keys() == wb.keys() and wa
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], atol=1e-6, rtol=1e-5)


def _compare(single, two_dir: Path, lora: bool) -> None:
    double_dir = Path(json.loads((two_dir / "result.json").read_text())["checkpoint"])
    a, b = read_metrics(single.metrics_path), read_metrics(two_dir / "metrics.jsonl")
    assert [m["step"] for m in b] == list(range(1, STEPS + 1))
    for key in ("loss", "margin", "accuracy", "grad_norm", "lr"):
        torch.testing.assert_close(torch.tensor([m[key] for m in b]), torch.tensor([m[key] for m in a]),
                                   atol=1e-5, rtol=1e-4)
    wa, wb = _weights(single.checkpoint_dir, lora), _weights(double_dir, lora)
    assert wa.keys() == wb.keys() and wa
    # Adam's first steps move every weight by about lr whatever the size of its gradient, so summation-order noise
    # in near-zero gradients can show as a small fraction of one step; a wrong shard would differ by whole steps.
    step = _config("ddp" if lora else "fsdp", per_device=4).train.lr
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], atol=0.02 * step, rtol=1e-4)
