"""The stage functions: each maps a chunk of records to (records, rejects). They call the engine and the ops;
the orchestrator (``ospo_fast.pipeline``) sequences, shards, resumes and stores.
"""

from __future__ import annotations

import random
from typing import Callable

import numpy as np
import torch

from ospo_fast.stages import perturb as P
from ospo_fast.stages import prompts as S1
from ospo_fast.stages import questions as Q
from ospo_fast.stages.context import StageContext
from ospo_fast.stages.select import judge_pair
from ospo_fast.stages.structure import objects_in_text


def _text_sampling(temperature: float, top_p: float, max_new_tokens: int):
    from ospo_fast.engine.text_gen import TextSampling

    return TextSampling(temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=max_new_tokens)


def _generate_text(ctx: StageContext, conversations: list[list[dict]], sampling, seeds: list[int]) -> list[str]:
    from ospo_fast.engine.text_gen import generate_text

    return generate_text(ctx.bundle, conversations, sampling, seeds)


# ---------------------------------------------------------------- stage 1

def seed_exemplars(ctx: StageContext, category: str, count: int, salt: object) -> list[dict]:
    """Exemplars for the few-shot request before the model has written any: sampler prompts."""
    rng = random.Random(S1.stable_seed("exemplar", ctx.config.seed, category, salt))
    out = []
    for _ in range(count):
        structure = S1.sample_structure(ctx.vocab, category, rng)
        out.append({"prompt": S1.render_prompt(structure), "structure": structure})
    return out


def model_prompts_chunk(ctx: StageContext, chunk_index: int, rank: int, history: list[dict]) -> tuple[list, list]:
    """One batch of in-context prompt requests. Exemplars come from the sampler until the first refresh, then from
    this rank's own accepted prompts (``history``), refreshed every ``exemplar_refresh_every`` chunks."""
    cfg = ctx.config.prompts
    categories = [c for c in cfg.categories if c in ctx.vocab.categories]
    refresh = chunk_index // max(1, cfg.exemplar_refresh_every)
    conversations, cats, seeds = [], [], []
    for row in range(cfg.batch_size):
        category = categories[(chunk_index * cfg.batch_size + row) % len(categories)]
        own = [h for h in history if h["category"] == category]
        if refresh > 0 and len(own) >= cfg.num_exemplars:
            rng = random.Random(S1.stable_seed("refresh", ctx.config.seed, rank, refresh, category))
            exemplars = rng.sample(own, cfg.num_exemplars)
        else:
            exemplars = seed_exemplars(ctx, category, cfg.num_exemplars, (rank, refresh, row))
        conversations.append(S1.prompt_request(category, exemplars))
        cats.append(category)
        seeds.append(S1.stable_seed("prompt-gen", ctx.config.seed, rank, chunk_index, row))
    texts = _generate_text(ctx, conversations, _text_sampling(cfg.temperature, cfg.top_p, cfg.max_new_tokens), seeds)
    records, rejects = [], []
    for row, (text, category) in enumerate(zip(texts, cats)):
        rid = f"m{rank:03d}-{chunk_index:05d}-{row:03d}"
        parsed = S1.parse_prompt_answer(text, category, cfg.max_numeracy)
        if parsed.record is None:
            rejects.append({"id": rid, "stage": "prompts", "reason": parsed.reason, "output": text[:500]})
        else:
            records.append(dict(parsed.record, id=rid))
    return records, rejects


# ---------------------------------------------------------------- stage 2

def perturb_chunk(ctx: StageContext, records: list[dict]) -> tuple[list, list]:
    cfg = ctx.config.perturb
    n = cfg.num_perturbations
    if cfg.source == "best_of_n":
        return [r for record in records for r in P.best_of_n_records(record, n)], []
    if cfg.source == "rules":
        out, rejects = [], []
        for record in records:
            made, rej = P.rule_perturbations(record, ctx.vocab, n, ctx.config.seed)
            out += made
            rejects += [dict(r, stage="perturb") for r in rej]
        return out, rejects
    jobs = [(record, index, kind) for record in records for index, kind in enumerate(P.perturbation_kinds(record, n))]
    seeds = [S1.stable_seed("perturb-gen", ctx.config.seed, r["id"], i) for r, i, _ in jobs]
    texts = _generate_text(ctx, [P.perturb_request(r, k) for r, _, k in jobs],
                           _text_sampling(cfg.temperature, cfg.top_p, cfg.max_new_tokens), seeds)
    out, rejects = [], []
    for (record, index, kind), text in zip(jobs, texts):
        parsed = P.parse_perturbation(text, record)
        rid = f"{record['id']}-n{index}"
        if isinstance(parsed, str):
            rejects.append({"id": rid, "stage": "perturb", "reason": parsed, "output": text[:500]})
        else:
            out.append(P.perturbed_record(record, index, kind, *parsed))
    return out, rejects


def densify_chunk(ctx: StageContext, records: list[dict]) -> tuple[list, list]:
    cfg = ctx.config.densify
    if not cfg.enabled:
        return [dict(r, dense_base=r["base_prompt"], dense_prompt=r["prompt"]) for r in records], []
    seeds = [S1.stable_seed("densify", ctx.config.seed, r["id"]) for r in records]
    texts = _generate_text(ctx, [P.densify_request(r["base_prompt"], r["prompt"]) for r in records],
                           _text_sampling(cfg.temperature, cfg.top_p, cfg.max_new_tokens), seeds)
    out, rejects = [], []
    for record, text in zip(records, texts):
        parsed = P.parse_densified(text, record)
        if isinstance(parsed, str):
            rejects.append({"id": record["id"], "stage": "densify", "reason": parsed, "output": text[:500]})
        else:
            out.append(dict(record, dense_base=parsed[0], dense_prompt=parsed[1]))
    return out, rejects


# ---------------------------------------------------------------- stage 3

def mask_objects(record: dict, side: str, context: str) -> list[str]:
    """Object words for one side's mask. ``base`` context: the base prompt's objects (always in x). ``generation``
    context: the base objects that occur in the generation prompt, else that prompt's own objects."""
    base_objects = record["base_structure"]["objects"]
    if context == "base":
        return list(base_objects)
    prompt = record["dense_base"] if side == "chosen" else record["dense_prompt"]
    present = [o for o in base_objects if objects_in_text({"objects": [o]}, prompt)]
    return present or list(record["structure"]["objects"])


def _union_masks(ctx: StageContext, scores, counts: list[int]) -> np.ndarray:
    """(B, G, G) bool unions from the capture's accumulators (``CapturedScores``) in one fused op: maps, Otsu
    masks, union (and soft masks) of the whole batch; ``counts``: real objects per row."""
    from ospo_fast.ops.object_masks import object_masks_from_scores

    valid = torch.zeros(scores.sums.shape[:2], dtype=torch.bool)
    for row, count in enumerate(counts):
        valid[row, :count] = True
    result = object_masks_from_scores(scores, ctx.config.masks, backend=ctx.config.masks.backend,
                                      object_valid=valid.to(scores.sums.device))
    return result.union.cpu().numpy()


def teacher_forced_masks(ctx: StageContext, prompts: list[str], tokens: torch.Tensor,
                         objects: list[list[str]]) -> np.ndarray:
    """(B, G, G) bool object masks of B finished images: one teacher-forced pass of [prompt + image tokens]
    (``masks.context=base``), the attention of the image tokens to each object word, Otsu masks, their union.

    prompts: B prompts the images are conditioned on; tokens: (B, G*G) long VQ ids; objects: B non-empty lists of
    words that occur in their prompt. Averages every head of the mask layers, or the localisation heads
    (``masks.heads``), as the images stage does."""
    from ospo_fast.engine.object_attention import teacher_forced_object_scores

    chosen = ctx.localization_heads()
    scores = teacher_forced_object_scores(ctx.bundle, prompts, tokens, objects,
                                          skip_layers=ctx.config.masks.skip_layers,
                                          heads=None if chosen is None else chosen.heads)
    return _union_masks(ctx, scores, [len(o) for o in objects])


def fit_context(ctx: StageContext, records: list[dict]) -> tuple[list, list]:
    """(records whose every prompt -- dense base, dense perturbed, base for the mask pass -- leaves room for the
    image tokens within the model's max_position_embeddings, rejects "prompt_too_long" naming the record)."""
    from ospo_fast.engine.prompts import prompt_token_ids

    bundle = ctx.bundle
    limit = bundle.model.config.text_config.max_position_embeddings
    fits, rejects = [], []
    for record in records:
        prompts = {record["dense_base"], record["dense_prompt"], record["base_prompt"]}
        need = max(len(prompt_token_ids(bundle.processor, p)) for p in prompts) + bundle.num_image_tokens
        if need > limit:
            rejects.append({"id": record["id"], "stage": "images", "reason": "prompt_too_long",
                            "detail": f"{need} positions (prompt + {bundle.num_image_tokens} image tokens) > "
                                      f"max_position_embeddings {limit}"})
        else:
            fits.append(record)
    return fits, rejects


def images_chunk(ctx: StageContext, records: list[dict]) -> tuple[list, list]:
    """Both images of every pair in one batch (chosen rows then rejected rows), then their object masks. Pairs
    whose prompts do not fit the model's positions are rejected (``fit_context``), not generated."""
    from ospo_fast.engine.image_gen import generate_images
    from ospo_fast.ops.object_masks import select_layers

    cfg, mcfg = ctx.config.images, ctx.config.masks
    bundle = ctx.bundle
    records, rejects = fit_context(ctx, records)
    layers = select_layers(bundle.num_layers, mcfg.skip_layers)
    out: list[dict] = []
    for start in range(0, len(records), max(1, cfg.batch_size // 2)):
        batch = records[start:start + max(1, cfg.batch_size // 2)]
        prompts = [r["dense_base"] for r in batch] + [r["dense_prompt"] for r in batch]
        # SPEC: seeds 0..N-1 per pair index on both sides; Best-of-N draws its rejected side from seeds N..2N-1
        n_pairs = ctx.config.perturb.num_perturbations
        seeds = [ctx.config.seed + r["n"] for r in batch] + [
            ctx.config.seed + r["n"] + (n_pairs if r["kind"] == P.BEST_OF_N else 0) for r in batch]
        sides = ["chosen"] * len(batch) + ["rejected"] * len(batch)
        objects = [mask_objects(r, side, mcfg.context) for side, r in zip(sides, batch + batch)]
        in_flight = mcfg.context == "generation"
        chosen = ctx.localization_heads()
        heads = None if chosen is None else chosen.heads
        result = generate_images(bundle, prompts, seeds, cfg, objects=objects if in_flight else None,
                                 mask_layers=layers if in_flight else None, mask_heads=heads if in_flight else None,
                                 planned_prompt_tokens=ctx.planned_image_prompt)
        if in_flight:
            unions = _union_masks(ctx, result.object_scores, [len(o) for o in objects])
        else:
            unions = teacher_forced_masks(ctx, [r["base_prompt"] for r in batch] * 2, result.tokens, objects)
        tokens = result.tokens.cpu().tolist()
        for i, record in enumerate(batch):
            j = i + len(batch)
            out.append(dict(record, seed=seeds[i], rejected_seed=seeds[j], mask_objects=objects[i], chosen={
                "image": result.pixels[i].cpu().numpy(), "tokens": tokens[i],
                "mask": unions[i].reshape(-1).astype(int).tolist()}, rejected={
                "image": result.pixels[j].cpu().numpy(), "tokens": tokens[j],
                "mask": unions[j].reshape(-1).astype(int).tolist()}))
    return out, rejects


# ---------------------------------------------------------------- stage 4

def questions_chunk(ctx: StageContext, records: list[dict]) -> tuple[list, list]:
    cfg = ctx.config.questions
    if cfg.source == "rules":
        return [{"id": r["id"], "questions": Q.rule_questions(r["structure"], cfg.max_questions), "source": "rules"}
                for r in records], []
    seeds = [S1.stable_seed("questions", ctx.config.seed, r["id"]) for r in records]
    texts = _generate_text(ctx, [Q.question_request(r) for r in records],
                           _text_sampling(cfg.temperature, cfg.top_p, cfg.max_new_tokens), seeds)
    out, rejects = [], []
    for record, text in zip(records, texts):
        parsed = Q.parse_questions(text, cfg.max_questions)
        if isinstance(parsed, str):
            rejects.append({"id": record["id"], "stage": "questions", "reason": parsed, "output": text[:500]})
        else:
            out.append({"id": record["id"], "questions": parsed, "source": "model"})
    return out, rejects


def vqa_chunk(ctx: StageContext, records: list[dict], questions: dict[str, list[str]],
              load_image: Callable[[dict], np.ndarray]) -> tuple[list, list]:
    """Self-VQA on both images of every pair with the base prompt's questions, then the pair verdict.
    ``load_image(side)``: the record store's checked reader of a side's PNG, (H, W, 3) uint8."""
    from ospo_fast.engine.vqa import score_yes_no

    out, rejects, todo = [], [], []
    for record in records:
        if record["base_id"] not in questions:
            rejects.append({"id": record["id"], "stage": "vqa", "reason": "no_questions_for_prompt"})
        else:
            todo.append(record)
    images = [load_image(r[side]) for r in todo for side in ("chosen", "rejected")]
    asked = [questions[r["base_id"]] for r in todo for _ in range(2)]
    probs = score_yes_no(ctx.bundle, images, asked, ctx.config.filter.vqa_batch_size) if todo else []
    for i, record in enumerate(todo):
        chosen = [list(p) for p in probs[2 * i]]
        rejected = [list(p) for p in probs[2 * i + 1]]
        verdict = judge_pair(chosen, rejected, ctx.config.filter.tau)
        out.append(dict(record, questions=asked[2 * i], chosen=dict(record["chosen"], vqa=chosen),
                        rejected=dict(record["rejected"], vqa=rejected), verdict=vars(verdict)))
    return out, rejects
