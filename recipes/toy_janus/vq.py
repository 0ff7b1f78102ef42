"""Phases vq, vqdec and vqdec_more: the toy VQ-VAE (64x64 px -> 8x8 grid, 512 codes) and its decoder alone, and
the encode / decode of images through the model's own VQ."""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from transformers import JanusForConditionalGeneration

from ospo_fast.toy import world
from recipes.toy_janus.data import scene_batch, to_pixels, to_uint8
from recipes.toy_janus.model import CODEBOOK, GRID, IMAGE_SIZE, BuildConfig


def background_pixels() -> torch.Tensor:
    """The toy world's background colour as model input, (1, 3, 1, 1) in [-1, 1] (``to_pixels``' scale)."""
    return torch.tensor(world.BACKGROUND).view(1, 3, 1, 1).float().div(127.5).sub(1.0)


def foreground(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, 1, H, W) float: 1 where a pixel is not the background colour."""
    return ((pixels - background_pixels()).abs().sum(1, keepdim=True) > 1e-3).float()


def reconstruction_loss(recon: torch.Tensor, pixels: torch.Tensor, fg: torch.Tensor, fg_weight: float) -> torch.Tensor:
    """Mean squared + absolute error of ``recon`` against ``pixels`` (both (B, 3, H, W)), the ``fg`` pixels
    (``foreground``) weighted ``fg_weight`` times the background's (against collapse to the plain background)."""
    err = recon - pixels
    return ((1.0 + (fg_weight - 1.0) * fg) * (err.square() + err.abs())).mean()


def vq_latents(vq, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, 64, 64) -> L2-normalised latents (B, 8, 8, 8) channels-last."""
    z = vq.quant_conv(vq.encoder(pixels))  # (B, D, 8, 8)
    return F.normalize(z.permute(0, 2, 3, 1), dim=-1)


def vq_forward(vq, pixels: torch.Tensor):
    """Straight-through quantised reconstruction. Returns (recon (B,3,64,64), commit loss, ids (B*64), flat
    latents (B*64, D) detached, latents (B, 8, 8, D))."""
    z = vq_latents(vq, pixels)  # (B, 8, 8, D)
    flat = z.reshape(-1, z.shape[-1])
    book = F.normalize(vq.quantize.embedding.weight, dim=-1)  # (K, D)
    ids = (flat @ book.T).argmax(-1)
    q = book[ids]
    commit = F.mse_loss(q, flat.detach()) + 0.25 * F.mse_loss(flat, q.detach())
    q = flat + (q - flat).detach()
    q = q.view(z.shape).permute(0, 3, 1, 2)  # (B, D, 8, 8)
    return vq.decoder(vq.post_quant_conv(q)), commit, ids, flat.detach(), z


def background_locality_loss(vq, pixels: torch.Tensor, z: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
    """Mean squared distance between the latents ``z`` (B, 8, 8, D) of the cells that hold no object pixel (``fg``
    (B, 1, 64, 64) float, ``foreground``) and the same cells' latents in an empty image (build_model.py's
    docstring, 1c)."""
    empty = background_pixels().expand(1, 3, *pixels.shape[2:])
    z_empty = vq_latents(vq, empty)  # (1, 8, 8, D)
    background = F.max_pool2d(fg, IMAGE_SIZE // GRID)[:, 0] == 0  # (B, 8, 8)
    distance = (z - z_empty).square().sum(-1)  # (B, 8, 8)
    return distance[background].mean() if background.any() else distance.new_zeros(())


@torch.no_grad()
def background_code_locality(model, images: np.ndarray) -> float:
    """``world.background_code_share`` of ``images`` through the model's own VQ."""
    empty_tokens = encode_tokens(model, world.empty_render()[None])
    return world.background_code_share(encode_tokens(model, images).numpy(), empty_tokens.numpy(), images)


def train_vq(model: JanusForConditionalGeneration, cfg: BuildConfig, log) -> dict:
    """Phase vq: the VQ-VAE on rendered scenes for ``cfg.vq_minutes`` (build_model.py's docstring, 1 and 1c)."""
    vq = model.model.vqmodel.train()
    rng = np.random.default_rng([cfg.seed, 1])
    opt = torch.optim.Adam(vq.parameters(), lr=cfg.vq_lr, betas=(0.9, 0.99))
    with torch.no_grad():  # codebook from encoder outputs
        _, images = scene_batch(rng, 64)
        z = vq_latents(vq, to_pixels(images)).reshape(-1, 8)
        vq.quantize.embedding.weight.copy_(z[torch.randperm(z.shape[0])[:CODEBOOK]])
    usage = torch.zeros(CODEBOOK)
    recent: list[torch.Tensor] = []
    start, step, budget = time.time(), 0, cfg.vq_minutes * 60
    while time.time() - start < budget:
        frac = (time.time() - start) / budget
        for group in opt.param_groups:
            group["lr"] = cfg.vq_lr * (0.5 * (1 + math.cos(math.pi * frac)) * 0.95 + 0.05)
        _, images = scene_batch(rng, cfg.vq_batch)
        pixels = to_pixels(images)
        recon, commit, ids, flat, z = vq_forward(vq, pixels)
        fg = foreground(pixels)
        loss = reconstruction_loss(recon, pixels, fg, cfg.fg_weight) + commit
        if cfg.vq_local_weight > 0:
            loss = loss + cfg.vq_local_weight * background_locality_loss(vq, pixels, z, fg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        usage += torch.bincount(ids, minlength=CODEBOOK).float()
        recent.append(flat)
        recent = recent[-8:]
        step += 1
        if step % cfg.restart_every == 0:
            dead = (usage == 0).nonzero().flatten()
            if len(dead) and frac < 0.85:
                pool = torch.cat(recent)
                pick = pool[torch.randint(pool.shape[0], (len(dead),))]
                with torch.no_grad():
                    vq.quantize.embedding.weight[dead] = F.normalize(pick + 0.01 * torch.randn_like(pick), dim=-1)
            log(f"vq step {step} loss {loss.item():.4f} commit {commit.item():.4f} used {(usage > 0).sum().item()} "
                f"restarted {len(dead)} lr {opt.param_groups[0]['lr']:.2e}")
            usage.zero_()
    with torch.no_grad():  # store the normalised codebook: encode()'s Euclidean argmin == cosine argmin
        vq.quantize.embedding.weight.copy_(F.normalize(vq.quantize.embedding.weight, dim=-1))
    vq.eval()
    return {"vq_steps": step}


def train_vq_decoder(model: JanusForConditionalGeneration, cfg: BuildConfig, log, restart: int = 0) -> dict:
    """Phase vqdec: train only the decoder side (post_quant_conv + decoder) on fixed tokens for
    ``cfg.vqdec_minutes``; encoder, quant_conv and codebook stay frozen, so every image keeps its tokens and the
    multitask phase does not depend on this one (the shipped build ran the two side by side). ``restart`` > 0:
    phase vqdec_more's warm restart number (fresh scenes, a new optimiser and schedule on the saved decoder)."""
    vq = model.model.vqmodel
    vq.eval()
    params = list(vq.decoder.parameters()) + list(vq.post_quant_conv.parameters())
    opt = torch.optim.Adam(params, lr=cfg.vq_lr / 2, betas=(0.9, 0.99))
    rng = np.random.default_rng([cfg.seed, 6] + ([restart] if restart else []))
    start, step, budget = time.time(), 0, cfg.vqdec_minutes * 60
    while time.time() - start < budget:
        frac = (time.time() - start) / budget
        for group in opt.param_groups:
            group["lr"] = cfg.vq_lr / 2 * (0.5 * (1 + math.cos(math.pi * frac)) * 0.95 + 0.05)
        _, images = scene_batch(rng, cfg.vq_batch)
        pixels = to_pixels(images)
        with torch.no_grad():
            tokens = vq.encode(pixels).image_tokens.view(len(images), -1)
        recon = vq.decode(tokens)  # (B, 3, 64, 64), through the same path as decode_image_tokens
        loss = reconstruction_loss(recon, pixels, foreground(pixels), cfg.fg_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 40 == 0:
            log(f"vqdec step {step} loss {loss.item():.4f} lr {opt.param_groups[0]['lr']:.2e}")
    return {"vqdec_steps": step}


@torch.no_grad()
def encode_tokens(model: JanusForConditionalGeneration, images: np.ndarray) -> torch.Tensor:
    """uint8 (B, 64, 64, 3) -> image tokens (B, 64) through the model's own VQ ``encode``."""
    out = model.model.vqmodel.encode(to_pixels(images))
    return out.image_tokens.view(len(images), -1)


@torch.no_grad()
def decode_tokens(model: JanusForConditionalGeneration, tokens: torch.Tensor) -> np.ndarray:
    """(B, 64) tokens -> uint8 (B, 64, 64, 3) through ``decode_image_tokens``."""
    return to_uint8(model.decode_image_tokens(tokens).permute(0, 3, 1, 2).float())
