"""Stage 1: base prompts with their structure.

Sources:
- ``sampler``: a compositional sampler over the vocabulary (objects x attributes x relations), one
  deterministic draw per prompt index, so any sharding of the indices gives the same prompts;
- ``file``: a JSONL file of ``{"prompt", "category", "structure"}`` records written by a user;
- ``model``: in-context generation by the model itself (SPEC stage 1): a few-shot chat per sub-category, answers
  parsed strictly (``Prompt: ...; Concepts and relations: ...; Relation: (obj, attr), (a, rel, b)``), rejected
  when they do not parse, leak category words, break the numeracy range or duplicate an earlier prompt. The
  few-shot exemplars are refreshed every ``exemplar_refresh_every`` batches from the model's own accepted prompts.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from ospo_fast.config import PromptConfig
from ospo_fast.stages.structure import (
    NUMBER_WORDS,
    Vocabulary,
    empty_structure,
    objects_in_text,
    parse_relation_tuples,
    render_prompt,
)
from ospo_fast.store import StoreError, check_name, read_jsonl_rows

CATEGORY_WORDS = ("color", "colour", "shape", "texture", "spatial", "numeracy", "category", "attribute", "relation")


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from any printable parts, identical across processes and runs (unlike ``hash``)."""
    import hashlib

    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ---------------------------------------------------------------- sampler

def _attribute(vocab: Vocabulary, cls: str, rng: random.Random) -> str:
    return rng.choice(vocab.attribute_classes[cls])


def sample_structure(vocab: Vocabulary, category: str, rng: random.Random) -> dict:
    """One structure of ``category`` drawn with ``rng``."""
    s = empty_structure()
    two = rng.random() < 0.5
    objs = rng.sample(vocab.objects, 2)
    if category in ("color", "shape", "texture"):
        s["objects"] = objs if two else objs[:1]
        s["attributes"] = [[o, _attribute(vocab, category, rng)] for o in s["objects"]]
    elif category in ("spatial_2d", "spatial_3d"):
        rels = vocab.relations_2d if category == "spatial_2d" else vocab.relations_3d
        s["objects"] = objs
        if vocab.colored_spatial:
            s["attributes"] = [[o, _attribute(vocab, "color", rng)] for o in objs]
        s["relations"] = [[objs[0], rng.choice(rels), objs[1]]]
    elif category == "numeracy":
        countable = sorted(vocab.plural)
        picks = rng.sample(countable, 2 if two else 1)
        for word in picks:
            count = rng.randint(2, 4) if two or rng.random() < 0.75 else 1
            name = vocab.plural[word] if count > 1 else word
            s["objects"].append(name)
            s["counts"][name] = count
    elif category == "non_spatial":
        agent = rng.choice(vocab.agents)
        target = rng.choice([o for o in vocab.objects if o != agent])
        s["objects"] = [agent, target]
        s["relations"] = [[agent, rng.choice(vocab.actions), target]]
    elif category == "complex":
        s["objects"] = objs
        classes = list(vocab.attribute_classes)
        s["attributes"] = [[o, _attribute(vocab, rng.choice(classes), rng)] for o in objs]
        s["relations"] = [[objs[0], rng.choice(vocab.relations_2d + vocab.relations_3d), objs[1]]]
    else:
        raise ValueError(f"unknown category {category!r}; known: {vocab.categories}")
    return s


def toy_world_prompts(config: PromptConfig, indices: list[int], seed: int) -> list[dict]:
    """Prompts of the toy world's training split (``ospo_fast.toy.world``), so held-out captions stay unseen.
    Relations are stored as the caption's phrase ("to the left of") so re-rendering reproduces the caption."""
    from ospo_fast.toy import world

    drawn = world.sample_prompts(max(indices, default=-1) + 1, split="train", seed=seed)
    records = []
    for index in indices:
        row = drawn[index]
        structure = dict(empty_structure(), **row["structure"])
        structure["relations"] = [[a, world.CAPTION_RELATION[r], b] for a, r, b in structure["relations"]]
        if render_prompt(structure) != row["prompt"]:
            raise ValueError(f"toy caption {row['prompt']!r} does not re-render from its structure {structure}")
        records.append({"id": f"p{index:06d}", "prompt": row["prompt"], "category": row["category"],
                        "structure": structure, "source": "toy_world"})
    return records


def sample_prompts(vocab: Vocabulary, config: PromptConfig, indices: list[int], seed: int) -> list[dict]:
    """Records for prompt indices ``indices``: each draw depends only on (seed, index). The toy vocabulary draws
    from the toy world's training split."""
    if config.vocabulary == "toy":
        return toy_world_prompts(config, indices, seed)
    categories = [c for c in config.categories if c in vocab.categories]
    if not categories:
        raise ValueError(f"prompts.categories={config.categories} has none of this vocabulary's categories "
                         f"{list(vocab.categories)}; set prompts.categories accordingly")
    records = []
    for index in indices:
        rng = random.Random(stable_seed("prompt", seed, index))
        category = categories[index % len(categories)]
        structure = sample_structure(vocab, category, rng)
        records.append({"id": f"p{index:06d}", "prompt": render_prompt(structure), "category": category,
                        "structure": structure, "source": "sampler"})
    return records


# ---------------------------------------------------------------- file

def _check_prompt_fields(row: dict, where: str) -> None:
    """Types and values of a prompt-file line, before any stage runs (a wrong one used to fail after stages 1-4)."""
    from ospo_fast.config import SUBCATEGORIES

    prompt, category, structure = row["prompt"], row["category"], row["structure"]
    if not isinstance(prompt, str) or not prompt.strip() or "\x00" in prompt:
        raise StoreError(f"{where}: prompt={prompt!r} must be a non-empty string without NUL characters")
    if category not in SUBCATEGORIES:
        raise StoreError(f"{where}: category={category!r} is not one of {list(SUBCATEGORIES)}")
    if not isinstance(structure, dict):
        raise StoreError(f"{where}: structure={structure!r} must be an object with objects (a list of words), "
                         "attributes and relations")
    objects = structure.get("objects", [])
    if not isinstance(objects, list) or not all(isinstance(o, str) and o.strip() for o in objects):
        raise StoreError(f"{where}: structure.objects={objects!r} must be a list of non-empty strings")
    for key in ("attributes", "relations"):
        value = structure.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, list) and all(isinstance(x, str) for x in v)
                                                  for v in value):
            raise StoreError(f"{where}: structure.{key}={value!r} must be a list of lists of strings")


def read_prompt_file(path: str | Path) -> list[dict]:
    """Base prompts from a user JSONL file; every line needs prompt, category and structure, and may give an
    ``id`` (a string of ``store.SAFE_NAME_RULE``, unique in the file). Problems are StoreErrors naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"prompts.file={str(path)!r} does not exist; give a JSONL file of "
                         '{"prompt": ..., "category": ..., "structure": {"objects": [...], ...}} lines')
    records, lines = [], {}
    for line_no, row in read_jsonl_rows(path, StoreError):
        if not isinstance(row, dict):
            raise StoreError(f"{path}:{line_no} is a {type(row).__name__}, not a record; each line needs prompt, "
                             "category and structure")
        missing = [k for k in ("prompt", "category", "structure") if k not in row]
        if missing:
            raise StoreError(f"{path}:{line_no} lacks {missing}; each line needs prompt, category and structure")
        _check_prompt_fields(row, f"{path}:{line_no}")
        structure = dict(empty_structure(), **row["structure"])
        if not structure["objects"] or not objects_in_text(structure, row["prompt"]):
            raise StoreError(f"{path}:{line_no}: structure objects {structure['objects']} must be non-empty and "
                             f"appear as words in the prompt {row['prompt']!r}")
        rid = check_name(row.get("id", f"f{len(records):06d}"), f"{path}:{line_no}")  # ids become file names
        if rid in lines:
            raise StoreError(f"{path}:{line_no}: id {rid!r} repeats line {lines[rid]} (lines without an id get "
                             "f000000, f000001, ... by position); give every prompt its own id")
        lines[rid] = line_no
        records.append({"id": rid, "prompt": row["prompt"],
                        "category": row["category"], "structure": structure, "source": "file"})
    if not records:
        raise StoreError(f"prompts.file={str(path)!r} holds no prompts")
    return records


# ---------------------------------------------------------------- model (in-context learning)

INSTRUCTIONS = {
    "color": "Each prompt binds a color to one or two everyday objects.",
    "shape": "Each prompt binds a shape to one or two everyday objects.",
    "texture": "Each prompt binds a material or texture to one or two everyday objects.",
    "spatial_2d": "Each prompt places two objects side by side, above or below each other.",
    "spatial_3d": "Each prompt places one object in front of or behind another.",
    "numeracy": "Each prompt asks for a small number (one to four) of one or two kinds of objects.",
    "non_spatial": "Each prompt shows a person or animal doing something with an object.",
    "complex": "Each prompt combines attributes of two objects with a spatial relation between them.",
}

ANSWER_RE = re.compile(r"^\s*Prompt:\s*(?P<prompt>[^;\n]+?)\s*;\s*Concepts and relations:\s*(?P<concepts>[^;\n]*?)"
                       r"\s*;\s*Relation:\s*(?P<relation>.+?)\s*$", re.S)


def format_answer(record: dict) -> str:
    """The answer line of an exemplar: ``Prompt: ...; Concepts and relations: ...; Relation: (...)``."""
    s = record["structure"]
    concepts = ", ".join(f"{' '.join([a for o2, a in s['attributes'] if o2 == o] + [o])}" for o in s["objects"])
    tuples = [f"({o}, {a})" for o, a in s["attributes"]] + [f"({a}, {r}, {b})" for a, r, b in s["relations"]]
    tuples += [f"({o}, {NUMBER_WORDS[n]})" for o, n in s.get("counts", {}).items() if n > 1]
    return f"Prompt: {record['prompt']}; Concepts and relations: {concepts}; Relation: {', '.join(tuples) or '()'}"


@dataclass
class ParseResult:
    record: dict | None
    reason: str = ""


def parse_prompt_answer(text: str, category: str, max_numeracy: int = 4) -> ParseResult:
    """Strictly parse one model answer into a record; ``reason`` says why it was rejected."""
    match = ANSWER_RE.match(text.strip().split("\n")[0] if "\n" in text.strip() else text)
    if not match:
        return ParseResult(None, "unparsable")
    prompt = match["prompt"].strip().rstrip(".")
    lowered = prompt.lower()
    if any(word in lowered.split() for word in CATEGORY_WORDS):
        return ParseResult(None, "category_word_leak")
    structure = parse_relation_tuples(match["relation"])
    if isinstance(structure, str):
        return ParseResult(None, structure)
    if not objects_in_text(structure, prompt):
        return ParseResult(None, "object_not_in_prompt")
    if category == "numeracy":
        digits = [int(d) for d in re.findall(r"\b\d+\b", prompt)]
        big = [w for w in ("five", "six", "seven", "eight", "nine", "ten") if w in lowered.split()]
        if digits or big or any(n > max_numeracy for n in structure["counts"].values()):
            return ParseResult(None, "numeracy_out_of_range")
    return ParseResult({"prompt": prompt, "category": category, "structure": structure, "source": "model"})


def prompt_request(category: str, exemplars: list[dict]) -> list[dict]:
    """A few-shot chat asking for one new prompt of ``category``."""
    system = ("You write short compositional prompts for a text-to-image model. " + INSTRUCTIONS[category] +
              " Answer in one line: Prompt: <prompt>; Concepts and relations: <objects with attributes>; "
              "Relation: (object, attribute), (object, relation, object).")
    messages = [{"role": "system", "content": [{"type": "text", "text": system}]}]
    for ex in exemplars:
        messages.append({"role": "user", "content": "Write one new prompt."})
        messages.append({"role": "assistant", "content": format_answer(ex)})
    messages.append({"role": "user", "content": "Write one new prompt."})
    return messages
