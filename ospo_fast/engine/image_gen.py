"""Batched, KV-cached, classifier-free-guided Janus image generation over transformers' own Janus model.

One preallocated ``StaticCache`` holds 2B rows: B conditional rows, then B unconditional rows built as Janus builds
them (BOS and ``<begin_of_image>`` kept, every other prompt token replaced by the pad token, same attention mask).
Prompts of different lengths are left-padded; pads are masked out and position ids count real tokens only, so a
row computes what it would compute alone. Each row samples with its own counter-based noise
(``engine.sampling``), so an image depends only on (prompt, seed, settings). The decode step (language model for
one token, generation head, guidance, sampling, next-token embedding) runs under ``torch.compile`` with CUDA
graphs on CUDA when ``config.compile``; plainly on CPU. Temperature 0 is greedy decoding.

With ``objects``, the attention that each image-token query of the conditional rows pays to the object words is
captured during these same decode steps (``engine.object_attention``); cell j is the query whose input is image
token j, so one extra step runs after the last token.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from transformers import StaticCache

from ospo_fast.config import ImageConfig
from ospo_fast.engine.sampling import sample_next


@dataclass
class ImageBatch:
    """Generated images. tokens: (B, N) int64 VQ codes in raster order; pixels: (B, H, W, 3) uint8;
    object_maps: (B, O, G, G) float32 mean attention of image-token queries to each object's words, or None."""

    tokens: torch.Tensor
    pixels: torch.Tensor
    object_maps: torch.Tensor | None = None


@dataclass(frozen=True)
class _Sampling:
    guidance_scale: float
    temperature: float
    top_k: int
    top_p: float


def image_prompt_inputs(bundle, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat template + ``<begin_of_image>``, left-padded: input_ids (B, T) and attention_mask (B, T) on CPU."""
    processor = bundle.processor
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": p}]}],
                                           add_generation_prompt=True, tokenize=False) for p in prompts]
    enc = processor(text=texts, generation_mode="image", padding=True, padding_side="left", return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def unconditional_ids(input_ids: torch.Tensor, bos_id: int, boi_id: int, pad_id: int) -> torch.Tensor:
    """Janus's unconditional prompt: every token other than BOS and ``<begin_of_image>`` becomes pad. (B, T)."""
    keep = (input_ids == bos_id) | (input_ids == boi_id)
    return input_ids.masked_fill(~keep, pad_id)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting real tokens only; pads get 0. (B, T) int64."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def pixels_from_decoded(decoded: torch.Tensor, image_mean, image_std) -> torch.Tensor:
    """VQ decoder output (B, H, W, 3) in normalised units -> uint8 (B, H, W, 3), as Janus's postprocess
    (unnormalise, x255, clip, truncate)."""
    mean = torch.as_tensor(image_mean, dtype=torch.float32, device=decoded.device)
    std = torch.as_tensor(image_std, dtype=torch.float32, device=decoded.device)
    return ((decoded.float() * std + mean) * 255.0).clamp(0, 255).to(torch.uint8)


def decode_pixels(bundle, tokens: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """VQ-decode (B, N) image tokens to uint8 pixels (B, H, W, 3) on CPU, ``batch_size`` images at a time."""
    image_processor = bundle.processor.image_processor
    out = []
    with torch.no_grad():
        for start in range(0, tokens.shape[0], batch_size):
            decoded = bundle.model.decode_image_tokens(tokens[start:start + batch_size].to(bundle.device))
            out.append(pixels_from_decoded(decoded, image_processor.image_mean, image_processor.image_std).cpu())
    return torch.cat(out)


def _check_args(bundle, prompts, seeds, config: ImageConfig, objects) -> None:
    if not prompts:
        raise ValueError("prompts is empty; pass at least one prompt")
    if len(seeds) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; pass one seed per prompt")
    if objects is not None and len(objects) != len(prompts):
        raise ValueError(f"objects has {len(objects)} entries for {len(prompts)} prompts; pass one list per prompt")
    if config.guidance_scale < 0 or config.temperature < 0:
        raise ValueError(f"guidance_scale={config.guidance_scale} and temperature={config.temperature} must be >= 0 "
                         "(temperature 0 is greedy)")
    if bundle.model.generation_config.pad_token_id is None and bundle.tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; Janus's unconditional rows need one (set pad_token)")


class _Decoder:
    """The decode step over one static cache: embed the last tokens, run the language model for one position,
    apply the generation head, guidance and sampling. All tensors keep their shapes, so it can be graphed."""

    def __init__(self, model, cache: StaticCache, sampling: _Sampling):
        self.model, self.cache, self.sampling = model, cache, sampling

    def logits(self, embeds: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """embeds (2B, T, H), position_ids (2B, T), mask (2B, L) -> guided float32 logits (B, V), last position."""
        out = self.model.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                                              past_key_values=self.cache, use_cache=True)
        scores = self.model.model.generation_head(out.last_hidden_state[:, -1, :]).float()  # (2B, V)
        cond, uncond = scores.chunk(2)
        return self.sampling.guidance_scale * (cond - uncond) + uncond  # (B, V), as Janus / transformers' CFG

    def step(self, tokens: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor, seeds: torch.Tensor,
             step: torch.Tensor) -> torch.Tensor:
        """tokens (B,) last image tokens; position_ids (2B, 1); mask (2B, L); step 0-d int64 -> next tokens (B,)."""
        embeds = self.model.prepare_embeddings_for_image_generation(tokens.repeat(2)[:, None])  # (2B, 1, H)
        return self.sample(self.logits(embeds, position_ids, mask), seeds, step)

    def sample(self, logits: torch.Tensor, seeds: torch.Tensor, step: torch.Tensor | int) -> torch.Tensor:
        s = self.sampling
        return sample_next(logits, seeds, step, s.temperature, s.top_k, s.top_p)


class _CompiledDecoders:
    """Compiled decoders with their static caches, kept across calls: CUDA graphs replay only when the cache
    tensors keep their addresses, so a (model, rows, cache length, sampling) shape reuses one cache (reset)."""

    def __init__(self, limit: int = 4):
        self.limit = limit
        self._pool: dict[tuple, tuple[_Decoder, object]] = {}

    def get(self, model, rows: int, cache_len: int, sampling: _Sampling):
        key = (id(model), rows, cache_len, sampling)
        if key in self._pool:
            decoder, step_fn = self._pool[key]
            decoder.cache.reset()
            return decoder, step_fn
        if len(self._pool) >= self.limit:
            self._pool.pop(next(iter(self._pool)))
        decoder = _Decoder(model, StaticCache(config=model.config.text_config, max_cache_len=cache_len), sampling)
        step_fn = torch.compile(decoder.step, mode="reduce-overhead", dynamic=False)
        self._pool[key] = (decoder, step_fn)
        return decoder, step_fn


_COMPILED = _CompiledDecoders()


def _pad_to_multiple(input_ids: torch.Tensor, mask: torch.Tensor, multiple: int, pad_id: int):
    """Left-pad (B, T) to a multiple of ``multiple`` columns (fewer distinct cache shapes to compile)."""
    extra = -input_ids.shape[1] % multiple
    if extra == 0:
        return input_ids, mask
    return (torch.nn.functional.pad(input_ids, (extra, 0), value=pad_id),
            torch.nn.functional.pad(mask, (extra, 0), value=0))


@torch.no_grad()
def generate_images(bundle, prompts: list[str], seeds: list[int], config: ImageConfig,
                    objects: list[list[str]] | None = None, mask_layers: list[int] | None = None) -> ImageBatch:
    """Generate one image per (prompt, seed) with classifier-free guidance, ``config.batch_size`` at a time.

    prompts: B texts; seeds: B ints (the image depends only on prompt, seed and settings); config: guidance
    scale, temperature (0: greedy), top_k (0: off), top_p (1.0: off), compile (CUDA graphs on CUDA; not while
    capturing maps). objects: per prompt, the object words whose attention maps to capture (layers
    ``mask_layers``, default ``select_layers(num_layers)``: all but the first and last 5).
    Returns ImageBatch(tokens (B, N), pixels (B, H, W, 3) uint8, object_maps (B, O, G, G) or None; O is the
    longest object list, shorter lists padded with zero maps).
    """
    _check_args(bundle, prompts, seeds, config, objects)
    if config.batch_size < 1:
        raise ValueError(f"images.batch_size={config.batch_size} must be >= 1")
    parts = []
    for start in range(0, len(prompts), config.batch_size):
        end = start + config.batch_size
        parts.append(_generate_batch(bundle, prompts[start:end], seeds[start:end], config,
                                     None if objects is None else objects[start:end], mask_layers))
    if len(parts) == 1:
        return parts[0]
    maps = None
    if objects is not None:
        width = max(p.object_maps.shape[1] for p in parts)
        maps = torch.cat([torch.nn.functional.pad(p.object_maps, (0, 0, 0, 0, 0, width - p.object_maps.shape[1]))
                          for p in parts])
    return ImageBatch(tokens=torch.cat([p.tokens for p in parts]), pixels=torch.cat([p.pixels for p in parts]),
                      object_maps=maps)


def _generate_batch(bundle, prompts: list[str], seeds: list[int], config: ImageConfig,
                    objects: list[list[str]] | None, mask_layers: list[int] | None) -> ImageBatch:
    """One batch of ``generate_images``: prefill 2B rows, decode N tokens (+1 capture step), VQ-decode."""
    model, tokenizer = bundle.model, bundle.tokenizer
    device = bundle.device
    gen_config = model.generation_config
    pad_id = gen_config.pad_token_id if gen_config.pad_token_id is not None else tokenizer.pad_token_id
    bos_id = gen_config.bos_token_id if gen_config.bos_token_id is not None else tokenizer.bos_token_id
    boi_id = tokenizer.convert_tokens_to_ids(bundle.processor.image_start_token)
    num_tokens = bundle.num_image_tokens
    compiled = config.compile and device.type == "cuda" and objects is None

    input_ids, mask = image_prompt_inputs(bundle, prompts)
    if compiled:
        input_ids, mask = _pad_to_multiple(input_ids, mask, 64, pad_id)
    batch, prompt_len = input_ids.shape
    ids2 = torch.cat([input_ids, unconditional_ids(input_ids, bos_id, boi_id, pad_id)]).to(device)  # (2B, T)
    mask2 = mask.repeat(2, 1).to(device)  # (2B, T)
    capture = _make_capture(bundle, input_ids, objects, mask_layers) if objects is not None else None
    cache_len = prompt_len + num_tokens + (1 if capture is not None else 0)
    full_mask = torch.cat([mask2, mask2.new_ones(2 * batch, cache_len - prompt_len)], dim=1)  # (2B, L)
    sampling = _Sampling(config.guidance_scale, config.temperature, config.top_k, config.top_p)
    if compiled:
        decoder, step_fn = _COMPILED.get(model, 2 * batch, cache_len, sampling)
    else:
        decoder = _Decoder(model, StaticCache(config=model.config.text_config, max_cache_len=cache_len), sampling)
        step_fn = decoder.step
    seeds_t = torch.as_tensor(seeds, dtype=torch.int64, device=device)
    positions = position_ids_from_mask(mask2)  # (2B, T)
    next_pos = positions[:, -1:] + 1  # (2B, 1)
    tokens = torch.empty(batch, num_tokens, dtype=torch.int64, device=device)

    with capture.recording(model) if capture is not None else contextlib.nullcontext():
        _set_cells(capture, -prompt_len)
        embeds = model.get_input_embeddings()(ids2)  # (2B, T, H)
        tokens[:, 0] = decoder.sample(decoder.logits(embeds, positions, full_mask), seeds_t, 0)
        for i in range(1, num_tokens):
            _set_cells(capture, i - 1)
            step = torch.tensor(i, dtype=torch.int64, device=device)
            tokens[:, i] = step_fn(tokens[:, i - 1].clone(), next_pos + (i - 1), full_mask, seeds_t, step)
        if capture is not None:  # one more query: the one whose input is the last image token
            _set_cells(capture, num_tokens - 1)
            embeds = model.prepare_embeddings_for_image_generation(tokens[:, -1].repeat(2)[:, None])
            model.model.language_model(inputs_embeds=embeds, attention_mask=full_mask,
                                       position_ids=next_pos + num_tokens - 1, past_key_values=decoder.cache,
                                       use_cache=True)

    object_maps = None
    if capture is not None:
        grid = bundle.grid
        object_maps = capture.maps().reshape(batch, -1, grid, grid).cpu()  # (B, O, G, G)
    pixels = decode_pixels(bundle, tokens, config.batch_size)
    return ImageBatch(tokens=tokens.cpu(), pixels=pixels, object_maps=object_maps)


def _make_capture(bundle, input_ids: torch.Tensor, objects: list[list[str]], mask_layers: list[int] | None):
    from ospo_fast.engine.object_attention import ObjectAttentionCapture, object_token_positions

    if mask_layers is None:
        from ospo_fast.ops.object_masks import select_layers

        mask_layers = select_layers(bundle.num_layers)
    positions = object_token_positions(bundle.tokenizer, input_ids, objects).to(bundle.device)  # (B, O, S)
    return ObjectAttentionCapture(positions, list(mask_layers), bundle.num_image_tokens)


def _set_cells(capture, start: int) -> None:
    if capture is not None:
        capture.set_cells(start)
