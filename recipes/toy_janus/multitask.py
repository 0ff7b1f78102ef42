"""Phases mm, t2i and und: the decoder's training on text-to-image and understanding together (mm: from the VQ
codebook; t2i: a generation-focused continuation; und: an understanding-focused one), each resumable from its
checkpoint in ``--work``."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ospo_fast.config import load_config
from ospo_fast.ops.object_masks import select_layers
from ospo_fast.toy import world
from recipes.toy_janus.data import object_cell_weights, scene_batch
from recipes.toy_janus.losses import object_attention_loss, t2i_forward, t2i_loss, understanding_batch
from recipes.toy_janus.model import BuildConfig
from recipes.toy_janus.vq import encode_tokens


def _mm_groups(model, cfg: BuildConfig) -> list[dict]:
    """Phase mm's optimiser groups: everything but the VQ at ``mm_lr``; the SigLIP tower at ``mm_vision_lr``
    (left out, and frozen, at 0)."""
    tower, rest = [], []
    for name, p in model.named_parameters():
        if name.startswith("model.vqmodel."):
            continue
        (tower if name.startswith("model.vision_model.") else rest).append(p)
    groups = [{"params": rest, "base_lr": cfg.mm_lr}]
    if cfg.mm_vision_lr > 0:
        groups.append({"params": tower, "base_lr": cfg.mm_vision_lr})
    else:
        for p in tower:
            p.requires_grad_(False)
    return groups


@dataclass(frozen=True)
class MultitaskSchedule:
    """What differs between phase mm (from the VQ codebook) and phase t2i (a generation-focused continuation of a
    built model): checkpoint name, wall-clock budget, peak LR and how often an understanding batch comes."""

    name: str
    minutes: float
    lr: float
    vqa_every: int
    warmup: int = 30
    floor: float = 0.03  # the cosine ends at floor * lr


def train_mm(model, processor, cfg: BuildConfig, work: Path, log) -> dict:
    """Multitask training (T2I + VQA) for ``cfg.mm_minutes`` of wall clock, resumable from ``work/mm.pt``; the
    generation embeddings start from the (normalised) VQ codebook."""
    with torch.no_grad():
        model.model.generation_embeddings.weight.copy_(model.model.vqmodel.quantize.embedding.weight)
    schedule = MultitaskSchedule("mm", cfg.mm_minutes, cfg.mm_lr, cfg.vqa_every)
    return multitask(model, processor, cfg, schedule, work, log)


def train_t2i(model, processor, cfg: BuildConfig, work: Path, log) -> dict:
    """Phase t2i: a generation-focused continuation of a built model (``--init``) for ``cfg.t2i_minutes``,
    resumable from ``work/t2i.pt``: T2I every step, the understanding batch (``UND_QUESTION_KINDS``, relation
    questions most often) every ``cfg.t2i_vqa_every`` steps so that reading keeps up. Same trainable parameters
    as phase mm. Phase mm spent most of its time on understanding (a T2I batch of 24 costs about 0.7 s on one
    thread, an understanding batch 2.7 s), so T2I got 395 steps in the shipped v2 build."""
    schedule = MultitaskSchedule("t2i", cfg.t2i_minutes, cfg.t2i_lr, cfg.t2i_vqa_every)
    return multitask(model, processor, cfg, schedule, work, log)


def multitask(model, processor, cfg: BuildConfig, schedule: MultitaskSchedule, work: Path, log) -> dict:
    """T2I every step + an understanding batch every ``schedule.vqa_every`` steps, warm-up then cosine, for
    ``schedule.minutes`` of wall clock, resumable from ``work/{name}.pt``. Returns ``{name}_steps`` and
    ``{name}_minutes_trained``."""
    model.train()
    model.model.vqmodel.eval().requires_grad_(False)
    groups = _mm_groups(model, cfg)
    for group in groups:
        group["base_lr"] = group["base_lr"] * schedule.lr / cfg.mm_lr
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=schedule.lr, betas=(0.9, 0.95), weight_decay=0.01)
    rng = np.random.default_rng([cfg.seed, 2] + ([7] if schedule.name != "mm" else []))
    ckpt = work / f"{schedule.name}.pt"
    state = _resume_phase(ckpt, model, opt, rng, log)
    budget = schedule.minutes * 60
    t0, last_save = time.time() - state["elapsed"], time.time()
    last_vqa = last_cap = last_attn = float("nan")
    hits: list[bool] = []
    lm = model.model.language_model
    attn_layers = select_layers(cfg.layers, load_config("toy").masks.skip_layers)  # the toy preset's mask layers
    if cfg.attn_weight > 0:
        lm.set_attn_implementation("eager")  # attention probabilities for the loss; the saved model keeps sdpa
    while (elapsed := time.time() - t0) < budget:
        frac, step = elapsed / budget, state["step"]
        cosine = 0.5 * (1 + math.cos(math.pi * frac))
        scale = min(1.0, (step + 1) / schedule.warmup) * (cosine * (1 - schedule.floor) + schedule.floor)
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * scale
        scenes, images = scene_batch(rng, cfg.mm_batch)
        tokens = encode_tokens(model, images)
        uncond = torch.from_numpy(rng.random(cfg.mm_batch) < cfg.p_uncond)
        captions = [world.caption(s) for s in scenes]
        weights = object_cell_weights(scenes, cfg.t2i_fg_weight, cfg.attn_min_cover) if cfg.t2i_fg_weight != 1 else None
        if cfg.attn_weight > 0:
            loss_t2i, ids, attentions = t2i_forward(model, processor, captions, tokens, uncond, True, weights)
            loss_attn = object_attention_loss(attentions, ids, processor.tokenizer, scenes, uncond, attn_layers,
                                              cfg.attn_min_cover)
            loss = loss_t2i + cfg.attn_weight * loss_attn
            last_attn = loss_attn.item()
        else:
            loss_t2i = t2i_loss(model, processor, captions, tokens, uncond, weights)
            loss = loss_t2i
        if step % schedule.vqa_every == 0:
            loss_vqa, loss_cap, correct = understanding_batch(model, processor, rng, cfg.mm_batch, cfg.mm_questions)
            loss = loss + cfg.vqa_weight * loss_vqa + cfg.caption_weight * loss_cap
            last_vqa, last_cap = loss_vqa.item(), loss_cap.item()
            hits = (hits + correct)[-400:]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        state["step"] += 1
        if state["step"] % 20 == 0:
            log(f"{schedule.name} step {state['step']} t2i {loss_t2i.item():.3f} vqa {last_vqa:.3f} "
                f"(train acc last 400 {np.mean(hits) if hits else float('nan'):.3f}) caption {last_cap:.3f} "
                f"attn {last_attn:.3f} lr {opt.param_groups[0]['lr']:.2e} {elapsed / 60:.1f} min")
        if time.time() - last_save > 240:
            state["elapsed"] = time.time() - t0
            _save_mm(ckpt, model, opt, rng, state)
            last_save = time.time()
    state["elapsed"] = time.time() - t0
    _save_mm(ckpt, model, opt, rng, state)
    lm.set_attn_implementation("sdpa")
    model.eval()
    result = {f"{schedule.name}_steps": state["step"],
              f"{schedule.name}_minutes_trained": round(state["elapsed"] / 60, 1)}
    if cfg.attn_weight > 0:
        result[f"{schedule.name}_attn_weight"] = cfg.attn_weight
        result[f"{schedule.name}_last_attn_loss"] = round(last_attn, 4)
    if cfg.t2i_fg_weight != 1:
        result[f"{schedule.name}_fg_weight"] = cfg.t2i_fg_weight
    return result


def _resume_phase(ckpt: Path, model, opt, rng: np.random.Generator, log) -> dict:
    """Load a phase checkpoint (model, optimizer, data RNG) if there is one; returns the phase's step state."""
    if not ckpt.is_file():
        return {"step": 0, "elapsed": 0.0}
    saved = torch.load(ckpt, weights_only=False)
    model.load_state_dict(saved["model"], strict=False)
    opt.load_state_dict(saved["opt"])
    rng.bit_generator.state = saved["rng"]
    state = saved["state"]
    log(f"resumed {ckpt.stem} at step {state['step']} ({state['elapsed'] / 60:.1f} min)")
    return state


def _save_mm(path: Path, model, opt, rng, state) -> None:
    weights = {k: v for k, v in model.state_dict().items() if not k.startswith("model.vqmodel.")}
    tmp = path.with_suffix(".tmp")
    torch.save({"model": weights, "opt": opt.state_dict(), "rng": rng.bit_generator.state, "state": state}, tmp)
    tmp.replace(path)


# ------------------------------------------------------------------------------------------------- phase und

_FROZEN_IN_UND = ("model.vqmodel.", "model.generation_head.", "model.generation_embeddings.",
                  "model.generation_aligner.")


def _und_groups(model, cfg: BuildConfig) -> list[dict]:
    """Vision tower + aligner at ``und_lr_vision``, the decoder at ``und_lr_decoder``; generation side frozen, and
    the tower too where phase mm kept it frozen (``mm_vision_lr`` 0: the tower of phase vis)."""
    frozen = _FROZEN_IN_UND + (("model.vision_model.",) if cfg.mm_vision_lr == 0 else ())
    vision, decoder = [], []
    for name, p in model.named_parameters():
        if name.startswith(frozen):
            p.requires_grad_(False)
        elif name.startswith(("model.vision_model.", "model.aligner.")):
            vision.append(p)
        else:
            decoder.append(p)
    return [{"params": vision, "base_lr": cfg.und_lr_vision}, {"params": decoder, "base_lr": cfg.und_lr_decoder}]


def train_und(model, processor, cfg: BuildConfig, work: Path, log) -> dict:
    """Understanding-focused continuation of phase mm for ``cfg.und_minutes``, resumable from ``work/und.pt``:
    balanced yes/no VQA + captioning every step, T2I every ``und_t2i_every`` steps so generation keeps up."""
    model.train()
    model.model.vqmodel.eval()
    groups = _und_groups(model, cfg)
    opt = torch.optim.AdamW(groups, lr=cfg.und_lr_decoder, betas=(0.9, 0.95), weight_decay=0.01)
    params = [p for g in groups for p in g["params"]]
    rng = np.random.default_rng([cfg.seed, 6])
    ckpt = work / "und.pt"
    state = _resume_phase(ckpt, model, opt, rng, log)
    budget, warmup = cfg.und_minutes * 60, 20
    t0, last_save = time.time() - state["elapsed"], time.time()
    last_t2i, hits = float("nan"), []
    while (elapsed := time.time() - t0) < budget:
        frac, step = elapsed / budget, state["step"]
        scale = min(1.0, (step + 1) / warmup) * (0.5 * (1 + math.cos(math.pi * frac)) * 0.9 + 0.1)
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * scale
        loss_vqa, loss_cap, correct = understanding_batch(model, processor, rng, cfg.und_batch, cfg.und_questions)
        hits += correct
        loss = cfg.vqa_weight * loss_vqa + cfg.caption_weight * loss_cap
        if step % cfg.und_t2i_every == 0:
            scenes, images = scene_batch(rng, cfg.mm_batch)
            uncond = torch.from_numpy(rng.random(cfg.mm_batch) < cfg.p_uncond)
            loss_t2i = t2i_loss(model, processor, [world.caption(s) for s in scenes], encode_tokens(model, images),
                                uncond)
            loss = loss + loss_t2i
            last_t2i = loss_t2i.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        state["step"] += 1
        if state["step"] % 10 == 0:
            recent = np.mean(hits[-10 * cfg.und_batch * cfg.und_questions:])
            log(f"und step {state['step']} vqa {loss_vqa.item():.3f} (train acc last 10 steps {recent:.3f}) "
                f"caption {loss_cap.item():.3f} t2i {last_t2i:.3f} "
                f"lr {opt.param_groups[0]['lr']:.2e}/{opt.param_groups[1]['lr']:.2e} {elapsed / 60:.1f} min")
        if time.time() - last_save > 180:
            state["elapsed"] = time.time() - t0
            _save_mm(ckpt, model, opt, rng, state)
            last_save = time.time()
    state["elapsed"] = time.time() - t0
    _save_mm(ckpt, model, opt, rng, state)
    model.eval()
    return {"und_steps": state["step"], "und_minutes_trained": round(state["elapsed"] / 60, 1)}
