"""Preference pairs for stage 5: read ``pairs.jsonl``, tokenise the base prompts in Janus's image-generation
layout, precompute soft object masks, and cut a deterministic stream of global batches that every rank shards
the same way.

A record: ``{"pair_id", "prompt", "category", "grid": G, "chosen": {"tokens": [int]*G*G, "mask": [0|1]*G*G,
"image": "images/...png", "score"}, "rejected": {...}}``; image paths are relative to the pairs file's folder.

Everything the loss would otherwise range-check on every step (token ids in [0, codebook), binary masks, soft
weights in [0, 1]) is validated here, once, so a training step never reads a tensor back to check it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ospo_fast.engine.prompts import prompt_token_ids  # noqa: F401  (the one prompt layout; re-exported)
from ospo_fast.ops.simpo_loss import check_mask_weights

SIDES = ("chosen", "rejected")


class PairsFileError(ValueError):
    """A pairs file that is missing or malformed; the message names the file, the line and the fix."""


@dataclass
class PairSet:
    """All pairs of a run, as tensors. P pairs, L_max prompt tokens, T = G*G image tokens.

    prompt_ids: list of P 1-D long tensors (chat-templated prompt ending in ``<begin_of_image>``);
    tokens: (P, 2, T) long, [:, 0] chosen, [:, 1] rejected; masks: (P, 2, T) float in [0, 1] (soft m_t)."""

    pair_ids: list[str]
    prompt_ids: list[torch.Tensor]
    tokens: torch.Tensor
    masks: torch.Tensor
    grid: int

    def __len__(self) -> int:
        return len(self.pair_ids)


@dataclass
class PairBatch:
    """One micro-batch of P pairs as 2P rows (0..P-1 chosen, P..2P-1 rejected). L: padded prompt length.

    prompt_ids: (2P, L) long, left-padded; prompt_mask: (2P, L) long; image_tokens: (2P, T) long;
    mask_weights: (2P, T) float."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    image_tokens: torch.Tensor
    mask_weights: torch.Tensor

    @property
    def num_pairs(self) -> int:
        return self.image_tokens.shape[0] // 2

    def to(self, device: torch.device) -> "PairBatch":
        return PairBatch(*(t.to(device, non_blocking=True) for t in
                           (self.prompt_ids, self.prompt_mask, self.image_tokens, self.mask_weights)))


def _fail(path: Path, line: int, what: str) -> PairsFileError:
    return PairsFileError(f"{path}:{line}: {what}. Each line must be a pair record as written by the pipeline "
                          "(pair_id, prompt, grid, chosen/rejected with tokens, mask, image); re-run the "
                          "pipeline's selection stage to rewrite it")


def _check_side(path: Path, line: int, record: dict, side: str, grid: int, codebook: int | None) -> None:
    entry = record.get(side)
    if not isinstance(entry, dict):
        raise _fail(path, line, f"{side!r} is missing or not an object")
    for key in ("tokens", "mask"):
        values = entry.get(key)
        if not isinstance(values, list) or len(values) != grid * grid:
            size = len(values) if isinstance(values, list) else type(values).__name__
            raise _fail(path, line, f"{side}.{key} must be a list of grid*grid={grid * grid} values, got {size}")
    tokens = entry["tokens"]
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        bad = next(t for t in tokens if not isinstance(t, int) or isinstance(t, bool))
        raise _fail(path, line, f"{side}.tokens must be integer codebook ids, got {bad!r}")
    if codebook is not None and (min(tokens) < 0 or max(tokens) >= codebook):
        raise _fail(path, line, f"{side}.tokens has ids outside the codebook [0, {codebook}) "
                    f"(min {min(tokens)}, max {max(tokens)}); were they sampled by a different model?")
    bad_mask = [m for m in entry["mask"] if m not in (0, 1) or isinstance(m, bool)]
    if bad_mask:
        raise _fail(path, line, f"pair {record.get('pair_id')!r}: {side}.mask must hold 0 or 1 per image token (the "
                    f"thresholded object mask), got {bad_mask[0]!r}")


def read_pairs(path: str | Path, grid: int | None = None, codebook: int | None = None) -> list[dict]:
    """Read and validate a pairs JSONL file. ``grid``/``codebook``: the model's, checked when given."""
    path = Path(path)
    if not path.is_file():
        raise PairsFileError(f"pairs file {path} does not exist; run the pipeline up to the selection stage "
                             "(it writes <run_dir>/pairs.jsonl) or pass the path of an existing pairs.jsonl")
    from ospo_fast.runstore import check_committed

    check_committed(path)  # inside a run directory: the pairs as selection committed them, not a damaged copy
    records = []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise _fail(path, line_no, f"not valid JSON ({err.msg} at column {err.colno})") from err
            if not isinstance(record, dict):
                raise _fail(path, line_no, f"expected a JSON object, got {type(record).__name__}")
            for key in ("pair_id", "prompt", "grid"):
                if key not in record:
                    raise _fail(path, line_no, f"missing key {key!r}")
            rec_grid = record["grid"]
            if not isinstance(rec_grid, int) or rec_grid <= 0:
                raise _fail(path, line_no, f"grid={rec_grid!r} must be a positive integer")
            if grid is not None and rec_grid != grid:
                raise _fail(path, line_no, f"grid={rec_grid} but the model's image grid is {grid}; train with the "
                            "model that generated these images")
            for side in SIDES:
                _check_side(path, line_no, record, side, rec_grid, codebook)
            records.append(record)
    if not records:
        raise PairsFileError(f"pairs file {path} holds no pairs; the selection stage kept none (lower "
                             "filter.tau or generate more prompts)")
    return records


def smooth_masks(binary: torch.Tensor, mode: str, kernel: int, sigma: float) -> torch.Tensor:
    """(N, G, G) binary -> (N, G*G) float weights m_t: Gaussian-smoothed (reference code) or the binary mask."""
    if mode == "binary":
        return binary.float().flatten(1)
    if mode != "gaussian":
        raise ValueError(f"loss.mask_smoothing={mode!r} is not supported; use 'gaussian' or 'binary'")
    from ospo_fast.ops.object_masks import soft_mask

    return soft_mask(binary, kernel=kernel, sigma=sigma).float().flatten(1)  # (N, G*G)


def image_side(model) -> int:
    """The side in pixels of the model's generation images (grid * 16: the VQ encoder halves it four times)."""
    return model.config.vq_config.num_patches * 16


def load_rgb(path: Path, size: int) -> np.ndarray:
    """The image at ``path`` as (size, size, 3) uint8 RGB, resized with bicubic filtering when it has another size.

    Raises what PIL raises for a file it cannot read (OSError, ``PIL.UnidentifiedImageError``, ValueError)."""
    from PIL import Image

    with Image.open(path) as opened:
        image = opened.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


def encode_rgb(model, pixels: list[np.ndarray], batch_size: int = 8) -> torch.Tensor:
    """VQ-encode (S, S, 3) uint8 images (S = ``image_side(model)``). Returns (N, G*G) long token ids.

    Pixels are scaled to [-1, 1] as Janus's image processor does for generation images."""
    vq = model.model.vqmodel
    device = next(vq.parameters()).device
    dtype = next(vq.parameters()).dtype
    out = []
    for start in range(0, len(pixels), batch_size):
        batch = np.stack(pixels[start:start + batch_size]).astype(np.float32)
        x = torch.from_numpy(batch).permute(0, 3, 1, 2)  # (B, 3, H, W) in [0, 255]
        x = (x / 127.5 - 1.0).to(device=device, dtype=dtype)
        with torch.no_grad():
            encoded = vq.encode(x)
        out.append(encoded.image_tokens.reshape(x.shape[0], -1).cpu())  # (B, G*G)
    return torch.cat(out).long()


def reencode_images(model, paths: list[Path], batch_size: int = 8) -> torch.Tensor:
    """Re-encode PNGs with the VQ encoder (as the reference code does), resized to the model's image side
    (``load_rgb``). Returns (N, G*G) long token ids."""
    size = image_side(model)
    out = []
    for start in range(0, len(paths), batch_size):  # a batch of pixels in memory at a time, not the whole set
        pixels = []
        for path in paths[start:start + batch_size]:
            if not path.is_file():
                raise PairsFileError(f"image {path} named in the pairs file does not exist; keep the run "
                                     "directory's images/ next to pairs.jsonl or set train.token_source=tokens")
            pixels.append(load_rgb(path, size))
        out.append(encode_rgb(model, pixels, batch_size))
    return torch.cat(out)


def load_pair_set(path: str | Path, bundle, mask_mode: str = "gaussian", kernel: int = 5, sigma: float = 1.0,
                  token_source: str = "tokens") -> PairSet:
    """Read ``path`` and build the tensors training needs (prompt ids, tokens, soft masks)."""
    path = Path(path)
    grid = bundle.grid
    codebook = bundle.model.config.vq_config.num_embeddings
    records = read_pairs(path, grid=grid, codebook=codebook)
    cache: dict[str, torch.Tensor] = {}
    prompt_ids = []
    for record in records:
        prompt = record["prompt"]
        if prompt not in cache:
            cache[prompt] = torch.tensor(prompt_token_ids(bundle.processor, prompt), dtype=torch.long)
        prompt_ids.append(cache[prompt])
    if token_source == "tokens":
        tokens = torch.tensor([[r[s]["tokens"] for s in SIDES] for r in records], dtype=torch.long)  # (P, 2, T)
    elif token_source == "reencode":
        images = [path.parent / r[s]["image"] for r in records for s in SIDES]
        tokens = reencode_images(bundle.model, images).view(len(records), 2, -1)
    else:
        raise ValueError(f"train.token_source={token_source!r} is not supported; use 'tokens' or 'reencode'")
    _check_token_range(tokens, codebook, path)
    binary = torch.tensor([[r[s]["mask"] for s in SIDES] for r in records], dtype=torch.float32)
    masks = smooth_masks(binary.view(-1, grid, grid), mask_mode, kernel, sigma).view(len(records), 2, -1)
    check_mask_weights(masks, mask_mode)  # once per data set: the training step skips this check
    return PairSet(pair_ids=[str(r["pair_id"]) for r in records], prompt_ids=prompt_ids, tokens=tokens,
                   masks=masks, grid=grid)


def _check_token_range(tokens: torch.Tensor, codebook: int, path: Path) -> None:
    """(P, 2, T) ids, e.g. re-encoded from PNGs: all in [0, codebook), checked once here instead of every step."""
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= codebook:
        raise PairsFileError(f"{path}: image token ids must lie in [0, {codebook}) (the model's codebook), got min "
                             f"{lo} max {hi}; re-encode the images with the training model")


@dataclass
class BatchPlan:
    """How global batches are cut: each optimizer step takes ``global_batch`` = per_device * world * accum pairs
    from an endless stream of per-epoch permutations (seeded), so step s always sees the same pairs, whatever
    the number of processes; micro-step a of step s gives rank r the slice [r*per_device, (r+1)*per_device)."""

    num_pairs: int
    per_device: int
    world: int
    accum: int
    seed: int

    @property
    def global_batch(self) -> int:
        return self.per_device * self.world * self.accum

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_pairs, generator=generator)

    def step_indices(self, step: int) -> torch.Tensor:
        """Pair indices of global batch ``step`` (0-based), shape (global_batch,)."""
        start = step * self.global_batch
        out = []
        while len(out) < self.global_batch:
            epoch, offset = divmod(start + len(out), self.num_pairs)
            order = self._epoch_order(epoch)
            out.extend(order[offset:offset + self.global_batch - len(out)].tolist())
        return torch.tensor(out, dtype=torch.long)

    def micro_indices(self, step: int, micro: int, rank: int) -> torch.Tensor:
        """Pair indices of rank ``rank`` in micro-step ``micro`` of step ``step``, shape (per_device,)."""
        flat = self.step_indices(step).view(self.accum, self.world, self.per_device)
        return flat[micro, rank]


def collate(pairs: PairSet, indices: torch.Tensor, pad_id: int) -> PairBatch:
    """Build 2P rows (chosen then rejected) with left-padded prompts."""
    idx = indices.tolist()
    prompts = [pairs.prompt_ids[i] for i in idx] * 2
    length = max(p.numel() for p in prompts)
    prompt_ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)  # (2P, L)
    prompt_mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, ids in enumerate(prompts):
        prompt_ids[row, length - ids.numel():] = ids
        prompt_mask[row, length - ids.numel():] = 1
    tokens = pairs.tokens[indices]  # (P, 2, T)
    masks = pairs.masks[indices]
    image_tokens = torch.cat([tokens[:, 0], tokens[:, 1]])  # (2P, T)
    mask_weights = torch.cat([masks[:, 0], masks[:, 1]])
    return PairBatch(prompt_ids, prompt_mask, image_tokens, mask_weights)
