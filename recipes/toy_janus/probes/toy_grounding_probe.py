"""Where the toy model's image tokens read the caption from (issue #16: why the object masks do not ground).

For held-out two-object captions and the VQ tokens of a true render of each (so where each object lies is known),
one teacher-forced forward with the eager attention, as the mask pass lays it out (``teacher_forced_inputs``):

1. NLL per image token (the positions that predict image tokens: ``<begin_of_image>`` and the image tokens) under
   the full prompt; with the caption's words hidden from those positions (the template tokens, which read the
   caption, stay visible); with the template's suffix after the caption (``\n\n<|Assistant|>:`` for Janus;
   ``<begin_of_image>`` stays) hidden from them instead; and under Janus's unconditional prompt. The share of the
   caption's gain over unconditional that survives says where the image tokens read the caption from: the words
   themselves, or a summary that the suffix holds. Then where the caption's gain goes: to the tokens of cells
   that hold object pixels or to those of plain background, and how many background cells have the VQ code they
   have in an empty image (a local tokenizer: all of them).
2. Per layer (head mean, image-token queries): the attention mass on BOS, the template (chat-template tokens
   before and after the caption, ``<begin_of_image>`` apart), ``<begin_of_image>``, the shape words, the colour
   words, the other caption words, and the earlier image tokens. Then, for each object's shape word, its attention
   from the cells the object covers over its attention from the other cells (``own/other``; the masks need it well
   above 1), the same for the object's first covered cell in raster order only (``onset``), and for the object's
   later cells the share of their attention to the image that lands on the object's own earlier cells, over that
   share by cell count (``copy``). Last, where the plain background reads the shape word: from the cells next to
   the object (8-neighbourhood) over those farther away (``near/far``: above 1 when the background reads the word
   where the object's edge is decided); and from the background cells after the first-drawn object's first cell
   (raster order) and before the other's, away from both, the word of the object still to come over the word of
   the one already begun (``pending/drawn``: same cells, same positions, so the image-position effect cancels;
   above 1 when a word is read until its object appears, not where it lies). And from an object's cells, its own
   shape word over the other object's shape word (``own word/other``: same cells, so what is common to the
   caption's words cancels; the object-specific part of the map). Then, per image row: the share of cells that
   objects touch, and the attention of the row's image tokens to the shape words.

    python recipes/toy_janus/probes/toy_grounding_probe.py [--model builtin:toy] [--n 64]

A row per layer and one for the NLLs are appended to benchmarks/results.jsonl.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root (benchmarks.harness)

from benchmarks.harness import append_rows  # noqa: E402
from ospo_fast.engine.image_gen import special_ids, unconditional_ids  # noqa: E402
from ospo_fast.engine.object_attention import encode_pixels_to_tokens, object_token_positions, teacher_forced_inputs  # noqa: E402,E501
from ospo_fast.engine.prompts import prompt_token_ids  # noqa: E402
from ospo_fast.models import load_janus  # noqa: E402
from ospo_fast.toy import world  # noqa: E402

CLASSES = ("bos", "template", "boi", "shape", "colour", "other word", "image")
MIN_COVER = 0.25  # a cell belongs to an object when the object covers this share of its pixels


def template_suffix_length(processor) -> int:
    """Tokens after the caption in the image prompt, ``<begin_of_image>`` included: the trailing tokens that two
    prompts ending in different words share."""
    a, b = prompt_token_ids(processor, "red"), prompt_token_ids(processor, "blue")
    shared = 0
    while shared < min(len(a), len(b)) and a[-1 - shared] == b[-1 - shared]:
        shared += 1
    return shared


def token_classes(bundle, ids: torch.Tensor, mask: torch.Tensor, suffix: int) -> list[list[str]]:
    """The class (``CLASSES``, or "pad") of each prompt token of each row. ids, mask: (B, T), left-padded."""
    decoded = {i: bundle.tokenizer.decode([i]).strip() for i in ids.unique().tolist()}
    bos = special_ids(bundle)[1]
    rows = []
    for row, keep in zip(ids.tolist(), mask.tolist()):
        first, t = keep.index(1), len(row)
        classes = []
        for position, token in enumerate(row):
            word = decoded[token]
            if not keep[position]:
                classes.append("pad")
            elif position == t - 1:
                classes.append("boi")
            elif token == bos and position == first:
                classes.append("bos")
            elif position >= t - suffix or word in ("<|User|>", ":", ""):
                classes.append("template")
            else:
                classes.append("shape" if word in world.SHAPES else "colour" if word in world.COLORS else "other word")
        rows.append(classes)
    return rows


def object_cells(obj: world.ToyObject, grid: int) -> np.ndarray:
    """(grid * grid,) bool, row-major: the cells ``obj`` covers by at least ``MIN_COVER`` of their pixels."""
    mask = world.object_mask(obj).astype(np.float32)
    patch = mask.shape[0] // grid
    return (mask.reshape(grid, patch, grid, patch).mean(axis=(1, 3)) >= MIN_COVER).reshape(-1)


def image_nll(bundle, inputs: dict, tokens: torch.Tensor, hide: torch.Tensor | None = None) -> torch.Tensor:
    """NLL in nats (B, N) of each image token of ``tokens`` (B, N), teacher-forced after the prompt. ``hide`` (B, T)
    bool: prompt tokens that the positions predicting image tokens (``<begin_of_image>`` on) may not attend to; the
    prompt tokens themselves still see them (a custom 4D mask: causal, padding, then ``hide``)."""
    model = bundle.model
    embeds, mask, t = inputs["inputs_embeds"], inputs["attention_mask"].bool(), inputs["input_ids"].shape[1]
    length = embeds.shape[1]
    allowed = torch.ones(length, length, dtype=torch.bool).tril()[None] & mask[:, None, :]  # (B, Q, K)
    if hide is not None:
        allowed[:, t - 1:, :t] &= ~hide[:, None, :]
    additive = torch.zeros(allowed.shape, dtype=embeds.dtype).masked_fill(~allowed, torch.finfo(embeds.dtype).min)
    out = model.model.language_model(inputs_embeds=embeds, attention_mask=additive[:, None],
                                     position_ids=inputs["position_ids"], use_cache=False)
    logits = model.model.generation_head(out.last_hidden_state[:, t - 1:-1])  # (B, N, K)
    return F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten(), reduction="none").view(tokens.shape)


def ring_cells(cells: np.ndarray, grid: int) -> np.ndarray:
    """(grid * grid,) bool: the cells next to ``cells`` (8-neighbourhood), ``cells`` themselves excluded."""
    square = cells.reshape(grid, grid)
    padded = np.pad(square, 1)
    grown = np.zeros_like(square)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            grown |= padded[dy:dy + grid, dx:dx + grid]
    return (grown & ~square).reshape(-1)


def layer_breakdown(attention: torch.Tensor, classes: list[list[str]], scenes: list, positions: torch.Tensor,
                    grid: int, untouched: np.ndarray) -> dict:
    """One layer's figures from its attention probabilities (B, heads, T + N, T + N); ``untouched`` (B, N) bool:
    the plain-background cells."""
    t = len(classes[0])
    att = attention.float().mean(1)[:, t:, :]  # (B, N, T + N): image-token queries, head mean
    mass = {name: 0.0 for name in CLASSES}
    for row, row_classes in enumerate(classes):
        per_key = att[row].mean(0)  # (T + N,)
        mass["image"] += per_key[t:].sum().item() / len(classes)
        for position, name in enumerate(row_classes):
            if name != "pad":
                mass[name] += per_key[position].item() / len(classes)
    own, other, onset, copy, copy_chance, near, far, pending, drawn, mine, theirs = ([] for _ in range(11))
    by_row = np.zeros(grid)  # attention to the caption's shape words, per image row (summed over the words)
    for row, scene in enumerate(scenes):
        words, covers, rings, onsets = [], [], [], []
        for index, obj in enumerate(scene.objects):
            keys = [p for p in positions[row, index].tolist() if p >= 0]
            on_word = att[row][:, keys].sum(-1).numpy()  # (N,)
            cells = object_cells(obj, grid)[:len(on_word)]
            if not cells.any() or cells.all():
                continue
            own.append(on_word[cells].mean())
            other.append(on_word[~cells].mean())
            onset.append(on_word[np.argmax(cells)] / on_word[~cells].mean())
            ring = ring_cells(cells, grid)
            halo = ring & untouched[row]
            distant = ~cells & ~ring & untouched[row]
            if halo.any() and distant.any():
                near.append(on_word[halo].mean())
                far.append(on_word[distant].mean())
            by_row += on_word.reshape(grid, grid).mean(1) / len(scenes)
            words.append(on_word)
            covers.append(cells)
            rings.append(ring | cells)
            onsets.append(int(np.argmax(cells)))
            covered = np.flatnonzero(cells)
            for cell in covered[1:]:  # continuation cells: how much of their look at the image is at the object
                earlier = torch.from_numpy(covered[covered <= cell]) + t
                on_image = att[row, cell, t:t + cell + 1].sum()
                copy.append((att[row, cell, earlier].sum() / on_image).item())
                copy_chance.append(len(earlier) / (cell + 1))
        if len(onsets) == 2:  # each object's cells: its own word against the other object's word
            for i, j in ((0, 1), (1, 0)):
                inside = covers[i] & ~covers[j]
                if inside.any():
                    mine.append(words[i][inside].mean())
                    theirs.append(words[j][inside].mean())
            # between the two onsets: one object is drawn, the other still to come
            first, second = np.argsort(onsets)
            window = np.zeros(len(words[0]), dtype=bool)
            window[onsets[first] + 1:onsets[second]] = True
            window &= untouched[row] & ~rings[0] & ~rings[1]
            if window.any():
                pending.append(words[second][window].mean())
                drawn.append(words[first][window].mean())
    return {"mass": mass, "own_over_other": float(np.mean(own) / np.mean(other)),
            "onset_over_other": float(np.mean(onset)), "copy_over_chance": float(np.mean(copy) / np.mean(copy_chance)),
            "near_over_far": float(np.mean(near) / np.mean(far)),
            "pending_over_drawn": float(np.mean(pending) / np.mean(drawn)),
            "own_word_over_other_word": float(np.mean(mine) / np.mean(theirs)), "shape_words_by_row": by_row.tolist()}


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:toy")
    parser.add_argument("--n", type=int, default=64, help="held-out two-object captions (with repeats)")
    args = parser.parse_args()
    bundle = load_janus(args.model, device="cpu")
    rng = np.random.default_rng(11)
    specs = [s for s in world.split_specs("heldout") if s.relation]
    specs = [specs[i] for i in rng.integers(len(specs), size=args.n)]
    scenes = [world.scene_from_spec(s, rng) for s in specs]
    captions = [world.caption_of_spec(s) for s in specs]
    renders = np.stack([world.render(scene) for scene in scenes])  # (n, 64, 64, 3) uint8
    tokens = encode_pixels_to_tokens(bundle, torch.from_numpy(renders))  # (n, N)
    suffix = template_suffix_length(bundle.processor)

    inputs = teacher_forced_inputs(bundle, captions, tokens)
    ids, t = inputs["input_ids"], inputs["input_ids"].shape[1]
    classes = token_classes(bundle, ids, inputs["attention_mask"][:, :t], suffix)
    is_word = torch.tensor([[name in ("shape", "colour", "other word") for name in row] for row in classes])
    is_suffix = torch.zeros_like(is_word)
    is_suffix[:, t - suffix:t - 1] = True  # the template after the caption, <begin_of_image> apart
    uncond = teacher_forced_inputs(bundle, captions, tokens)
    pad, bos, boi = special_ids(bundle)
    lm = bundle.model.model.language_model
    uncond["inputs_embeds"][:, :t] = lm.get_input_embeddings()(unconditional_ids(ids, bos, boi, pad))
    per_token = {"full prompt": image_nll(bundle, inputs, tokens),
                 "words hidden": image_nll(bundle, inputs, tokens, is_word),
                 "suffix hidden": image_nll(bundle, inputs, tokens, is_suffix),
                 "unconditional": image_nll(bundle, uncond, tokens)}
    nll = {k: v.mean().item() for k, v in per_token.items()}
    gain = nll["unconditional"] - nll["full prompt"]
    kept = {k: (nll["unconditional"] - nll[k]) / gain for k in ("words hidden", "suffix hidden")}
    print(f"{args.model}: n={args.n} renders of held-out two-object captions; template suffix = {suffix} tokens")
    print("NLL per image token: " + ", ".join(f"{k} {v:.3f}" for k, v in nll.items()))
    print("the caption's gain over unconditional that survives: " + ", ".join(f"{k} {v:.0%}" for k, v in kept.items()))
    touched = torch.from_numpy(~world.plain_background_cells(renders, bundle.grid))  # (n, N): any object pixel
    token_gain = per_token["unconditional"] - per_token["full prompt"]  # (n, N)
    cells = {}
    for name, where in (("object cells (any object pixel)", touched), ("background cells (none)", ~touched)):
        cells[name] = {"share_of_cells": where.float().mean().item(), "gain_per_token": token_gain[where].mean().item(),
                       "share_of_gain": (token_gain[where].sum() / token_gain.sum()).item()}
        print(f"{name}: {cells[name]['share_of_cells']:.0%} of cells, the caption's gain "
              f"{cells[name]['gain_per_token']:.3f} nats per token, {cells[name]['share_of_gain']:.0%} of the total")
    empty_tokens = encode_pixels_to_tokens(bundle, torch.from_numpy(world.empty_render()[None]))
    local = world.background_code_share(tokens.numpy(), empty_tokens.numpy(), renders)
    print(f"background cells whose VQ code is the empty image's: {local:.1%}")

    lm.set_attn_implementation("eager")  # attention probabilities
    out = lm(inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"],
             position_ids=inputs["position_ids"], use_cache=False, output_attentions=True)
    positions = object_token_positions(bundle.tokenizer, ids, [list(s.shapes) for s in specs])  # (B, O, S)
    print("attention mass of image-token queries (head mean); shape words: own/other cells, onset/other; object")
    print("cells after the first: attention to the object's own earlier cells / chance (copy)")
    print("shape words from plain-background cells: next to the object over farther away (near/far); from the cells")
    print("between the two objects' first cells: the word of the object still to come over the drawn one's; from an")
    print("object's cells: its own shape word over the other object's (own word/other)")
    print("layer " + " ".join(f"{name:>10s}" for name in CLASSES)
          + "  own/other  onset   copy  near/far  pending/drawn  own word/other")
    rows = [{"measure": "nll", **nll, "gain_kept": kept, "cells": cells, "background_codes_as_empty": local}]
    for layer, attention in enumerate(out.attentions):
        result = layer_breakdown(attention, classes, scenes, positions, bundle.grid, ~touched.numpy())
        ratios = "  ".join(f"{result[k]:{w}.2f}" for k, w in
                           (("own_over_other", 9), ("onset_over_other", 5), ("copy_over_chance", 5),
                            ("near_over_far", 8), ("pending_over_drawn", 13), ("own_word_over_other_word", 13)))
        print(f"L{layer:<4d} " + " ".join(f"{result['mass'][name]:10.3f}" for name in CLASSES) + "  " + ratios,
              flush=True)
        rows.append({"measure": "attention", "layer": layer, **result})
    covered = touched.view(-1, bundle.grid, bundle.grid).float().mean((0, 2))
    print("per image row (raster order): the share of cells with an object pixel, then per layer the attention of")
    print("the row's image tokens to the caption's shape words")
    print("covered " + " ".join(f"{x:6.3f}" for x in covered.tolist()))
    for row in rows[1:]:
        print(f"L{row['layer']:<6d} " + " ".join(f"{x:6.3f}" for x in row["shape_words_by_row"]))
    append_rows("toy_grounding_probe", rows, table="", config={"model": args.model, "n": args.n})


if __name__ == "__main__":
    main()
