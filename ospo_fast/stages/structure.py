"""Prompt structure: the objects, attribute bindings and relations kept with every prompt from stage 1 on.

A structure is a plain dict (it is stored in JSONL records):
``{"objects": ["car", "bench"], "attributes": [["car", "red"], ["bench", "wooden"]],
   "relations": [["car", "on the left of", "bench"]], "counts": {"car": 1}}``
Object words appear literally in the prompt text: the mask stage looks them up there. ``render_prompt`` turns a
structure back into a short prompt; the rule perturbations edit structures and re-render.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}


@dataclass(frozen=True)
class Vocabulary:
    """Word lists for the compositional sampler and the rule perturbations. ``attribute_classes`` maps a class
    (color, shape, texture) to its words; a replacement keeps the class of the word it replaces."""

    objects: tuple[str, ...]
    plural: dict[str, str]
    attribute_classes: dict[str, tuple[str, ...]]
    relations_2d: tuple[str, ...]
    relations_3d: tuple[str, ...]
    actions: tuple[str, ...] = ()
    agents: tuple[str, ...] = ()
    categories: tuple[str, ...] = field(default=())
    colored_spatial: bool = False  # spatial prompts also bind a colour to each object (the toy world)

    def attribute_class(self, word: str) -> str | None:
        for name, words in self.attribute_classes.items():
            if word in words:
                return name
        return None


GENERAL = Vocabulary(
    objects=("dog", "cat", "bird", "horse", "car", "bus", "bench", "apple", "banana", "cup", "chair", "table",
             "book", "lamp", "tree", "flower", "house", "boat", "clock", "vase", "bowl", "bottle", "hat", "ball",
             "kite", "plate"),
    plural={"dog": "dogs", "cat": "cats", "bird": "birds", "apple": "apples", "cup": "cups", "book": "books",
            "chair": "chairs", "ball": "balls", "bottle": "bottles", "flower": "flowers", "boat": "boats",
            "clock": "clocks", "plate": "plates", "hat": "hats"},
    attribute_classes={
        "color": ("red", "green", "blue", "yellow", "purple", "orange", "pink", "black", "white", "brown"),
        "shape": ("round", "square", "triangular", "oval", "rectangular"),
        "texture": ("wooden", "metal", "glass", "plastic", "leather", "fluffy"),
    },
    relations_2d=("on the left of", "on the right of", "on top of", "below"),
    relations_3d=("in front of", "behind"),
    actions=("riding", "holding", "chasing", "watching", "sitting on"),
    agents=("man", "woman", "child", "dog", "cat"),
    categories=("color", "shape", "texture", "spatial_2d", "spatial_3d", "numeracy", "non_spatial", "complex"),
)


def article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def empty_structure() -> dict:
    return {"objects": [], "attributes": [], "relations": [], "counts": {}}


def attributes_of(structure: dict, obj: str) -> list[str]:
    return [attr for o, attr in structure["attributes"] if o == obj]


def render_phrase(structure: dict, obj: str) -> str:
    """"a red car", "two cats", "an old wooden bench"."""
    words = attributes_of(structure, obj) + [obj]
    count = structure.get("counts", {}).get(obj, 1)
    lead = NUMBER_WORDS[count] if count > 1 else article(words[0])
    return " ".join([lead] + words)


def render_prompt(structure: dict) -> str:
    """Short prompt text from a structure: related objects as "A rel B", the rest joined with "and"."""
    parts: list[str] = []
    used: set[str] = set()
    for a, rel, b in structure["relations"]:
        parts.append(f"{render_phrase(structure, a)} {rel} {render_phrase(structure, b)}")
        used.update((a, b))
    parts += [render_phrase(structure, o) for o in structure["objects"] if o not in used]
    return " and ".join(parts)


def objects_in_text(structure: dict, text: str) -> bool:
    """True when every object word occurs in ``text`` as a word."""
    words = set(text.lower().replace(",", " ").replace(".", " ").split())
    return all(o.lower() in words for o in structure["objects"])


def prompt_objects(text: str, vocabularies: tuple[Vocabulary, ...] | None = None) -> list[str]:
    """The object words of a prompt, read back the way ``render_prompt`` lays prompts out: the text is cut into
    phrases at commas, "and" and the vocabularies' relation and action phrases (longest first), and each phrase's
    last word is its object ("a red car on the left of two dogs" -> ["car", "dogs"]). Exact for every prompt
    ``render_prompt`` writes; for free-form prompts it is a heuristic (a phrase may end in a verb or an
    adjective), so a data set that lists its objects should pass them instead. Words keep the prompt's case; no
    repeats. ``vocabularies``: where the relation phrases come from (default: every built-in vocabulary)."""
    vocabularies = tuple(VOCABULARIES.values()) if vocabularies is None else vocabularies
    phrases = {p for v in vocabularies for p in (*v.relations_2d, *v.relations_3d, *v.actions)} | {"and"}
    cut = "|".join(re.escape(p) for p in sorted(phrases, key=len, reverse=True))
    out: list[str] = []
    for phrase in re.split(rf"[,;.]|\b(?:{cut})\b", text, flags=re.IGNORECASE):
        words = re.findall(r"[^\W\d_][\w'-]*", phrase or "")
        if words and words[-1].lower() not in (o.lower() for o in out):
            out.append(words[-1])
    return out


TUPLE_RE = re.compile(r"\(([^()]*)\)")


def parse_relation_tuples(text: str) -> dict | str:
    """A structure from ``(object, attribute), (object, number), (object, relation, object)`` tuples, or the reject
    reason ("bad_relation_tuple", "no_objects")."""
    words_to_number = {v: k for k, v in NUMBER_WORDS.items()}
    structure = empty_structure()
    for raw in TUPLE_RE.findall(text):
        parts = [p.strip() for p in raw.split(",") if p.strip()]
        if len(parts) == 2:
            number = words_to_number.get(parts[1])
            if number:
                structure["counts"][parts[0]] = number
            else:
                structure["attributes"].append(parts)
        elif len(parts) == 3:
            structure["relations"].append(parts)
        else:
            return "bad_relation_tuple"
        for name in [parts[0]] + ([parts[2]] if len(parts) == 3 else []):
            if name not in structure["objects"]:
                structure["objects"].append(name)
    return structure if structure["objects"] else "no_objects"


def copy_structure(structure: dict) -> dict:
    out = copy.deepcopy(structure)
    out.setdefault("counts", {})
    return out


TOY = Vocabulary(
    objects=("circle", "square", "triangle"),
    plural={},
    attribute_classes={"color": ("red", "green", "blue", "yellow", "purple", "cyan")},
    relations_2d=("to the left of", "to the right of", "above", "below"),
    relations_3d=(),
    categories=("color", "spatial_2d"),
    colored_spatial=True,
)

VOCABULARIES = {"general": GENERAL, "toy": TOY}
