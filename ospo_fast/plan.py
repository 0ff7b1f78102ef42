"""Cost model and memory planning: how much memory and time each stage of a run needs, from the model's config alone.

The model's parts are counted exactly by building ``JanusForConditionalGeneration(config)`` on the meta device (no
weights, no memory); FLOPs of the convolutional parts (VQ decoder, SigLIP tower) are counted on the meta device with
``torch.utils.flop_counter.FlopCounterMode``. Everything else is closed-form and stated next to its term:

- memory of a stage = weights + KV cache + the largest activation that is alive at once (``StageMemory``);
  KV cache of image generation = 2R rows x (prompt + N + 1) slots x layers x 2 (K, V) x kv_heads x head_dim x bytes,
  the ``StaticCache`` that ``engine.image_gen`` allocates (R images, CFG doubles the rows);
- ``auto_batch``: the largest batch whose memory fits ``budget x (1 - margin)``;
- time of a decode step = max(bytes read / bandwidth, FLOPs / peak) + per-step overhead (roofline); prefill,
  VQ decode, Self-VQA and training = FLOPs / (peak x efficiency) (``Device``);
- ``plan_run``: per stage the work (generations, tokens, FLOPs, bytes), the batch, memory per device and hours.
- ``synthesis_floor``: the memory-bandwidth floor of one image (CFG: 2 rows; the KV its attention reads, plus the
  weights once per step shared by the batch) at the device's full bandwidth; ``ospo-fast plan`` prints it.

Units: bytes, FLOPs, seconds. Nothing here queries a device at import time.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

GiB = 2 ** 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# Memory kept free when sizing batches from a budget: allocator fragmentation, CUDA context, transient copies.
MARGIN_FRACTION = 0.10
MAX_AUTO_BATCH = 1024  # auto never picks more rows than this (a decode step is compute bound long before)

# Lengths the plan assumes for prompts it has not seen (tokens). Stated in every printed plan.
IMAGE_PROMPT_TOKENS = 128  # a densified prompt in the chat template (stage 3)
BASE_PROMPT_TOKENS = 48  # a short base prompt in the chat template (mask pass, training)
TEXT_REQUEST_TOKENS = 384  # a few-shot request of stages 1-2 and 4
VQA_TEXT_TOKENS = 48  # system prompt + question around the image placeholders (stage 4)
QUESTIONS_PER_IMAGE = 4  # expected atomic questions per base prompt (questions.max_questions caps it)


# ------------------------------------------------------------------------------------------------ devices

@dataclass(frozen=True)
class Device:
    """One accelerator: memory (bytes), memory bandwidth (bytes/s), dense bf16 matmul peak (FLOP/s), the fractions
    of them that kernels reach (``*_efficiency``; ``conv_efficiency`` for the VQ decoder's convolutions), and the
    host cost of launching one op (s; ``op_overhead`` x ``HostOps`` is added to every piece; 0 on GPUs, where CUDA
    graphs replay the decode step and the host runs ahead of the device elsewhere)."""

    name: str
    memory: float
    bandwidth: float
    peak_flops: float
    source: str
    bandwidth_efficiency: float = 0.8
    matmul_efficiency: float = 0.5
    conv_efficiency: float = 0.5
    op_overhead: float = 0.0


# NVIDIA datasheets, SXM parts, dense (no sparsity) bf16 tensor-core peak:
# A100: "NVIDIA A100 Tensor Core GPU" datasheet (2021): 40 GB HBM2 at 1,555 GB/s, 80 GB HBM2e at 2,039 GB/s, 312 TFLOPS;
# H100: "NVIDIA H100 Tensor Core GPU" datasheet (2023): 80 GB HBM3 at 3.35 TB/s, 989 TFLOPS (1,979 is with sparsity);
# H200: "NVIDIA H200 Tensor Core GPU" product brief (2024): 141 GB HBM3e at 4.8 TB/s, 989 TFLOPS.
GPUS = {
    "a100-40gb": Device("A100 40GB SXM", 40e9, 1.555e12, 312e12, "NVIDIA A100 datasheet"),
    "a100-80gb": Device("A100 80GB SXM", 80e9, 2.039e12, 312e12, "NVIDIA A100 datasheet"),
    "h100": Device("H100 80GB SXM", 80e9, 3.35e12, 989e12, "NVIDIA H100 datasheet"),
    "h200": Device("H200 141GB SXM", 141e9, 4.8e12, 989e12, "NVIDIA H200 product brief"),
}


def gpu(name: str) -> Device:
    """The named GPU's constants; an unknown name is a ValueError listing the valid ones."""
    key = name.lower()
    if key not in GPUS:
        raise ValueError(f"unknown GPU {name!r}; choose one of {sorted(GPUS)}")
    return GPUS[key]


# ------------------------------------------------------------------------------------------------ model shape

@dataclass(frozen=True)
class ModelShape:
    """What the cost model needs of one Janus model: decoder sizes, image sizes and exact parameter counts per part
    (``params``: vision_model, aligner, vqmodel, generation_embeddings, generation_aligner, generation_head,
    language_model (embed_tokens included), embed_tokens, lm_head (also when tied to embed_tokens), total)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    image_tokens: int  # N = grid ** 2
    codebook: int
    image_size: int
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int
    params: dict = field(hash=False)
    vq_top_channels: int = 128  # VQ decoder channels at full resolution (base channels x first multiplier)
    vq_decode_flops: float = 0.0  # one image (B=1), counted on the meta device
    vq_decode_bytes: float = 0.0  # bytes its ops read and write (float32), counted on the meta device
    vision_flops: float = 0.0  # SigLIP tower + aligner for one image

    @property
    def total_params(self) -> int:
        """Every parameter once (what the weights occupy)."""
        return self.params["total"]

    @property
    def decoder_params(self) -> int:
        """Decoder layers + final norm: the weights every token's forward multiplies (embeddings excluded)."""
        return self.params["language_model"] - self.params["embed_tokens"]

    @property
    def image_step_params(self) -> int:
        """Weights one image-decode step reads: decoder, generation aligner, generation head."""
        return self.decoder_params + self.params["generation_aligner"] + self.params["generation_head"]

    @property
    def text_step_params(self) -> int:
        """Weights one text-decode step reads: decoder and the language-model head."""
        return self.decoder_params + self.params["lm_head"]

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token in every layer, in elements (multiply by dtype bytes)."""
        return self.layers * 2 * self.kv_heads * self.head_dim

    def lora_params(self, rank: int, targets: tuple[str, ...] | list[str]) -> int:
        """Adapter parameters: per layer and target, rank x (in + out)."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        dims = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
        return self.layers * sum(rank * sum(dims[t]) for t in targets)


def meta_model(config):
    """``JanusForConditionalGeneration(config)`` on the meta device: the real module tree, no storage."""
    from transformers import JanusForConditionalGeneration

    with torch.device("meta"):
        return JanusForConditionalGeneration(config)


def part_params(model) -> dict[str, int]:
    """Parameter counts per top-level part of a Janus model (meta or real)."""
    count = lambda module: sum(p.numel() for p in module.parameters())
    parts = {name: count(child) for name, child in model.model.named_children()}
    parts["embed_tokens"] = count(model.model.language_model.get_input_embeddings())
    parts["lm_head"] = count(model.lm_head)
    parts["total"] = count(model)  # unique parameters: a tied lm_head (tie_word_embeddings) counts once
    return parts


def _meta_traffic(fn) -> float:
    """Bytes every op inside ``fn`` reads and writes (its tensor inputs + outputs), run on meta tensors."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Traffic(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
            Traffic.total += sum(t.numel() * t.element_size() for t in tensors)
            return out

    with Traffic(), torch.no_grad():
        fn()
    return float(Traffic.total)


def _meta_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return float(counter.get_total_flops())


def model_shape(config, count_flops: bool = True) -> ModelShape:
    """The ``ModelShape`` of a ``JanusConfig``: parameter counts from a meta-device model, FLOPs of one image's
    VQ decode and vision encoding counted there too (``count_flops=False`` skips them: 0)."""
    text, vision = config.text_config, config.vision_config
    model = meta_model(config)
    vq_flops = vision_flops = vq_bytes = 0.0
    if count_flops:
        n, size = vision.num_image_tokens, vision.image_size
        decode = lambda: model.decode_image_tokens(torch.zeros(1, n, dtype=torch.long, device="meta"))
        vq_flops, vq_bytes = _meta_flops(decode), _meta_traffic(decode)
        vision_flops = _meta_flops(lambda: model.model.get_image_features(
            torch.zeros(1, 3, size, size, device="meta")))
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return ModelShape(
        hidden=text.hidden_size, intermediate=text.intermediate_size, layers=text.num_hidden_layers,
        heads=text.num_attention_heads, kv_heads=text.num_key_value_heads, head_dim=head_dim,
        vocab=text.vocab_size, image_tokens=vision.num_image_tokens, codebook=config.vq_config.num_embeddings,
        image_size=vision.image_size, vision_hidden=vision.hidden_size,
        vision_intermediate=vision.intermediate_size, vision_layers=vision.num_hidden_layers,
        vision_heads=vision.num_attention_heads, params=part_params(model),
        vq_top_channels=config.vq_config.base_channels * config.vq_config.channel_multiplier[0],
        vq_decode_flops=vq_flops, vq_decode_bytes=vq_bytes,
        vision_flops=vision_flops)


def kind_config(kind: str, grid: int = 8):
    """The ``JanusConfig`` that ``models.factory`` builds for ``kind`` (tiny, janus-pro-1b-shape, ...)."""
    from ospo_fast.models.factory import janus_config, sizes_for

    return janus_config(sizes_for(kind, grid), {"bos": 0, "eos": 1, "pad": 2, "image": 3})


def config_for_path(path: str):
    """The ``JanusConfig`` of ``model.path`` without loading weights: builtin:NAME from the factory's sizes, a hub
    id naming Janus-Pro-1B/7B from the published sizes (the factory's ``*-shape`` kinds), else config.json."""
    from pathlib import Path

    if path.startswith("builtin:"):
        name = path.split(":", 1)[1]
        if name.startswith("tiny-"):
            return kind_config("tiny", int(name.split("-", 1)[1]))
        if name != "toy":
            return kind_config(name)
    for size in ("1B", "7B"):
        if path.rstrip("/").endswith(f"Janus-Pro-{size}") and not (Path(path).expanduser() / "config.json").is_file():
            return kind_config(f"janus-pro-{size.lower()}-shape")
    from transformers import JanusConfig

    from ospo_fast.models.loader import resolve_model_path

    return JanusConfig.from_pretrained(resolve_model_path(path))


# ------------------------------------------------------------------------------------------------ memory

@dataclass(frozen=True)
class StageMemory:
    """Peak memory of one stage at one batch (bytes): weights + kv + the largest activation term + optimizer
    state (training). ``activations`` names each transient term; only the largest counts (they are not alive
    together)."""

    weights: float
    kv: float
    activations: dict
    optimizer: float = 0.0

    @property
    def peak_activation(self) -> float:
        return max(self.activations.values()) if self.activations else 0.0

    @property
    def total(self) -> float:
        return self.weights + self.kv + self.peak_activation + self.optimizer


def image_kv_bytes(shape: ModelShape, images: int, prompt_len: int, dtype_bytes: int) -> int:
    """The ``StaticCache`` of ``engine.image_gen`` for ``images`` images: 2R rows (CFG) x (prompt + N + 1) slots."""
    return 2 * images * (prompt_len + shape.image_tokens + 1) * shape.kv_bytes_per_token * dtype_bytes


def _layer_activation(shape: ModelShape, rows: int, tokens: int, dtype_bytes: int, scores: bool) -> float:
    """One decoder layer's live activations in a no-grad forward: residual, normed input, q/k/v/attention output
    (4H) and gate, up, activated (3I) per token; plus the (heads, T, T) scores when attention materialises them."""
    per_token = 4 * shape.hidden + 3 * shape.intermediate
    out = rows * tokens * per_token * dtype_bytes
    if scores:
        out += rows * shape.heads * tokens * tokens * dtype_bytes
    return float(out)


def images_memory(shape: ModelShape, images: int, dtype: str = "bfloat16", prompt_len: int = IMAGE_PROMPT_TOKENS,
                  scores: bool = False, mask_prompt_len: int = BASE_PROMPT_TOKENS) -> StageMemory:
    """Stage 3 at ``images`` images per batch (``images.batch_size``): all weights resident, the static KV cache,
    and the largest of prefill (2R rows), the base-context mask pass (R rows x (prompt + N), no cache), the
    float32 guided logits, and the VQ decode of R images (4 feature maps of base channels at full resolution)."""
    b = DTYPE_BYTES[dtype]
    rows = 2 * images
    return StageMemory(
        weights=shape.total_params * b,
        kv=image_kv_bytes(shape, images, prompt_len, b),
        activations={
            "prefill": _layer_activation(shape, rows, prompt_len, b, scores),
            "mask_pass": _layer_activation(shape, images, mask_prompt_len + shape.image_tokens, b, scores),
            "logits": float(rows * shape.codebook * 4 * 3),
            "vq_decode": float(images * 4 * shape.vq_top_channels * shape.image_size ** 2 * b),
        })


def vqa_memory(shape: ModelShape, images: int, dtype: str = "bfloat16", questions: int = QUESTIONS_PER_IMAGE,
               text_tokens: int = VQA_TEXT_TOKENS, scores: bool = False) -> StageMemory:
    """Stage 4 at ``images`` images per batch (``filter.vqa_batch_size``), as ``engine.vqa``: the prefix KV of n
    images plus its copy for n x K question rows; activations: the SigLIP tower, the prefix prefill, and the
    float32 softmax over the full vocabulary for n x K rows."""
    b = DTYPE_BYTES[dtype]
    prefix = shape.image_tokens + text_tokens
    patches = (shape.image_size // 16) ** 2
    vision_per_token = 4 * shape.vision_hidden + 2 * shape.vision_intermediate
    vision = images * patches * vision_per_token * b + (
        images * shape.vision_heads * patches ** 2 * b if scores else 0)
    return StageMemory(
        weights=shape.total_params * b,
        kv=images * (1 + questions) * prefix * shape.kv_bytes_per_token * b,
        activations={
            "vision": float(vision),
            "prefill": _layer_activation(shape, images, prefix, b, scores),
            "logits": float(images * questions * shape.vocab * 4 * 2),
        })


def train_memory(shape: ModelShape, pairs: int, dtype: str = "bfloat16", lora_rank: int | None = 64,
                 lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"),
                 checkpointing: bool = True, prompt_len: int = BASE_PROMPT_TOKENS) -> StageMemory:
    """Stage 5 at ``pairs`` pairs per micro-batch (``train.per_device_batch``): 2 sequences per pair (chosen and
    rejected, both after the base prompt) of prompt + N tokens.

    Weights: the frozen model in ``dtype``. Trainable: LoRA adapters in float32 (peft upcasts them) or, with
    ``lora_rank=None``, the language model; optimizer = trainable x (4 weight + 4 grad + 8 AdamW moments) bytes
    (LoRA) or (grad in dtype + 8) bytes (full). Activations per token and layer saved for backward: 6H + 4I
    (norm inputs, q/k/v, attention output, gate/up/activated/down input). With gradient checkpointing only each
    layer's input (H) is kept, plus one layer recomputed and its gradients (2 x (6H + 4I)); the fused loss keeps
    the image positions' hidden states and one float32 chunk of logits."""
    b = DTYPE_BYTES[dtype]
    seqs, tokens = 2 * pairs, prompt_len + shape.image_tokens
    per_layer = 6 * shape.hidden + 4 * shape.intermediate
    if checkpointing:
        acts = seqs * tokens * (shape.layers * shape.hidden + 2 * per_layer) * b
    else:
        acts = seqs * tokens * shape.layers * per_layer * b
    loss = seqs * shape.image_tokens * (shape.hidden * b + min(shape.codebook, 4096) * 4)
    if lora_rank is None:
        optimizer = shape.params["language_model"] * (b + 8)
    else:
        optimizer = shape.lora_params(lora_rank, lora_targets) * 16
    return StageMemory(weights=shape.total_params * b, kv=0.0, activations={"backward": float(acts + loss)},
                       optimizer=float(optimizer))


# ------------------------------------------------------------------------------------------------ batches

MEMORY_FNS = {"images": images_memory, "vqa": vqa_memory, "train": train_memory}


@dataclass(frozen=True)
class BatchChoice:
    """The batch ``auto_batch`` chose for a stage: its memory, the budget, and why it stopped there."""

    stage: str
    batch: int
    memory: StageMemory
    budget: float
    margin: float
    limit: str  # "memory" (batch + 1 would not fit) or "cap" (MAX_AUTO_BATCH or the caller's cap)

    @property
    def usable(self) -> float:
        return self.budget * (1 - self.margin)

    def line(self) -> str:
        m = self.memory
        return (f"{self.stage}: batch {self.batch} ({self.limit}-bound) needs {m.total / GiB:.2f} GiB of "
                f"{self.usable / GiB:.2f} GiB usable ({self.budget / GiB:.2f} GiB budget, {self.margin:.0%} margin): "
                f"weights {m.weights / GiB:.2f}, KV {m.kv / GiB:.2f}, activations {m.peak_activation / GiB:.2f}"
                + (f", optimizer {m.optimizer / GiB:.2f}" if m.optimizer else ""))


def auto_batch(shape: ModelShape, stage: str, budget: float, margin: float = MARGIN_FRACTION,
               cap: int = MAX_AUTO_BATCH, **memory_kwargs) -> BatchChoice:
    """The largest batch b <= ``cap`` with memory(b) <= budget x (1 - margin) for ``stage`` in ("images", "vqa",
    "train"); ``memory_kwargs`` go to its memory function (dtype, prompt_len, ...). Memory grows with b, so a
    binary search finds it. A budget that does not hold batch 1 is a ValueError naming both numbers."""
    if stage not in MEMORY_FNS:
        raise ValueError(f"unknown stage {stage!r} for auto_batch; choose one of {sorted(MEMORY_FNS)}")
    fn = MEMORY_FNS[stage]
    usable = budget * (1 - margin)
    need = lambda b: fn(shape, b, **memory_kwargs).total
    if need(1) > usable:
        raise ValueError(f"{stage}: batch 1 needs {need(1) / GiB:.2f} GiB but only {usable / GiB:.2f} GiB is usable "
                         f"({budget / GiB:.2f} GiB budget, {margin:.0%} margin); use a bigger device, a lower "
                         "precision (model.dtype=bfloat16) or a smaller model")
    lo, hi = 1, cap
    if need(cap) <= usable:
        return BatchChoice(stage, cap, fn(shape, cap, **memory_kwargs), budget, margin, "cap")
    while hi - lo > 1:  # need(lo) fits, need(hi) does not
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if need(mid) <= usable else (lo, mid)
    return BatchChoice(stage, lo, fn(shape, lo, **memory_kwargs), budget, margin, "memory")


def device_budget(device: torch.device | str) -> float:
    """Memory a run may use on ``device`` (bytes): CUDA free memory plus what this process's allocator already
    holds (reusable); on the CPU the available system memory (psutil)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free + torch.cuda.memory_reserved(device))
    import psutil

    return float(psutil.virtual_memory().available)


def resolve_auto_batches(config, device: torch.device | str, budget: float | None = None,
                         shape: ModelShape | None = None, log=print):
    """A copy of ``config`` with every ``"auto"`` batch size (images.batch_size, filter.vqa_batch_size) replaced
    by ``stable_batch(auto_batch(...))`` on ``device``'s memory (or ``budget``), the chosen plan printed once
    through ``log``. A config without "auto" comes back unchanged (the same object). The number is what
    config.yaml and the stage fingerprints record, so a resume that resolves to another number (another GPU) is
    refused naming the key; pass the saved number to resume there."""
    wanted = [(section, key, stage) for section, key, stage in AUTO_FIELDS
              if getattr(getattr(config, section), key) == "auto"]
    if not wanted:
        return config
    shape = shape or model_shape(config_for_path(config.model.path), count_flops=False)
    budget = device_budget(device) if budget is None else budget
    resolved = dataclasses.replace(config)
    for section, key, stage in wanted:
        kwargs = _stage_kwargs(config, stage)
        choice = auto_batch(shape, stage, budget, **kwargs)
        batch = stable_batch(choice.batch)
        choice = dataclasses.replace(choice, batch=batch, memory=MEMORY_FNS[stage](shape, batch, **kwargs))
        part = dataclasses.replace(getattr(resolved, section), **{key: batch})
        resolved = dataclasses.replace(resolved, **{section: part})
        log(f"[ospo-fast plan] {section}.{key}=auto -> {batch} on {torch.device(device)}: {choice.line()}")
    return resolved


def stable_batch(batch: int) -> int:
    """``batch`` rounded down to a multiple of 8 from 16 up: the same number when free memory moves a little
    between a run and its resume (and whole tensor-core tiles)."""
    return batch if batch < 16 else batch // 8 * 8


AUTO_FIELDS = (("images", "batch_size", "images"), ("filter", "vqa_batch_size", "vqa"))


def _stage_kwargs(config, stage: str) -> dict:
    """Memory-function arguments a config implies (dtype, attention, LoRA) for ``stage``."""
    out: dict = {"dtype": config.model.dtype}
    if stage in ("images", "vqa"):
        out["scores"] = config.model.attn_implementation == "eager"
    if stage == "vqa":
        out["questions"] = config.questions.max_questions  # memory for the worst case: every question asked
    if stage == "train":
        tc = config.train
        out.update(lora_rank=tc.lora_r if tc.lora else None, lora_targets=tuple(tc.lora_targets),
                   checkpointing=tc.gradient_checkpointing)
    return out


# ------------------------------------------------------------------------------------------------ time

def decode_step_cost(step_params: int, rows: int, context: int, shape: ModelShape, dtype_bytes: int) -> tuple:
    """(FLOPs, bytes) of one KV-cached decode step for ``rows`` rows attending to ``context`` cached tokens:
    2 x params x rows for the matmuls + 4 x rows x context x layers x heads x head_dim for QK and PV; bytes: the
    step's weights once + the KV cache read once."""
    flops = 2 * step_params * rows + 4 * rows * context * shape.layers * shape.heads * shape.head_dim
    bytes_ = step_params * dtype_bytes + rows * context * shape.kv_bytes_per_token * dtype_bytes
    return float(flops), float(bytes_)


def forward_flops(shape: ModelShape, rows: int, tokens: int, context: int | None = None) -> float:
    """FLOPs of a decoder forward over ``tokens`` new tokens per row (prefill / teacher forcing): 2 x decoder
    params per token + 4 x tokens x context x layers x heads x head_dim attention (causal: context = tokens / 2
    on average, when ``context`` is None)."""
    context = tokens / 2 if context is None else context
    return float(rows * tokens * (2 * shape.decoder_params + 4 * context * shape.layers * shape.heads
                                  * shape.head_dim))


def decode_time(steps: int, step_params: int, rows: int, start_context: int, shape: ModelShape, device: Device,
                dtype_bytes: int) -> tuple[float, float, float]:
    """Seconds, FLOPs and bytes of ``steps`` decode steps from ``start_context`` cached tokens: per step
    max(bytes / (bandwidth x eff), FLOPs / (peak x eff)) (roofline). Attention covers the mean context of a growing
    cache (the image engine's decode attention reads only filled slots, ``ospo_fast.ops.decode_attention``)."""
    context = start_context + steps / 2
    flops, bytes_ = decode_step_cost(step_params, rows, context, shape, dtype_bytes)
    per_step = max(bytes_ / (device.bandwidth * device.bandwidth_efficiency),
                   flops / (device.peak_flops * device.matmul_efficiency))
    return per_step * steps, flops * steps, bytes_ * steps


def compute_time(flops: float, device: Device) -> float:
    return flops / (device.peak_flops * device.matmul_efficiency)


@dataclass(frozen=True)
class HostOps:
    """Op launches (aten ops) of each piece, counted by running it once (benchmarks/bench_calibrate.py); they
    matter where each op costs host time (``Device.op_overhead``, the CPU), not on GPUs. prefill, step, mask_pass,
    vq_decode: per image batch; vqa: per Self-VQA batch; train: per micro-batch (forward + backward)."""

    prefill: int = 0
    step: int = 0
    mask_pass: int = 0
    vq_decode: int = 0
    vqa: int = 0
    train: int = 0


NO_OPS = HostOps()


def image_batch_seconds(shape: ModelShape, images: int, device: Device, dtype: str = "bfloat16",
                        prompt_len: int = IMAGE_PROMPT_TOKENS, mask_pass: bool = True,
                        ops: HostOps = NO_OPS) -> dict[str, float]:
    """Seconds of one stage-3 batch of ``images`` images, per piece: prefill of 2R rows (FLOPs), N - 1 decode steps
    (roofline), the base-context mask pass (R rows x (base prompt + N), FLOPs; ``mask_pass=False``: 0), the VQ
    decode of R images (its convolution FLOPs at the convolution rate + the bytes its ops move at the bandwidth:
    GroupNorm, SiLU and additions on full-resolution maps are memory bound; both counted on the meta device,
    bytes scaled from float32 to ``dtype``); each + its op launches x ``device.op_overhead``."""
    b, n, o = DTYPE_BYTES[dtype], shape.image_tokens, device.op_overhead
    head = 2 * shape.params["generation_head"]  # the generation head at the last position, per row
    decode, _, _ = decode_time(n - 1, shape.image_step_params, 2 * images, prompt_len, shape, device, b)
    return {
        "prefill": compute_time(forward_flops(shape, 2 * images, prompt_len) + 2 * images * head, device)
        + ops.prefill * o,
        "decode": decode + (n - 1) * ops.step * o,
        "mask_pass": (compute_time(forward_flops(shape, images, BASE_PROMPT_TOKENS + n), device) + ops.mask_pass * o)
        if mask_pass else 0.0,
        "vq_decode": images * (shape.vq_decode_flops / (device.peak_flops * device.conv_efficiency)
                               + shape.vq_decode_bytes * b / 4 / (device.bandwidth * device.bandwidth_efficiency))
        + ops.vq_decode * o,
    }


def vqa_batch_seconds(shape: ModelShape, images: int, questions: int, device: Device,
                      ops: HostOps = NO_OPS, suffix_tokens: int = 16) -> float:
    """Seconds of one Self-VQA batch (``engine.vqa``): SigLIP + aligner per image, the (system + image) prefix
    prefill once per image, ``questions`` suffixes of ``suffix_tokens`` per image against that prefix, the
    language-model head at one position per question (FLOPs), + op launches."""
    prefix = shape.image_tokens + VQA_TEXT_TOKENS
    head = 2 * questions * shape.params["lm_head"]
    flops = images * (shape.vision_flops + forward_flops(shape, 1, prefix)
                      + forward_flops(shape, questions, suffix_tokens, prefix) + head)
    return compute_time(flops, device) + ops.vqa * device.op_overhead


def train_flops_per_pair(shape: ModelShape, lora: bool = True, checkpointing: bool = True,
                         prompt_len: int = BASE_PROMPT_TOKENS) -> float:
    """FLOPs of one training pair (2 sequences of prompt + N tokens): per token LoRA 6 x params (forward, the
    recompute under checkpointing, input gradients; adapter weight gradients are negligible), full fine-tuning
    8 x params (+ weight gradients); 2 x params less without checkpointing; + the generation head (x3: forward,
    input and weight gradients of the fused loss)."""
    mult = (6 if lora else 8) - (0 if checkpointing else 2)
    tokens = prompt_len + shape.image_tokens
    seq = mult / 2 * forward_flops(shape, 1, tokens) + 3 * 2 * shape.image_tokens * shape.params["generation_head"]
    return 2 * seq


def train_step_seconds(shape: ModelShape, pairs: int, device: Device, lora: bool = True, checkpointing: bool = True,
                       ops: HostOps = NO_OPS, prompt_len: int = BASE_PROMPT_TOKENS) -> float:
    """Seconds of one micro-batch of ``pairs`` pairs (FLOPs / (peak x eff) + op launches)."""
    return (compute_time(pairs * train_flops_per_pair(shape, lora, checkpointing, prompt_len), device)
            + ops.train * device.op_overhead)


# ------------------------------------------------------------------------------------------------ the floor

@dataclass(frozen=True)
class SynthesisShape:
    """What the bandwidth floor of image synthesis needs of a model and a run: ``layers``, ``kv_width``
    (num_key_value_heads x head_dim), ``prompt_len`` and ``image_tokens`` (tokens), ``weight_bytes`` (the weights
    one decode step reads: decoder, generation aligner and head), ``kv_dtype_bytes`` (2: bf16) and ``rows`` per
    image (2: CFG's conditional and unconditional rows)."""

    layers: int
    kv_width: int
    prompt_len: int
    image_tokens: int
    weight_bytes: float
    kv_dtype_bytes: int = 2
    rows: int = 2

    @classmethod
    def of(cls, shape: ModelShape, prompt_len: int = IMAGE_PROMPT_TOKENS, dtype: str = "bfloat16") -> SynthesisShape:
        """The floor's shape of a ``ModelShape`` with weights and KV cache in ``dtype``."""
        b = DTYPE_BYTES[dtype]
        return cls(shape.layers, shape.kv_heads * shape.head_dim, prompt_len, shape.image_tokens,
                   float(shape.image_step_params * b), b)

    @property
    def kv_bytes_per_image(self) -> float:
        """KV bytes an image's rows read while it is drawn: image token t (t = 0 .. N - 1) attends to the prompt
        and the t tokens before it, so rows x sum_t (prompt + t) = rows x (N x prompt + N (N - 1) / 2) cached
        tokens, each layers x 2 (K, V) x kv_width x kv_dtype_bytes."""
        n = self.image_tokens
        tokens = n * self.prompt_len + n * (n - 1) // 2
        return float(self.rows * tokens * self.layers * 2 * self.kv_width * self.kv_dtype_bytes)


@dataclass(frozen=True)
class SynthesisFloor:
    """The bandwidth floor of one image at ``batch`` images per batch on a device of ``bandwidth`` bytes/s (the
    full datasheet figure, no efficiency factor): bytes per image = its KV reads + the weights read once per step
    (N steps) shared by the batch; seconds per image = bytes / bandwidth."""

    batch: int
    bandwidth: float
    kv_bytes: float
    weight_bytes: float
    bytes_per_image: float
    seconds_per_image: float
    images_per_s: float


def synthesis_floor(model: SynthesisShape, batch: int, device: Device) -> SynthesisFloor:
    """Bytes, seconds and images/s of one image at the memory-bandwidth floor of ``device`` (only its
    ``bandwidth`` is used): no kernel reads less than the KV cache its attention needs and the weights once per
    step. Janus-Pro-1B shape (24 layers x 2048) at a 64-token prompt: 79.6 GB of KV per image; 7B (30 x 4096):
    199 GB. ``batch``: images per batch (e.g. ``cache_batch``)."""
    if batch < 1:
        raise ValueError(f"batch={batch} must be >= 1 images")
    weights = model.image_tokens * model.weight_bytes / batch
    total = model.kv_bytes_per_image + weights
    seconds = total / device.bandwidth
    return SynthesisFloor(batch, device.bandwidth, model.kv_bytes_per_image, weights, total, seconds, 1 / seconds)


def cache_batch(shape: ModelShape, device: Device, prompt_len: int = IMAGE_PROMPT_TOKENS, dtype: str = "bfloat16",
                margin: float = MARGIN_FRACTION) -> int:
    """The largest batch whose weights and static KV cache (``image_kv_bytes``) fit ``device.memory`` x (1 -
    margin): the floor's batch (activations left out; ``auto_batch`` counts them and picks fewer)."""
    b = DTYPE_BYTES[dtype]
    free = device.memory * (1 - margin) - shape.total_params * b
    per_image = image_kv_bytes(shape, 1, prompt_len, b)
    if free < per_image:
        raise ValueError(f"{device.name}: the weights ({shape.total_params * b / GiB:.2f} GiB) leave "
                         f"{max(free, 0) / GiB:.2f} GiB, less than one image's KV cache ({per_image / GiB:.2f} GiB)")
    return int(free // per_image)


@dataclass
class StagePlan:
    """One stage of ``plan_run``: work, batch, memory per device, predicted seconds (for the whole run)."""

    stage: str
    generations: int  # requests, images or pairs x steps
    tokens: float
    flops: float
    bytes: float
    batch: int | str
    memory: float  # bytes per device
    seconds: float
    note: str = ""


def text_stage(name: str, requests: int, new_tokens: int, batch: int, shape: ModelShape, device: Device,
               dtype: str, devices: int) -> StagePlan:
    """A text-generation stage: ``requests`` chats of TEXT_REQUEST_TOKENS, up to ``new_tokens`` each (upper bound:
    every answer runs to the limit), ``batch`` rows per device batch."""
    b = DTYPE_BYTES[dtype]
    batches = math.ceil(requests / devices / batch)
    prefill = forward_flops(shape, batch, TEXT_REQUEST_TOKENS)
    seconds, flops, bytes_ = decode_time(new_tokens, shape.text_step_params, batch, TEXT_REQUEST_TOKENS, shape,
                                         device, b)
    kv = batch * (TEXT_REQUEST_TOKENS + new_tokens) * shape.kv_bytes_per_token * b
    memory = shape.total_params * b + kv + _layer_activation(shape, batch, TEXT_REQUEST_TOKENS, b, False)
    return StagePlan(name, requests, float(requests * (TEXT_REQUEST_TOKENS + new_tokens)),
                     (flops + prefill) * batches * devices, bytes_ * batches * devices, batch, memory,
                     batches * (seconds + compute_time(prefill, device)), f"<= {new_tokens} new tokens per request")


def images_stage(config, shape: ModelShape, device: Device, devices: int, batch: int) -> StagePlan:
    """Stage 3: 2 images per pair, each R-image batch = prefill of 2R rows + (N - 1) decode steps (+1 with masks in
    the generation context) + the base-context mask pass (R rows x (prompt + N)) + VQ decode of R images."""
    b = DTYPE_BYTES[config.model.dtype]
    n = shape.image_tokens
    images = config.prompts.num_prompts * config.perturb.num_perturbations * 2
    batches = math.ceil(images / devices / batch)
    prefill = forward_flops(shape, 2 * batch, IMAGE_PROMPT_TOKENS)
    _, flops, bytes_ = decode_time(n - 1, shape.image_step_params, 2 * batch, IMAGE_PROMPT_TOKENS, shape, device, b)
    mask = forward_flops(shape, batch, BASE_PROMPT_TOKENS + n) if config.masks.context == "base" else 0.0
    vq = batch * shape.vq_decode_flops
    per_batch = sum(image_batch_seconds(shape, batch, device, config.model.dtype,
                                        mask_pass=config.masks.context == "base").values())
    memory = images_memory(shape, batch, **_stage_kwargs(config, "images"))
    return StagePlan("images", images, float(images * 2 * (IMAGE_PROMPT_TOKENS + n)),
                     (flops + prefill + mask + vq) * batches * devices, bytes_ * batches * devices, batch,
                     memory.total, batches * per_batch, f"CFG: 2 rows per image, {n} tokens")


def vqa_stage(config, shape: ModelShape, device: Device, devices: int, batch: int) -> StagePlan:
    """Stage 4: every image through the vision tower, its prefix prefill once, then K question suffixes."""
    images = config.prompts.num_prompts * config.perturb.num_perturbations * 2
    k = min(QUESTIONS_PER_IMAGE, config.questions.max_questions)
    prefix = shape.image_tokens + VQA_TEXT_TOKENS
    memory = vqa_memory(shape, batch, **_stage_kwargs(config, "vqa"))
    seconds = vqa_batch_seconds(shape, 1, k, device)  # FLOPs are linear in the images of a batch
    flops = seconds * device.peak_flops * device.matmul_efficiency * images
    return StagePlan("vqa", images, float(images * (prefix + 16 * k)), flops, 0.0, batch, memory.total,
                     seconds * math.ceil(images / devices), f"{k} questions per image (memory: "
                     f"{config.questions.max_questions})")


def train_stage(config, shape: ModelShape, device: Device, devices: int, batch: int) -> StagePlan:
    """Stage 5: max_steps x per_device_batch x grad_accum pairs per device (``train_flops_per_pair``); every
    device runs its own micro-batches (DDP), so the hours do not shrink with more devices."""
    tc = config.train
    tokens_per_seq = BASE_PROMPT_TOKENS + shape.image_tokens
    pairs_per_device = tc.max_steps * tc.per_device_batch * tc.grad_accum
    flops_device = pairs_per_device * train_flops_per_pair(shape, tc.lora, tc.gradient_checkpointing)
    memory = train_memory(shape, batch, **_stage_kwargs(config, "train"))
    return StagePlan("train", tc.max_steps, float(pairs_per_device * devices * 2 * tokens_per_seq),
                     flops_device * devices, 0.0, batch, memory.total, compute_time(flops_device, device),
                     f"{tc.max_steps} steps x {tc.per_device_batch} x {tc.grad_accum} x {devices} devices")


def _batch(value, shape: ModelShape, stage: str, device: Device, config) -> int:
    if value == "auto":
        return stable_batch(auto_batch(shape, stage, device.memory, **_stage_kwargs(config, stage)).batch)
    return int(value)


def plan_run(config, shape: ModelShape, device: Device, devices: int = 1) -> list[StagePlan]:
    """Per stage of ``config`` on ``devices`` x ``device`` (data parallel: every device holds the whole model and
    a 1/devices share of the work): the work, batch, memory per device and predicted seconds."""
    if devices < 1:
        raise ValueError(f"devices={devices} must be >= 1")
    dtype = config.model.dtype
    out = []
    p = config.prompts.num_prompts
    pairs = p * config.perturb.num_perturbations
    if config.prompts.source == "model":
        out.append(text_stage("prompts", p, config.prompts.max_new_tokens, config.prompts.batch_size, shape, device,
                              dtype, devices))
    if config.perturb.source == "model":
        out.append(text_stage("perturb", pairs, config.perturb.max_new_tokens, config.perturb.batch_size, shape,
                              device, dtype, devices))
    if config.densify.enabled:
        out.append(text_stage("densify", pairs, config.densify.max_new_tokens, config.densify.batch_size, shape,
                              device, dtype, devices))
    out.append(images_stage(config, shape, device, devices, _batch(config.images.batch_size, shape, "images",
                                                                   device, config)))
    if config.questions.source == "model":
        out.append(text_stage("questions", p, config.questions.max_new_tokens, config.questions.batch_size, shape,
                              device, dtype, devices))
    out.append(vqa_stage(config, shape, device, devices, _batch(config.filter.vqa_batch_size, shape, "vqa",
                                                                device, config)))
    out.append(train_stage(config, shape, device, devices, config.train.per_device_batch))
    return out


def floor_line(floor: SynthesisFloor, device: Device, predicted_images_per_s: float) -> str:
    """The images stage's floor as one line under the plan: bytes per image (KV + weights at the row's batch),
    images/s per GPU at the full bandwidth, and the images row's prediction (images/s per GPU, fraction)."""
    return (f"floor of images: {floor.bytes_per_image / 1e9:.1f} GB/image (KV {floor.kv_bytes / 1e9:.1f} + weights "
            f"{floor.weight_bytes / 1e9:.1f} at batch {floor.batch}) = {floor.images_per_s:.1f} images/s per GPU at "
            f"{device.bandwidth / 1e12:.2f} TB/s (the images row: {predicted_images_per_s:.1f}, "
            f"{predicted_images_per_s / floor.images_per_s:.0%})")


def format_plan(stages: list[StagePlan], device: Device, devices: int, title: str = "",
                notes: tuple[str, ...] = ()) -> str:
    """The plan as a fixed-width table, ``notes`` (lines under it), totals and the stated assumptions."""
    head = (f"{'stage':<10}{'work':>10}{'tokens':>11}{'TFLOP':>12}{'TB read':>10}{'batch':>7}"
            f"{'GiB/GPU':>9}{'hours':>9}  note")
    lines = [title] if title else []
    lines += [f"{devices} x {device.name}: {device.memory / 1e9:.0f} GB, {device.bandwidth / 1e12:.2f} TB/s "
              f"(x{device.bandwidth_efficiency}), {device.peak_flops / 1e12:.0f} TFLOPS bf16 "
              f"(x{device.matmul_efficiency}) [{device.source}]", head, "-" * len(head)]
    for s in stages:
        fits = "" if s.memory <= device.memory * (1 - MARGIN_FRACTION) else "  DOES NOT FIT"
        lines.append(f"{s.stage:<10}{s.generations:>10}{s.tokens:>11.3g}{s.flops / 1e12:>12.4g}{s.bytes / 1e12:>10.3g}"
                     f"{s.batch!s:>7}{s.memory / GiB:>9.1f}{s.seconds / 3600:>9.2f}  {s.note}{fits}")
    lines += notes
    total = sum(s.seconds for s in stages)
    lines.append(f"total: {total / 3600:.2f} hours wall on {devices} GPUs ({total * devices / 3600:.1f} GPU-hours)")
    lines.append(f"assumes: image prompt {IMAGE_PROMPT_TOKENS} tokens, base prompt {BASE_PROMPT_TOKENS}, text request "
                 f"{TEXT_REQUEST_TOKENS}, {QUESTIONS_PER_IMAGE} questions per image, text answers at their "
                 f"max_new_tokens; memory margin {MARGIN_FRACTION:.0%}")
    return "\n".join(lines)


def plan_report(preset: str | None, overrides: list[str] | tuple[str, ...] = (), gpus: int = 1,
                gpu_name: str = "h100") -> str:
    """``ospo-fast plan``: the resolved preset's plan on ``gpus`` x ``gpu_name`` as text (no weights load: the
    model's config comes from ``config_for_path``). ValueError for an unknown GPU (valid names listed)."""
    from ospo_fast.config import load_config

    device = gpu(gpu_name)
    if gpus < 1:
        raise ValueError(f"--gpus {gpus} must be >= 1")
    config = load_config(preset, overrides)
    shape = model_shape(config_for_path(config.model.path))
    title = (f"plan for preset {preset} ({config.model.path}, {config.model.dtype}; {shape.total_params / 1e9:.2f}B "
             f"parameters, {shape.layers} layers, hidden {shape.hidden}): {config.prompts.num_prompts} prompts x "
             f"{config.perturb.num_perturbations} perturbations")
    stages = plan_run(config, shape, device, gpus)
    images = next(s for s in stages if s.stage == "images")
    model = SynthesisShape.of(shape, IMAGE_PROMPT_TOKENS, config.model.dtype)
    floor = synthesis_floor(model, int(images.batch), device)
    line = floor_line(floor, device, images.generations / gpus / images.seconds)
    return format_plan(stages, device, gpus, title, notes=(line,))
