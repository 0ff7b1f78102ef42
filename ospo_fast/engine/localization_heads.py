"""Localisation heads: the few attention heads whose image-token queries look at an object word's own cells
(issue 37; after Kang et al., CVPR 2025, "Your Large Vision-Language Model Only Needs A Few Attention Heads For
Visual Grounding", who find that a handful of heads ground objects where the mean over every head blurs).

Chosen once per model, without labels, from images the model draws itself:

1. draw images of prompts from the run's own prompt sampler (the stage passes ``stages.prompts.sample_prompts`` at
   a salted seed, so the choice depends on the model and settings, not on a run's records or its sharding);
2. one eager teacher-forced forward per few images gives every head's attention from each image-token query to
   each object word of the caption (``head_object_maps``: (L, H, B, O, N), mean over the word's sub-tokens);
3. per (layer, head): ``mass``, the mean attention a query pays to the object words, and ``entropy``, the mean
   Shannon entropy of the object's map normalised over the N cells, divided by log N (0: one cell, 1: uniform; the
   paper's spatial entropy is over connected components of a thresholded map, ours is over the map itself);
4. heads that look at the words at all (mass at or above the median of the candidate heads) ranked by entropy,
   lowest first: the first ``k`` are the localisation heads. Candidate layers are the mask layers
   (``ops.object_masks.select_layers``: all but the first and last k of the SPEC).

``LocalizationHeads.heads`` ({layer: head indices}) is what the capture averages (``ObjectAttentionCapture(heads=)``,
``generate_images(mask_heads=)``, ``teacher_forced_object_scores(heads=)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ospo_fast.engine.object_attention import object_token_positions, objects_valid, teacher_forced_inputs


@dataclass(frozen=True)
class LocalizationHeads:
    """The chosen heads, ranked (best first), with each one's mass and entropy, and how many images chose them."""

    ranked: tuple[tuple[int, int], ...]
    mass: tuple[float, ...]
    entropy: tuple[float, ...]
    images: int

    @property
    def heads(self) -> dict[int, tuple[int, ...]]:
        out: dict[int, list[int]] = {}
        for layer, head in self.ranked:
            out.setdefault(layer, []).append(head)
        return {layer: tuple(sorted(heads)) for layer, heads in sorted(out.items())}

    def write(self, path) -> None:
        """Keep the choice as JSON (``read`` gives it back); a cache that cannot be written only costs a new choice."""
        from ospo_fast.store import atomic_write_json

        try:
            atomic_write_json(path, {"ranked": [list(p) for p in self.ranked], "mass": list(self.mass),
                                     "entropy": list(self.entropy), "images": self.images})
        except OSError:
            pass

    @classmethod
    def read(cls, path) -> LocalizationHeads | None:
        """The choice ``write`` kept at ``path``, or None when there is none or it is not readable (choose again)."""
        import json

        try:
            data = json.loads(open(path, encoding="utf-8").read())
            return cls(ranked=tuple((int(a), int(b)) for a, b in data["ranked"]),
                       mass=tuple(float(m) for m in data["mass"]), entropy=tuple(float(e) for e in data["entropy"]),
                       images=int(data["images"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def summary(self) -> dict:
        """For the run summary: the heads as "layer.head", best first, with their scores."""
        return {"heads": [f"{layer}.{head}" for layer, head in self.ranked], "images": self.images,
                "mass": [round(m, 5) for m in self.mass], "entropy": [round(e, 4) for e in self.entropy],
                "criterion": "mass >= median of the mask layers' heads, then lowest spatial entropy"}


@torch.no_grad()
def head_object_maps(bundle, prompts: list[str], image_tokens: torch.Tensor, objects: list[list[str]],
                     layers: list[int], chunk: int = 4) -> torch.Tensor:
    """(L, H, B, O, N) float32: every head's attention from image-token query j to object o's sub-tokens (mean over
    them), from transformers' eager forward with ``output_attentions=True``, ``chunk`` images at a time; padded
    objects are zeros."""
    lm = bundle.model.model.language_model
    original = lm.config._attn_implementation
    out = []
    lm.set_attn_implementation("eager")
    try:
        for start in range(0, len(prompts), chunk):
            end = min(start + chunk, len(prompts))
            inputs = teacher_forced_inputs(bundle, prompts[start:end], image_tokens[start:end])
            t = inputs["input_ids"].shape[1]
            positions = object_token_positions(bundle.tokenizer, inputs["input_ids"].cpu(), objects[start:end])
            attn = lm(inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"],
                      position_ids=inputs["position_ids"], output_attentions=True, use_cache=False).attentions
            picked = torch.stack([attn[i][:, :, t:, :].float().cpu() for i in layers])  # (L, b, H, N, T)
            valid = (positions >= 0).float()  # (b, O, S)
            index = positions.clamp(min=0)  # (b, O, S)
            l_, b, h, n, _ = picked.shape
            gathered = picked.gather(-1, index.view(1, b, 1, 1, -1).expand(l_, b, h, n, index[0].numel()))
            gathered = gathered.view(l_, b, h, n, *index.shape[1:]) * valid[None, :, None, None]  # (L, b, H, N, O, S)
            maps = gathered.sum(-1) / valid.sum(-1).clamp(min=1)[None, :, None, None]  # (L, b, H, N, O)
            out.append(maps.permute(0, 2, 1, 4, 3))  # (L, H, b, O, N)
    finally:
        lm.set_attn_implementation(original)
    width = max(m.shape[3] for m in out)
    return torch.cat([torch.nn.functional.pad(m, (0, 0, 0, width - m.shape[3])) for m in out], dim=2)


def score_heads(maps: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """maps (L, H, B, O, N), valid (B, O) bool -> mass (L, H) and entropy (L, H) float64, means over the valid
    (image, object) maps: mass = mean attention per cell, entropy = Shannon entropy of the map normalised over
    its N cells, / log N."""
    m = maps.double()
    w = valid.double()[None, None]  # (1, 1, B, O)
    total = m.sum(-1)  # (L, H, B, O)
    p = m / total.clamp(min=1e-30)[..., None]
    entropy = -(p * p.clamp(min=1e-30).log()).sum(-1) / math.log(m.shape[-1])  # (L, H, B, O)
    count = w.sum()
    return (total / m.shape[-1] * w).sum((-1, -2)) / count, (entropy * w).sum((-1, -2)) / count


def choose_heads(mass: torch.Tensor, entropy: torch.Tensor, layers: list[int], k: int) -> list[tuple[int, int]]:
    """The k (layer, head) pairs of lowest entropy among those whose mass is at least the median: best first."""
    flat_mass, flat_entropy = mass.flatten(), entropy.flatten()
    eligible = flat_mass >= flat_mass.median()
    order = sorted((int(i) for i in eligible.nonzero().flatten()), key=lambda i: (float(flat_entropy[i]), i))
    heads = mass.shape[1]
    return [(layers[i // heads], i % heads) for i in order[:k]]


def find_localization_heads(bundle, prompts: list[str], objects: list[list[str]], seeds: list[int], images_config,
                            k: int, layers: list[int]) -> LocalizationHeads:
    """Draw one image per prompt with the model itself (``images_config``: the run's ImageConfig) and choose its
    k localisation heads among ``layers``' heads from the attention its image tokens pay to ``objects``."""
    from ospo_fast.engine.image_gen import generate_images

    drawn = generate_images(bundle, prompts, seeds, images_config)
    maps = head_object_maps(bundle, prompts, drawn.tokens, objects, layers)
    mass, entropy = score_heads(maps, objects_valid(objects))
    ranked = choose_heads(mass, entropy, layers, k)
    index = {layer: i for i, layer in enumerate(layers)}
    return LocalizationHeads(ranked=tuple(ranked), mass=tuple(float(mass[index[lay], h]) for lay, h in ranked),
                             entropy=tuple(float(entropy[index[lay], h]) for lay, h in ranked), images=len(prompts))
