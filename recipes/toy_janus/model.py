"""The toy Janus's sizes, build settings and architecture (a small ``JanusForConditionalGeneration``), and the warm
starts of a continuation: ``--init`` (``init_from_saved``), ``--init-decoder`` (``init_decoder_from``) and
``--grow-after`` (``grow_decoder``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import JanusConfig, JanusForConditionalGeneration, JanusProcessor

from ospo_fast.models.factory import image_generation_config
from ospo_fast.toy import world

GRID = 8
IMAGE_SIZE = world.SIZE
CODEBOOK = 512
PATCH = IMAGE_SIZE // GRID  # pixels per grid cell (and SigLIP patch) side


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
