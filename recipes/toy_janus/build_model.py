"""Build the toy Janus (``builtin:toy``): a small ``JanusForConditionalGeneration`` trained on the toy world, on a
CPU, in resumable phases.

  python recipes/toy_janus/build_model.py --out ospo_fast/assets/toy_janus --seed 0

A training recipe, kept beside the library (as torchtune keeps its recipes): the library needs only what it ships
(``ospo_fast/assets/toy_janus``, ``ospo_fast.toy``'s world and judge), never this file.

Phases (each saves its result under ``--work``; a rerun skips finished phases):
1. ``vq``: the VQ-VAE (64x64 px -> 8x8 grid, 512 codes) on rendered scenes. Janus decodes through
   L2-normalised codebook entries, so training quantises L2-normalised latents against a normalised codebook
   (stored normalised, so ``encode``'s Euclidean argmin equals the cosine argmin). Against collapse to the plain
   background: codebook initialised from encoder outputs, dead codes restarted from recent encoder outputs, and
   foreground pixels weighted ``fg_weight`` times in the reconstruction loss.
   ``vqdec``: then the decoder side alone on the frozen tokens (sharper shapes; tokens do not change, so it can
   run beside phase mm, as it did for the shipped build). ``vqdec_more``: a warm restart of it on the saved decoder
   for ``--vqdec-minutes`` more.
1c. ``--vq-local-weight W`` (phase vq): the toy VQ's encoder sees the whole image (GroupNorm statistics, attention
   at the 8x8 level), so a cell of plain background gets a code that depends on the objects elsewhere: in the v2.1
   VQ, 1.4% of background cells keep the code they have in an empty image, and 80% of what the caption tells the
   generator goes into predicting background tokens (BUILD.md, "Why two targets stay unmet"). This adds ``W`` x
   the squared distance between each background cell's (normalised) latent and the same cell's latent in the
   empty image, so that background codes say "background here" and the objects' words matter where the objects
   are. Tokenizer pretraining; the decoder's attention is not touched. With ``--init``, a retrained VQ resets the
   generation embeddings to the new codebook (as phase mm does), since the old ones name the old codes. Weight 1
   (12 min) made 28% of background codes local and did not move the masks; weight 10 (25 min) made 58% local, and
   the continuation on it grounds (masks 1.4-1.7x chance against 1.1x) and draws better (BUILD.md, "A local enough
   VQ"; that model ships as ``builtin:toy`` v2.2).
1b. ``vis`` (optional, ``--vis-minutes``): the SigLIP tower alone, with a linear read-out of its last hidden states
   trained on dense per-patch targets (``patch_labels``: the colour and shape of the object covering each patch,
   and the patch's row and column), so that the understanding path tells shapes apart and keeps positions before
   the decoder learns to read it. Pretraining of the understanding path only; the decoder's attention maps (the
   object masks) are not supervised. Saves ``work/vis.pt``, which later runs in that ``--work`` load.
2. ``mm``: one multitask model, like Janus: text-to-image (generation head on the image tokens after the
   chat-templated caption + ``<begin_of_image>``, the layout of transformers' Janus ``generate``; captions are
   replaced by pads with probability ``p_uncond`` so that classifier-free guidance has an unconditional branch)
   and yes/no understanding (the SigLIP tower reads the image into the placeholders; the LM head predicts the
   answer token ``"yes"`` / ``"no"`` after the understanding chat, answers balanced).
2b. ``und`` (optional, ``--und-minutes``): continues from phase mm's weights with an understanding-focused recipe:
   balanced yes/no VQA (``und_questions`` per image, as suffixes on one shared prefix, the way Self-VQA reads)
   + captioning (a suffix on the same prefix) every step, T2I every ``und_t2i_every`` steps; generation head, generation
   embeddings and generation aligner frozen; the SigLIP tower + aligner at a higher LR than the decoder.
   Resumable from ``work/und.pt``. Questions: ``UND_QUESTION_KINDS`` (shape and relation questions twice as often).
   ``--init DIR`` starts the later phases from a saved toy model instead of ``work``'s checkpoints (e.g.
   ``--init ospo_fast/assets/toy_janus --work build/und2 --out build/toy_und2 --phases und,save,eval``; BUILD.md
   records what such a continuation reached).
2c. ``--attn-weight W`` (phases mm and t2i; a diagnostic, never for the shipped model): adds ``W`` x the
   object-attention loss (``object_attention_loss``): in the mask layers the toy preset reads
   (``masks.skip_layers``), the attention of image-token queries to an object's word, normalised over the image,
   should spread over the cells the object covers. Issue #16 rules this out for ``builtin:toy`` (grounding must
   emerge, as in Janus-Pro); it exists to answer a different question: given a model whose attention does ground
   the objects, do stage 3's masks find them, and does the object weighting of the loss then pay? BUILD.md records
   both answers ("Diagnostic: a model taught to ground").
2d. ``--t2i-fg-weight W`` (phases mm and t2i): the T2I loss weights the image tokens of the cells an object covers
   ``W`` times the background's (``object_cell_weights``), as the VQ's ``fg_weight`` does for pixels: about 80% of
   the cells are plain background, which the model learns first. A property of the training images; no loss is
   put on the attention. Weight 3 for 20 min on v2.1 did no better than the same continuation without it (T2I
   12.2% / 11.6% strict, masks 1.16x / 1.09x; BUILD.md, "A local enough VQ").
3. ``eval`` + ``save``: measure the figures (codes used, judge accuracy of reconstructions, T2I strict/loose on
   held-out prompts with CFG 5, VQA accuracy on held-out captions), save fp16 weights, processor, generation
   config, ``metrics.json`` and ``BUILD.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import JanusConfig, JanusForConditionalGeneration, JanusProcessor
from transformers.models.janus.processing_janus import DEFAULT_SYSTEM_PROMPT

from ospo_fast.config import load_config
from ospo_fast.engine.object_attention import object_token_positions
from ospo_fast.engine.prompts import image_prompt_inputs
from ospo_fast.engine.vqa import vqa_prompt
from ospo_fast.models.factory import image_generation_config
from ospo_fast.models.tokenizer import build_tokenizer
from ospo_fast.ops.object_masks import select_layers
from ospo_fast.toy import world

GRID = 8
IMAGE_SIZE = world.SIZE
CODEBOOK = 512


@dataclass
class BuildConfig:
    """Sizes and schedule of the toy build (defaults: the shipped model)."""

    seed: int = 0
    hidden: int = 256
    intermediate: int = 768
    layers: int = 6
    heads: int = 4
    vision_hidden: int = 128
    vision_layers: int = 2
    vq_base_channels: int = 32
    vq_latent_channels: int = 64
    vq_minutes: float = 14.0
    vq_batch: int = 16
    vq_lr: float = 1e-3
    fg_weight: float = 10.0
    vq_local_weight: float = 0.0  # (1c) weight of the VQ's locality loss on background cells (0: off)
    restart_every: int = 40
    vqdec_minutes: float = 12.0
    vis_minutes: float = 0.0  # phase vis (0: not run): dense per-patch supervision of the SigLIP tower
    vis_batch: int = 32
    vis_lr: float = 1e-3
    mm_minutes: float = 56.0
    mm_batch: int = 24
    mm_lr: float = 1e-3
    mm_vision_lr: float = 0.0  # SigLIP tower in phase mm (0: frozen, as Janus keeps SigLIP frozen; needs phase vis)
    p_uncond: float = 0.1
    vqa_every: int = 1  # one understanding batch every ``vqa_every`` steps
    vqa_weight: float = 2.0
    mm_questions: int = 4  # yes/no questions per understanding image in phase mm (suffixes on one shared prefix)
    caption_weight: float = 1.0  # auxiliary captioning loss on the VQA images
    und_minutes: float = 0.0  # phase und (0: not run)
    und_batch: int = 32
    und_questions: int = 4  # yes/no questions per image in phase und (suffixes on one shared prefix)
    und_lr_vision: float = 1e-3  # SigLIP tower + understanding aligner
    und_lr_decoder: float = 3e-4  # language model + LM head
    und_t2i_every: int = 2  # one T2I batch every ``und_t2i_every`` steps (generation head/embeddings frozen)
    t2i_minutes: float = 0.0  # phase t2i (0: not run): generation-focused continuation of a built model
    t2i_lr: float = 5e-4  # its peak LR (phase mm's groups, scaled by t2i_lr / mm_lr)
    t2i_vqa_every: int = 4  # one understanding batch every ``t2i_vqa_every`` T2I steps
    attn_weight: float = 0.0  # diagnostic builds only (2c): weight of the object-attention loss; 0 for builtin:toy
    attn_min_cover: float = 0.25  # a cell belongs to an object's region when the object covers this much of it
    t2i_fg_weight: float = 1.0  # (2d) weight of the T2I NLL of tokens in object cells, background 1 (1: plain mean)
    threads: int = 1


# ----------------------------------------------------------------------------------------------------- model

def build_toy_processor(tokenizer) -> JanusProcessor:
    """Processor for 64x64 images (mean/std 0.5 like Janus-Pro, so pixel values are in [-1, 1])."""
    from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil

    image_processor = JanusImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                             image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return JanusProcessor(image_processor, tokenizer, chat_template=tokenizer.chat_template,
                          num_image_tokens=GRID * GRID)


def toy_config(cfg: BuildConfig, tokenizer) -> JanusConfig:
    """JanusConfig: 64 px images, patch 8 (8x8 = 64 image tokens), VQ downsample 8, 512 codes."""
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    return JanusConfig(
        text_config=dict(model_type="llama", hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                         num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                         num_key_value_heads=cfg.heads, vocab_size=1024, max_position_embeddings=512, **ids),
        vision_config=dict(hidden_size=cfg.vision_hidden, intermediate_size=2 * cfg.vision_hidden,
                           num_hidden_layers=cfg.vision_layers, num_attention_heads=4, image_size=IMAGE_SIZE,
                           patch_size=IMAGE_SIZE // GRID, num_image_tokens=GRID * GRID, projection_dim=cfg.hidden),
        vq_config=dict(embed_dim=8, num_embeddings=CODEBOOK, base_channels=cfg.vq_base_channels,
                       channel_multiplier=[1, 1, 2, 2], num_res_blocks=1, latent_channels=cfg.vq_latent_channels,
                       num_patches=GRID, projection_dim=cfg.hidden, image_token_embed_dim=cfg.hidden,
                       num_hidden_layers=2),
        image_token_id=tokenizer.convert_tokens_to_ids(tokenizer.image_token),
    )


def new_model(cfg: BuildConfig, tokenizer) -> JanusForConditionalGeneration:
    torch.manual_seed(cfg.seed)
    model = JanusForConditionalGeneration(toy_config(cfg, tokenizer))
    model.generation_config = image_generation_config(tokenizer)
    return model


# ------------------------------------------------------------------------------------------------------ data

def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """float (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3)."""
    return ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def scene_batch(rng: np.random.Generator, n: int, split: str | None = None) -> tuple[list, np.ndarray]:
    """``n`` scenes (from ``split``'s captions when given) and their renders, uint8 (n, 64, 64, 3)."""
    specs = world.split_specs(split) if split else None
    scenes = []
    for _ in range(n):
        if specs is None:
            scene = world.sample_scene(rng)
            while world.is_heldout(world.caption(scene)):
                scene = world.sample_scene(rng)
        else:
            scene = world.scene_from_spec(specs[rng.integers(len(specs))], rng)
        scenes.append(scene)
    return scenes, np.stack([world.render(s) for s in scenes])


# -------------------------------------------------------------------------------------------------- phase vq

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


def background_locality_loss(vq, pixels: torch.Tensor, z: torch.Tensor, foreground: torch.Tensor) -> torch.Tensor:
    """Mean squared distance between the latents ``z`` (B, 8, 8, D) of the cells that hold no object pixel
    (``foreground`` (B, 1, 64, 64) float) and the same cells' latents in an empty image (docstring 1c)."""
    empty = torch.tensor(world.BACKGROUND).view(1, 3, 1, 1).float().div(127.5).sub(1.0).expand(1, 3, *pixels.shape[2:])
    z_empty = vq_latents(vq, empty)  # (1, 8, 8, D)
    background = F.max_pool2d(foreground, IMAGE_SIZE // GRID)[:, 0] == 0  # (B, 8, 8)
    distance = (z - z_empty).square().sum(-1)  # (B, 8, 8)
    return distance[background].mean() if background.any() else distance.new_zeros(())


@torch.no_grad()
def background_code_locality(model, images: np.ndarray) -> float:
    """``world.background_code_share`` of ``images`` through the model's own VQ."""
    empty_tokens = encode_tokens(model, world.empty_render()[None])
    return world.background_code_share(encode_tokens(model, images).numpy(), empty_tokens.numpy(), images)


def train_vq(model: JanusForConditionalGeneration, cfg: BuildConfig, log) -> dict:
    vq = model.model.vqmodel.train()
    rng = np.random.default_rng([cfg.seed, 1])
    opt = torch.optim.Adam(vq.parameters(), lr=cfg.vq_lr, betas=(0.9, 0.99))
    background = torch.tensor(world.BACKGROUND).view(1, 3, 1, 1).float().div(127.5).sub(1.0)
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
        fg = ((pixels - background).abs().sum(1, keepdim=True) > 1e-3).float()
        weight = 1.0 + (cfg.fg_weight - 1.0) * fg
        err = (recon - pixels)
        loss = (weight * (err.square() + err.abs())).mean() + commit
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
    background = torch.tensor(world.BACKGROUND).view(1, 3, 1, 1).float().div(127.5).sub(1.0)
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
        fg = ((pixels - background).abs().sum(1, keepdim=True) > 1e-3).float()
        err = recon - pixels
        loss = ((1.0 + (cfg.fg_weight - 1.0) * fg) * (err.square() + err.abs())).mean()
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


# ------------------------------------------------------------------------------------------- prompts, questions

# T2I and VQA prompts are the library's (``image_prompt_inputs``, ``vqa_prompt``): the toy is trained on the layout
# that the pipeline uses it with.


def answer_token_ids(tokenizer) -> tuple[list[int], list[int]]:
    """First tokens of the answers right after ``<|Assistant|>:`` (the chat template writes ``": " + answer``):
    ([" yes", " Yes"], [" no", " No"]) as ``ospo_fast.engine.vqa.answer_token_ids`` reads them; SPEC stage 4
    takes the max over each pair. The model is trained on " yes" / " no"."""
    first = {w: tokenizer(" " + w, add_special_tokens=False)["input_ids"][0] for w in ("yes", "Yes", "no", "No")}
    return [first["yes"], first["Yes"]], [first["no"], first["No"]]


def answer_ids(tokenizer) -> tuple[int, int]:
    """The training targets: the first tokens of " yes" and " no"."""
    yes, no = answer_token_ids(tokenizer)
    return yes[0], no[0]


QUESTION_KINDS = ("there", "there", "there_shape", "is_colour", "rel_shapes", "rel_full", "there_rel")
# Phase und's mix: shape and relation questions twice as often (the colour ones are learnt first, see BUILD.md).
UND_QUESTION_KINDS = ("there", "there_shape", "there_shape", "is_colour", "rel_shapes", "rel_shapes", "rel_full",
                      "rel_full", "there_rel", "there_rel")
_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def make_question(spec: world.SceneSpec, rng: np.random.Generator, yes: bool,
                  kinds: tuple[str, ...] = QUESTION_KINDS) -> str:
    """A yes/no question about a scene spec whose true answer is ``yes``. Templates:
    ``Is there a {colour} {shape}?``, ``Is there a {shape}?``, ``Is the {shape} {colour}?``,
    ``Is the {shape} {relation} the {shape}?``, ``Is the {colour} {shape} {relation} the {colour} {shape}?``,
    ``Is there a {colour} {shape} {relation} a {colour} {shape}?`` (relation as in captions, e.g. "to the left of")."""
    pairs = list(zip(spec.colors, spec.shapes))
    if not spec.relation:
        kinds = tuple(k for k in kinds if not k.startswith(("rel_", "there_rel")))
    kind = kinds[rng.integers(len(kinds))]
    if kind == "there_shape" and not yes and len(pairs) == len(world.SHAPES):
        kind = "there"
    if kind == "there":
        if yes:
            c, s = pairs[rng.integers(len(pairs))]
        else:
            options = [(c, s) for c in world.COLORS for s in world.SHAPES if (c, s) not in pairs]
            hard = [(c, s) for c, s in options if c in spec.colors or s in spec.shapes]
            pool = hard if rng.random() < 0.7 else options
            c, s = pool[rng.integers(len(pool))]
        return f"Is there a {c} {s}?"
    if kind == "there_shape":
        pool = list(spec.shapes) if yes else [s for s in world.SHAPES if s not in spec.shapes]
        return f"Is there a {pool[rng.integers(len(pool))]}?"
    if kind == "is_colour":
        c, s = pairs[rng.integers(len(pairs))]
        if not yes:
            others = [x for x in world.COLORS if x != c]
            c = others[rng.integers(len(others))]
        return f"Is the {s} {c}?"
    (c1, s1), (c2, s2) = pairs
    rel = spec.relation
    if rng.random() < 0.5:  # ask it the other way round
        (c1, s1), (c2, s2), rel = (c2, s2), (c1, s1), _OPPOSITE[rel]
    if not yes:
        if kind != "rel_shapes" and rng.random() < 0.4:  # swap the colour binding instead of the relation
            c1, c2 = c2, c1
        else:
            others = [r for r in world.RELATIONS if r != rel]
            rel = others[rng.integers(len(others))]
    phrase = world.CAPTION_RELATION[rel]
    if kind == "rel_shapes":
        return f"Is the {s1} {phrase} the {s2}?"
    if kind == "rel_full":
        return f"Is the {c1} {s1} {phrase} the {c2} {s2}?"
    return f"Is there a {c1} {s1} {phrase} a {c2} {s2}?"


# ------------------------------------------------------------------------------------------------- phase vis

PATCH = IMAGE_SIZE // GRID
PATCH_TASKS = {"colour": 1 + len(world.COLORS), "shape": 1 + len(world.SHAPES), "row": GRID, "col": GRID}


def patch_labels(scenes: list, min_cover: float = 0.25) -> dict[str, torch.Tensor]:
    """Dense targets of the understanding path, each long (B, GRID * GRID) in the SigLIP tower's patch order
    (row-major): the colour and the shape (0 = background, else 1 + index in ``world.COLORS`` / ``world.SHAPES``) of
    the object that covers most of the patch, background when none covers ``min_cover`` of it; and the patch's own
    row and column. Objects are counted as drawn (a later object hides an earlier one)."""
    colour = torch.zeros(len(scenes), GRID * GRID, dtype=torch.long)
    shape = torch.zeros_like(colour)
    for row, scene in enumerate(scenes):
        owner = np.full((IMAGE_SIZE, IMAGE_SIZE), -1)
        for index, obj in enumerate(scene.objects):
            owner[world.object_mask(obj)] = index
        cells = owner.reshape(GRID, PATCH, GRID, PATCH).transpose(0, 2, 1, 3).reshape(GRID * GRID, PATCH * PATCH)
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


# -------------------------------------------------------------------------------------------------- phase mm

def t2i_loss(model, processor, captions: list[str], tokens: torch.Tensor, uncond: torch.Tensor,
             weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean NLL of image tokens (B, 64) under the generation head, conditioned as Janus ``generate`` does;
    rows with ``uncond`` set see BOS, pads and ``<begin_of_image>`` only (the CFG branch). ``weights`` (B, 64):
    a weighted mean instead (``object_cell_weights``)."""
    return _t2i_forward(model, processor, captions, tokens, uncond, weights=weights)[0]


def _t2i_forward(model, processor, captions: list[str], tokens: torch.Tensor, uncond: torch.Tensor,
                 output_attentions: bool = False,
                 weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
    """``t2i_loss``'s forward: (NLL, the text ids (B, T) as fed, the decoder's attention probabilities per layer
    (B, heads, T + 63, T + 63) when ``output_attentions``, which needs the eager attention)."""
    ids, mask = image_prompt_inputs(processor, captions)  # (B, T), the library's prompt layout
    tok = processor.tokenizer
    keep = (ids == tok.bos_token_id) | (ids == tok.convert_tokens_to_ids(tok.boi_token))
    ids = torch.where(uncond[:, None] & ~keep, torch.full_like(ids, tok.pad_token_id), ids)
    text = model.get_input_embeddings()(ids)  # (B, T, H)
    image = model.prepare_embeddings_for_image_generation(tokens[:, :-1])  # (B, 63, H)
    attention = torch.cat([mask, torch.ones_like(tokens[:, :-1])], dim=1)  # (B, T + 63)
    out = model.model.language_model(inputs_embeds=torch.cat([text, image], 1), attention_mask=attention,
                                     output_attentions=output_attentions)
    logits = model.model.generation_head(out.last_hidden_state[:, ids.shape[1] - 1:])  # (B, 64, K)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens.reshape(-1), reduction="none")
    nll = nll.mean() if weights is None else (nll * weights.reshape(-1)).sum() / weights.sum()
    return nll, ids, out.attentions if output_attentions else None


def object_cell_weights(scenes: list, fg_weight: float, min_cover: float) -> torch.Tensor:
    """(B, GRID * GRID) T2I loss weights: ``fg_weight`` on the cells an object covers by at least ``min_cover``
    (``object_regions``), 1 elsewhere. Where the objects are is a property of the training image, like the VQ's
    ``fg_weight``; nothing here touches the attention."""
    covered = torch.stack([torch.stack(list(object_regions(scene, min_cover).values())).any(0) for scene in scenes])
    return 1.0 + (fg_weight - 1.0) * covered.float()


def object_regions(scene: world.Scene, min_cover: float) -> dict[str, torch.Tensor]:
    """Each shape word of ``scene`` -> (GRID * GRID,) bool: the VQ grid cells (row-major, the image tokens' order)
    that objects of that shape cover by at least ``min_cover`` of their pixels, as drawn (a later object hides an
    earlier one). Two objects of one shape share the word (the caption's first occurrence), so their regions join."""
    owner = np.full((IMAGE_SIZE, IMAGE_SIZE), -1)
    for index, obj in enumerate(scene.objects):
        owner[world.object_mask(obj)] = index
    patch = IMAGE_SIZE // GRID
    cells = owner.reshape(GRID, patch, GRID, patch).transpose(0, 2, 1, 3).reshape(GRID * GRID, patch * patch)
    regions: dict[str, torch.Tensor] = {}
    for index, obj in enumerate(scene.objects):
        covered = torch.from_numpy((cells == index).mean(-1) >= min_cover)
        regions[obj.shape] = regions.get(obj.shape, torch.zeros_like(covered)) | covered
    return regions


def object_attention_loss(attentions: tuple, ids: torch.Tensor, tokenizer, scenes: list, uncond: torch.Tensor,
                          layers: list[int], min_cover: float) -> torch.Tensor:
    """Supervision for the decoder's eyes: where the pipeline reads object masks (SPEC stage 3: the attention of
    image-token queries to an object word's sub-tokens, averaged over heads and the mask layers ``layers``), the
    map, normalised over the image's cells, should spread over the cells the object covers. Cross-entropy of the
    uniform distribution on the object's region (``object_regions``) against that normalised map, averaged over
    the conditional rows' shape words. Cells follow the library's rule: the query whose input is image token j is
    cell j (cells 0..62 here; training feeds 63 image tokens).

    attentions: per layer (B, heads, T + 63, T + 63); ids: (B, T) the text as fed."""
    t = ids.shape[1]
    maps = torch.stack([attentions[i] for i in layers]).mean(dim=(0, 2))[:, t:, :]  # (B, 63, T + 63)
    terms = []
    for row, scene in enumerate(scenes):
        if uncond[row]:
            continue
        regions = object_regions(scene, min_cover)
        words = list(regions)
        positions = object_token_positions(tokenizer, ids[row:row + 1], [words])[0]  # (O, S), -1 padding
        for word, subtokens in zip(words, positions):
            region = regions[word][:maps.shape[1]]
            if not region.any():
                continue
            attended = maps[row][:, subtokens[subtokens >= 0]].mean(-1)  # (63,)
            share = attended / attended.sum().clamp_min(1e-12)
            terms.append(-(torch.log(share.clamp_min(1e-12))[region]).mean())
    return torch.stack(terms).mean() if terms else maps.new_zeros(())


def vqa_logits(model, processor, images: np.ndarray, questions: list[str]) -> torch.Tensor:
    """Next-token logits (B, V) after the understanding chat for each (image uint8 (64,64,3), question)."""
    enc = processor(text=[vqa_prompt(processor, q) for q in questions], images=list(images),
                    return_tensors="pt", padding=True)
    dev = next(model.parameters()).device
    out = model(input_ids=enc.input_ids.to(dev), attention_mask=enc.attention_mask.to(dev),
                pixel_values=enc.pixel_values.to(dev, next(model.parameters()).dtype), logits_to_keep=1)
    return out.logits[:, -1].float()


CAPTION_REQUEST = "Describe the image."


def caption_loss(model, processor, images: np.ndarray, captions: list[str]) -> torch.Tensor:
    """Auxiliary understanding loss, one full left-padded sequence per image: NLL of the caption (+ end of sentence)
    as the assistant's answer to ``<image_placeholder>\nDescribe the image.``; it teaches the decoder to read the
    image tokens, which the balanced yes/no task alone does not start to do. The phases train through
    ``shared_prefix_understanding``; this is its reference (tests)."""
    tok = processor.tokenizer
    texts = [caption_text(processor, c) for c in captions]
    enc = processor(text=texts, images=list(images), return_tensors="pt", padding=True)
    lengths = [len(tok(" " + c + tok.eos_token, add_special_tokens=False)["input_ids"]) for c in captions]
    logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                   pixel_values=enc.pixel_values).logits  # (B, T, V); left padding: answers end each row
    width = max(lengths)
    labels = enc.input_ids[:, -width:].clone()  # (B, width)
    for row, n in enumerate(lengths):
        labels[row, : width - n] = -100
    return F.cross_entropy(logits[:, -width - 1:-1].reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=-100)


def caption_text(processor, caption: str) -> str:
    """The captioning chat with its answer: ``<image_placeholder>\nDescribe the image.`` then `` {caption}<eos>``."""
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CAPTION_REQUEST}]}
    prompt = DEFAULT_SYSTEM_PROMPT + processor.apply_chat_template([user], add_generation_prompt=True)
    return prompt + " " + caption + processor.tokenizer.eos_token


def shared_prefix_understanding(model, processor, images: np.ndarray, questions: list[list[str]],
                                captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The understanding losses the way Self-VQA reads (``ospo_fast.engine.vqa.prefix_cached_hidden``): each
    image's (system + image) prefix runs once and its K questions and its caption chat run as suffixes on a copy
    of its KV, so K answers per image cost K short suffixes instead of K full sequences.
    Returns the answer logits (sum K, V) and the caption NLL per token (scalar)."""
    from ospo_fast.engine.vqa import prefix_cached_hidden, split_prompts
    from ospo_fast.models.loader import JanusBundle

    bundle = JanusBundle(model, processor, "toy build")
    tok = processor.tokenizer
    prefix, suffixes, owner, kinds = None, [], [], []
    for i, (qs, caption) in enumerate(zip(questions, captions)):
        pre, suf = split_prompts(bundle, [vqa_prompt(processor, q) for q in qs] + [caption_text(processor, caption)])
        prefix = prefix or pre
        if pre != prefix:
            raise ValueError("all images must share one prompt prefix")
        suffixes += suf
        owner += [i] * len(suf)
        kinds += ["vqa"] * len(qs) + ["caption"]
    pixels = processor.image_processor(list(images), return_tensors="pt")["pixel_values"]
    hidden, mask = prefix_cached_hidden(bundle, pixels, prefix, suffixes, owner)  # (R, W, H), (R, W)
    last = mask.sum(1) - 1  # (R,)
    is_vqa = torch.tensor([k == "vqa" for k in kinds])
    rows = torch.arange(len(owner))
    answer = model.lm_head(hidden[rows[is_vqa], last[is_vqa]])  # (sum K, V)
    # caption rows: the last n tokens are " {caption}<eos>", each predicted by the hidden state one position earlier
    caption_rows = rows[~is_vqa].tolist()
    picks, targets = [], []
    for row, caption in zip(caption_rows, captions):
        n = len(tok(" " + caption + tok.eos_token, add_special_tokens=False)["input_ids"])
        end = int(last[row]) + 1
        picks += [(row, j - 1) for j in range(end - n, end)]
        targets += suffixes[row][end - n:end]
    r, c = torch.tensor(picks).T
    caption_nll = F.cross_entropy(model.lm_head(hidden[r, c]).float(), torch.tensor(targets))
    return answer.float(), caption_nll


def understanding_batch(model, processor, rng: np.random.Generator, batch: int,
                        questions_per_image: int) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
    """One understanding batch of phases mm and und: ``batch`` scenes, ``questions_per_image`` balanced yes/no
    questions each (``UND_QUESTION_KINDS``) and the caption, through ``shared_prefix_understanding``.
    Returns the answer cross-entropy, the caption NLL and, per question, whether yes/no was ranked right."""
    yes_id, no_id = answer_ids(processor.tokenizer)
    scenes, images = scene_batch(rng, batch)
    answers = rng.random((batch, questions_per_image)) < 0.5  # (B, K)
    questions = [[make_question(world.spec_of(s), rng, bool(a), UND_QUESTION_KINDS) for a in row]
                 for s, row in zip(scenes, answers)]
    target = torch.tensor([yes_id if a else no_id for a in answers.ravel()])
    logits, loss_cap = shared_prefix_understanding(model, processor, images, questions,
                                                   [world.caption(s) for s in scenes])  # (B K, V)
    correct = ((logits[:, yes_id] > logits[:, no_id]) == torch.from_numpy(answers.ravel())).tolist()
    return F.cross_entropy(logits, target), loss_cap, correct


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
            loss_t2i, ids, attentions = _t2i_forward(model, processor, captions, tokens, uncond, True, weights)
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


# ------------------------------------------------------------------------------------------------ evaluation

@torch.no_grad()
def sample_toy_images(model, processor, captions: list[str], seed: int, guidance_scale: float = 5.0,
                      batch_size: int = 16) -> tuple[torch.Tensor, np.ndarray]:
    """Janus ``generate(generation_mode="image")`` with CFG; returns tokens (N, 64) and uint8 (N, 64, 64, 3).

    transformers' own sampler (not ``ospo_fast.engine.generate_images``): the build measures the model alone."""
    tokens = []
    dev = next(model.parameters()).device
    for start in range(0, len(captions), batch_size):
        chunk = captions[start:start + batch_size]
        ids, mask = image_prompt_inputs(processor, chunk)
        torch.manual_seed(seed + start)
        tokens.append(model.generate(inputs=ids.to(dev), attention_mask=mask.to(dev),
                                     generation_mode="image", guidance_scale=guidance_scale, do_sample=True,
                                     temperature=1.0).cpu())
    tokens = torch.cat(tokens)
    return tokens, decode_tokens(model, tokens.to(dev))


def eval_t2i(model, processor, split: str, seed: int, n: int, guidance_scale: float = 5.0) -> dict:
    """Judged alignment of ``n`` generated images for the captions of ``split`` (cycled, fixed order)."""
    from ospo_fast.toy.judge import judge

    specs = world.split_specs(split)
    order = np.random.default_rng([seed, 3]).permutation(len(specs))
    chosen = [specs[order[i % len(specs)]] for i in range(n)]
    _, images = sample_toy_images(model, processor, [world.caption_of_spec(s) for s in chosen], seed, guidance_scale)
    results = [judge(img, world.structure_of_spec(s)) for img, s in zip(images, chosen)]
    return {"n": n, "strict": float(np.mean([r.strict for r in results])),
            "loose": float(np.mean([r.loose for r in results]))}


@torch.no_grad()
def eval_vqa(model, processor, split: str, seed: int, n: int, batch_size: int = 32) -> dict:
    """Accuracy of sign(p(yes) - p(no)) on ``n`` balanced questions about scenes of ``split``'s captions;
    p(yes) = max(P("yes"), P("Yes")) over the full vocabulary, as SPEC stage 4."""
    rng = np.random.default_rng([seed, 4])
    correct = []
    for start in range(0, n, batch_size):
        m = min(batch_size, n - start)
        scenes, images = scene_batch(rng, m, split)
        answers = rng.random(m) < 0.5
        questions = [make_question(world.spec_of(s), rng, bool(a)) for s, a in zip(scenes, answers)]
        correct += answered_right(model, processor, images, questions, answers)
    return {"n": n, "accuracy": float(np.mean(correct))}


def answered_right(model, processor, images: np.ndarray, questions: list[str], answers: np.ndarray) -> list[bool]:
    """Per question, whether sign(p(yes) - p(no)) matches the true answer (bool (B,)); p(yes) = max(P("yes"),
    P("Yes")) over the full vocabulary, as SPEC stage 4."""
    yes_ids, no_ids = answer_token_ids(processor.tokenizer)
    probs = vqa_logits(model, processor, images, questions).softmax(-1)
    score = probs[:, yes_ids].amax(-1) - probs[:, no_ids].amax(-1)  # (B,)
    return ((score > 0).numpy() == answers).tolist()


QUESTION_GROUPS = {"colour": ("there", "is_colour"), "shape": ("there_shape",),
                   "relation": ("rel_shapes", "rel_full", "there_rel")}


@torch.no_grad()
def eval_vqa_per_kind(model, processor, split: str, seed: int, n: int, batch_size: int = 32) -> dict:
    """``eval_vqa``'s accuracy for each group of ``QUESTION_GROUPS`` (``n`` balanced questions each, two-object
    scenes for the relation questions), so a model that reads colours only is not hidden by the mix."""
    rng = np.random.default_rng([seed, 10])
    pairs = [s for s in world.split_specs(split) if s.relation]
    result = {}
    for group, kinds in QUESTION_GROUPS.items():
        correct = []
        for start in range(0, n, batch_size):
            m = min(batch_size, n - start)
            specs = [pairs[i] for i in rng.integers(len(pairs), size=m)]
            scenes = [world.scene_from_spec(spec, rng) for spec in specs]
            images = np.stack([world.render(s) for s in scenes])
            answers = rng.random(m) < 0.5
            questions = [make_question(spec, rng, bool(a), kinds) for spec, a in zip(specs, answers)]
            correct += answered_right(model, processor, images, questions, answers)
        result[group] = {"n": n, "accuracy": float(np.mean(correct))}
    return result


@torch.no_grad()
def eval_vq(model, seed: int, n: int) -> dict:
    """Codes used over ``n`` scenes, and the judge on their reconstructions (encode -> decode)."""
    from ospo_fast.toy.judge import judge

    rng = np.random.default_rng([seed, 5])
    scenes, images = scene_batch(rng, n)
    tokens = torch.cat([encode_tokens(model, images[i:i + 64]) for i in range(0, n, 64)])
    recon = np.concatenate([decode_tokens(model, tokens[i:i + 64]) for i in range(0, n, 64)])
    results = [judge(img, world.structure(s)) for img, s in zip(recon, scenes)]
    return {"n": n, "codes_used": int(tokens.unique().numel()),
            "recon_strict": float(np.mean([r.strict for r in results])),
            "recon_loose": float(np.mean([r.loose for r in results])),
            "background_codes_as_empty": background_code_locality(model, images)}


# ------------------------------------------------------------------------------------------------------- main

def _logger(path: Path):
    def log(message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        print(line, flush=True)
        with path.open("a") as f:
            f.write(line + "\n")
    return log


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="ospo_fast/assets/toy_janus")
    parser.add_argument("--work", default="build/toy_janus_work", help="phase checkpoints and the log")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vq-minutes", type=float, default=BuildConfig.vq_minutes)
    parser.add_argument("--mm-minutes", type=float, default=BuildConfig.mm_minutes)
    parser.add_argument("--mm-vision-lr", type=float, default=BuildConfig.mm_vision_lr,
                        help="LR of the SigLIP tower in phase mm (0: frozen; needs the tower of phase vis)")
    parser.add_argument("--mm-questions", type=int, default=BuildConfig.mm_questions,
                        help="yes/no questions per image in phase mm (1: one, as the first v2 build)")
    parser.add_argument("--vqdec-minutes", type=float, default=BuildConfig.vqdec_minutes)
    parser.add_argument("--und-minutes", type=float, default=BuildConfig.und_minutes)
    parser.add_argument("--t2i-minutes", type=float, default=BuildConfig.t2i_minutes,
                        help="phase t2i: generation-focused continuation (T2I every step), usually after --init")
    parser.add_argument("--t2i-lr", type=float, default=BuildConfig.t2i_lr)
    parser.add_argument("--t2i-vqa-every", type=int, default=BuildConfig.t2i_vqa_every,
                        help="phase t2i: one understanding batch every this many T2I steps")
    parser.add_argument("--attn-weight", type=float, default=BuildConfig.attn_weight,
                        help="phases mm/t2i, diagnostic builds only: weight of the object-attention loss (image-token "
                             "queries of the mask layers attend to an object's word where the object is drawn); "
                             "0: off, as builtin:toy must be (issue #16: grounding must emerge)")
    parser.add_argument("--vq-local-weight", type=float, default=BuildConfig.vq_local_weight,
                        help="phase vq: weight of the locality loss (background cells' latents = the empty image's)")
    parser.add_argument("--t2i-fg-weight", type=float, default=BuildConfig.t2i_fg_weight,
                        help="phases mm/t2i: weight of the T2I loss on image tokens in object cells (background 1)")
    parser.add_argument("--vis-minutes", type=float, default=BuildConfig.vis_minutes,
                        help="phase vis: per-patch pretraining of the SigLIP tower (run it with --phases vis,...)")
    parser.add_argument("--phases", default="vq,vqdec,mm,save,eval")
    parser.add_argument("--grow-after", default=None,
                        help="with --init: insert a new, identity-initialised decoder layer after each of these "
                             "comma-separated layer indices (e.g. 1,2,3: 6 -> 9 layers)")
    parser.add_argument("--init-decoder", default=None,
                        help="phase mm starts its language model, LM head and aligner from this saved toy model "
                             "(e.g. the v1 ospo_fast/assets/toy_janus); a resumed phase mm ignores it")
    parser.add_argument("--init", default=None,
                        help="start the later phases from a saved toy model (e.g. the shipped "
                             "ospo_fast/assets/toy_janus) instead of the phase checkpoints in --work")
    args = parser.parse_args(argv)
    cfg = BuildConfig(seed=args.seed, vq_minutes=args.vq_minutes, vqdec_minutes=args.vqdec_minutes,
                      mm_minutes=args.mm_minutes, mm_vision_lr=args.mm_vision_lr, mm_questions=args.mm_questions,
                      und_minutes=args.und_minutes, t2i_minutes=args.t2i_minutes, t2i_lr=args.t2i_lr,
                      t2i_vqa_every=args.t2i_vqa_every, attn_weight=args.attn_weight,
                      t2i_fg_weight=args.t2i_fg_weight, vq_local_weight=args.vq_local_weight,
                      vis_minutes=args.vis_minutes)
    torch.set_num_threads(cfg.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log = _logger(work / "build.log")
    tokenizer = build_tokenizer()
    model = new_model(cfg, tokenizer)
    stats: dict = {"build": asdict(cfg)}
    phases = args.phases.split(",")
    if args.init:
        init_from_saved(model, Path(args.init), work, log)
    if args.grow_after:
        if not args.init:
            raise SystemExit("--grow-after grows a built model: give it --init DIR")
        model = grow_decoder(model, cfg, tokenizer, [int(i) for i in args.grow_after.split(",")])
        log(f"decoder grown to {cfg.layers} layers (new layers after {args.grow_after})")
        recorded = json.loads((work / "vq_stats.json").read_text())
        (work / "vq_stats.json").write_text(json.dumps({**recorded, "grow_after": args.grow_after}))
    vq_file = work / "vq.pt"
    if vq_file.is_file():
        model.model.vqmodel.load_state_dict(torch.load(vq_file))
        log(f"loaded {vq_file}")
    elif "vq" in phases:
        stats.update(train_vq(model, cfg, log))
        torch.save(model.model.vqmodel.state_dict(), vq_file)
        recorded = json.loads((work / "vq_stats.json").read_text()) if args.init else {}
        (work / "vq_stats.json").write_text(json.dumps({**recorded, **stats}))
        log(f"saved {vq_file}")
    if args.init and vq_file.is_file() and not any((work / f"{name}.pt").is_file() for name in ("t2i", "und")):
        with torch.no_grad():  # the init model's generation embeddings name its old codes (docstring 1c)
            model.model.generation_embeddings.weight.copy_(model.model.vqmodel.quantize.embedding.weight)
        log("generation embeddings reset to the retrained VQ's codebook")
    vqdec_file = work / "vq_decoder.pt"
    if vqdec_file.is_file():
        model.model.vqmodel.load_state_dict(torch.load(vqdec_file))
        log(f"loaded {vqdec_file}")
    elif "vqdec" in phases:
        stats = {**json.loads((work / "vq_stats.json").read_text()), **train_vq_decoder(model, cfg, log)}
        torch.save(model.model.vqmodel.state_dict(), vqdec_file)
        (work / "vq_stats.json").write_text(json.dumps(stats))
        log(f"saved {vqdec_file}")
    if "vqdec_more" in phases:  # a warm restart of phase vqdec on its saved decoder, for --vqdec-minutes more
        if not vqdec_file.is_file():
            raise SystemExit(f"phase vqdec_more continues {vqdec_file}, which does not exist: run phase vqdec first")
        stats = json.loads((work / "vq_stats.json").read_text())
        restart = stats.get("vqdec_restarts", 0) + 1
        more = train_vq_decoder(model, cfg, log, restart)
        stats.update(vqdec_steps=stats["vqdec_steps"] + more["vqdec_steps"], vqdec_restarts=restart)
        torch.save(model.model.vqmodel.state_dict(), vqdec_file.with_suffix(".tmp"))
        vqdec_file.with_suffix(".tmp").replace(vqdec_file)
        (work / "vq_stats.json").write_text(json.dumps(stats))
        log(f"saved {vqdec_file} after restart {restart} ({more['vqdec_steps']} more steps)")
    vis_file = work / "vis.pt"
    if vis_file.is_file():
        model.model.vision_model.load_state_dict(torch.load(vis_file)["tower"])
        log(f"loaded {vis_file}")
    elif "vis" in phases:
        vis = train_vis(model, cfg, work, log)
        (work / "vis_stats.json").write_text(json.dumps(vis))
        log(f"saved {vis_file}: {vis}")
    if "mm" in phases and cfg.mm_vision_lr == 0 and not vis_file.is_file() and not args.init:
        raise SystemExit(f"--mm-vision-lr 0 freezes the SigLIP tower, but {vis_file} does not exist: run phase vis "
                         "first (--phases vis,... --vis-minutes 10) or give the tower an LR (--mm-vision-lr 1e-3)")
    if args.init_decoder and "mm" in phases and not (work / "mm.pt").is_file():
        init_decoder_from(model, Path(args.init_decoder), log)
        recorded = json.loads((work / "vq_stats.json").read_text()) if (work / "vq_stats.json").is_file() else {}
        (work / "vq_stats.json").write_text(json.dumps({**recorded, "init_decoder": args.init_decoder}))
    run_later_phases(model, tokenizer, cfg, work, Path(args.out), phases, log)


DECODER_PREFIXES = ("model.language_model.", "lm_head.", "model.aligner.")


def init_decoder_from(model, path: Path, log) -> None:
    """Warm start: copy a saved toy model's language model, LM head and understanding aligner (fp16 -> fp32) into
    ``model``; the VQ, the SigLIP tower and the generation side stay as built (new codes need a new generation
    head). A decoder that already answers yes/no questions skips the long plateau before a fresh one starts to."""
    saved = JanusForConditionalGeneration.from_pretrained(path, dtype=torch.float32).state_dict()
    picked = {k: v for k, v in saved.items() if k.startswith(DECODER_PREFIXES)}
    missing, _ = model.load_state_dict(picked, strict=False)
    if not picked or any(k.startswith(DECODER_PREFIXES) for k in missing):
        raise SystemExit(f"--init-decoder {path}: not a toy model of these sizes (decoder weights missing)")
    log(f"decoder initialised from {path} ({len(picked)} tensors)")


def grow_decoder(model, cfg: BuildConfig, tokenizer, after: list[int]) -> JanusForConditionalGeneration:
    """More decoder layers for a built model (issue #16's depth factor: with more layers ``masks.skip_layers``
    keeps several middle ones): a new model with one new layer after each old layer index in ``after``, the old
    layers' weights copied, each new layer freshly initialised but with its attention output (``o_proj``) and
    MLP output (``down_proj``) zero, so it adds nothing to the residual stream: the grown model computes exactly
    what the old one did, and training then starts from there. Sets ``cfg.layers``. Returns the new model."""
    old_layers = cfg.layers
    if not after or sorted(set(after)) != sorted(after) or not all(0 <= i < old_layers for i in after):
        raise SystemExit(f"--grow-after {after}: give distinct layer indices in 0..{old_layers - 1}")
    cfg.layers = old_layers + len(after)
    new_index, position = {}, 0
    for i in range(old_layers):
        new_index[i] = position
        position += 2 if i in after else 1
    grown = new_model(cfg, tokenizer)
    state = grown.state_dict()
    prefix = "model.language_model.layers."
    for name, value in model.state_dict().items():
        if name.startswith(prefix):
            index, rest = name[len(prefix):].split(".", 1)
            name = f"{prefix}{new_index[int(index)]}.{rest}"
        state[name] = value
    for i in after:
        for weight in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
            state[f"{prefix}{new_index[i] + 1}.{weight}"] = torch.zeros_like(state[f"{prefix}0.{weight}"])
    grown.load_state_dict(state)
    return grown


def init_from_saved(model, path: Path, work: Path, log) -> None:
    """Copy a saved toy model's weights (fp16 -> fp32) into ``model`` and its build figures (``metrics.json``)
    into ``work``, so that the later phases continue from it. Refuses a ``work`` that already holds phase
    checkpoints of phases mm, t2i or und: they would silently replace the weights loaded here. A VQ retrained in
    ``work`` by an earlier run of the same continuation (``vq.pt``, ``vq_decoder.pt``) is meant to replace the init
    model's, so it is allowed, and that run's record is kept."""
    stale = [p.name for p in work.glob("*.pt") if p.name not in ("vq.pt", "vq_decoder.pt")]
    if stale:
        raise SystemExit(f"--init {path}: {work} already holds phase checkpoints {stale}; use an empty --work")
    saved = JanusForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    model.load_state_dict(saved.state_dict())
    record = work / "vq_stats.json"
    if (work / "vq.pt").is_file() and record.is_file() and json.loads(record.read_text()).get("init") == str(path):
        log(f"initialised from {path}; the VQ retrained in {work} replaces its VQ")
        return
    metrics = json.loads((path / "metrics.json").read_text())
    keep = {k: v for k, v in metrics.items() if k.endswith(("_steps", "_trained"))}
    keep.update(init=str(path), init_build=metrics.get("init_build", metrics["build"]))  # the first build's settings
    keep.update({k: metrics[k] for k in ("init_decoder", "vis_patch_accuracy", "vqdec_restarts") if k in metrics})
    (work / "vq_stats.json").write_text(json.dumps(keep))
    log(f"initialised from {path} ({keep})")


def run_later_phases(model, tokenizer, cfg: BuildConfig, work: Path, out: Path, phases: list[str], log) -> None:
    """Phases mm, t2i and und (train, or load a finished phase's checkpoint from ``work``), save (fp16 safetensors
    + processor + generation config) and eval (through ``load_janus``, writing ``metrics.json`` and ``BUILD.md``
    into ``out``)."""
    processor = build_toy_processor(tokenizer)
    stats = json.loads((work / "vq_stats.json").read_text()) if (work / "vq_stats.json").is_file() else {}
    if (work / "vis_stats.json").is_file():
        stats.update(json.loads((work / "vis_stats.json").read_text()))
    for name, train in (("mm", train_mm), ("t2i", train_t2i), ("und", train_und)):  # in this order
        if name in phases:
            trained = train(model, processor, cfg, work, log)
            for key in (f"{name}_steps", f"{name}_minutes_trained"):  # --init: a continuation adds to the figures
                trained[key] += stats.get(key, 0)                        # of the model it starts from
            stats.update(trained)
            (work / f"{name}_stats.json").write_text(json.dumps(stats))
        elif (work / f"{name}.pt").is_file():
            model.load_state_dict(torch.load(work / f"{name}.pt", weights_only=False)["model"], strict=False)
            stats.update(json.loads((work / f"{name}_stats.json").read_text()))
    stats["build"] = asdict(cfg)  # this run's budgets (a resumed phase may have been given a longer one)
    if "save" in phases:
        if (work / "vq_decoder.pt").is_file():  # phase vqdec may have finished beside phase mm
            model.model.vqmodel.load_state_dict(torch.load(work / "vq_decoder.pt"))
        out.mkdir(parents=True, exist_ok=True)
        model.eval().to(torch.float16).save_pretrained(out)
        processor.save_pretrained(out)
        model.to(torch.float32)
        log(f"saved model to {out}")
    if "report" in phases:  # rewrite BUILD.md from metrics.json
        write_build_md(out, json.loads((out / "metrics.json").read_text()))
    if "eval" in phases:
        from ospo_fast.models import load_janus

        bundle = load_janus(str(out), dtype="float32", device="cpu")
        metrics = {"seed": cfg.seed, "answer_tokens": {"yes": " yes", "no": " no"}, **stats}
        metrics["vq"] = eval_vq(bundle.model, cfg.seed, 256)
        log(f"vq {metrics['vq']}")
        metrics["vqa_heldout"] = eval_vqa(bundle.model, bundle.processor, "heldout", cfg.seed, 512)
        log(f"vqa {metrics['vqa_heldout']}")
        metrics["vqa_per_kind_heldout"] = eval_vqa_per_kind(bundle.model, bundle.processor, "heldout", cfg.seed, 256)
        log(f"vqa per kind {metrics['vqa_per_kind_heldout']}")
        for split, n in (("heldout", 160), ("train", 160)):
            metrics[f"t2i_{split}_cfg5"] = eval_t2i(bundle.model, bundle.processor, split, cfg.seed, n)
            log(f"t2i {split} {metrics[f't2i_{split}_cfg5']}")
        metrics["test_t2i_heldout_cfg5"] = eval_t2i(bundle.model, bundle.processor, "heldout", TEST_SEED, TEST_N)
        metrics["test_vqa_heldout"] = eval_vqa(bundle.model, bundle.processor, "heldout", TEST_SEED, TEST_N * 2)
        log(f"test-sized {metrics['test_t2i_heldout_cfg5']} {metrics['test_vqa_heldout']}")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
        write_build_md(out, metrics)


TEST_SEED, TEST_N = 1234, 32  # the tests' held-out check (tests/test_toy_model.py)


def _pair(result: dict) -> str:
    return f"{result['strict']:.3f} / {result['loose']:.3f} (n={result['n']})"


HISTORY_HEADING = "## Build history"


def write_build_md(out: Path, metrics: dict) -> None:
    """BUILD.md = the generated report + the hand-written history of an existing BUILD.md (from
    ``HISTORY_HEADING`` on), which records what a rerun cannot: interrupted phases, recipe changes, continuations."""
    path = out / "BUILD.md"
    old = path.read_text() if path.is_file() else ""
    history = old[old.index(HISTORY_HEADING):] if HISTORY_HEADING in old else ""
    path.write_text(build_report(metrics) + ("\n" + history if history else ""))


def build_report(m: dict) -> str:
    """BUILD.md text from the metrics dict."""
    b, vq = m.get("init_build", m["build"]), m["vq"]  # a continuation (--init): the first build's settings
    rows = [
        (f"VQ steps (batch {b['vq_batch']})", m.get("vq_steps", "?")),
        *([(f"SigLIP tower per-patch steps (phase vis, batch {b['vis_batch']})", m["vis_steps"])]
          if "vis_steps" in m else []),
        (f"VQ codes used on {vq['n']} scenes", f"{vq['codes_used']} / 512"),
        ("judge on VQ reconstructions, strict / loose", f"{vq['recon_strict']:.3f} / {vq['recon_loose']:.3f}"),
        ("VQ decoder-only steps" + (f" (phase vqdec + {m['vqdec_restarts']} warm restart(s), vqdec_more)"
                                    if m.get("vqdec_restarts") else ""), m.get("vqdec_steps", "?")),
        (f"multitask steps (T2I batch {b['mm_batch']}, VQA batch {b['mm_batch']} every {b['vqa_every']})",
         m.get("mm_steps", "?")),
        *([(f"generation-focused steps (phase t2i: T2I batch {m['build']['mm_batch']}, understanding every "
            f"{m['build']['t2i_vqa_every']})", m["t2i_steps"])] if "t2i_steps" in m else []),
        *([(f"understanding steps (phase und: VQA + caption batch {b['und_batch']}, T2I every "
            f"{b['und_t2i_every']})", m["und_steps"])] if "und_steps" in m else []),
        ("T2I held-out captions, CFG 5, strict / loose", _pair(m["t2i_heldout_cfg5"])),
        ("T2I training captions, CFG 5, strict / loose", _pair(m["t2i_train_cfg5"])),
        ("VQA accuracy, held-out captions, balanced", f"{m['vqa_heldout']['accuracy']:.3f} "
                                                      f"(n={m['vqa_heldout']['n']})"),
        *[(f"VQA accuracy, held-out two-object captions, {kind} questions", f"{r['accuracy']:.3f} (n={r['n']})")
          for kind, r in m.get("vqa_per_kind_heldout", {}).items()],
        (f"test-sized T2I held-out, seed {TEST_SEED}, strict / loose", _pair(m["test_t2i_heldout_cfg5"])),
        (f"test-sized VQA held-out, seed {TEST_SEED}", f"{m['test_vqa_heldout']['accuracy']:.3f} "
                                                       f"(n={m['test_vqa_heldout']['n']})"),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    und_cmd = f" --und-minutes {b['und_minutes']}" if b.get("und_minutes") else ""
    und_cmd += f" --init-decoder {m['init_decoder']}" if m.get("init_decoder") else ""
    then = m["build"]
    continued = (f"\nThen continued from that model (DIR: {m.get('init', '?')}; the figures below are the continued "
                 f"model's): `python "
                 f"recipes/toy_janus/build_model.py --init DIR --work build/continued --out ospo_fast/assets/toy_janus "
                 f"--phases t2i,save,eval --t2i-minutes {then['t2i_minutes']} --t2i-lr {then['t2i_lr']:g} "
                 f"--t2i-vqa-every {then['t2i_vqa_every']}" + (f" --grow-after {m['grow_after']}" if m.get("grow_after")
                                                               else "") + "`."
                 if "init_build" in m and then.get("t2i_minutes") else "")
    vis_cmd = (f" --vis-minutes {b['vis_minutes']} --mm-vision-lr {b['mm_vision_lr']:g} --mm-questions "
               f"{b.get('mm_questions', 1)}" if b.get("vis_minutes") else "")
    return f"""# builtin:toy: how it was built

Command (CPU, 1 thread each, wall-clock budgets): `python recipes/toy_janus/build_model.py --out
ospo_fast/assets/toy_janus --seed {m['seed']} --vq-minutes {b['vq_minutes']} --vqdec-minutes {b['vqdec_minutes']}
--mm-minutes {b['mm_minutes']}{vis_cmd}{und_cmd}` (phase checkpoints and the log in `build/toy_janus_work/`; a rerun
resumes).{continued}
Phases:
VQ-VAE, then the VQ decoder alone on frozen tokens beside the multitask phase (T2I + yes/no VQA), then save (fp16)
and eval through `load_janus`. Budgets are wall clock and the machine was shared (load 6-11 on 2 cores), so a
rerun reaches a different number of steps: the figures are this build's.

Model: JanusForConditionalGeneration, LLaMA decoder {b['layers']} layers x hidden {b['hidden']} (heads {b['heads']},
MLP {b['intermediate']}), vocab 1024 (project tokenizer); SigLIP tower {b['vision_layers']} layers x
{b['vision_hidden']}, image 64 px, patch 8 -> 64 image tokens; VQ-VAE base {b['vq_base_channels']} channels,
multipliers [1,1,2,2] (downsample 8 -> 8x8 grid), 512 codes of dim 8; weights fp16 safetensors. Masks: the decoder
has only {b['layers']} layers, so `presets/toy.yaml` sets `masks.skip_layers: 1` (layers 1..{b['layers'] - 2}).

| figure | value |
|---|---|
{table}

Answers: the model is trained to put the answer on the first token of `" yes"` / `" no"` (with the space the chat
template writes after `<|Assistant|>:`), as `ospo_fast.engine.vqa.answer_token_ids` reads it.
Questions it was trained on: `make_question` in `recipes/toy_janus/build_model.py`.
Held-out captions: `ospo_fast.toy.world.is_heldout` (crc32 % 8 == 0, {len(world.split_specs('heldout'))} of
{len(world.all_specs())} captions), never seen in training, neither for T2I nor for VQA.
"""


if __name__ == "__main__":
    main()
