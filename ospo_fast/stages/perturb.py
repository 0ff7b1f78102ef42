"""Stage 2: perturbed prompts (replace / swap / drop at object level) and joint densification.

Rule source (``perturb.source="rules"``): edits the kept structure and re-renders the prompt.
- replace: swap in an attribute (same class) or an object that was not in x (a new combination);
- swap: exchange two objects' attributes, or their positions in the relation (a new binding);
- drop: remove the second object (and its relations), or the only object's attribute.
Model source: the SPEC's think-step-by-step request, parsed strictly.
Per-sub-category mix (reference code): single-object color/shape/texture/numeracy -> [replace]*3; non_spatial ->
[replace, drop, replace]; everything else -> [replace, swap, drop].
"""

from __future__ import annotations

import random
import re

from ospo_fast.stages.prompts import stable_seed
from ospo_fast.stages.structure import (
    Vocabulary,
    attributes_of,
    copy_structure,
    objects_in_text,
    parse_relation_tuples,
    render_prompt,
)

REPLACE, SWAP, DROP = "replace", "swap", "drop"
BEST_OF_N = "best_of_n"


def perturbation_kinds(record: dict, n: int) -> list[str]:
    """The reference mix of transformations for ``record``'s sub-category, cycled to length ``n``."""
    category, objects = record["category"], record["structure"]["objects"]
    if category in ("color", "shape", "texture", "numeracy") and len(objects) == 1:
        mix = [REPLACE, REPLACE, REPLACE]
    elif category == "non_spatial":
        mix = [REPLACE, DROP, REPLACE]
    else:
        mix = [REPLACE, SWAP, DROP]
    return [mix[i % len(mix)] for i in range(n)]


def _rename(structure: dict, old: str, new: str) -> None:
    structure["objects"] = [new if o == old else o for o in structure["objects"]]
    structure["attributes"] = [[new if o == old else o, a] for o, a in structure["attributes"]]
    structure["relations"] = [[new if a == old else a, r, new if b == old else b] for a, r, b in structure["relations"]]
    if old in structure["counts"]:
        structure["counts"][new] = structure["counts"].pop(old)


def rule_replace(structure: dict, vocab: Vocabulary, rng: random.Random) -> dict | None:
    s = copy_structure(structure)
    candidates = [("attr", i) for i, (_, a) in enumerate(s["attributes"]) if vocab.attribute_class(a)]
    candidates += [("count", o) for o, n in s["counts"].items() if n > 1]
    candidates += [("obj", o) for o in s["objects"] if o in vocab.objects]
    if not candidates:
        return None
    kind, target = rng.choice(candidates)
    if kind == "attr":
        obj, attr = s["attributes"][target]
        present = {a for _, a in s["attributes"]}
        options = [w for w in vocab.attribute_classes[vocab.attribute_class(attr)] if w not in present]
        s["attributes"][target] = [obj, rng.choice(options)]
    elif kind == "count":
        s["counts"][target] = rng.choice([n for n in (2, 3, 4) if n != s["counts"][target]])
    else:
        options = [o for o in vocab.objects if o not in s["objects"]]
        _rename(s, target, rng.choice(options))
    return s


def rule_swap(structure: dict, vocab: Vocabulary, rng: random.Random) -> dict | None:
    s = copy_structure(structure)
    if len(s["objects"]) < 2:
        return None
    a, b = s["objects"][:2]
    attrs_a, attrs_b = attributes_of(s, a), attributes_of(s, b)
    if s["relations"] and (attrs_a == attrs_b or rng.random() < 0.5):
        s["relations"] = [[y, r, x] for x, r, y in s["relations"]]  # exchange positions
    elif attrs_a != attrs_b:
        s["attributes"] = [[o, attr] for o, attr in s["attributes"] if o not in (a, b)]
        s["attributes"] += [[a, attr] for attr in attrs_b] + [[b, attr] for attr in attrs_a]
    else:
        return None
    return s


def rule_drop(structure: dict, vocab: Vocabulary, rng: random.Random) -> dict | None:
    s = copy_structure(structure)
    if len(s["objects"]) >= 2:
        gone = s["objects"][-1]
        s["objects"] = s["objects"][:-1]
        s["attributes"] = [[o, a] for o, a in s["attributes"] if o != gone]
        s["relations"] = [rel for rel in s["relations"] if gone not in (rel[0], rel[2])]
        s["counts"].pop(gone, None)
        return s
    if s["attributes"]:
        s["attributes"] = s["attributes"][:-1]
        return s
    return None


RULES = {REPLACE: rule_replace, SWAP: rule_swap, DROP: rule_drop}


def rule_perturbations(record: dict, vocab: Vocabulary, n: int, seed: int,
                       attempts: int = 8) -> tuple[list[dict], list[dict]]:
    """(perturbed records, rejects) for one base record, deterministic in (seed, record id). Each of the ``n``
    transformations is drawn up to ``attempts`` times until it gives a prompt different from x and from the
    earlier perturbations; a swap or drop that cannot apply (one object, no attribute) falls back to replace."""
    out, rejects, seen = [], [], {record["prompt"]}
    for index, kind in enumerate(perturbation_kinds(record, n)):
        rng = random.Random(stable_seed("perturb", seed, record["id"], index))
        prompt, structure = "", None
        for _ in range(attempts):
            structure = RULES[kind](record["structure"], vocab, rng)
            if structure is None and kind != REPLACE:
                kind, structure = REPLACE, rule_replace(record["structure"], vocab, rng)
            prompt = render_prompt(structure) if structure else ""
            if structure and prompt not in seen:
                break
        if not structure or prompt in seen:
            rejects.append({"id": f"{record['id']}-n{index}", "reason": f"{kind}_no_new_prompt"})
            continue
        seen.add(prompt)
        out.append(perturbed_record(record, index, kind, prompt, structure))
    return out, rejects


def perturbed_record(record: dict, index: int, kind: str, prompt: str, structure: dict) -> dict:
    return {"id": f"{record['id']}-n{index}", "base_id": record["id"], "n": index, "kind": kind,
            "category": record["category"], "base_prompt": record["prompt"], "base_structure": record["structure"],
            "prompt": prompt, "structure": structure}


def best_of_n_records(record: dict, n: int) -> list[dict]:
    """The Best-of-N baseline: ``n`` records whose both sides are drawn from x itself (different seeds)."""
    return [perturbed_record(record, index, BEST_OF_N, record["prompt"], record["structure"]) for index in range(n)]


# ---------------------------------------------------------------- model source

KIND_HELP = {
    REPLACE: "replace one object or attribute with one that is not in the prompt",
    SWAP: "swap the attributes or the positions of two objects",
    DROP: "remove one object or one attribute",
}


def perturb_request(record: dict, kind: str) -> list[dict]:
    s = record["structure"]
    text = (f"Prompt: {record['prompt']}\nObjects: {', '.join(s['objects'])}\n"
            f"Bindings: {', '.join(f'({o}, {a})' for o, a in s['attributes']) or 'none'}\n"
            f"Transformation: {kind} ({KIND_HELP[kind]}).\n"
            "Think step by step: list the objects, list the bindings, apply the transformation, then end with one "
            "line 'Contrastive prompt: <prompt>; Relation: (object, attribute), (object, relation, object)'.")
    return [{"role": "user", "content": text}]


CONTRAST_RE = re.compile(r"Contrastive prompt:\s*(?P<prompt>[^;\n]+?)\s*;\s*Relation:\s*(?P<relation>[^\n]*)")


def parse_perturbation(text: str, record: dict) -> tuple[str, dict] | str:
    """(prompt, structure) from a model answer, or the reject reason."""
    match = CONTRAST_RE.search(text)
    if not match:
        return "unparsable"
    prompt = match["prompt"].strip().rstrip(".")
    if prompt.lower() == record["prompt"].lower():
        return "unchanged"
    structure = parse_relation_tuples(match["relation"])
    if isinstance(structure, str):
        return structure
    if not objects_in_text(structure, prompt):
        return "object_not_in_prompt"
    return prompt, structure


# ---------------------------------------------------------------- joint densification

def densify_request(base_prompt: str, perturbed_prompt: str) -> list[dict]:
    text = ("Rewrite the two prompts below as two long, detailed prompts for a text-to-image model. Both must "
            "describe the same scene, background, lighting and style; they differ only where the prompts differ, "
            "and every object of each prompt keeps its attributes and relations.\n"
            f"A: {base_prompt}\nB: {perturbed_prompt}\n"
            "Answer with two lines: 'Dense A: <prompt>' and 'Dense B: <prompt>'.")
    return [{"role": "user", "content": text}]


DENSE_RE = re.compile(r"Dense A:\s*(?P<a>[^\n]+?)\s*\n\s*Dense B:\s*(?P<b>[^\n]+)")


def parse_densified(text: str, record: dict) -> tuple[str, str] | str:
    match = DENSE_RE.search(text)
    if not match:
        return "unparsable"
    dense_a, dense_b = match["a"].strip(), match["b"].strip()
    if not objects_in_text(record["base_structure"], dense_a):
        return "base_object_lost"
    if not objects_in_text(record["structure"], dense_b):
        return "perturbed_object_lost"
    return dense_a, dense_b
