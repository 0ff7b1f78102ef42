"""Offline Janus models: random-initialised ``JanusForConditionalGeneration`` with the real structure (SigLIP-style
vision tower, aligner, VQ-VAE, generation head, LLaMA decoder), a locally built tokenizer, processor, chat
template and generation config, saved with ``save_pretrained`` so they load back through ``load_janus`` exactly
like a real checkpoint.

Kinds:
- ``tiny``: small sizes for tests and the CPU demo; ``grid`` sets the image-token grid (8 -> 8x8 = 64 tokens,
  24 -> 576 tokens as Janus-Pro). Images are ``grid * 16`` pixels.
- ``janus-pro-1b-shape`` / ``janus-pro-7b-shape``: the published sizes, random weights, for GPU benchmarks
  (speed does not depend on the weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig, JanusConfig, JanusForConditionalGeneration, JanusProcessor

from ospo_fast.models.tokenizer import BOI, build_tokenizer

KINDS = ("tiny", "janus-pro-1b-shape", "janus-pro-7b-shape")


@dataclass
class ModelSizes:
    """Sizes of one Janus model; ``grid`` is the image-token grid side (tokens per image = grid**2)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int
    grid: int
    codebook: int
    vq_base_channels: int
    vq_latent_channels: int
    vq_res_blocks: int
    max_positions: int


def sizes_for(kind: str, grid: int = 8) -> ModelSizes:
    if kind == "tiny":
        return ModelSizes(hidden=128, intermediate=256, layers=12, heads=4, kv_heads=4, vocab=1024,
                          vision_hidden=64, vision_intermediate=128, vision_layers=2, vision_heads=4, grid=grid,
                          codebook=256, vq_base_channels=32, vq_latent_channels=32, vq_res_blocks=1,
                          max_positions=2048)
    if kind == "janus-pro-1b-shape":
        return ModelSizes(hidden=2048, intermediate=5632, layers=24, heads=16, kv_heads=16, vocab=102400,
                          vision_hidden=1024, vision_intermediate=4096, vision_layers=24, vision_heads=16,
                          grid=24, codebook=16384, vq_base_channels=128, vq_latent_channels=256, vq_res_blocks=2,
                          max_positions=16384)
    if kind == "janus-pro-7b-shape":
        return ModelSizes(hidden=4096, intermediate=11008, layers=30, heads=32, kv_heads=32, vocab=102400,
                          vision_hidden=1024, vision_intermediate=4096, vision_layers=24, vision_heads=16,
                          grid=24, codebook=16384, vq_base_channels=128, vq_latent_channels=256, vq_res_blocks=2,
                          max_positions=16384)
    raise ValueError(f"unknown model kind {kind!r}; choose one of {KINDS}")


def janus_config(sizes: ModelSizes, special_ids: dict[str, int]) -> JanusConfig:
    patch = 16
    image_size = sizes.grid * patch
    return JanusConfig(
        text_config=dict(
            model_type="llama", hidden_size=sizes.hidden, intermediate_size=sizes.intermediate,
            num_hidden_layers=sizes.layers, num_attention_heads=sizes.heads, num_key_value_heads=sizes.kv_heads,
            vocab_size=sizes.vocab, max_position_embeddings=sizes.max_positions,
            bos_token_id=special_ids["bos"], eos_token_id=special_ids["eos"], pad_token_id=special_ids["pad"],
        ),
        vision_config=dict(
            hidden_size=sizes.vision_hidden, intermediate_size=sizes.vision_intermediate,
            num_hidden_layers=sizes.vision_layers, num_attention_heads=sizes.vision_heads,
            image_size=image_size, patch_size=patch, num_image_tokens=sizes.grid ** 2,
            projection_dim=sizes.hidden,
        ),
        vq_config=dict(
            embed_dim=8, num_embeddings=sizes.codebook, base_channels=sizes.vq_base_channels,
            channel_multiplier=[1, 1, 2, 2, 4], num_res_blocks=sizes.vq_res_blocks,
            latent_channels=sizes.vq_latent_channels, projection_dim=sizes.hidden,
            image_token_embed_dim=sizes.hidden,
        ),
        image_token_id=special_ids["image"],
    )


def image_generation_config(tokenizer) -> GenerationConfig:
    """The generation config Janus needs for ``generate(generation_mode="image")`` (SPEC defaults)."""
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, guidance_scale=5.0, do_sample=True, temperature=1.0,
        max_new_tokens=512, generation_kwargs={"boi_token_id": tokenizer.convert_tokens_to_ids(BOI)},
    )


def build_processor(tokenizer, grid: int) -> JanusProcessor:
    from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil

    image_processor = JanusImageProcessorPil(size={"height": grid * 16, "width": grid * 16})
    return JanusProcessor(image_processor, tokenizer, chat_template=tokenizer.chat_template,
                          num_image_tokens=grid ** 2)


def _special_ids(tokenizer) -> dict[str, int]:
    return {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id,
            "image": tokenizer.convert_tokens_to_ids(tokenizer.image_token)}


def build_random_bundle(kind: str, grid: int, device: torch.device | str, dtype: torch.dtype = torch.bfloat16,
                        seed: int = 0, layers: int | None = None):
    """A random-initialised Janus of ``kind`` (``sizes_for``) with its tokenizer, processor and generation config,
    built in ``dtype`` directly on ``device``: no CPU copy, no file (a GPU benchmark's 1B or 7B shape in seconds).
    ``layers`` overrides the decoder depth. Returns a ``JanusBundle``."""
    import dataclasses

    from ospo_fast.models.loader import JanusBundle

    sizes = sizes_for(kind, grid)
    if layers is not None:
        sizes = dataclasses.replace(sizes, layers=layers)
    tokenizer = build_tokenizer(vocab_size=min(sizes.vocab, 1024))
    torch.manual_seed(seed)
    with torch.device(device):
        model = JanusForConditionalGeneration._from_config(janus_config(sizes, _special_ids(tokenizer)), dtype=dtype,
                                                           attn_implementation="sdpa")
    model.generation_config = image_generation_config(tokenizer)
    name = kind if kind != "tiny" else f"tiny-{grid}"
    return JanusBundle(model=model.eval(), processor=build_processor(tokenizer, sizes.grid), source=f"builtin:{name}")


def build_offline_model(kind: str, out_dir: str | Path, grid: int = 8, seed: int = 0,
                        dtype: torch.dtype = torch.float32) -> Path:
    """Build a random-initialised Janus model of ``kind`` and save model, processor and generation config to
    ``out_dir`` (loadable by ``ospo_fast.models.load_janus``). Returns the directory."""
    sizes = sizes_for(kind, grid)
    tokenizer = build_tokenizer(vocab_size=min(sizes.vocab, 1024))
    config = janus_config(sizes, _special_ids(tokenizer))
    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(config).to(dtype)
    model.generation_config = image_generation_config(tokenizer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    build_processor(tokenizer, sizes.grid).save_pretrained(out)
    return out
