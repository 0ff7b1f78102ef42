"""Rule sources of stages 1, 2 and 4: the sampler, perturbations, questions and strict parsing."""

import json

import pytest

from ospo_fast.config import PromptConfig
from ospo_fast.stages import perturb as P
from ospo_fast.stages import prompts as S1
from ospo_fast.stages.questions import parse_questions, rule_questions
from ospo_fast.stages.structure import GENERAL, TOY, objects_in_text, render_prompt


def _prompts(vocab=GENERAL, n=64, seed=0, categories=None):
    config = PromptConfig(categories=categories or list(vocab.categories))
    return S1.sample_prompts(vocab, config, list(range(n)), seed)


def test_sampler_is_deterministic_per_index_whatever_the_sharding():
    whole = _prompts()
    shards = S1.sample_prompts(GENERAL, PromptConfig(), list(range(1, 64, 2)), 0)
    assert shards == whole[1::2]
    assert _prompts(seed=1) != whole


def test_sampler_covers_categories_and_keeps_structure():
    records = _prompts()
    assert {r["category"] for r in records} == set(GENERAL.categories)
    for r in records:
        assert r["structure"]["objects"] and objects_in_text(r["structure"], r["prompt"])
        assert render_prompt(r["structure"]) == r["prompt"]
        if r["category"] == "numeracy":
            assert all(1 <= n <= 4 for n in r["structure"]["counts"].values())


def test_model_answer_round_trip_and_rejects():
    for record in _prompts(n=16):
        parsed = S1.parse_prompt_answer(S1.format_answer(record), record["category"])
        assert parsed.record["structure"] == record["structure"], record["prompt"]
    assert S1.parse_prompt_answer("a cat", "color").reason == "unparsable"
    leak = "Prompt: a red color cat; Concepts and relations: red cat; Relation: (cat, red)"
    assert S1.parse_prompt_answer(leak, "color").reason == "category_word_leak"
    missing = "Prompt: a red cat; Concepts and relations: red dog; Relation: (dog, red)"
    assert S1.parse_prompt_answer(missing, "color").reason == "object_not_in_prompt"
    big = "Prompt: seven cats; Concepts and relations: cats; Relation: (cats, seven)"
    assert S1.parse_prompt_answer(big, "numeracy").reason == "numeracy_out_of_range"


@pytest.mark.parametrize("category, kinds", [
    ("color", ["replace"] * 3), ("non_spatial", ["replace", "drop", "replace"]),
    ("spatial_2d", ["replace", "swap", "drop"]), ("complex", ["replace", "swap", "drop"]),
])
def test_reference_perturbation_mix(category, kinds):
    record = next(r for r in _prompts() if r["category"] == category and
                  (category != "color" or len(r["structure"]["objects"]) == 1))
    assert P.perturbation_kinds(record, 3) == kinds


def test_two_object_attribute_prompt_uses_replace_swap_drop():
    record = next(r for r in _prompts() if r["category"] == "color" and len(r["structure"]["objects"]) == 2)
    assert P.perturbation_kinds(record, 3) == ["replace", "swap", "drop"]


def test_rule_perturbations_change_object_level_detail_only():
    for record in _prompts(TOY, n=40):
        out, rejects = P.rule_perturbations(record, TOY, 3, seed=0)
        assert len(out) + len(rejects) == 3
        assert len({o["prompt"] for o in out}) == len(out)
        base = record["structure"]
        for o in out:
            assert o["prompt"] != record["prompt"] and o["base_id"] == record["id"]
            s = o["structure"]
            if o["kind"] == "swap":
                assert sorted(s["objects"]) == sorted(base["objects"])
            if o["kind"] == "drop":
                assert len(s["objects"]) + len(s["attributes"]) < len(base["objects"]) + len(base["attributes"])
            if o["kind"] == "replace":
                new_words = set(o["prompt"].split()) - set(record["prompt"].split())
                assert new_words, "a replacement brings a word that was not in x"


def test_rule_questions_from_structure():
    s = {"objects": ["circle", "square"], "attributes": [["circle", "red"], ["square", "blue"]],
         "relations": [["circle", "to the left of", "square"]], "counts": {}}
    assert rule_questions(s) == ["Is there a red circle?", "Is there a blue square?",
                                 "Is the circle to the left of the square?"]
    assert rule_questions({"objects": ["cats"], "attributes": [], "relations": [], "counts": {"cats": 3}}) == \
        ["Are there three cats?"]


def test_parse_questions():
    assert parse_questions("Questions: Is there a white harp? Is there a rust soup?") == \
        ["Is there a white harp?", "Is there a rust soup?"]
    assert parse_questions("no idea") == "unparsable"
    assert parse_questions("Questions: nothing here") == "no_questions"


def test_perturbation_and_densify_parsers():
    record = {"prompt": "a red cat", "structure": {"objects": ["cat"], "attributes": [["cat", "red"]],
                                                   "relations": [], "counts": {}},
              "base_structure": {"objects": ["cat"], "attributes": [], "relations": [], "counts": {}}}
    ok = P.parse_perturbation("...steps...\nContrastive prompt: a blue cat; Relation: (cat, blue)", record)
    assert ok[0] == "a blue cat" and ok[1]["attributes"] == [["cat", "blue"]]
    assert P.parse_perturbation("Contrastive prompt: a red cat; Relation: (cat, red)", record) == "unchanged"
    assert P.parse_perturbation("whatever", record) == "unparsable"
    dense = P.parse_densified("Dense A: a red cat on a sofa\nDense B: a red cat on a sofa at noon", record)
    assert dense == ("a red cat on a sofa", "a red cat on a sofa at noon")
    assert P.parse_densified("Dense A: a sofa\nDense B: a cat", record) == "base_object_lost"


def test_prompt_file_source(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text(json.dumps({"prompt": "a red cat", "category": "color",
                                "structure": {"objects": ["cat"], "attributes": [["cat", "red"]]}}) + "\n")
    assert S1.read_prompt_file(good)[0]["structure"]["relations"] == []
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a cat"}\n')
    with pytest.raises(ValueError, match="lacks"):
        S1.read_prompt_file(bad)
    with pytest.raises(ValueError, match="does not exist"):
        S1.read_prompt_file(tmp_path / "none.jsonl")
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"prompt": "a cat", "category": "color", "structure": {"objects": ["dog"]}}) + "\n")
    with pytest.raises(ValueError, match="appear as words"):
        S1.read_prompt_file(wrong)


def test_resuming_with_another_process_count_is_refused(tmp_path):
    from ospo_fast.runstore import RunStore

    RunStore(tmp_path, rank=0, world=2).write_chunk("perturb", 0, [{"id": "a"}], [])
    RunStore(tmp_path, rank=0, world=2).check_world("perturb")
    with pytest.raises(ValueError, match="started with 2 process"):
        RunStore(tmp_path, rank=0, world=1).check_world("perturb")


@pytest.mark.parametrize("field, value, match", [
    ("category", 7, "category=7 is not one of"), ("category", "colour", "is not one of"),
    ("prompt", "a red\x00 car", "without NUL"), ("prompt", 3, "non-empty string"),
    ("structure", {"objects": "car"}, "list of non-empty strings"),
    ("structure", {"objects": ["car"], "attributes": [["car", 5]]}, "list of lists of strings"),
])
def test_wrong_prompt_file_fields_are_named_before_any_stage(tmp_path, field, value, match):
    """Issue 35's campaign: a wrong-typed field (e.g. "category": 7) failed only after stages 1-4 ran."""
    import json

    from ospo_fast.stages.prompts import read_prompt_file
    from ospo_fast.store import StoreError

    row = {"prompt": "a red car", "category": "color", "structure": {"objects": ["car"]}, field: value}
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(StoreError, match=match) as err:
        read_prompt_file(path)
    assert f"{path}:1" in str(err.value)
