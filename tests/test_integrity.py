"""The run directory's integrity on the tiny random model: a corruption matrix (torn line, lost line, cut file,
flipped byte; in a chunk, a stage output, a PNG, the manifest), crash windows between two writes (injected by
failing the manifest or marker write, then resumed and compared with an uninterrupted run), config fingerprints,
prompt-file ids, and the umask. Every damaged case must end in one StoreError naming the file and the fix; every
crash must resume to the uninterrupted result."""

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from ospo_fast import runstore
from ospo_fast.config import load_config
from ospo_fast.models.loader import ModelLoadError
from ospo_fast.pipeline import Pipeline
from ospo_fast.stages import prompts as S1
from ospo_fast.store import FingerprintMismatch, StoreError, atomic_write_text, read_jsonl, safe_join

# 1 prompt x 2 perturbations = 2 candidate pairs, one per image chunk; no filtering (a random model is never sure)
OVERRIDES = ["prompts.num_prompts=1", "prompts.chunk_size=1", "perturb.num_perturbations=2", "images.batch_size=2",
             "filter.enabled=false", "filter.vqa_batch_size=2"]


class Crash(Exception):
    """Stands in for a kill between two writes."""


def _pipeline(out: Path, *extra: str, redo: str | None = None) -> Pipeline:
    return Pipeline(load_config("tiny", [*OVERRIDES, *extra]), out, redo=redo, progress=False)


def _crash_when(monkeypatch, predicate) -> None:
    """Make the store's JSON commit writes (manifest, chunk markers) raise Crash when ``predicate(path, obj)``."""
    real = runstore.atomic_write_json

    def write(path, obj):
        if predicate(Path(path), obj):
            raise Crash(str(path))
        return real(path, obj)

    monkeypatch.setattr(runstore, "atomic_write_json", write)


def _manifest_gains(section: str, key: str):
    return lambda path, obj: path.name == "manifest.json" and key in obj.get(section, {})


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    return out, _pipeline(out).run()


@pytest.fixture(scope="module")
def cut_at_images_merge(tmp_path_factory):
    """A run killed after images/records.jsonl was written but before the manifest entry that commits it: every
    image chunk is committed, the stage is not."""
    out = tmp_path_factory.mktemp("cut")
    with pytest.MonkeyPatch.context() as mp:
        _crash_when(mp, _manifest_gains("stages", "images"))
        with pytest.raises(Crash):
            _pipeline(out).run()
    assert (out / "images" / "records.jsonl").is_file()
    return out


def _copy(src: Path, tmp_path: Path) -> Path:
    shutil.copytree(src, tmp_path / "run")
    return tmp_path / "run"


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    lines = data.splitlines(keepends=True)
    if how == "torn_last_line":  # the last line cut short, no newline
        data = b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2]
    elif how == "lost_last_line":  # cut exactly at a line boundary: still valid JSONL, one record fewer
        data = b"".join(lines[:-1])
    elif how == "cut_mid_file":
        data = data[: len(data) // 3]
    elif how == "flipped_byte":
        middle = len(data) // 2
        data = data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1:]
    path.write_bytes(data)


DAMAGE = ["torn_last_line", "lost_last_line", "cut_mid_file", "flipped_byte"]


# ---------------------------------------------------------------- corruption matrix

@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_chunk_is_named_with_its_fix_then_recomputed(cut_at_images_merge, reference, tmp_path, how):
    run = _copy(cut_at_images_merge, tmp_path)
    chunk = run / "images" / "rank000-of-001" / "chunk-00001.jsonl"
    _damage(chunk, how)
    with pytest.raises(StoreError) as err:
        _pipeline(run).run()
    message = str(err.value)
    assert "\n" not in message and str(chunk) in message
    assert "delete" in message and "chunk-00001.done.json" in message and "--redo images" in message
    (run / "images" / "rank000-of-001" / "chunk-00001.done.json").unlink()  # the fix the message names
    assert _pipeline(run).run() == reference[1]


@pytest.mark.parametrize("how", DAMAGE)
@pytest.mark.parametrize("stage", ["prompts", "images", "vqa"])
def test_damaged_stage_output_is_named_with_its_fix(reference, tmp_path, how, stage):
    run = _copy(reference[0], tmp_path)
    records = run / stage / "records.jsonl"
    _damage(records, how)
    expected = rf"^{re.escape(str(records))} does not match its sha256 .*; pass --redo {stage} "
    with pytest.raises(StoreError, match=expected):
        _pipeline(run).run()
    if stage == "images" and how == "lost_last_line":  # follow the fix once (the others are the same code path)
        assert _pipeline(run, redo=stage).run() == reference[1]


def test_damaged_chunk_marker_is_named_with_its_fix(cut_at_images_merge, tmp_path):
    run = _copy(cut_at_images_merge, tmp_path)
    marker = run / "images" / "rank000-of-001" / "chunk-00000.done.json"
    _damage(marker, "cut_mid_file")
    expected = rf"^{re.escape(str(marker))} is damaged .*; delete {re.escape(str(marker))} to recompute that chunk"
    with pytest.raises(StoreError, match=expected):
        _pipeline(run).run()


def test_damaged_rejects_file_is_an_error(reference, tmp_path):
    run = _copy(reference[0], tmp_path)
    (run / "prompts" / "rejects.jsonl").write_text('{"id": "x", "reason": "made up"}\n')
    with pytest.raises(StoreError, match="prompts/rejects.jsonl does not match its sha256"):
        runstore.RunStore(run).read_rejects("prompts")


@pytest.mark.parametrize("how", ["cut_mid_file", "flipped_byte"])
def test_damaged_png_before_vqa_is_named_then_redone(reference, tmp_path, monkeypatch, how):
    """Killed just before the vqa stage; a PNG is damaged; the resume's VQA read names it."""
    run = tmp_path / "run"
    _crash_when(monkeypatch, _manifest_gains("fingerprints", "vqa"))
    with pytest.raises(Crash):
        _pipeline(run).run()
    monkeypatch.undo()
    png = run / "images" / "p000000-n1-rejected.png"
    _damage(png, how)
    expected = rf"^{re.escape(str(png))} does not match its sha256 in its record .*; pass --redo images$"
    with pytest.raises(StoreError, match=expected):
        _pipeline(run).run()
    assert _pipeline(run, redo="images").run() == reference[1]


def test_damaged_png_of_a_finished_run_is_named(reference, tmp_path):
    run = _copy(reference[0], tmp_path)
    png = run / reference[1][0]["chosen"]["image"]
    _damage(png, "flipped_byte")
    expected = rf"^{re.escape(str(png))} does not match its sha256 in .*manifest.json .*; pass --redo images"
    with pytest.raises(StoreError, match=expected):
        _pipeline(run).run()


@pytest.mark.parametrize("how", ["cut_mid_file", "flipped_byte", "edited_checksum"])
def test_damaged_manifest_is_named_with_its_fix(reference, tmp_path, how):
    run = _copy(reference[0], tmp_path)
    manifest = run / "manifest.json"
    config_before = (run / "config.yaml").read_bytes()
    if how == "edited_checksum":  # still valid JSON: the file it vouches for no longer matches
        data = json.loads(manifest.read_text())
        data["stages"]["perturb"]["sha256"] = "0" * 64
        manifest.write_text(json.dumps(data))
        expected = rf"^{re.escape(str(run / 'perturb' / 'records.jsonl'))} does not match its sha256 .*--redo perturb"
    else:
        text = manifest.read_text()
        # flip a structural byte (a brace) so that the file is no longer JSON
        manifest.write_text(text[: len(text) // 3] if how == "cut_mid_file" else text.replace("{", "[", 2))
        expected = rf"^{re.escape(str(manifest))} is damaged .*pass --redo prompts to recompute the run$"
    with pytest.raises(StoreError, match=expected):
        _pipeline(run).run()
    assert (run / "config.yaml").read_bytes() == config_before
    if how == "cut_mid_file":  # follow the fix once
        assert _pipeline(run, redo="prompts").run() == reference[1]


def _manifest_copies(out: Path, monkeypatch) -> list[bytes]:
    """Run the small pipeline into ``out``, keeping every manifest it writes (oldest first)."""
    real, copies = runstore.atomic_write_json, []

    def write(path, obj):
        real(path, obj)
        if Path(path).name == "manifest.json":
            copies.append(Path(path).read_bytes())

    monkeypatch.setattr(runstore, "atomic_write_json", write)
    _pipeline(out).run()
    monkeypatch.undo()
    return copies


def test_the_manifest_is_a_chain_and_a_rollback_or_deletion_is_refused(reference, tmp_path, monkeypatch):
    """Was: a deleted manifest read as "nothing done yet" (train and export then read pairs.jsonl unchecked) and an
    older copy was taken as the truth. Each manifest records its predecessor's sha256 and a generation that every
    chunk marker records too; pairs.jsonl and config.yaml are read only when the manifest lists them."""
    from ospo_fast.export import export_parquet
    from ospo_fast.store import sha256_bytes
    from ospo_fast.train.data import read_pairs

    run = tmp_path / "run"
    copies = _manifest_copies(run, monkeypatch)
    chain = [json.loads(c) for c in copies]
    assert [m["generation"] for m in chain] == list(range(1, len(chain) + 1))
    assert chain[0]["previous_sha256"] is None
    assert all(m["previous_sha256"] == sha256_bytes(c) for m, c in zip(chain[1:], copies))
    assert "config.yaml" in chain[-1]["outputs"] and "pairs.jsonl" in chain[-1]["outputs"]
    pairs = run / "pairs.jsonl"
    newest = copies[-1]

    # an older manifest (from before the last image chunk was committed) put back: every reader refuses
    older = next(c for c in reversed(copies) if json.loads(c)["generation"] < max(
        json.loads(m.read_text())["generation"] for m in run.glob("images/rank*/chunk-*.done.json")))
    (run / "manifest.json").write_bytes(older)
    rolled_back = r"manifest\.json is at generation \d+, but chunks here were committed under generation \d+"
    for read in (lambda: _pipeline(run).run(), lambda: read_pairs(pairs), lambda: export_parquet(run)):
        with pytest.raises(StoreError, match=rolled_back):
            read()
    # the newest manifest from before the pairs were committed: no later chunk, but pairs.jsonl is not listed
    (run / "manifest.json").write_bytes(next(c for c in reversed(copies)
                                             if "pairs.jsonl" not in json.loads(c)["outputs"]))
    with pytest.raises(StoreError, match=r"pairs\.jsonl is not listed in .*manifest\.json"):
        read_pairs(pairs)
    # deleted: the chunks' markers still say what was committed
    (run / "manifest.json").unlink()
    for read in (lambda: _pipeline(run).run(), lambda: read_pairs(pairs)):
        with pytest.raises(StoreError, match=r"manifest\.json is missing, but chunks here were committed"):
            read()
    (run / "manifest.json").write_bytes(newest)  # restored: the run reads as before
    assert read_pairs(pairs) == read_pairs(reference[0] / "pairs.jsonl")
    (run / "manifest.json").unlink()
    assert _pipeline(run, redo="prompts").run() == reference[1]  # the fix the message names


def test_cli_prints_one_line_for_a_damaged_run(reference, tmp_path, capsys):
    from ospo_fast.cli import main

    run = _copy(reference[0], tmp_path)
    _damage(run / "images" / "records.jsonl", "torn_last_line")
    code = main(["synth", "--preset", "tiny", "--out", str(run), *OVERRIDES])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert "images/records.jsonl does not match its sha256" in err and "--redo images" in err


def test_cli_prints_one_line_for_a_wrong_redo_or_process_count(tmp_path, capsys):
    from ospo_fast.cli import main

    with pytest.raises(StoreError, match=r"^--redo 'imagez' is not a stage; give one of \['prompts', "):
        _pipeline(tmp_path, redo="imagez")
    runstore.RunStore(tmp_path, rank=0, world=2).write_chunk("perturb", 0, [{"id": "a"}], [])
    assert main(["synth", "--preset", "tiny", "--out", str(tmp_path), *OVERRIDES]) == 2
    err = capsys.readouterr().err  # after the prompts stage's progress bar
    errors = [line for line in err.splitlines() if "error" in line]
    assert "Traceback" not in err and len(errors) == 1 and errors[0].startswith("ospo-fast: error: stage 'perturb'")
    assert "was started with 2 process(es)" in errors[0] and "--redo perturb" in errors[0]


def test_read_jsonl_treats_a_torn_or_damaged_line_as_an_error(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]
    path.write_text('{"a": 1}\n{"a": 2')
    with pytest.raises(StoreError, match="ends in a torn line"):
        read_jsonl(path)
    path.write_text('{"a": 1}\n{"a": \n{"a": 3}\n')
    with pytest.raises(StoreError, match=r"x.jsonl:2 is damaged"):
        read_jsonl(path)
    path.write_bytes(b'{"a": 1}\n{"a": "\xff"}\n')  # a flipped bit inside a string: still JSON-shaped
    with pytest.raises(StoreError, match=r"x.jsonl:2 is damaged \(not UTF-8"):
        read_jsonl(path)


# ---------------------------------------------------------------- crash windows

def test_crash_after_images_merge_before_its_commit_resumes(cut_at_images_merge, reference, tmp_path):
    """Was: images/records.jsonl alone marked the stage done, so the manifest never got "images" and the run's
    summary failed with KeyError('images')."""
    from ospo_fast.run import stage_summary

    run = _copy(cut_at_images_merge, tmp_path)
    assert _pipeline(run).run() == reference[1]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages"]["images"] == json.loads((reference[0] / "manifest.json").read_text())[
        "stages"]["images"] | {"seconds": manifest["stages"]["images"]["seconds"]}
    assert stage_summary(run)["records"]["images"] == 2


def test_crash_after_pairs_before_their_commit_resumes(reference, tmp_path, monkeypatch):
    run = tmp_path / "run"
    _crash_when(monkeypatch, _manifest_gains("outputs", "pairs.jsonl"))
    with pytest.raises(Crash):
        _pipeline(run).run()
    assert (run / "pairs.jsonl").is_file()
    monkeypatch.undo()
    assert _pipeline(run).run() == reference[1]
    assert json.loads((run / "manifest.json").read_text())["outputs"]["pairs.jsonl"]["records"] == 1


def test_crash_before_a_chunk_marker_redoes_only_that_chunk(reference, tmp_path, monkeypatch):
    run = tmp_path / "run"
    _crash_when(monkeypatch, lambda path, obj: path.name == "chunk-00001.done.json" and path.parent.parent.name
                == "images")
    with pytest.raises(Crash):
        _pipeline(run).run()
    monkeypatch.undo()
    chunks = run / "images" / "rank000-of-001"
    assert (chunks / "chunk-00001.jsonl").is_file() and not (chunks / "chunk-00001.done.json").exists()
    first = (chunks / "chunk-00000.done.json").stat().st_mtime_ns
    assert _pipeline(run).run() == reference[1]
    assert (chunks / "chunk-00000.done.json").stat().st_mtime_ns == first  # kept, not recomputed


def _model_prompts_stand_in(ctx, chunk_index, rank, history):
    """Stage 1's model source without a model: two sampler prompts per request batch (distinct prompts)."""
    made = S1.sample_prompts(ctx.vocab, ctx.config.prompts, [2 * chunk_index, 2 * chunk_index + 1], ctx.config.seed)
    return [dict(r, id=f"m{rank:03d}-{chunk_index:05d}-{i:03d}") for i, r in enumerate(made)], []


def test_crash_between_prompt_merge_and_its_commit_keeps_the_quota(tmp_path, monkeypatch):
    """Was: the merge committed 4 prompts and the quota pass (3) came after it; a crash between them left 4."""
    from ospo_fast.stages import steps

    monkeypatch.setattr(steps, "model_prompts_chunk", _model_prompts_stand_in)
    settings = ["prompts.source=model", "prompts.num_prompts=3", "prompts.batch_size=2"]
    whole = _pipeline(tmp_path / "whole", *settings).base_prompts()
    assert len(whole) == 3
    with monkeypatch.context() as mp:
        _crash_when(mp, _manifest_gains("stages", "prompts"))
        with pytest.raises(Crash):
            _pipeline(tmp_path / "cut", *settings).base_prompts()
    assert _pipeline(tmp_path / "cut", *settings).base_prompts() == whole
    entry = json.loads((tmp_path / "cut" / "manifest.json").read_text())["stages"]["prompts"]
    assert entry["records"] == 3 and entry["reject_reasons"] == {"over_quota": 1}


# ---------------------------------------------------------------- fingerprints

def test_resume_with_other_settings_is_refused_before_anything_changes(reference, tmp_path):
    run = _copy(reference[0], tmp_path)
    config_before = (run / "config.yaml").read_bytes()
    with pytest.raises(FingerprintMismatch, match=r"^stage 'prompts' .*seed: 0 -> 1.*--redo prompts"):
        _pipeline(run, "seed=1")
    with pytest.raises(FingerprintMismatch, match=r"^stage 'images' .*images\.guidance_scale: 5\.0 -> 1\.0\)"
                                                  r".*--redo images to recompute it and every later stage$"):
        _pipeline(run, "images.guidance_scale=1.0")
    assert (run / "config.yaml").read_bytes() == config_before


def test_half_made_stage_with_other_settings_is_refused(cut_at_images_merge, reference, tmp_path):
    """Was: the finished image chunks of the old config were kept and the rest made with the new one."""
    run = _copy(cut_at_images_merge, tmp_path)
    with pytest.raises(FingerprintMismatch, match=r"stage 'images' .*images\.temperature: 1\.0 -> 0\.5"):
        _pipeline(run, "images.temperature=0.5").run()
    again = _pipeline(run, "images.temperature=0.5", redo="images").run()
    assert len(again) == 1 and again != reference[1]


def _write_prompts(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _prompt(pid=None, text="a red apple") -> dict:
    """A color prompt ``"a <color> <object> ..."`` with its structure."""
    color, obj = text.split()[1:3]
    row = {"prompt": text, "category": "color", "structure": {"objects": [obj], "attributes": [[obj, color]]}}
    return row if pid is None else dict(row, id=pid)


def test_edited_prompt_file_is_refused(tmp_path):
    prompts = _write_prompts(tmp_path / "p.jsonl", [_prompt("a"), _prompt("b", "a blue car")])
    settings = ["prompts.source=file", f"prompts.file={prompts}"]
    assert [r["id"] for r in _pipeline(tmp_path / "run", *settings).base_prompts()] == ["a", "b"]
    _write_prompts(prompts, [_prompt("a"), _prompt("b", "a green car")])
    with pytest.raises(FingerprintMismatch, match=r"stage 'prompts' .*prompts\.file_identity\.sha256: "):
        _pipeline(tmp_path / "run", *settings)


# ---------------------------------------------------------------- ids that become paths

@pytest.mark.parametrize("bad, why", [
    ("../../../escape", "not allowed"), ("sub/dir", "not allowed"), (".hidden", "not allowed"),
    ("a" * 101, "not allowed"), ("", "not allowed"), (7, "is a int"), (["a"], "is a list")])
def test_unsafe_or_non_string_prompt_ids_are_refused_with_file_and_line(tmp_path, bad, why):
    path = _write_prompts(tmp_path / "p.jsonl", [_prompt("ok"), _prompt(bad)])
    with pytest.raises(StoreError, match=rf"^{re.escape(str(path))}:2: id .* {why}"):
        S1.read_prompt_file(path)


def test_duplicate_prompt_ids_are_refused_with_both_lines(tmp_path):
    path = _write_prompts(tmp_path / "p.jsonl", [_prompt("a"), _prompt(), _prompt("a", "a blue car")])
    with pytest.raises(StoreError, match=rf"^{re.escape(str(path))}:3: id 'a' repeats line 1"):
        S1.read_prompt_file(path)
    path = _write_prompts(tmp_path / "q.jsonl", [_prompt(), _prompt("f000000", "a blue car")])  # a default id
    with pytest.raises(StoreError, match=rf"^{re.escape(str(path))}:2: id 'f000000' repeats line 1"):
        S1.read_prompt_file(path)


def test_no_path_is_made_from_an_unchecked_id(tmp_path):
    store = runstore.RunStore(tmp_path / "run")
    with pytest.raises(StoreError, match="not allowed"):
        safe_join(tmp_path, "../x", ".png")
    import numpy as np

    with pytest.raises(StoreError, match="not allowed"):
        store.write_chunk("images", 0, [{"id": "../../escape", "chosen": {"image": np.zeros((8, 8, 3), np.uint8)}}],
                          [])
    assert not list(tmp_path.glob("*.png")) and not (tmp_path / "escape-chosen.png").exists()


# ---------------------------------------------------------------- file modes

@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_outputs_follow_the_umask_like_open(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "ours.txt", "x")
        with open(tmp_path / "plain.txt", "w") as handle:
            handle.write("x")
    finally:
        os.umask(old)
    assert (tmp_path / "ours.txt").stat().st_mode & 0o777 == (tmp_path / "plain.txt").stat().st_mode & 0o777


# ---------------------------------------------------------------- records that cannot be made faithfully

def test_prompt_longer_than_the_model_positions_is_rejected_with_its_id(tmp_path):
    """Was: generated past max_position_embeddings (2048 on the tiny model) and kept."""
    long_text = " ".join(["a red apple on a wooden table"] * 300)  # 2108 prompt tokens + 64 image tokens
    prompts = _write_prompts(tmp_path / "p.jsonl", [_prompt("short"), _prompt("long", long_text)])
    pipe = _pipeline(tmp_path / "run", "prompts.source=file", f"prompts.file={prompts}", "perturb.num_perturbations=1")
    assert [p["base_id"] for p in pipe.run()] == ["short"]
    rejects = pipe.store.read_rejects("images")
    assert [r["id"] for r in rejects] == ["long-n0"] and rejects[0]["reason"] == "prompt_too_long"
    assert "max_position_embeddings 2048" in rejects[0]["detail"]


@pytest.mark.parametrize("value", [float("nan"), 0.5, -1])
def test_pairs_file_with_a_nan_or_soft_mask_is_refused_with_the_pair_id(reference, tmp_path, value):
    """Was (NaN): accepted, and the NaN weights acted like a zero mask."""
    from ospo_fast.train.data import PairsFileError, read_pairs

    pair = json.loads(json.dumps(reference[1][0]))
    pair["rejected"]["mask"][5] = value
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(pair) + "\n")  # json writes NaN, and json.loads reads it back
    with pytest.raises(PairsFileError, match=rf"^{re.escape(str(path))}:1: pair '{pair['pair_id']}': rejected\.mask "):
        read_pairs(path)


def test_model_identity_is_content_whatever_names_the_model(tmp_path, monkeypatch):
    """Was: built-in models and hub ids were identified by name (a cached builtin:tiny replaced under a half-done
    resume went unnoticed), and large weight files by their first and last MiB only (a flipped byte in between did
    not change the identity)."""
    from ospo_fast.models.loader import model_identity, resolve_model_path
    from ospo_fast.store import DIGEST_CACHE_FILE, cache_dir, file_identity

    monkeypatch.setattr("ospo_fast.store.DIGEST_CACHE_MIN", 1 << 20)  # remember digests of files from 1 MiB
    rng = __import__("numpy").random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text('{"hidden_size": 8}')
    weights = bytearray(rng.standard_normal(600_000).astype("float32").tobytes())  # 2.4 MB
    (tmp_path / "a" / "model.safetensors").write_bytes(weights)
    (tmp_path / "b" / "model.safetensors").write_bytes(weights)
    assert file_identity(tmp_path / "a") == file_identity(tmp_path / "b")  # its location does not matter
    assert (cache_dir() / DIGEST_CACHE_FILE).is_file()  # the large file's digest is remembered
    weights[1_200_000] ^= 1  # one bit in the middle of the weights
    (tmp_path / "b" / "model.safetensors").write_bytes(weights)
    assert file_identity(tmp_path / "a") != file_identity(tmp_path / "b")  # rewritten: new mtime, hashed again
    before = model_identity(str(tmp_path / "a"))
    (tmp_path / "a" / "README.md").write_text("notes about the model")  # documentation is not the model
    assert model_identity(str(tmp_path / "a")) == before

    built = Path(resolve_model_path("builtin:tiny"))
    before = model_identity("builtin:tiny")
    assert before == file_identity(built) and "model.safetensors" in before["files"]
    config = built / "config.json"
    saved = config.read_bytes()
    try:
        config.write_bytes(saved.replace(b"{", b"{ ", 1))  # the cached build replaced by another
        assert model_identity("builtin:tiny") != before
    finally:
        config.write_bytes(saved)


def test_a_hub_id_is_identified_by_its_cached_snapshot(tmp_path, monkeypatch):
    """A hub id resolves to its snapshot in the Hugging Face cache (laid out here as the hub client writes it,
    nothing downloaded): two revisions of one id have two identities."""
    import huggingface_hub.constants

    from ospo_fast.models.loader import model_identity

    hub = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    repo = hub / "models--someone--Janus-Test"
    identities = []
    for revision, weights in (("a" * 40, b"one"), ("b" * 40, b"two")):
        snapshot = repo / "snapshots" / revision
        snapshot.mkdir(parents=True)
        (snapshot / "config.json").write_text('{"model_type": "janus"}')
        (snapshot / "model.safetensors").write_bytes(weights)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(revision)
        identities.append(model_identity("someone/Janus-Test"))
    assert identities[0]["files"]["model.safetensors"] != identities[1]["files"]["model.safetensors"]
    with pytest.raises(ModelLoadError, match=r"'someone/Missing' is neither a local directory nor a hub id"):
        model_identity("someone/Missing")


def test_training_refuses_pairs_changed_after_the_run_committed_them(reference, tmp_path):
    """Was: a pairs.jsonl changed after the run (still valid JSON, or one line fewer) trained without a word."""
    from ospo_fast.train.data import read_pairs

    run = _copy(reference[0], tmp_path)
    pairs = run / "pairs.jsonl"
    assert len(read_pairs(pairs)) == 1
    pair = read_jsonl(pairs)[0]
    pairs.write_text(json.dumps(dict(pair, prompt=pair["prompt"] + " and a dog")) + "\n")
    with pytest.raises(StoreError, match=rf"^{re.escape(str(pairs))} does not match its sha256 .*--redo select"):
        read_pairs(pairs)
    (tmp_path / "loose.jsonl").write_text(pairs.read_text())  # outside a run directory: nothing to check against
    assert len(read_pairs(tmp_path / "loose.jsonl")) == 1


@pytest.mark.parametrize("stage", ["prompts", "vqa"])
def test_run_summary_reads_only_committed_files(reference, tmp_path, stage):
    """Was: the run summary read the stage files with a plain JSONL reader, so a lost last line was one record fewer
    in the printed counts and rates."""
    from ospo_fast.run import stage_summary

    run = _copy(reference[0], tmp_path)
    assert stage_summary(run)["pairs"] == len(reference[1])
    _damage(run / stage / "records.jsonl", "lost_last_line")
    with pytest.raises(StoreError, match=rf"^{re.escape(str(run / stage / 'records.jsonl'))} "):
        stage_summary(run)


def test_toy_mask_localisation_checks_the_pngs(reference, tmp_path):
    from ospo_fast.run import toy_mask_localisation

    run = _copy(reference[0], tmp_path)
    _damage(run / reference[1][0]["chosen"]["image"], "flipped_byte")
    with pytest.raises(StoreError, match="does not match its sha256"):
        toy_mask_localisation(run)


def test_export_checks_the_pngs(reference, tmp_path):
    """Was: export read the PNG bytes as they were, so a damaged image went into the Parquet file."""
    from ospo_fast.export import RunDirError, export_parquet

    run = _copy(reference[0], tmp_path)
    _damage(run / reference[1][0]["chosen"]["image"], "flipped_byte")
    with pytest.raises(RunDirError, match="does not match its sha256 .*--redo images"):
        export_parquet(run)


def test_toy_pair_judgement_checks_what_it_reads(reference, tmp_path):
    """Was: the toy pair judgement read the stage files and PNGs unchecked (the run summary's twin)."""
    from ospo_fast.toy.evaluate import pair_judgement

    run = _copy(reference[0], tmp_path)
    _damage(run / "images" / "records.jsonl", "lost_last_line")
    with pytest.raises(StoreError, match=rf"^{re.escape(str(run / 'images' / 'records.jsonl'))} "):
        pair_judgement(run)


def test_saved_weights_follow_the_umask_and_stale_temporaries_go_on_resume(tmp_path):
    """safetensors writes 0o600 files: published checkpoints and merged models take the umask's mode like every
    other output; what a killed writer left (.x.tmp files, step-N.tmp directories) is removed once the directory's
    write lock is held, and nothing else is."""
    import os

    import torch
    from safetensors.torch import save_file

    from ospo_fast.store import directory_lock
    from ospo_fast.train import checkpoint as ckpt

    old = os.umask(0o022)
    try:
        final = tmp_path / "checkpoints" / "step-000002"
        tmp = ckpt.temp_dir_for(final)
        save_file({"w": torch.zeros(2)}, str(tmp / "adapter_model.safetensors"))
        assert (tmp / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o600  # what safetensors does
        ckpt.publish(tmp, final)
        assert (final / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(old)
    (tmp_path / ".pairs.jsonl.abc123.tmp").write_text("half")
    (tmp_path / "checkpoints" / "step-000004.tmp").mkdir()
    (tmp_path / "notes.tmp").write_text("a user's file")  # not our naming: kept
    with directory_lock(tmp_path):
        pass
    assert not (tmp_path / ".pairs.jsonl.abc123.tmp").exists()
    assert not (tmp_path / "checkpoints" / "step-000004.tmp").exists()
    assert (tmp_path / "notes.tmp").exists() and (final / "adapter_model.safetensors").exists()


def test_nothing_is_written_or_deleted_through_a_symlink_inside_a_run(tmp_path):
    """A symlinked images/ (or manifest, or report/) inside a run directory is refused, naming the link, before
    anything is written through it; the report deletes only pages named as it names them."""
    import pytest

    from ospo_fast.report import OUR_PAGE
    from ospo_fast.runstore import RunStore
    from ospo_fast.store import StoreError, check_no_symlink

    outside = tmp_path / "outside"
    outside.mkdir()
    run = tmp_path / "run"
    run.mkdir()
    (run / "images").symlink_to(outside, target_is_directory=True)
    store = RunStore(run)
    with pytest.raises(StoreError, match="images is a symlink"):
        store._write_checked(run / "images" / "a.png", b"png")
    (run / "manifest.json").symlink_to(outside / "m.json")
    with pytest.raises(StoreError, match="manifest.json is a symlink"):
        store.reset_manifest()
    assert list(outside.iterdir()) == []
    assert check_no_symlink(tmp_path / "run", run / "ok" / "x.png") == run / "ok" / "x.png"
    linked_root = tmp_path / "link-to-run"  # the run directory itself may be a link the user made
    linked_root.symlink_to(run, target_is_directory=True)
    assert check_no_symlink(linked_root, linked_root / "x.json") == linked_root / "x.json"
    assert OUR_PAGE.fullmatch("pairs-all-1.html") and not OUR_PAGE.fullmatch("index.html")


def test_a_full_disk_in_a_checkpoint_save_is_an_os_error(tmp_path, monkeypatch):
    """torch.save raises RuntimeError("... file write failed") on a full disk; the trainer's saves turn it into an
    ENOSPC OSError, which the command line reports in one line with how to resume."""
    import errno

    import pytest
    import torch

    from ospo_fast.cli import _os_error
    from ospo_fast.train import checkpoint as ckpt

    def full_disk(obj, path):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0\nfile write failed")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError) as err:
        ckpt.save_torch({"a": 1}, tmp_path / "optimizer.pt")
    assert err.value.errno == errno.ENOSPC and "optimizer.pt" in _os_error(err.value)
    assert "re-run the same command to resume" in _os_error(err.value)


def test_a_non_utf8_metrics_file_is_a_checkpoint_error(tmp_path):
    import pytest

    from ospo_fast.train.checkpoint import CheckpointError, read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1, "loss": 1.0}\n{"step": 2, "loss": \xff}\n')
    with pytest.raises(CheckpointError, match="not UTF-8 at offset"):
        read_metrics(path)
