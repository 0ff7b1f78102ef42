"""Stage 4a: K atomic yes/no questions per base prompt.

Rule source: questions from the kept structure (one per object with its attributes or count, one per relation).
Model source: ``Concepts and relations: ...; Questions: Is there a white harp? Is there a rust soup?`` sampled
at temperature 1.2, top_p 0.5 (reference code), parsed strictly.
"""

from __future__ import annotations

import re

from ospo_fast.stages.structure import NUMBER_WORDS, article, attributes_of


def rule_questions(structure: dict, max_questions: int = 8) -> list[str]:
    questions = []
    for obj in structure["objects"]:
        words = " ".join(attributes_of(structure, obj) + [obj])
        count = structure.get("counts", {}).get(obj, 1)
        if count > 1:
            questions.append(f"Are there {NUMBER_WORDS[count]} {words}?")
        else:
            questions.append(f"Is there {article(words)} {words}?")
    for a, rel, b in structure["relations"]:
        questions.append(f"Is the {a} {rel} the {b}?")
    return questions[:max_questions]


def question_request(record: dict) -> list[dict]:
    s = record["structure"]
    concepts = ", ".join(" ".join(attributes_of(s, o) + [o]) for o in s["objects"])
    relations = "; ".join(" ".join(r) for r in s["relations"])
    text = (f"Prompt: {record['prompt']}\nConcepts and relations: {concepts}"
            + (f"; {relations}" if relations else "")
            + "\nWrite atomic yes/no questions, one per object with its attributes and one per relation, that an "
              "image matching the prompt answers with yes. Answer in one line: 'Questions: <q1> <q2> ...'.")
    return [{"role": "user", "content": text}]


QUESTION_RE = re.compile(r"\b((?:Is|Are|Does|Do)\b[^?\n]{2,120}\?)")


def parse_questions(text: str, max_questions: int = 8) -> list[str] | str:
    """The questions of a model answer, or the reject reason."""
    if "Questions:" not in text:
        return "unparsable"
    found = QUESTION_RE.findall(text.split("Questions:", 1)[1])
    unique = list(dict.fromkeys(q.strip() for q in found))
    if not unique:
        return "no_questions"
    return unique[:max_questions]
