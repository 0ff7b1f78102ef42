"""The engine on a real GPU (skipped without CUDA; ``make gpu-check`` runs them): compiled ``generate_images`` with
and without the in-flight capture against the eager engine on the same GPU, one bf16 trainer step with the fused
loss (Triton) against the naive loss, Self-VQA in bf16 and float32 against transformers' full forward, and a
two-process NCCL smoke test (DDP) where two GPUs exist."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.gpu import requires_cuda, requires_two_gpus

PROMPTS = ["a red car", "a blue bench and a green apple on a wooden table near the tall tree", "a cat"]
OBJECTS = [["car"], ["bench", "apple", "tree"], ["cat"]]
SEEDS = [3, 1, 4]


@pytest.fixture(scope="module")
def small():
    """A 2-layer tiny Janus (4x4 grid) built in float32 on the GPU: a compile takes seconds, and in float32 the
    compiled and eager steps round alike, so they draw the same tokens."""
    from benchmarks.gpu_check import Shape, build_bundle

    return build_bundle(Shape("tiny", 4), "cuda", dtype=torch.float32, layers=2)


@requires_cuda
@pytest.mark.parametrize("capture", [False, True], ids=["plain", "in-flight-capture"])
def test_compiled_synthesis_equals_eager_in_one_graph(small, capture):
    """images.compile=auto on CUDA (``fullgraph``, CUDA graphs): a ragged last batch, then a second call; one graph,
    no breaks, the eager engine's tokens exactly (and its object maps, with capture)."""
    from torch._dynamo.utils import counters

    from ospo_fast.config import ImageConfig
    from ospo_fast.engine.image_gen import generate_images

    config = ImageConfig(temperature=1.0, top_k=64, batch_size=2, compile="auto")
    objects = OBJECTS if capture else None
    eager = generate_images(small, PROMPTS, SEEDS, dataclasses.replace(config, compile=False), objects=objects)
    torch._dynamo.reset()
    counters.clear()
    compiled = generate_images(small, PROMPTS, SEEDS, config, objects=objects)
    again = generate_images(small, PROMPTS[1:], SEEDS[1:], config, objects=None if objects is None else OBJECTS[1:])
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters["graph_break"])
    assert torch.equal(compiled.tokens, eager.tokens) and torch.equal(again.tokens, eager.tokens[1:])
    assert compiled.pixels.shape == eager.pixels.shape == (3, small.grid * 16, small.grid * 16, 3)
    if capture:
        assert compiled.object_maps.shape == (3, 3, small.grid, small.grid)
        torch.testing.assert_close(compiled.object_maps, eager.object_maps, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(again.object_maps, eager.object_maps[1:], atol=1e-5, rtol=1e-4)


@requires_cuda
def test_bf16_trainer_step_with_the_fused_loss(tmp_path):
    """bf16 weights, bf16 autocast, LoRA: the fused head + loss (Triton on CUDA) steps the optimizer with a finite
    loss and gradient, and its first loss equals the naive loss's (full logits) to bf16 precision (the adapters
    start at zero, so both are the base model's loss on the same batch)."""
    from ospo_fast.train.trainer import Trainer
    from tests.test_trainer import tiny_config, write_pairs

    pairs = write_pairs(tmp_path / "pairs.jsonl", 4)
    first = {}
    for fused in (True, False):
        config = tiny_config(max_steps=2, bf16=True, warmup_ratio=0.0)  # no warm-up: the first step moves
        config.model.device, config.model.dtype, config.loss.fused = "cuda", "bfloat16", fused
        trainer = Trainer(config, pairs, tmp_path / f"fused-{fused}")
        assert trainer.device.type == "cuda" and trainer.bundle.model.dtype == torch.bfloat16
        before = {n: p.detach().clone() for n, p in trainer.core.named_parameters() if p.requires_grad}
        metrics = trainer.train_step()
        assert not metrics["skipped"] and trainer.optimizer_steps == 1
        assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"]) and metrics["grad_norm"] > 0
        after = dict(trainer.core.named_parameters())
        assert any(not torch.equal(before[n], after[n]) for n in before)  # the adapters moved
        first[fused] = metrics["loss"]
    assert first[True] == pytest.approx(first[False], rel=2e-2, abs=1e-2)


def _full_forward(bundle, image, question: str, ids: dict[str, int]) -> tuple[float, float]:
    """transformers' Janus forward over the whole prompt for one (image, question): (p_yes, p_no)."""
    from ospo_fast.engine.vqa import vqa_prompt

    inputs = bundle.processor(text=[vqa_prompt(bundle.processor, question)], images=[image], return_tensors="pt")
    inputs = inputs.to(bundle.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(bundle.model.dtype)
    with torch.no_grad():
        probs = bundle.model(**inputs).logits[0, -1].float().softmax(-1)
    return (max(probs[ids["yes"]], probs[ids["Yes"]]).item(), max(probs[ids["no"]], probs[ids["No"]]).item())


@requires_cuda
def test_self_vqa_on_cuda_against_the_full_forward():
    """float32: allclose to transformers' per-question full forward on the same GPU; bf16 (what runs): its error
    against that float32 reference is within twice transformers' own bf16 error on the same inputs."""
    from ospo_fast.engine.vqa import answer_token_ids, score_yes_no
    from tests.test_vqa import QUESTIONS, _bundle, _flat, _images

    bundles = {dtype: _bundle(dtype) for dtype in ("float32", "bfloat16")}
    for bundle in bundles.values():
        bundle.model.to("cuda")
    ids = answer_token_ids(bundles["float32"])
    images = _images(bundles["float32"])
    reference = lambda b: _flat([[_full_forward(b, im, q, ids) for q in qs]  # noqa: E731
                                 for im, qs in zip(images, QUESTIONS)])
    want = reference(bundles["float32"])
    got32 = _flat(score_yes_no(bundles["float32"], images, QUESTIONS, batch_size=2))
    torch.testing.assert_close(got32, want, atol=1e-6, rtol=1e-3)
    own = reference(bundles["bfloat16"])
    got16 = _flat(score_yes_no(bundles["bfloat16"], images, QUESTIONS, batch_size=2))
    own_error = float(((own - want).abs() / want).max())
    assert float(((got16 - want).abs() / want).max()) <= 2 * own_error + 1e-3


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _nccl_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from ospo_fast.distributed import init_distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    group = init_distributed("cuda")
    try:
        total = torch.full((4,), float(rank + 1), device=group.device)
        dist.all_reduce(total)
        torch.manual_seed(rank)  # different inputs and initial weights per rank: DDP must reconcile both
        model = DistributedDataParallel(torch.nn.Linear(8, 2).to(group.device), device_ids=[group.device.index])
        model(torch.randn(3, 8, device=group.device)).sum().backward()
        grad = model.module.weight.grad
        grads = [torch.zeros_like(grad) for _ in range(world)]
        dist.all_gather(grads, grad)
        Path(out, f"{rank}.json").write_text(json.dumps({
            "backend": dist.get_backend(), "device": str(group.device), "sum": total.tolist(),
            "grads_equal": all(torch.equal(g, grads[0]) for g in grads)}))
    finally:
        group.close()


@requires_two_gpus
def test_two_process_nccl_smoke(tmp_path):
    """Two ranks on two GPUs join through ``init_distributed`` with nccl, each on its own device; all-reduce and a
    DDP backward agree."""
    import torch.multiprocessing as mp

    mp.spawn(_nccl_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    reports = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
    assert [r["device"] for r in reports] == ["cuda:0", "cuda:1"]
    assert all(r["backend"] == "nccl" and r["sum"] == [3.0] * 4 and r["grads_equal"] for r in reports)
