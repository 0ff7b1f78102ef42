"""The end-to-end command on the tiny random model: five stages, a trained checkpoint, a dataset, a report,
and a summary whose numbers agree with the files."""

import json
import os
from pathlib import Path

import pytest

import ospo_fast.evaluate
from ospo_fast.cli import main
from ospo_fast.config import load_config
from ospo_fast.evaluate import evaluation_for, evaluation_kind
from ospo_fast.models import load_janus
from ospo_fast.run import format_summary, run_ospo
from ospo_fast.store import FingerprintMismatch, read_jsonl
from ospo_fast.toy.evaluate import ToyEvaluation

OVERRIDES = ["model.path=builtin:tiny-4", "iterations=2",
             "prompts.num_prompts=3", "perturb.num_perturbations=2", "images.batch_size=6",
             "filter.enabled=false", "train.max_steps=2", "train.per_device_batch=2", "train.save_every=1",
             "eval.toy_heldout_prompts=0"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    summary = run_ospo(load_config("tiny", OVERRIDES), out)
    return out, summary


def test_run_produces_checkpoint_dataset_report(tiny_run):
    out, summary = tiny_run
    it = out / "iter1"
    assert (it / "synth" / "pairs.jsonl").is_file() and (it / "synth" / "report.html").is_file()
    merged = summary["iterations"][0]["model"]  # relative to the run directory
    assert merged == "iter1/train/merged"
    bundle = load_janus(str(out / merged), device="cpu")  # the trained model loads through the normal loader
    assert bundle.num_image_tokens == 16
    assert json.loads((out / "summary.json").read_text()) == summary


def test_iteration_two_starts_from_iteration_one(tiny_run):
    out, summary = tiny_run
    first, second = summary["iterations"]
    saved = load_config(str(out / "iter2" / "synth" / "config.yaml"))
    assert not os.path.isabs(saved.model.path)  # relative to the working directory, as loaded
    assert os.path.samefile(saved.model.path, out / first["model"])
    assert second["model"] == "iter2/train/merged"


def test_summary_agrees_with_files(tiny_run):
    out, summary = tiny_run
    it = summary["iterations"][0]
    manifest = json.loads((out / "iter1" / "synth" / "manifest.json").read_text())
    assert it["synth"]["records"] == {k: v["records"] for k, v in manifest["stages"].items()}
    assert it["synth"]["pairs"] == len(read_jsonl(out / "iter1" / "synth" / "pairs.jsonl")) == 3
    metrics = [r for r in read_jsonl(out / "iter1" / "train" / "metrics.jsonl") if "loss" in r]
    assert it["train"]["steps"] == len(metrics) == 2
    assert it["train"]["last"]["loss"] == metrics[-1]["loss"]
    assert sum(it["synth"]["filter_reasons"].values()) == manifest["stages"]["vqa"]["records"]
    text = format_summary(summary)
    assert "RANDOM-INITIALISED" in text and "images/s" in text


def test_the_config_selects_the_kind_of_evaluation():
    """The toy world with held-out judging on is judged by the toy judge; every other run by nothing."""
    assert evaluation_kind(load_config("toy")) == "toy"
    assert evaluation_kind(load_config("toy", ["eval.toy_heldout_prompts=0"])) == "none"
    assert evaluation_kind(load_config("tiny")) == "none"
    assert isinstance(evaluation_for(load_config("toy"), Path("heldout")), ToyEvaluation)
    assert evaluation_for(load_config("tiny"), Path("heldout")).judge_model("builtin:tiny-4", "before") == {}


def test_run_calls_the_evaluation_step_of_its_kind(tmp_path, monkeypatch):
    """The run judges only through ``ospo_fast.evaluate``: the evaluation of the config's kind gets the starting
    model, then the trained model by the path the next iteration would load, then the iteration's synthesis run;
    the summary holds what it returned, under the run's names."""
    calls = []

    class Recorder:
        def __init__(self, config, heldout_dir):
            calls.append(("init", config.model.path, heldout_dir))

        def judge_model(self, model_path, name):
            calls.append(("judge_model", model_path, name))
            return {"": {"judged": model_path}, "@other": {"judged": name}}

        def compare(self, before, after):
            calls.append(("compare", before, after))
            return {"": {"change": 0.5}}

        def judge_pairs(self, synth_dir):
            calls.append(("judge_pairs", synth_dir))
            return {"pair_figures": {"n": 3}}

    monkeypatch.setitem(ospo_fast.evaluate.EVALUATIONS, "recorder", Recorder)
    monkeypatch.setattr(ospo_fast.evaluate, "evaluation_kind", lambda config: "recorder")
    summary = run_ospo(load_config("tiny", [*OVERRIDES, "iterations=1"]), tmp_path)
    trained = os.path.relpath(tmp_path / "iter1" / "train" / "merged")  # as iteration 2 would load it
    assert calls == [("init", "builtin:tiny-4", tmp_path / "heldout"),
                     ("judge_model", "builtin:tiny-4", "before"), ("judge_model", trained, "after_iter1"),
                     ("compare", "before", "after_iter1"), ("judge_pairs", tmp_path / "iter1" / "synth")]
    assert summary["alignment"] == {"before": {"judged": "builtin:tiny-4"}, "before@other": {"judged": "before"},
                                    "after_iter1": {"judged": trained}, "after_iter1@other": {"judged": "after_iter1"}}
    assert summary["alignment_change"] == {"iter1": {"change": 0.5}}
    assert summary["iterations"][0]["pair_figures"] == {"n": 3}


def test_no_pairs_is_a_clear_error(tmp_path, capsys):
    code = main(["run", "--preset", "tiny", "--out", str(tmp_path), "model.path=builtin:tiny-4",
                 "prompts.num_prompts=1", "filter.tau=1.0",  # a random model's S is near 0 < 1
                 "perturb.num_perturbations=1",
                 "eval.toy_heldout_prompts=0"])
    err = capsys.readouterr().err
    assert code == 2 and "kept no pair (filter: chosen_below_tau 1)" in err
    assert "builtin:tiny-4 is random-initialised" in err and "set filter.enabled=false" in err  # why, and what to do
    assert (tmp_path / "iter1" / "synth" / "report.html").is_file()  # the report it names exists


def test_toy_run_judges_before_and_after_at_each_guidance(tmp_path):
    """On the toy world the summary holds judged alignment at CFG 5 and CFG 1 before and after, and what the pairs
    hold by the judge; the printed summary shows them."""
    config = load_config("toy", ["prompts.num_prompts=4", "filter.enabled=false", "train.max_steps=2",
                                 "train.per_device_batch=2", "train.save_every=2", "eval.toy_heldout_prompts=4"])
    summary = run_ospo(config, tmp_path)
    assert sorted(summary["alignment"]) == ["after_iter1", "after_iter1@cfg1", "before", "before@cfg1"]
    judged = summary["iterations"][0]["pair_judgement"]
    assert judged["kept"]["n"] == 4 and judged["candidates"]["n"] == 12
    assert 0.0 <= judged["kept"]["chosen_loose"] <= 1.0
    answers = summary["iterations"][0]["pair_self_vqa"]  # 12 candidate pairs, both sides, their rule questions
    assert answers["candidates"]["n"] == answers["candidates"]["all"]["n"] > 24
    assert answers["kept"]["n"] < answers["candidates"]["n"]
    assert summary["alignment"]["before"]["guidance_scale"] == 5.0
    assert summary["alignment"]["before@cfg1"]["guidance_scale"] == 1.0
    assert sorted(summary["alignment_change"]) == ["iter1", "iter1@cfg1"]
    for key in ("", "@cfg1"):  # same prompts and seeds: the paired change is the difference of the rates
        change, before, after = (summary["alignment_change"][f"iter1{key}"], summary["alignment"][f"before{key}"],
                                 summary["alignment"][f"after_iter1{key}"])
        assert change["strict"] == pytest.approx(after["strict"] - before["strict"])
        assert change["loose"] == pytest.approx(after["loose"] - before["loose"])
    text = format_summary(summary)
    assert "before@cfg1" in text and "judge on kept pairs (n=4)" in text
    assert f"Self-VQA answers on kept pairs right by the judge (n={answers['kept']['n']}): object " in text
    assert "CFG 5  strict" in text and "CFG 1  strict" in text and "change iter1@cfg1" in text
    before = summary["alignment"]["before"]
    assert f"strict {before['strict']:.1%} +- {100 * before['strict_se']:.1f}" in text
    # a rerun with another setting is refused before it writes anything: the directory stays byte-identical
    snapshot = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    changed = load_config("toy", ["prompts.num_prompts=4", "filter.enabled=false", "train.max_steps=2",
                                  "train.per_device_batch=2", "train.save_every=2", "eval.toy_heldout_prompts=4",
                                  "images.guidance_scale=3"])
    with pytest.raises(FingerprintMismatch, match="images"):
        run_ospo(changed, tmp_path)
    assert {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()} == snapshot


def test_a_resume_reuses_the_judged_before_images_of_the_same_settings(tmp_path, monkeypatch):
    """The held-out "before" judging is kept with the model's content identity and the settings; a resume with the
    same ones reuses it (no model load, no drawing), another setting judges afresh."""
    from ospo_fast.toy import evaluate as toy_evaluate

    config = load_config("toy", ["eval.toy_heldout_prompts=4", "eval.toy_extra_guidance=[]"])
    first = ToyEvaluation(config, tmp_path).judge_model(config.model.path, "before")
    calls = []
    real = toy_evaluate.heldout_alignment
    monkeypatch.setattr(toy_evaluate, "heldout_alignment", lambda *a, **k: calls.append(a) or real(*a, **k))
    assert ToyEvaluation(config, tmp_path).judge_model(config.model.path, "before") == first and calls == []
    other = load_config("toy", ["eval.toy_heldout_prompts=4", "eval.toy_extra_guidance=[]", "images.temperature=0.5"])
    ToyEvaluation(other, tmp_path).judge_model(other.model.path, "before")
    assert len(calls) == 1
    monkeypatch.setattr(toy_evaluate, "JUDGE_VERSION", toy_evaluate.JUDGE_VERSION + 1)  # another judge: afresh
    ToyEvaluation(other, tmp_path).judge_model(other.model.path, "before")
    assert len(calls) == 2
