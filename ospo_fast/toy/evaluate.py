"""Judged text-image alignment of a model on the toy world's held-out prompts (generated with the engine, scored
by the exact judge). Seeds are fixed per prompt index, so two models are compared on the same noise.

``ToyEvaluation`` is the run's evaluation step on the toy world (the ``"toy"`` kind of ``ospo_fast.evaluate``):
held-out alignment before and after each iteration (``heldout_alignment``), the paired change, and what each
iteration's pairs hold by the judge (masks, images, Self-VQA answers)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from ospo_fast.config import ImageConfig, OSPOConfig
from ospo_fast.toy import world
from ospo_fast.toy.judge import JUDGE_VERSION, judge


class ToyEvaluation:
    """The toy world's evaluation of a run (``ospo_fast.evaluate.Evaluation``): the judged images and verdicts of
    model ``name`` at setting suffix k are kept in ``heldout_dir/<name><k>`` for the report's gallery."""

    def __init__(self, config: OSPOConfig, heldout_dir: Path) -> None:
        self.config, self.heldout_dir = config, Path(heldout_dir)

    def judge_model(self, model_path: str, name: str) -> dict[str, dict]:
        """Held-out alignment of ``model_path``, saved as ``name``. A resume reuses what an earlier judging of the
        same model (by content) with the same settings left (``<name>.judged.json``), so it neither re-draws nor
        re-judges; anything else judges afresh."""
        from ospo_fast.models.loader import model_identity
        from ospo_fast.store import StoreError, atomic_write_json, config_fingerprint

        record = self.heldout_dir / f"{name}.judged.json"
        c = self.config
        fingerprint = config_fingerprint({
            "model.identity": model_identity(model_path), "model.dtype": c.model.dtype, "seed": c.seed,
            "images": dataclasses.asdict(c.images), "eval": dataclasses.asdict(c.eval),
            "judge": JUDGE_VERSION})  # verdicts of an older judge are judged again, never mixed with new ones
        saved = _read_judged(record)
        dirs = [self.heldout_dir / f"{name}{key}" for key in setting_keys(c)]
        if saved is not None and saved.get("fingerprint") == fingerprint and all(d.is_dir() for d in dirs):
            return saved["results"]
        results = heldout_alignment(c, model_path, self.heldout_dir / name)
        try:
            atomic_write_json(record, {"fingerprint": fingerprint, "results": results})
        except (OSError, StoreError, TypeError) as err:  # a record that cannot be kept only costs a re-judging
            print(f"[ospo-fast] note: could not keep {record} ({err}); a resume will judge {name} again")
        return results

    def compare(self, before: str, after: str) -> dict[str, dict]:
        """After minus before, image by image (``paired_change``), at every setting ``judge_model`` judged."""
        return {key: paired_change(self.heldout_dir / f"{before}{key}", self.heldout_dir / f"{after}{key}")
                for key in setting_keys(self.config)}

    def judge_pairs(self, synth_dir: Path) -> dict[str, dict]:
        figures = {"mask_localisation": pair_mask_localisation(synth_dir), "pair_judgement": pair_judgement(synth_dir)}
        if self.config.questions.source == "rules":  # the judge knows the truth of rule questions only
            figures["pair_self_vqa"] = pair_self_vqa(synth_dir)
        return figures


def _read_judged(path: Path) -> dict | None:
    """A ``<name>.judged.json`` record, or None when there is none or it is not a readable object (judge again)."""
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("results"), dict) else None


def _guidance_weights(config: OSPOConfig) -> list[float]:
    """``images.guidance_scale`` then each of ``eval.toy_extra_guidance``, without repeats."""
    return list(dict.fromkeys([config.images.guidance_scale, *config.eval.toy_extra_guidance]))


def _guidance_key(config: OSPOConfig, weight: float) -> str:
    return "" if weight == config.images.guidance_scale else f"@cfg{weight:g}"


def setting_keys(config: OSPOConfig) -> list[str]:
    """The keys of ``heldout_alignment``'s result, in its order."""
    keys = [_guidance_key(config, weight) for weight in _guidance_weights(config)]
    return keys + (["@retuned"] if config.eval.toy_retune_guidance else [])


def heldout_alignment(config: OSPOConfig, model_path: str, save_to: Path | None = None) -> dict[str, dict]:
    """Judged alignment on held-out prompts at ``images.guidance_scale`` (key "") and at each of
    ``eval.toy_extra_guidance`` (key "@cfg<w>"), and at the re-tuned weight (key "@retuned") when
    ``eval.toy_retune_guidance`` lists any. With ``save_to`` (``<run>/heldout/<name>``) the images and verdicts of
    key k go to ``<run>/heldout/<name><k>`` for the report."""
    from ospo_fast.models import load_janus

    m = config.model
    bundle = load_janus(model_path, dtype=m.dtype, device=m.device, attn_implementation=m.attn_implementation)
    results = {}
    for weight in _guidance_weights(config):
        key = _guidance_key(config, weight)
        images = dataclasses.replace(config.images, guidance_scale=weight)
        save_dir = None if save_to is None else save_to.with_name(save_to.name + key)
        desc = f"judge {'held-out' if save_to is None else save_to.name}{key}"
        results[key] = judged_alignment(bundle, config.eval.toy_heldout_prompts, seed=config.seed, config=images,
                                        batch_size=config.eval.batch_size, save_dir=save_dir, desc=desc)
    if config.eval.toy_retune_guidance:
        weight, tuning = retuned_guidance(bundle, config)
        images = dataclasses.replace(config.images, guidance_scale=weight)
        save_dir = None if save_to is None else save_to.with_name(save_to.name + "@retuned")
        results["@retuned"] = {**judged_alignment(bundle, config.eval.toy_heldout_prompts, seed=config.seed,
                                                  config=images, batch_size=config.eval.batch_size,
                                                  save_dir=save_dir, desc=f"judge held-out @ re-tuned CFG {weight:g}"),
                               "retuned_on": tuning}
    return results


def retuned_guidance(bundle, config: OSPOConfig) -> tuple[float, dict]:
    """``eval.toy_retune_guidance``: the weight of that list whose images of ``eval.toy_retune_prompts``
    training-split captions the judge finds best (loose, then strict; the first listed on a tie), and every
    weight's {"strict", "loose", "n"} on them. The seeds differ from the held-out run's."""
    tuning = {}
    for weight in config.eval.toy_retune_guidance:
        images = dataclasses.replace(config.images, guidance_scale=weight)
        r = judged_alignment(bundle, config.eval.toy_retune_prompts, seed=config.seed + 1, config=images,
                             batch_size=config.eval.batch_size, split="train", desc=f"re-tune CFG {weight:g}")
        tuning[f"{weight:g}"] = {"n": r["n"], "strict": r["strict"], "loose": r["loose"]}

    def rank(weight: float) -> tuple[float, float]:  # max() keeps the first of equals: the earlier listed
        return tuning[f"{weight:g}"]["loose"], tuning[f"{weight:g}"]["strict"]

    return max(config.eval.toy_retune_guidance, key=rank), tuning


def judged_alignment(bundle, num_prompts: int, seed: int = 0, config: ImageConfig | None = None,
                     batch_size: int = 32, split: str = "heldout", save_dir: Path | None = None,
                     desc: str = "judge") -> dict:
    """{"n", "strict", "loose", "per_category": {cat: {"n", "strict", "loose"}}} over ``num_prompts`` prompts of
    ``split`` ("heldout": captions never trained on; "train": the captions OSPO's prompts come from, fresh
    sampling seeds); strict = colour + shape + relation, loose = colour + position.

    A progress bar named ``desc`` counts the images. With ``save_dir``, every image is kept as
    ``save_dir/images/NNNN.png`` with its verdict in ``save_dir/verdicts.jsonl`` (see ``save_judged``), so the report
    shows them without generating again."""
    from tqdm.auto import tqdm

    from ospo_fast.engine.image_gen import generate_images

    config = config or ImageConfig()
    records = world.sample_prompts(num_prompts, split=split, seed=seed + 1)
    results, seeds, pixels = [], [], []
    with tqdm(total=len(records), desc=desc, unit="image") as bar:
        for start in range(0, len(records), batch_size):
            batch = records[start:start + batch_size]
            batch_seeds = [seed + start + i for i in range(len(batch))]
            images = generate_images(bundle, [r["prompt"] for r in batch], batch_seeds, config).pixels.cpu().numpy()
            results += [judge(img, r["structure"]) for img, r in zip(images, batch)]
            seeds += batch_seeds
            pixels += list(images)  # (H, W, 3) uint8 each
            bar.update(len(batch))
    if save_dir is not None:
        save_judged(Path(save_dir), records, seeds, pixels, results)
    strict, loose = float(np.mean([r.strict for r in results])), float(np.mean([r.loose for r in results]))
    summary: dict = {"n": len(results), "guidance_scale": config.guidance_scale,
                     "strict": strict, "strict_se": standard_error(strict, len(results)),
                     "loose": loose, "loose_se": standard_error(loose, len(results)), "per_category": {}}
    for category in sorted({r["category"] for r in records}):
        picked = [res for res, rec in zip(results, records) if rec["category"] == category]
        summary["per_category"][category] = {"n": len(picked), "strict": float(np.mean([r.strict for r in picked])),
                                             "loose": float(np.mean([r.loose for r in picked]))}
    return summary


def standard_error(rate: float, n: int) -> float:
    """Binomial standard error of a rate measured on ``n`` independently sampled images (nan when n is 0)."""
    return math.sqrt(rate * (1.0 - rate) / n) if n else float("nan")


def paired_change(before_dir: Path, after_dir: Path) -> dict:
    """After minus before on the same prompts and sampling seeds, from the ``verdicts.jsonl`` of two
    ``judged_alignment`` runs with ``save_dir``: {"n", "strict", "strict_se", "loose", "loose_se"}, each change the
    mean per-image difference (-1, 0 or 1) and its standard error sd / sqrt(n). Pairing removes the prompt-to-prompt
    spread, so the change's error is smaller than the two rates' errors combined."""
    from ospo_fast.store import read_jsonl

    before, after = read_jsonl(Path(before_dir) / "verdicts.jsonl"), read_jsonl(Path(after_dir) / "verdicts.jsonl")
    if not before or [(r["prompt"], r["seed"]) for r in before] != [(r["prompt"], r["seed"]) for r in after]:
        raise ValueError(f"{before_dir} and {after_dir} must hold the same prompts and seeds (and at least one); "
                         "judge both with the same eval settings")
    change: dict = {"n": len(before)}
    for key in ("strict", "loose"):
        diff = np.array([float(a[key]) - float(b[key]) for b, a in zip(before, after)])
        change[key] = float(diff.mean())
        change[f"{key}_se"] = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else float("nan")
    return change


def save_judged(save_dir: Path, records: list[dict], seeds: list[int], pixels: list[np.ndarray],
                results: list) -> None:
    """Write ``images/NNNN.png`` (uint8 (H, W, 3) each) and ``verdicts.jsonl``: one line per image with "index",
    "prompt", "category", "seed", "image" (relative to ``save_dir``), "strict", "loose" and the judge's "details".
    The JSONL is written last, so a directory with it is complete."""
    import io

    from PIL import Image

    from ospo_fast.store import atomic_write_bytes, atomic_write_jsonl

    rows = []
    for index, (record, seed, image, result) in enumerate(zip(records, seeds, pixels, results)):
        buffer = io.BytesIO()
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG")
        rel = f"images/{index:04d}.png"
        atomic_write_bytes(save_dir / rel, buffer.getvalue())
        rows.append({"index": index, "prompt": record["prompt"], "category": record["category"], "seed": seed,
                     "image": rel, "strict": bool(result.strict), "loose": bool(result.loose),
                     "details": result.details})
    atomic_write_jsonl(save_dir / "verdicts.jsonl", rows)


def object_cells(image: np.ndarray, grid: int, min_fill: float = 0.25) -> np.ndarray:
    """(grid, grid) bool: cells of an image whose pixels are mostly nearer a palette colour than the background."""
    from ospo_fast.toy.world import BACKGROUND, PALETTE

    pixels = image.astype(np.float32)
    palette = np.asarray(list(PALETTE.values()), dtype=np.float32)
    to_palette = ((pixels[:, :, None, :] - palette[None, None]) ** 2).sum(-1).min(-1)
    to_background = ((pixels - np.asarray(BACKGROUND, dtype=np.float32)) ** 2).sum(-1)
    foreground = to_palette < to_background
    h, w = foreground.shape
    cells = foreground.reshape(grid, h // grid, grid, w // grid).mean(axis=(1, 3))
    return cells > min_fill


def mask_localisation(images: list[np.ndarray], masks: list[np.ndarray]) -> dict:
    """How well object masks (each (G, G) bool) cover the drawn objects: mean precision (mask cells on objects),
    its chance level (the object-cell fraction), and recall, over images where both are non-empty."""
    precision, chance, recall = [], [], []
    for image, mask in zip(images, masks):
        cells = object_cells(image, mask.shape[0])
        if mask.any() and cells.any():
            precision.append((mask & cells).sum() / mask.sum())
            chance.append(cells.mean())
            recall.append((mask & cells).sum() / cells.sum())
    return {"n": len(precision), "precision": float(np.mean(precision)) if precision else float("nan"),
            "chance": float(np.mean(chance)) if chance else float("nan"),
            "recall": float(np.mean(recall)) if recall else float("nan")}


def pair_mask_localisation(synth_dir: Path) -> dict:
    """``mask_localisation`` of a synthesis run's pairs: how well the attention masks of the generated images cover
    the drawn objects."""
    from ospo_fast.runstore import RunStore

    store = RunStore(synth_dir)
    images, masks = [], []
    for record in store.read_stage("images"):  # checked against the manifest; PNGs against their sha256
        for side in ("chosen", "rejected"):
            images.append(store.load_image(record[side]))
            grid = int(round(len(record[side]["mask"]) ** 0.5))
            masks.append(np.asarray(record[side]["mask"], dtype=bool).reshape(grid, grid))
    return mask_localisation(images, masks)


def pair_judgement(synth_dir: Path) -> dict:
    """What the preference pairs of a synthesis run hold, by the exact judge against the base prompt: strict and
    loose rates of chosen and rejected images, and how often chosen is loosely right where rejected is not (and
    the reverse), for the kept pairs and for every candidate pair before filtering and selection."""
    from ospo_fast.runstore import RunStore

    store = RunStore(synth_dir)  # stage files against the manifest, PNGs against their sha256
    structures = {r["id"]: r["structure"] for r in store.read_stage("prompts")}
    candidates = store.read_stage("images")
    verdict = {}  # image path -> judge result; kept pairs are candidates, so each image is judged once
    for r in candidates:
        for side in ("chosen", "rejected"):
            verdict[r[side]["image"]] = judge(store.load_image(r[side]), structures[r["base_id"]])

    def summary(rows: list[dict]) -> dict:
        if not rows:
            return {"n": 0}
        w = [verdict[r["chosen"]["image"]] for r in rows]
        lo = [verdict[r["rejected"]["image"]] for r in rows]
        return {"n": len(rows),
                "chosen_strict": float(np.mean([j.strict for j in w])),
                "chosen_loose": float(np.mean([j.loose for j in w])),
                "rejected_strict": float(np.mean([j.strict for j in lo])),
                "rejected_loose": float(np.mean([j.loose for j in lo])),
                "chosen_better": float(np.mean([a.loose and not b.loose for a, b in zip(w, lo)])),
                "rejected_better": float(np.mean([b.loose and not a.loose for a, b in zip(w, lo)]))}

    return {"kept": summary(store.read_final("pairs.jsonl", images=False)), "candidates": summary(candidates)}


def pair_self_vqa(synth_dir: Path) -> dict:
    """How often the model's own yes/no answers on its pairs are right, by the exact judge: every Self-VQA answer
    of the ``vqa`` stage (yes when p_yes > p_no) against ``judge.rule_question_truths`` of the image it was asked
    about, per question kind ("object": colour and shape, "relation") and overall, for every scored candidate and
    for the kept pairs; with the rate of true answers, so accuracy can be read against always answering one way.
    The run must use ``questions.source=rules`` (the judge knows the truth of rule questions only)."""
    from ospo_fast.runstore import RunStore
    from ospo_fast.stages.questions import rule_questions
    from ospo_fast.toy.judge import rule_question_truths

    store = RunStore(synth_dir)
    structures = {r["id"]: r["structure"] for r in store.read_stage("prompts")}
    truths: dict[str, list[tuple[str, bool]]] = {}  # image path -> truths; an image is judged once

    def answers(records: list[dict]) -> list[tuple[str, bool, bool]]:
        """(kind, said yes, true) for every answer of ``records`` (vqa-stage records or final pairs: both carry
        ``base_id``, ``questions`` and per side ``image`` and ``vqa``)."""
        rows = []
        for record in records:
            structure = structures[record["base_id"]]
            expected = rule_questions(structure, len(record["questions"]))
            if record["questions"] != expected:
                raise ValueError(f"{synth_dir}: record {record['id']} asked {record['questions']}, not the rule "
                                 f"questions {expected}; judge Self-VQA on a run with questions.source=rules")
            for side in (record["chosen"], record["rejected"]):
                if side["image"] not in truths:
                    truths[side["image"]] = rule_question_truths(store.load_image(side), structure)
                said = [p_yes > p_no for p_yes, p_no in side["vqa"]]
                rows += [(kind, yes, truth) for (kind, truth), yes in zip(truths[side["image"]], said)]
        return rows

    rate = lambda values: float(np.mean(values)) if values else float("nan")

    def summary(rows: list[tuple[str, bool, bool]]) -> dict:
        out = {"n": len(rows)}
        for kind in ("object", "relation", "all"):
            picked = [(yes, truth) for k, yes, truth in rows if kind in ("all", k)]
            out[kind] = {"n": len(picked), "accuracy": rate([yes == truth for yes, truth in picked]),
                         "true_rate": rate([truth for _, truth in picked])}
        return out

    # kept pairs are checked with their PNGs; a best-of-N pair joins two scored images of one prompt
    return {"candidates": summary(answers(store.read_stage("vqa"))),
            "kept": summary(answers(store.read_final("pairs.jsonl")))}
