"""Model-written stages on an untrained model: every malformed output is counted per stage and reason and kept
in the rejects file; nothing crashes and nothing is silently replaced."""

import json

from ospo_fast.config import load_config
from ospo_fast.pipeline import Pipeline
from ospo_fast.store import read_jsonl

SHORT = ["prompts.max_new_tokens=12", "perturb.max_new_tokens=12", "densify.max_new_tokens=12",
         "questions.max_new_tokens=12"]


def test_model_prompt_source_rejects_garbage(tmp_path):
    config = load_config("tiny", ["prompts.source=model", "prompts.num_prompts=2", "prompts.batch_size=2", *SHORT])
    pairs = Pipeline(config, tmp_path, progress=False).run()
    assert pairs == []
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    prompts = manifest["stages"]["prompts"]
    assert prompts["records"] == 0 and prompts["rejects"] == 8  # 4 request batches of 2 (the 4x quota cap)
    rejects = read_jsonl(tmp_path / "prompts" / "rejects.jsonl")
    assert sum(prompts["reject_reasons"].values()) == len(rejects) == 8
    assert all(r["stage"] == "prompts" and "output" in r for r in rejects)


def test_model_perturb_densify_and_questions_reject_garbage(tmp_path):
    config = load_config("tiny", ["prompts.num_prompts=2", "perturb.source=model", "perturb.num_perturbations=2",
                                  "questions.source=model", "densify.enabled=true", *SHORT])
    Pipeline(config, tmp_path, progress=False).run()
    stages = json.loads((tmp_path / "manifest.json").read_text())["stages"]
    assert stages["prompts"]["records"] == 2
    assert stages["perturb"]["records"] + stages["perturb"]["rejects"] == 4
    assert stages["questions"]["records"] + stages["questions"]["rejects"] == 2
    for stage in ("perturb", "questions"):
        rejects = read_jsonl(tmp_path / stage / "rejects.jsonl")
        assert len(rejects) == stages[stage]["rejects"] > 0
        assert {r["reason"] for r in rejects} <= {"unparsable", "no_questions", "unchanged", "bad_relation_tuple",
                                                  "no_objects", "object_not_in_prompt"}
