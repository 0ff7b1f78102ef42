"""The build's figures (``metrics.json``): the VQ's codes and reconstructions, T2I alignment by the exact judge
with transformers' own sampler, and VQA accuracy, on held-out captions."""

from __future__ import annotations

import numpy as np
import torch

from ospo_fast.engine.prompts import image_prompt_inputs
from ospo_fast.toy import world
from ospo_fast.toy.judge import judge
from recipes.toy_janus.data import answer_token_ids, make_question, scene_batch
from recipes.toy_janus.losses import vqa_logits
from recipes.toy_janus.vq import background_code_locality, decode_tokens, encode_tokens

TEST_SEED, TEST_N = 1234, 32  # the tests' held-out check (tests/test_toy_model.py)


@torch.no_grad()
def sample_toy_images(model, processor, captions: list[str], seed: int, guidance_scale: float = 5.0,
                      batch_size: int = 16) -> tuple[torch.Tensor, np.ndarray]:
    """Janus ``generate(generation_mode="image")`` with CFG; returns tokens (N, 64) and uint8 (N, 64, 64, 3).

    transformers' own sampler (not ``ospo_fast.engine.generate_images``): the build measures the model alone."""
    tokens = []
    dev = next(model.parameters()).device
    for start in range(0, len(captions), batch_size):
        chunk = captions[start:start + batch_size]
        ids, mask = image_prompt_inputs(processor, chunk)
        torch.manual_seed(seed + start)
        tokens.append(model.generate(inputs=ids.to(dev), attention_mask=mask.to(dev),
                                     generation_mode="image", guidance_scale=guidance_scale, do_sample=True,
                                     temperature=1.0).cpu())
    tokens = torch.cat(tokens)
    return tokens, decode_tokens(model, tokens.to(dev))


def eval_t2i(model, processor, split: str, seed: int, n: int, guidance_scale: float = 5.0) -> dict:
    """Judged alignment of ``n`` generated images for the captions of ``split`` (cycled, fixed order)."""
    specs = world.split_specs(split)
    order = np.random.default_rng([seed, 3]).permutation(len(specs))
    chosen = [specs[order[i % len(specs)]] for i in range(n)]
    _, images = sample_toy_images(model, processor, [world.caption_of_spec(s) for s in chosen], seed, guidance_scale)
    results = [judge(img, world.structure_of_spec(s)) for img, s in zip(images, chosen)]
    return {"n": n, "strict": float(np.mean([r.strict for r in results])),
            "loose": float(np.mean([r.loose for r in results]))}


@torch.no_grad()
def eval_vqa(model, processor, split: str, seed: int, n: int, batch_size: int = 32) -> dict:
    """Accuracy of sign(p(yes) - p(no)) on ``n`` balanced questions about scenes of ``split``'s captions;
    p(yes) = max(P("yes"), P("Yes")) over the full vocabulary, as SPEC stage 4."""
    rng = np.random.default_rng([seed, 4])
    correct = []
    for start in range(0, n, batch_size):
        m = min(batch_size, n - start)
        scenes, images = scene_batch(rng, m, split)
        answers = rng.random(m) < 0.5
        questions = [make_question(world.spec_of(s), rng, bool(a)) for s, a in zip(scenes, answers)]
        correct += answered_right(model, processor, images, questions, answers)
    return {"n": n, "accuracy": float(np.mean(correct))}


def answered_right(model, processor, images: np.ndarray, questions: list[str], answers: np.ndarray) -> list[bool]:
    """Per question, whether sign(p(yes) - p(no)) matches the true answer (bool (B,)); p(yes) = max(P("yes"),
    P("Yes")) over the full vocabulary, as SPEC stage 4."""
    yes_ids, no_ids = answer_token_ids(processor.tokenizer)
    probs = vqa_logits(model, processor, images, questions).softmax(-1)
    score = probs[:, yes_ids].amax(-1) - probs[:, no_ids].amax(-1)  # (B,)
    return ((score > 0).numpy() == answers).tolist()


QUESTION_GROUPS = {"colour": ("there", "is_colour"), "shape": ("there_shape",),
                   "relation": ("rel_shapes", "rel_full", "there_rel")}


@torch.no_grad()
def eval_vqa_per_kind(model, processor, split: str, seed: int, n: int, batch_size: int = 32) -> dict:
    """``eval_vqa``'s accuracy for each group of ``QUESTION_GROUPS`` (``n`` balanced questions each, two-object
    scenes for the relation questions), so a model that reads colours only is not hidden by the mix."""
    rng = np.random.default_rng([seed, 10])
    pairs = [s for s in world.split_specs(split) if s.relation]
    result = {}
    for group, kinds in QUESTION_GROUPS.items():
        correct = []
        for start in range(0, n, batch_size):
            m = min(batch_size, n - start)
            specs = [pairs[i] for i in rng.integers(len(pairs), size=m)]
            scenes = [world.scene_from_spec(spec, rng) for spec in specs]
            images = np.stack([world.render(s) for s in scenes])
            answers = rng.random(m) < 0.5
            questions = [make_question(spec, rng, bool(a), kinds) for spec, a in zip(specs, answers)]
            correct += answered_right(model, processor, images, questions, answers)
        result[group] = {"n": n, "accuracy": float(np.mean(correct))}
    return result


@torch.no_grad()
def eval_vq(model, seed: int, n: int) -> dict:
    """Codes used over ``n`` scenes, and the judge on their reconstructions (encode -> decode)."""
    rng = np.random.default_rng([seed, 5])
    scenes, images = scene_batch(rng, n)
    tokens = torch.cat([encode_tokens(model, images[i:i + 64]) for i in range(0, n, 64)])
    recon = np.concatenate([decode_tokens(model, tokens[i:i + 64]) for i in range(0, n, 64)])
    results = [judge(img, world.structure(s)) for img, s in zip(recon, scenes)]
    return {"n": n, "codes_used": int(tokens.unique().numel()),
            "recon_strict": float(np.mean([r.strict for r in results])),
            "recon_loose": float(np.mean([r.loose for r in results])),
            "background_codes_as_empty": background_code_locality(model, images)}
