"""Shared token sampling for image and text generation: temperature, top-k, top-p and per-row seeded draws.

Seeded draws use the Gumbel-max trick with counter-based noise: the uniform number for (row, step, vocab entry)
is a hash of (seed, step, entry), so a row's draw depends only on its own seed and step, never on which other
rows share the batch, and no generator state lives outside the tensors (the step can run under CUDA graphs).
argmax(logits / T + Gumbel) is an exact draw from softmax(logits / T) restricted to the kept entries.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def entry_keys(size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(size,) int64: each vocabulary entry's part of the counter hash, (entry * 0x9E3779B1) mod 2**32.

    A decode step compiled with torch.compile takes this as an input tensor (``counter_uniform(keys=)``) instead
    of building it: inside a compiled graph inductor folds ``arange * 0x9E3779B1`` into an int32 index expression,
    and Triton 3.6 refuses the literal ("Scalar 2654435761 is out of range for type int32", the first H200 run).
    """
    entries = torch.arange(size, dtype=torch.int64, device=device)
    return (entries * 0x9E3779B1) & _MASK32


def counter_uniform(seeds: torch.Tensor, step: torch.Tensor | int, size: int,
                    keys: torch.Tensor | None = None) -> torch.Tensor:
    """Uniform numbers in (0, 1), one per (row, entry), a pure function of (seed, step, entry).

    seeds: (R,) int64; step: int or 0-d int64 tensor; keys: ``entry_keys(size)`` on the seeds' device, or None
    to build it here (eager callers); returns (R, size) float32.
    """
    seeds = seeds.to(torch.int64)
    step = torch.as_tensor(step, dtype=torch.int64, device=seeds.device)
    row_key = _fmix32((seeds & _MASK32) ^ 0x9E3779B9)
    row_key = _fmix32(row_key ^ ((step * 0x632BE5AB + 0x7F4A7C15) & _MASK32))  # (R,)
    if keys is None:
        keys = entry_keys(size, seeds.device)
    elif keys.shape != (size,):
        raise ValueError(f"keys has shape {tuple(keys.shape)} for {size} entries; pass entry_keys({size})")
    bits = _fmix32(row_key[:, None] ^ keys)  # (R, size)
    return ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / 2**24)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set entries outside the top-k and outside the top-p nucleus to -inf (transformers' warper semantics:
    keep the smallest set of most likely entries whose probability reaches top_p, at least one).

    logits: (R, V) float, already divided by the temperature. top_k 0 and top_p 1.0 are off.
    """
    if top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_k={top_k} must be >= 0 and top_p={top_p} in (0, 1]; use top_k=0, top_p=1.0 for off")
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (R, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # (R, V) probability of the strictly more likely entries
        drop_sorted = mass_before >= top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, seeds: torch.Tensor, step: torch.Tensor | int, temperature: float,
                top_k: int = 0, top_p: float = 1.0, keys: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row. temperature <= 0 means greedy (argmax, seeds unused).

    logits: (R, V); seeds: (R,) int64; step: the token index (int or 0-d tensor); keys: ``entry_keys(V)``, which
    a compiled caller must pass (see there). Returns (R,) int64.
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    scaled = filter_logits(logits.float() / temperature, top_k, top_p)
    gumbel = -torch.log(-torch.log(counter_uniform(seeds, step, logits.shape[-1], keys)))
    return (scaled + gumbel).argmax(dim=-1)
