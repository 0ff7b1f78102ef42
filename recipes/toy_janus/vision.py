"""Phase vis (optional): the SigLIP tower alone, with a linear read-out trained on dense per-patch targets."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ospo_fast.toy import world
from recipes.toy_janus.data import cell_owners, scene_batch, to_pixels
from recipes.toy_janus.model import GRID, PATCH, BuildConfig

PATCH_TASKS = {"colour": 1 + len(world.COLORS), "shape": 1 + len(world.SHAPES), "row": GRID, "col": GRID}


def patch_labels(scenes: list, min_cover: float = 0.25) -> dict[str, torch.Tensor]:
    """Dense targets of the understanding path, each long (B, GRID * GRID) in the SigLIP tower's patch order
    (row-major): the colour and the shape (0 = background, else 1 + index in ``world.COLORS`` / ``world.SHAPES``) of
    the object that covers most of the patch, background when none covers ``min_cover`` of it; and the patch's own
    row and column. Objects are counted as drawn (a later object hides an earlier one)."""
    colour = torch.zeros(len(scenes), GRID * GRID, dtype=torch.long)
    shape = torch.zeros_like(colour)
    for row, scene in enumerate(scenes):
        cells = cell_owners(scene)
        pixels = np.stack([(cells == i).sum(-1) for i in range(len(scene.objects))])  # (objects, patches)
        best, share = pixels.argmax(0), pixels.max(0) / (PATCH * PATCH)
        for patch in np.nonzero(share >= min_cover)[0]:
            obj = scene.objects[best[patch]]
            colour[row, patch] = 1 + world.COLORS.index(obj.color)
            shape[row, patch] = 1 + world.SHAPES.index(obj.shape)
    position = torch.arange(GRID * GRID).expand(len(scenes), -1)
    return {"colour": colour, "shape": shape, "row": position // GRID, "col": position % GRID}


def new_patch_head(cfg: BuildConfig) -> torch.nn.Linear:
    """One linear read-out of the tower's last hidden states for every task of ``PATCH_TASKS`` (a pretraining
    head: it is not part of the shipped model)."""
    torch.manual_seed(cfg.seed + 11)
    return torch.nn.Linear(cfg.vision_hidden, sum(PATCH_TASKS.values()))


def patch_logits(model, head: torch.nn.Linear, images: np.ndarray) -> dict[str, torch.Tensor]:
    """Per-task logits (B, GRID * GRID, classes) of the SigLIP tower's last hidden states on uint8 images."""
    hidden = model.model.vision_model(to_pixels(images), return_dict=True).last_hidden_state  # (B, P, H)
    return dict(zip(PATCH_TASKS, head(hidden).split(list(PATCH_TASKS.values()), dim=-1)))


def patch_loss(model, head: torch.nn.Linear, labels: dict[str, torch.Tensor],
               images: np.ndarray) -> tuple[torch.Tensor, dict]:
    """Sum over tasks of the per-patch cross entropy against ``patch_labels`` of the images' scenes, and each
    task's accuracy on the object patches (colour, shape) or on all patches (row, col)."""
    logits = patch_logits(model, head, images)
    loss, accuracy = torch.zeros(()), {}
    on_object = labels["colour"] > 0
    for task, value in logits.items():
        loss = loss + F.cross_entropy(value.reshape(-1, value.shape[-1]), labels[task].reshape(-1))
        hit = value.argmax(-1) == labels[task]
        accuracy[task] = float(hit[on_object].float().mean() if task in ("colour", "shape") else hit.float().mean())
    return loss, accuracy


def train_vis(model, cfg: BuildConfig, work: Path, log) -> dict:
    """Phase vis: the SigLIP tower (+ ``new_patch_head``) alone on dense per-patch targets (``patch_labels``) for
    ``cfg.vis_minutes``, so the understanding path can tell shapes apart and keeps where each patch is before the
    decoder learns to read it (the yes/no task alone carries one bit per image). The attention maps used for
    object masks live in the decoder and are not supervised. Saves the tower to ``work/vis.pt``."""
    tower = model.model.vision_model.train()
    head = new_patch_head(cfg)
    params = list(tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.vis_lr, betas=(0.9, 0.95), weight_decay=0.01)
    rng = np.random.default_rng([cfg.seed, 8])
    start, step, budget, warmup = time.time(), 0, cfg.vis_minutes * 60, 50
    while time.time() - start < budget:
        frac = (time.time() - start) / budget
        for group in opt.param_groups:
            group["lr"] = cfg.vis_lr * min(1.0, (step + 1) / warmup) * (0.5 * (1 + math.cos(math.pi * frac)) * 0.95
                                                                         + 0.05)
        scenes, images = scene_batch(rng, cfg.vis_batch)
        loss, accuracy = patch_loss(model, head, patch_labels(scenes), images)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            log(f"vis step {step} loss {loss.item():.4f} accuracy "
                + " ".join(f"{k} {v:.3f}" for k, v in accuracy.items()) + f" lr {opt.param_groups[0]['lr']:.2e}")
    tower.eval()
    torch.save({"tower": tower.state_dict(), "head": head.state_dict()}, work / "vis.pt")
    return {"vis_steps": step, "vis_patch_accuracy": eval_patches(model, head, cfg.seed, 256)}


@torch.no_grad()
def eval_patches(model, head: torch.nn.Linear, seed: int, n: int) -> dict:
    """Per-patch accuracy of the tower's read-out on ``n`` scenes of held-out captions; ``majority`` is what
    always answering the commonest object class scores on the shape task (the chance to beat)."""
    rng = np.random.default_rng([seed, 9])
    scenes, images = scene_batch(rng, n, "heldout")
    labels = patch_labels(scenes)
    _, accuracy = patch_loss(model, head, labels, images)
    shapes = labels["shape"]
    on_object = shapes[shapes > 0]
    accuracy["shape_majority"] = float(torch.bincount(on_object).max() / len(on_object))
    return {"n": n, **{k: round(v, 4) for k, v in accuracy.items()}}
