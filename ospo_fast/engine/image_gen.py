"""Batched, KV-cached, classifier-free-guided Janus image generation over transformers' own Janus model.

One preallocated ``StaticCache`` holds 2R rows: R conditional rows, then R unconditional rows built as Janus builds
them (BOS and ``<begin_of_image>`` kept, every other prompt token replaced by the pad token, same attention mask).
Prompts of different lengths are left-padded; pads are masked out and position ids count real tokens only, so a
row computes what it would compute alone. Each row samples with its own counter-based noise
(``engine.sampling``), so an image depends only on (prompt, seed, settings). Temperature 0 is greedy decoding.
Where that holds: float32 on the CPU, MHA and GQA models alike, is tested bit for bit (a prompt's tokens are the
same in a batch of 4, alone, and in another order). It does not hold in bfloat16/float16: a reduction over another
batch size rounds differently, and with GQA greedy tokens moved (109 of 256 between batch 4 and 1 on a 13-layer
model); nor is it guaranteed on CUDA, where matmul kernels (and TF32, if enabled) may differ with the batch size.

The prompt is prefilled eagerly; then every decode step (language model for one token, generation head,
guidance, sampling, next-token embedding, and with ``objects`` the attention capture) is one fixed-shape function
of device tensors: the step counter lives on the device and is advanced inside the step, the sampled token is
written into a preallocated (R, N + 1) buffer, so the Python loop passes nothing per token. With
``images.compile`` ("auto": CUDA only; true: every device; false: never) that step is compiled once with
``torch.compile(fullgraph=True)`` (CUDA graphs, ``mode="reduce-overhead"``, on CUDA; plain inductor on CPU),
following gpt-fast: every batch of a call has the same rows (``images.batch_size`` when compiled, else
min(batch_size, prompts); the ragged last batch is padded with copies of its last prompt, dropped afterwards),
prompts are left-padded to a multiple of ``PROMPT_BUCKET`` tokens (the longest of the call), object lists to
multiples of ``OBJECT_BUCKET``. One call therefore compiles one graph per mask context, a process at most one per
(rows, prompt bucket, object bucket, sampling); a graph break or a recompile inside a batch raises instead of
running eagerly. Eager and compiled runs share this layout, so on the CPU they give the same tokens bit for bit.

With ``objects``, the attention that each image-token query of the conditional rows pays to the object words is
captured during these same decode steps (``engine.object_attention``); cell j is the query whose input is image
token j, so one extra step runs after the last token (its draw is discarded).

Jacobi decoding (``images.decoding: jacobi``, window W): token i is argmax(logits_i / T + Gumbel(seed, i)), a pure
function of its prefix, so iterating on a window of guesses converges to exactly the tokens sequential decoding
draws. Each row keeps ``accepted[r]`` exact tokens; one iteration feeds every row the W + 1 tokens from index
s = min(accepted) - 1 (exact in every row) on, both CFG rows the same tokens, writes their KV at cache slots
prompt_len + s.., and re-samples every position with its own noise. A row's new exact prefix runs up to the first
fed token that is neither already accepted nor equal to the token just sampled for its index; the sample after it
is exact too (its prefix was), so every row gains at least one token per forward. Samples past the exact prefix
are the next iteration's drafts (plain Jacobi: no draft model); already-accepted tokens are never rewritten, and a
re-sample that differs from one (a near-tie the multi-token forward rounds the other way) is counted in
``ImageBatch.near_tie_flips``, never hidden. The KV of rejected drafts is overwritten by the next iteration, which
starts at or before them. A finished row keeps its slot until the batch ends; the batch takes as many forwards as
its slowest row (``ImageBatch.forward_passes``). One fixed shape per W, so it compiles once; the stop check is one
host read per iteration. With the in-flight capture (``masks.context=generation``) every forward's object
attention is staged, and a row keeps cell j from the first forward in which tokens 0..j were all exact (the queries
fed tokens s..reach-2); a batch then runs until every row has every cell, at most one forward more than its tokens
need (the query fed the last image token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from transformers import StaticCache

from ospo_fast.config import ImageConfig
from ospo_fast.engine.attention import DecodeSlots, engine_attention_on
from ospo_fast.engine.prompts import image_prompt_inputs, position_ids_from_mask
from ospo_fast.engine.sampling import entry_keys, sample_next

PROMPT_BUCKET = 64  # prompts are left-padded to a multiple of this many tokens
OBJECT_BUCKET = 4  # objects per prompt and sub-tokens per object are padded to multiples of this
MAX_GRAPHS = 32  # compiled: graphs of the decode step per process before it refuses to compile another


@dataclass
class ImageBatch:
    """Generated images. tokens: (B, N) int64 VQ codes in raster order; pixels: (B, H, W, 3) uint8;
    object_maps: (B, O, G, G) float32 mean attention of image-token queries to each object's words, or None;
    object_scores: the capture's accumulators behind them (``CapturedScores``, sums (B, O, S, G, G)) for the fused
    mask op ``object_masks_from_scores``, or None."""

    tokens: torch.Tensor
    pixels: torch.Tensor
    object_maps: torch.Tensor | None = None
    object_scores: object | None = None  # ospo_fast.ops.object_masks.CapturedScores
    forward_passes: int = 0  # language-model forwards after the prefills, summed over batches
    near_tie_flips: int = 0  # Jacobi: accepted tokens whose re-sample in a later forward came out different


@dataclass(frozen=True)
class _Sampling:
    guidance_scale: float
    temperature: float
    top_k: int
    top_p: float


@dataclass(frozen=True)
class _Shape:
    """Everything the decode step's graph depends on. objects/subtokens 0: no capture."""

    rows: int
    prompt_len: int
    num_tokens: int
    sampling: _Sampling
    objects: int = 0
    subtokens: int = 0
    layers: tuple[int, ...] = ()
    attention: str = "auto"  # the decode attention's backend; "full": SDPA over the whole static cache
    window: int = 0  # Jacobi decoding's draft tokens per forward; 0: sequential
    heads: tuple[tuple[int, tuple[int, ...]], ...] = ()  # the capture's (layer, heads) pairs; (): every head


def unconditional_ids(input_ids: torch.Tensor, bos_id: int, boi_id: int, pad_id: int) -> torch.Tensor:
    """Janus's unconditional prompt: every token other than BOS and ``<begin_of_image>`` becomes pad. (B, T)."""
    keep = (input_ids == bos_id) | (input_ids == boi_id)
    return input_ids.masked_fill(~keep, pad_id)


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


def compile_enabled(setting: bool | str, device: torch.device) -> bool:
    """``images.compile``: "auto" compiles the decode step on CUDA only, True on every device, False never."""
    if setting not in ("auto", True, False):
        raise ValueError(f"images.compile={setting!r} must be 'auto', true or false")
    return device.type == "cuda" if setting == "auto" else bool(setting)


def compile_mode(device_type: str) -> str | None:
    """torch.compile mode per device: CUDA graphs on CUDA; inductor's default elsewhere (CPU has no graphs)."""
    return "reduce-overhead" if device_type == "cuda" else None


def _decode_step(decoder: _Decoder) -> None:
    if decoder.shape.window:
        decoder.jacobi_step()
    else:
        decoder.step()


_COMPILED_STEPS: dict[str, Callable[[_Decoder], None]] = {}


def compiled_step(device_type: str) -> Callable[[_Decoder], None]:
    """The one compiled decode step per device type (``fullgraph=True``: a graph break raises)."""
    if device_type not in _COMPILED_STEPS:
        _COMPILED_STEPS[device_type] = torch.compile(_decode_step, fullgraph=True, dynamic=False,
                                                     mode=compile_mode(device_type))
    return _COMPILED_STEPS[device_type]


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
    if config.batch_size < 1:
        raise ValueError(f"images.batch_size={config.batch_size} must be >= 1")
    if bundle.model.generation_config.pad_token_id is None and bundle.tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; Janus's unconditional rows need one (set pad_token)")


class _Decoder:
    """Decode state of one shape: a static cache of 2R rows and prompt_len + N + 1 slots, and device tensors
    tokens (R, N + 1), index (0-d: the image token the next step feeds), first_position (2R, 1), seeds (R,),
    mask (2R, L), keys (V,) (the sampler's per-entry hash, an input so the compiled step builds none), plus an
    object-attention capture whose cells follow ``index``. All keep their addresses (marked static for CUDA graphs)
    and shapes across batches, so the step compiles once and replays."""

    def __init__(self, model, shape: _Shape, device: torch.device):
        self.model, self.shape = model, shape
        r, cache_len = shape.rows, shape.prompt_len + shape.num_tokens + 1 + shape.window
        self.cache = StaticCache(config=model.config.text_config, max_cache_len=cache_len)
        # cols N..: the discarded draw (sequential) or the window's overhang past the image (Jacobi)
        self.tokens = torch.zeros(r, shape.num_tokens + 1 + shape.window, dtype=torch.int64, device=device)
        self.accepted = torch.ones(r, dtype=torch.int64, device=device)  # Jacobi: exact tokens per row
        self.committed = torch.zeros(r, dtype=torch.int64, device=device)  # Jacobi + capture: cells kept per row
        self.window_start = torch.zeros((), dtype=torch.int64, device=device)  # Jacobi: token index fed first
        self.flips = torch.zeros((), dtype=torch.int64, device=device)  # Jacobi: see ImageBatch.near_tie_flips
        self.offsets = torch.arange(shape.window + 1, device=device)  # Jacobi: the window's positions
        self.index = torch.zeros((), dtype=torch.int64, device=device)
        self.first_position = torch.zeros(2 * r, 1, dtype=torch.int64, device=device)
        self.seeds = torch.zeros(r, dtype=torch.int64, device=device)
        self.mask = torch.ones(2 * r, cache_len, dtype=torch.int64, device=device)  # (2R, L)
        self.keys = entry_keys(model.model.generation_head.vision_head.out_features, device)  # (V,)
        self.slots = None  # row b's real keys: cache slots [start[b], end[b]), end advanced by the step
        if shape.attention != "full":
            self.slots = DecodeSlots(start=torch.zeros(2 * r, dtype=torch.int32, device=device),
                                     end=torch.zeros(2 * r, dtype=torch.int32, device=device),
                                     backend=shape.attention)
        self.capture = None
        if shape.objects:
            from ospo_fast.engine.object_attention import ObjectAttentionCapture

            positions = torch.full((r, shape.objects, shape.subtokens), -1, dtype=torch.int64, device=device)
            self.capture = ObjectAttentionCapture(positions, list(shape.layers), shape.num_tokens,
                                                  heads=dict(shape.heads) if shape.heads else None)
            if shape.window:  # the queries fed tokens s.. are cells s..; kept once exact (``jacobi_step``)
                self.capture.stage_window(shape.window + 1)
                self.capture.set_cells(self.window_start)
            else:
                self.capture.set_cells(self.index)  # the query fed image token `index` is cell `index`
        for t in [self.tokens, self.index, self.first_position, self.seeds, self.mask, self.keys, self.accepted,
                  self.committed, self.window_start, self.flips, self.offsets] + (
                self.capture.tensors() if self.capture is not None else []) + (
                [self.slots.start, self.slots.end] if self.slots is not None else []):
            torch._dynamo.mark_static_address(t)

    def start(self, ids2: torch.Tensor, mask2: torch.Tensor, seeds: torch.Tensor,
              key_positions: torch.Tensor | None) -> None:
        """Prefill (eager) one batch: ids2 and mask2 (2R, T) on the device, seeds (R,), key_positions (R, O, S)
        or None; samples token 0 and points ``index`` at it."""
        if bool((mask2[:, 1:] < mask2[:, :-1]).any()):
            raise ValueError("prompt masks must be left-padded (zeros only before the first real token)")
        self.cache.reset()
        self.mask[:, :ids2.shape[1]].copy_(mask2)
        self.seeds.copy_(seeds)
        if self.slots is not None:
            self.slots.start.copy_((mask2 == 0).sum(dim=1))  # (2R,) left padding
        if self.capture is not None:
            self.capture.load(key_positions)
        positions = position_ids_from_mask(mask2)  # (2R, T)
        embeds = self.model.get_input_embeddings()(ids2)  # (2R, T, H); its queries are text: no capture
        self.tokens[:, 0] = self.sample(self.logits(embeds, positions, None), 0)
        self.first_position.copy_(positions[:, -1:] + 1)
        self.index.zero_()
        self.tokens[:, 1:].zero_()  # Jacobi's first drafts (any guess is exact; zeros keep runs reproducible)
        self.accepted.fill_(1)
        self.committed.zero_()
        self.flips.zero_()

    def logits(self, embeds: torch.Tensor, position_ids: torch.Tensor, capture,
               slots: DecodeSlots | None = None, cache_position: torch.Tensor | None = None,
               last_only: bool = True) -> torch.Tensor:
        """embeds (2R, T, H), position_ids (2R, T) -> guided float32 logits (R, V) at the last position, or (R, T, V)
        at every position with ``last_only=False``. slots: a decode step's filled cache slots (the decode attention
        reads only those), None otherwise; cache_position (T,): the cache slots written (default: after the last
        written one)."""
        extra = {} if capture is None else {"object_capture": capture}
        if slots is not None:
            extra["decode_slots"] = slots
        if cache_position is not None:
            extra["cache_position"] = cache_position
        out = self.model.model.language_model(inputs_embeds=embeds, attention_mask=self.mask,
                                              position_ids=position_ids, past_key_values=self.cache, use_cache=True,
                                              **extra)
        hidden = out.last_hidden_state[:, -1, :] if last_only else out.last_hidden_state
        scores = self.model.model.generation_head(hidden).float()  # (2R, V) or (2R, T, V)
        cond, uncond = scores.chunk(2)
        return self.shape.sampling.guidance_scale * (cond - uncond) + uncond  # (R, V), as Janus's CFG

    def sample(self, logits: torch.Tensor, step: torch.Tensor | int) -> torch.Tensor:
        s = self.shape.sampling
        return sample_next(logits, self.seeds, step, s.temperature, s.top_k, s.top_p, self.keys)

    def step(self) -> None:
        """Feed image token ``index`` of every row, write token ``index + 1``, advance ``index``: device-only."""
        index = self.index.view(1)
        last = self.tokens.index_select(1, index)  # (R, 1)
        embeds = self.model.prepare_embeddings_for_image_generation(last.repeat(2, 1))  # (2R, 1, H)
        if self.slots is not None:  # this step writes cache slot prompt_len + index
            self.slots.end.copy_((self.index + (self.shape.prompt_len + 1)).expand(self.slots.end.shape))
        logits = self.logits(embeds, self.first_position + self.index, self.capture, self.slots)  # (R, V)
        self.tokens.index_copy_(1, index + 1, self.sample(logits, self.index + 1)[:, None])
        self.index.add_(1)

    def jacobi_step(self) -> None:
        """One Jacobi iteration (module docstring): feed tokens s..s+W of every row, s = min(accepted) - 1,
        re-sample tokens s+1..s+W+1, extend each row's exact prefix: device-only."""
        start = self.accepted.min() - 1  # 0-d: token s is exact in every row
        self.window_start.copy_(start)  # the capture's cells of this forward
        fed = start + self.offsets  # (W+1,) token indices fed
        inputs = self.tokens.index_select(1, fed)  # (R, W+1)
        embeds = self.model.prepare_embeddings_for_image_generation(inputs.repeat(2, 1))  # (2R, W+1, H)
        for layer in self.cache.layers:  # rewind: this forward writes cache slots prompt_len + s ..
            layer.cumulative_length.copy_(self.shape.prompt_len + start)
        logits = self.logits(embeds, self.first_position + fed, self.capture,
                             cache_position=self.shape.prompt_len + fed,
                             last_only=False)  # (R, W+1, V): position j predicts token s + 1 + j
        samples = torch.stack([self.sample(logits[:, j], fed[j] + 1) for j in range(self.shape.window + 1)],
                              dim=1)  # (R, W+1): tokens s+1..s+W+1, each with its own noise
        known = fed[None, 1:] < self.accepted[:, None]  # (R, W): fed tokens s+1.. already accepted
        exact = (known | (inputs[:, 1:] == samples[:, :-1])).long().cumprod(dim=1)  # leading exact fed tokens
        reach = start + 2 + exact.sum(dim=1)  # (R,): tokens 0..reach-1 are exact now
        if self.capture is not None:  # the queries fed tokens s..reach-2 saw exact inputs only: keep each once
            keep = (fed[None, :] < reach[:, None] - 1) & (fed[None, :] >= self.committed[:, None])  # (R, W+1)
            self.capture.commit_stage(fed, keep)
            self.committed.copy_(torch.maximum(self.committed, (reach - 1).clamp(max=self.shape.num_tokens)))
        written = fed + 1  # (W+1,) indices of the samples
        current = self.tokens.index_select(1, written)  # (R, W+1)
        keep = written[None, :] < self.accepted[:, None]  # never rewrite an accepted token
        self.flips.add_((keep & (current != samples)).sum())
        self.tokens.index_copy_(1, written, torch.where(keep, current, samples))
        self.accepted.copy_(torch.maximum(self.accepted, reach.clamp(max=self.shape.num_tokens)))


class _DecoderPool:
    """Decoders kept across calls: CUDA graphs replay only while the state tensors keep their addresses,
    so a (model, shape, device) reuses its decoder. Each holds a whole KV cache (Janus-Pro-7B, 16 images of a
    256-token bucket: about 13 GB in bf16), and ``images.batch_size: auto`` plans memory for one; so the pool keeps
    ``limit`` (1) decoders and drops the others *before* it builds a new one, so two caches are never alive at
    once. A shape met again after another costs a new cache and a CUDA-graph re-recording, not a recompilation."""

    def __init__(self, limit: int = 1):
        self.limit = limit
        self._pool: dict[tuple, _Decoder] = {}

    def get(self, model, shape: _Shape, device: torch.device) -> _Decoder:
        key = (id(model), shape, str(device))
        decoder = self._pool.pop(key, None)
        if decoder is not None and decoder.model is not model:
            decoder = None
        while len(self._pool) >= self.limit:  # free before allocating
            self._pool.pop(next(iter(self._pool)))
        if decoder is None:
            decoder = _Decoder(model, shape, device)
        self._pool[key] = decoder
        return decoder

    def clear(self) -> None:
        """Drop every decoder (and its cache)."""
        self._pool.clear()


_POOL = _DecoderPool()


def release_decoders() -> None:
    """Free the cached decoders (their KV caches and the CUDA graphs' static inputs), e.g. before building another
    model in the same process."""
    _POOL.clear()


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _left_pad(x: torch.Tensor, width: int, value: int) -> torch.Tensor:
    """(B, T) -> (B, width), padded on the left with ``value``."""
    return torch.nn.functional.pad(x, (width - x.shape[1], 0), value=value)


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """(b, ...) -> (rows, ...) by repeating the last row (dummy rows of a ragged last batch)."""
    if x.shape[0] == rows:
        return x
    return torch.cat([x, x[-1:].expand(rows - x.shape[0], *x.shape[1:])])


def batch_for_bucket(batch: int, planned_prompt: int, bucket: int, num_tokens: int) -> int:
    """Images per batch whose static cache (2 rows x (bucket + N + 1) slots each) fits the slots planned for
    ``batch`` images at ``planned_prompt`` prompt tokens; at least 1, at most ``batch``."""
    planned = batch * (planned_prompt + num_tokens + 1)
    return max(1, min(batch, planned // (bucket + num_tokens + 1)))


def special_ids(bundle) -> tuple[int, int, int]:
    """(pad, bos, <begin_of_image>) token ids; pad and bos from the generation config where set."""
    gen_config, tokenizer = bundle.model.generation_config, bundle.tokenizer
    pad_id = gen_config.pad_token_id if gen_config.pad_token_id is not None else tokenizer.pad_token_id
    bos_id = gen_config.bos_token_id if gen_config.bos_token_id is not None else tokenizer.bos_token_id
    return pad_id, bos_id, tokenizer.convert_tokens_to_ids(bundle.processor.image_start_token)


def _tokenise(bundle, prompts: list[str], objects: list[list[str]] | None):
    """All prompts of a call, left-padded together to a multiple of PROMPT_BUCKET: ids, mask (P, T); object key
    positions (P, O, S) with O and S padded to multiples of OBJECT_BUCKET, or None."""
    ids, mask = image_prompt_inputs(bundle.processor, prompts)
    width = _round_up(ids.shape[1], PROMPT_BUCKET)
    ids, mask = _left_pad(ids, width, special_ids(bundle)[0]), _left_pad(mask, width, 0)
    if objects is None:
        return ids, mask, None
    from ospo_fast.engine.object_attention import object_token_positions

    positions = object_token_positions(bundle.tokenizer, ids, objects)  # (P, O, S)
    o, s = (_round_up(n, OBJECT_BUCKET) for n in positions.shape[1:])
    return ids, mask, torch.nn.functional.pad(positions, (0, s - positions.shape[2], 0, o - positions.shape[1]),
                                              value=-1)


@torch.no_grad()
def generate_images(bundle, prompts: list[str], seeds: list[int], config: ImageConfig,
                    objects: list[list[str]] | None = None, mask_layers: list[int] | None = None,
                    attention: str = "auto", mask_heads: dict[int, tuple[int, ...]] | None = None,
                    planned_prompt_tokens: int | None = None) -> ImageBatch:
    """Generate one image per (prompt, seed) with classifier-free guidance, ``config.batch_size`` at a time.

    prompts: B texts; seeds: B ints (the image depends only on prompt, seed and settings, in float32 on the CPU:
    see the module docstring); config: guidance scale, temperature (0: greedy), top_k (0: off), top_p (1.0: off),
    compile ("auto" | true | false, see the module docstring). objects: per prompt, the object words whose
    attention maps to capture (layers ``mask_layers``, default ``select_layers(num_layers)``: all but the first
    and last k = min(5, (L - 1) // 2) of the L layers, e.g. layers 5..24 of 30, 4 and 5 of 10, all of 1 or 2).
    mask_heads: {layer: head indices} to average instead of every head of ``mask_layers`` (localisation heads).
    planned_prompt_tokens: the prompt length ``config.batch_size`` was planned for (``images.batch_size: auto``,
    ``ospo_fast.plan``): a longer prompt bucket gets fewer images per batch, so the KV cache stays within the
    planned slots (``batch_for_bucket``); None: ``config.batch_size`` as it is.
    attention: the decode steps' attention, ``ospo_fast.ops.decode_attention`` over each row's filled cache slots
    with this backend ("auto", "ref", "sdpa", "triton"), or "full" (SDPA over the whole static cache, masked: the
    engine before issue 33, kept as the baseline of benchmarks/bench_decode_attention.py).
    Returns ImageBatch(tokens (B, N), pixels (B, H, W, 3) uint8, object_maps (B, O, G, G) or None; O is the
    longest object list, shorter lists padded with zero maps).
    """
    _check_args(bundle, prompts, seeds, config, objects)
    device, model = bundle.device, bundle.model
    compiled = compile_enabled(config.compile, device)
    ids, mask, key_positions = _tokenise(bundle, prompts, objects)
    layers: tuple[int, ...] = ()
    if objects is not None:
        from ospo_fast.ops.object_masks import select_layers

        layers = tuple(sorted(set(mask_layers if mask_layers is not None else select_layers(bundle.num_layers))))
        if mask_heads:
            layers = tuple(sorted(mask_heads))
    sampling = _Sampling(config.guidance_scale, config.temperature, config.top_k, config.top_p)
    captured = (0, 0) if key_positions is None else tuple(key_positions.shape[1:])
    # fixed rows per call, the ragged last batch padded; compiled: the same rows for every call
    per_batch = config.batch_size if planned_prompt_tokens is None else batch_for_bucket(
        config.batch_size, planned_prompt_tokens, ids.shape[1], bundle.num_image_tokens)
    rows = per_batch if compiled else min(per_batch, len(prompts))
    window = config.jacobi_window if config.decoding == "jacobi" else 0
    heads = tuple((layer, tuple(sorted(mask_heads[layer]))) for layer in sorted(mask_heads or {}))
    decoder = _POOL.get(model, _Shape(rows, ids.shape[1], bundle.num_image_tokens, sampling, *captured, layers,
                                      attention, window, heads), device)
    tokens, maps, passes, flips = [], [], 0, 0
    with engine_attention_on(model):
        for start in range(0, len(prompts), per_batch):
            end = min(start + per_batch, len(prompts))
            batch_tokens, batch_maps, batch_passes = _decode_batch(
                bundle, decoder, ids[start:end], mask[start:end], seeds[start:end],
                None if key_positions is None else key_positions[start:end], compiled)
            tokens.append(batch_tokens)
            maps.append(batch_maps)
            passes += batch_passes
            flips += int(decoder.flips)
    tokens = torch.cat(tokens)
    object_maps = object_scores = None
    if objects is not None:
        from ospo_fast.ops.object_masks import CapturedScores, maps_from_scores_ref

        width = max(1, max(len(words) for words in objects))  # drop the bucket's padding objects
        object_scores = CapturedScores(sums=torch.cat([m.sums for m in maps])[:, :width],
                                       counts=torch.cat([m.counts for m in maps]), heads=maps[0].heads,
                                       token_valid=torch.cat([m.token_valid for m in maps])[:, :width])
        object_maps = maps_from_scores_ref(object_scores, object_scores.token_valid.any(-1)).float()  # (B, O, G, G)
    pixels = decode_pixels(bundle, tokens, config.batch_size)
    return ImageBatch(tokens=tokens, pixels=pixels, object_maps=object_maps, object_scores=object_scores,
                      forward_passes=passes, near_tie_flips=flips)


def _decode_batch(bundle, decoder: _Decoder, ids: torch.Tensor, mask: torch.Tensor, seeds: list[int],
                  key_positions: torch.Tensor | None, compiled: bool):
    """One batch: ids/mask (b, T) with b <= rows, padded to the decoder's rows; prefill, then N - 1 decode steps
    (+1 capture step) or Jacobi iterations until every row has N exact tokens. Returns tokens (b, N) int64, the
    capture's CapturedScores (b rows, copies) or None, on CPU, and the forwards after the prefill."""
    device, rows, num_tokens = bundle.device, decoder.shape.rows, decoder.shape.num_tokens
    n = ids.shape[0]
    pad_id, bos_id, boi_id = special_ids(bundle)
    ids, mask = _pad_rows(ids, rows), _pad_rows(mask, rows)
    ids2 = torch.cat([ids, unconditional_ids(ids, bos_id, boi_id, pad_id)]).to(device)  # (2R, T)
    mask2 = mask.repeat(2, 1).to(device)  # (2R, T)
    seeds_t = _pad_rows(torch.as_tensor(seeds, dtype=torch.int64), rows).to(device)  # (R,)
    capture = decoder.capture
    if capture is None:
        decoder.start(ids2, mask2, seeds_t, None)
        if decoder.shape.window:
            iterations = _run_jacobi(decoder, compiled)
            return _detach_tokens(decoder, n), None, iterations
        _run_steps(decoder, num_tokens - 1, compiled)
        return _detach_tokens(decoder, n), None, num_tokens - 1
    with capture.recording(bundle.model):
        decoder.start(ids2, mask2, seeds_t, _pad_rows(key_positions, rows))
        if decoder.shape.window:
            forwards = _run_jacobi(decoder, compiled)  # until every cell's query was exact once
            capture.finish_staged()
        else:
            _run_steps(decoder, num_tokens, compiled)  # one more query: the one whose input is the last image token
            forwards = num_tokens
    scores = capture.scores((bundle.grid, bundle.grid))  # views of buffers the next batch overwrites: copy
    return _detach_tokens(decoder, n), type(scores)(
        sums=scores.sums[:n].to("cpu", copy=True), counts=scores.counts[:n].to("cpu", copy=True),
        heads=scores.heads, token_valid=scores.token_valid[:n].to("cpu", copy=True)), forwards


def _detach_tokens(decoder: _Decoder, n: int) -> torch.Tensor:
    """(n, N) int64 on CPU, a copy: the decoder's buffer is overwritten by the next batch."""
    return decoder.tokens[:n, :decoder.shape.num_tokens].to("cpu", copy=True)


def _run_jacobi(decoder: _Decoder, compiled: bool) -> int:
    """Jacobi iterations until every row has all N tokens, and with a capture every cell's query (one host read
    per iteration); returns how many."""
    num_tokens, iterations = decoder.shape.num_tokens, 0
    progress = decoder.accepted if decoder.capture is None else decoder.committed  # committed <= accepted
    while int(progress.min()) < num_tokens:
        if iterations > num_tokens:  # each iteration gains >= 1 token (and cell) per row: cannot happen
            raise RuntimeError(f"Jacobi decoding made no progress after {iterations} iterations")
        _run_steps(decoder, 1, compiled, first=iterations == 0)
        iterations += 1
    return iterations


def _run_steps(decoder: _Decoder, steps: int, compiled: bool, first: bool = True) -> None:
    """``steps`` decode steps. Compiled: the first may compile (a new shape); the rest must replay that graph, so
    a guard that fails mid-batch raises (torch.compiler stance ``fail_on_recompile``) instead of recompiling."""
    if not compiled:
        for _ in range(steps):
            _decode_step(decoder)
        return
    if steps < 1:
        return
    step_fn = compiled_step(decoder.index.device.type)
    try:
        with torch._dynamo.config.patch(recompile_limit=MAX_GRAPHS):
            if first:  # may compile (a new shape)
                step_fn(decoder)
                steps -= 1
            with torch.compiler.set_stance("fail_on_recompile"):
                for _ in range(steps):
                    step_fn(decoder)
    except torch._dynamo.exc.FailOnRecompileLimitHit as error:
        raise RuntimeError(f"the image decode step was compiled for {MAX_GRAPHS} shapes in this process (rows, "
                           "prompt bucket, objects, sampling); keep images.batch_size and the sampling settings "
                           "fixed, or set images.compile=false") from error
