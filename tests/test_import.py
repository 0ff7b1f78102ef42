"""``ospo-fast import`` on a small set written in the OSPO authors' layout (their train JSON with absolute image paths
of their machines, PNGs under images_pairwise/{base,negative}/<t2i_category>/<item_id>/, ``_mask.pt`` files under
object_mask/{base,negative}/...) and the tiny built-in model: the pairs train, tokens are the VQ encoder's, masks
are the documented ones, every skipped item is a reject with its reason, paths never leave the given roots, and a
rerun is a no-op or a one-line refusal."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ospo_fast.cli import main
from ospo_fast.store import LOCK_FILE

PREFIX = "/nas2/data/Janus_dataset/main_exp/aaai/janus/images_pairwise"  # as in the authors' files
TINY = ["--preset", "tiny", "model.device=cpu"]
SIDE = 128  # builtin:tiny: an 8x8 token grid, 16 px per token
GOOD = {"0000001": "attribute", "0000002": "layout", "0000003": "non-spatial", "0000004": "complex",
        "0000005": "attribute"}
PROMPTS = {"0000001": "a paper book and a glass jar.", "0000002": "a red car on the left of a wooden bench",
           "0000003": "a man riding a horse", "0000004": "two dogs and a blue cup",
           "0000005": "a green apple and a red book"}


class AuthorsSet:
    """Paths of a written set and what the import must make of it."""

    def __init__(self, root: Path):
        self.root = root
        self.data = root / "train_mode_argmax_chosen_object_16.json"
        self.images = root / "images_pairwise"
        self.masks = root / "object_mask"
        self.outside = root / "outside.png"
        self.items: list[dict] = []
        self.sources: dict[str, dict[str, Path]] = {}  # item_id -> side -> PNG the pair must come from
        self.mask_files: dict[str, dict[str, torch.Tensor]] = {}
        self.expected_rejects: dict[int, str] = {}  # position in the JSON -> reason
        self.rng = np.random.default_rng(0)

    def png(self, rel: str, size=(SIDE, SIDE), mode: str = "RGB") -> Path:
        path = self.images / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = self.rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        (image.convert(mode) if mode != "RGB" else image).save(path)
        return path

    def mask(self, side: str, category: str, item_id: str, name: str, value) -> None:
        folder = self.masks / ("base" if side == "chosen" else "negative") / category / item_id
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(value, folder / f"{name}_mask.pt")
        self.mask_files.setdefault(item_id, {})[side] = value

    def rect_mask(self, size: int = 24) -> torch.Tensor:
        """A 0/1 uint8 (size, size) rectangle, as their save_binary_mask writes (torch.from_numpy(uint8))."""
        y0, x0 = self.rng.integers(0, size // 2, 2)
        y1, x1 = y0 + self.rng.integers(3, size // 2, 2)
        mask = np.zeros((size, size), dtype=np.uint8)
        mask[y0:y1, x0:x1] = 1
        return torch.from_numpy(mask)

    def add(self, item: dict, reason: str | None = None) -> dict:
        if reason is not None:
            self.expected_rejects[len(self.items)] = reason
        self.items.append(item)
        return item

    def good(self, item_id: str, category: str, name: str = "00", absolute: bool = True, **sizes) -> None:
        sources = {}
        paths = {}
        for side, folder in (("chosen", "base"), ("rejected", "negative")):
            rel = f"{folder}/{category}/{item_id}/{name}.png"
            sources[side] = self.png(rel, **sizes.get(side, {}))
            paths[side] = f"{PREFIX}/{rel}" if absolute else rel
            self.mask(side, category, item_id, name, self.rect_mask())
        self.sources[item_id] = sources
        self.add({"item_id": item_id, "t2i_category": category, "sub_category": f"{category}1",
                  "prompt": PROMPTS[item_id], "chosen": paths["chosen"], "rejected": paths["rejected"],
                  "chosen_score": 0.9, "rejected_score": 0.4, "rejected_prompt": PROMPTS[item_id] + " (negative)",
                  "negative_prompt": ["unused", "by", "the import"]})

    def bad(self, item_id: str, reason: str, category: str = "attribute", **change) -> dict:
        """An item whose files are all fine unless ``change`` (or the caller) breaks them."""
        for side, folder in (("chosen", "base"), ("rejected", "negative")):
            self.png(f"{folder}/{category}/{item_id}/00.png")
            self.mask(side, category, item_id, "00", self.rect_mask())
        item = {"item_id": item_id, "t2i_category": category, "prompt": "a red car and a blue bench",
                "chosen": f"base/{category}/{item_id}/00.png", "rejected": f"negative/{category}/{item_id}/00.png"}
        return self.add(dict(item, **change), reason)


def write_authors_set(root: Path) -> AuthorsSet:
    s = AuthorsSet(root)
    s.good("0000001", "attribute", chosen={"size": (256, 256)})  # resized to the model's 128 px
    s.good("0000002", "layout", chosen={"mode": "P"}, rejected={"mode": "RGBA"})  # converted to RGB
    s.good("0000003", "non-spatial")
    s.good("0000004", "complex")
    s.good("0000005", "attribute", name="01", absolute=False)  # a relative path, and another file name
    s.mask("chosen", "attribute", "0000005", "01", s.rect_mask(8))  # already on the token grid: used as it is
    s.bad("0000010", "missing_image", chosen="base/attribute/0000010/07.png")
    s.bad("0000011", "unreadable_image")
    (s.images / "base/attribute/0000011/00.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    s.bad("0000012", "image_not_square")
    s.png("negative/attribute/0000012/00.png", size=(SIDE, 96))
    s.bad("0000013", "bad_mask")
    s.mask("chosen", "attribute", "0000013", "00", torch.full((24, 24), 2, dtype=torch.uint8))
    s.bad("0000014", "bad_mask")
    s.mask("rejected", "attribute", "0000014", "00", torch.ones(24, 23, dtype=torch.uint8))
    s.bad("0000015", "bad_mask")
    s.mask("chosen", "attribute", "0000015", "00", {"mask": [1, 0]})
    s.bad("0000016", "missing_mask")
    (s.masks / "negative/attribute/0000016/00_mask.pt").unlink()
    s.bad("0000017", "unsafe_category", category="attribute", t2i_category="../attribute")
    s.add(dict(s.items[0]), "duplicate_item_id")  # item 0000001 again: the first one is kept
    s.add({"item_id": "../evil", "t2i_category": "attribute", "prompt": "a cat", "chosen": "a.png",
           "rejected": "b.png"}, "unsafe_item_id")
    s.outside.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((SIDE, SIDE, 3), dtype=np.uint8)).save(s.outside)
    s.bad("0000020", "path_outside_root", chosen="../outside.png")  # climbs out of --images
    s.bad("0000021", "path_outside_root", chosen=str(s.outside))  # absolute, not under the stripped prefix
    s.bad("0000022", "symlink")
    link = s.images / "base/attribute/0000022/00.png"
    link.unlink()
    link.symlink_to(s.outside)
    s.bad("0000023", "symlink", category="layout")
    folder = s.images / "negative/layout/0000023"
    for child in folder.iterdir():
        child.unlink()
    folder.rmdir()
    folder.symlink_to(s.outside.parent)  # a linked folder on the way
    s.bad("0000024", "prompt_too_long", prompt="a red car " + "and a blue bench " * 700)
    s.data.write_text(json.dumps(s.items, indent=4))
    return s


@pytest.fixture(scope="module")
def authors(tmp_path_factory) -> AuthorsSet:
    return write_authors_set(tmp_path_factory.mktemp("hub"))


def _import_args(s: AuthorsSet, out: Path, masks: bool = True) -> list[str]:
    args = ["import", "--data", str(s.data), "--images", str(s.images), "--strip-prefix", PREFIX, "--out", str(out),
            "--chunk-size", "4"]
    return args + (["--masks", str(s.masks)] if masks else []) + TINY


@pytest.fixture(scope="module")
def imported(authors, tmp_path_factory) -> tuple[Path, str]:
    """The set imported once through the CLI (with the authors' masks); the output directory and what it printed."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("run") / "imported"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(_import_args(authors, out)) == 0
    return out, printed.getvalue()


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != LOCK_FILE}


def _one_line_error(capsys) -> str:
    """The error line; nothing else but a model loader's progress bar (transformers', on stderr) came before it."""
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.strip() and "Loading weights" not in line]
    assert len(ours) == 1 and ours[0].startswith("ospo-fast: error: ") and "Traceback" not in err, err
    return ours[0]


# -- the pairs are the trainer's own ---------------------------------------------------------------------------------
def test_imported_pairs_load_and_train(imported, tiny_bundle, tmp_path):
    from ospo_fast.train import load_pair_set, read_pairs

    out, printed = imported
    records = read_pairs(out / "pairs.jsonl", grid=8, codebook=256)
    assert sorted(r["pair_id"] for r in records) == sorted(GOOD)
    for record in records:
        assert record["prompt"] == PROMPTS[record["pair_id"]] and record["category"] == GOOD[record["pair_id"]]
        assert record["chosen"]["score"] == 0.9 and record["rejected"]["score"] == 0.4
        assert record["chosen"]["image"] == f"images/{record['pair_id']}-chosen.png"
        category, item_id = GOOD[record["pair_id"]], record["pair_id"]
        name = "01" if item_id == "0000005" else "00"
        assert record["source"]["chosen"] == f"base/{category}/{item_id}/{name}.png"  # under --images, not theirs
    pairs = load_pair_set(out / "pairs.jsonl", tiny_bundle)
    assert pairs.tokens.shape == (len(GOOD), 2, 64)
    assert "imported 5 pairs" in printed and "ospo-fast train --pairs" in printed
    train_dir = tmp_path / "train"
    assert main(["train", "--pairs", str(out / "pairs.jsonl"), "--out", str(train_dir), *TINY, "train.max_steps=1",
                 "train.per_device_batch=2", "train.lora_targets=[q_proj]"]) == 0
    assert len((train_dir / "metrics.jsonl").read_text().splitlines()) == 1


def test_tokens_are_the_vq_encoders_and_the_pngs_reencode_to_them(imported, authors, tiny_bundle):
    from ospo_fast.train import load_pair_set, read_pairs

    out, _ = imported
    vq = tiny_bundle.model.model.vqmodel
    for record in read_pairs(out / "pairs.jsonl"):
        for side in ("chosen", "rejected"):
            image = Image.open(authors.sources[record["pair_id"]][side]).convert("RGB")
            if image.size != (SIDE, SIDE):
                image = image.resize((SIDE, SIDE), Image.BICUBIC)
            x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 127.5 - 1
            with torch.no_grad():
                expected = vq.encode(x).image_tokens.view(-1).tolist()
            assert record[side]["tokens"] == expected, (record["pair_id"], side)
    stored = load_pair_set(out / "pairs.jsonl", tiny_bundle)
    reencoded = load_pair_set(out / "pairs.jsonl", tiny_bundle, token_source="reencode")
    assert torch.equal(stored.tokens, reencoded.tokens)


def test_masks_are_the_authors_on_the_token_grid(imported, authors):
    from ospo_fast.train import read_pairs

    out, _ = imported
    for record in read_pairs(out / "pairs.jsonl"):
        for side in ("chosen", "rejected"):
            mask = authors.mask_files[record["pair_id"]][side].numpy()
            if mask.shape == (24, 24):  # the area vote: 3x3 blocks, at least half of them 1
                mask = (mask.reshape(8, 3, 8, 3).mean(axis=(1, 3)) >= 0.5).astype(int)
            assert record[side]["mask"] == mask.reshape(-1).tolist(), (record["pair_id"], side)
        assert record["source"]["masks"] == "authors"


def test_mask_on_grid_votes_by_area_and_refuses_non_binary():
    from ospo_fast.importer import mask_on_grid

    rng = np.random.default_rng(1)
    for size, grid in ((24, 8), (24, 24), (48, 24), (24, 12)):
        mask = (rng.random((size, size)) < 0.4).astype(np.uint8)
        got, problem = mask_on_grid(torch.from_numpy(mask), grid)
        k = size // grid
        expected = (mask.reshape(grid, k, grid, k).mean(axis=(1, 3)) >= 0.5).astype(np.uint8)
        assert problem == "" and got.tolist() == expected.reshape(-1).tolist()
    assert mask_on_grid(torch.ones(24, 24, dtype=torch.bool), 8)[0].tolist() == [1] * 64
    assert "values other than 0 and 1" in mask_on_grid(torch.full((24, 24), 0.5), 8)[1]
    assert "not a square" in mask_on_grid(torch.zeros(1, 24, 24), 8)[1]
    assert "not a tensor" in mask_on_grid(np.zeros((24, 24)), 8)[1]


# -- nothing silently dropped ----------------------------------------------------------------------------------------
def test_every_skipped_item_is_a_reject_with_its_reason(imported, authors):
    out, printed = imported
    rejects = [json.loads(line) for line in (out / "import" / "rejects.jsonl").read_text().splitlines()]
    assert {r["index"]: r["reason"] for r in rejects} == authors.expected_rejects
    assert len(rejects) + len(GOOD) == len(authors.items)
    counts: dict[str, int] = {}
    for reason in authors.expected_rejects.values():
        counts[reason] = counts.get(reason, 0) + 1
    listed = ", ".join(f"{reason} {count}" for reason, count in sorted(counts.items()))
    assert f"skipped {len(rejects)} ({listed})" in printed
    by_reason = {r["reason"]: r["detail"] for r in rejects}
    assert "--strip-prefix" in by_reason["path_outside_root"] or "'..'" in by_reason["path_outside_root"]
    assert "symlink" in by_reason["symlink"]


def test_paths_never_leave_the_roots(imported, authors):
    out, _ = imported
    rejects = [json.loads(line) for line in (out / "import" / "rejects.jsonl").read_text().splitlines()]
    escapes = {r["id"]: r for r in rejects if r["reason"] in ("path_outside_root", "symlink", "unsafe_item_id",
                                                              "unsafe_category")}
    assert set(escapes) == {"0000020", "0000021", "0000022", "0000023", "../evil", "0000017"}
    assert not (out.parent / "evil-chosen.png").exists() and not list(out.parent.glob("*.png"))
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(
        f"{i}-{side}.png" for i in GOOD for side in ("chosen", "rejected"))


def test_the_run_names_no_directory_of_this_machine(imported, authors):
    out, _ = imported
    machine = str(authors.root.parent.parent)  # pytest's base temporary directory, above the set and the run
    for name in ("pairs.jsonl", "manifest.json", "import/records.jsonl"):
        assert machine not in (out / name).read_text(), name
    rejects = (out / "import" / "rejects.jsonl").read_text()
    assert rejects.count(machine) == 1  # only item 0000021's own path, quoted from the JSON


def test_nothing_is_written_through_a_symlink_in_out(authors, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "images").symlink_to(elsewhere)
    assert main(_import_args(authors, out)) == 2
    assert "symlink" in _one_line_error(capsys)
    assert list(elsewhere.iterdir()) == []


# -- reruns ----------------------------------------------------------------------------------------------------------
def test_rerun_with_the_same_inputs_does_nothing(imported, authors, capsys):
    out, _ = imported
    before = _snapshot(out)
    assert main(_import_args(authors, out)) == 0
    assert capsys.readouterr().out.startswith(f"nothing to do: {out} already holds this import; imported 5 pairs")
    assert _snapshot(out) == before


def test_rerun_with_other_inputs_is_refused_and_redo_imports_again(imported, authors, tmp_path, capsys):
    out, _ = imported
    before = _snapshot(out)
    assert main(_import_args(authors, out, masks=False)) == 2
    err = _one_line_error(capsys)
    assert "import.masks" in err and "--redo" in err
    assert _snapshot(out) == before
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    assert main(_import_args(authors, copy, masks=False) + ["--redo"]) == 0  # imports again, masks computed
    assert "masks: the model's teacher-forced attention" in capsys.readouterr().out
    records = [json.loads(line) for line in (copy / "pairs.jsonl").read_text().splitlines()]
    mask_only = sum(r in ("bad_mask", "missing_mask", "unsafe_category") for r in authors.expected_rejects.values())
    assert {r["source"]["masks"] for r in records} == {"attention"} and len(records) == len(GOOD) + mask_only


def test_a_synthesis_run_directory_is_refused(authors, tmp_path, capsys):
    out = tmp_path / "synth"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"stages": {"prompts": {}}, "fingerprints": {}, "outputs": {}}))
    before = _snapshot(out)
    assert main(_import_args(authors, out)) == 2
    assert "synthesis run" in _one_line_error(capsys)
    assert _snapshot(out) == before


def test_an_interrupted_import_resumes_to_the_same_pairs(authors, tiny_bundle, tmp_path, monkeypatch):
    from ospo_fast import importer
    from ospo_fast.config import load_config

    config = load_config("tiny", ["model.device=cpu"])
    settings = importer.ImportSettings(data=authors.data, images=authors.images, masks=authors.masks,
                                       strip_prefix=PREFIX, chunk_size=4)
    full = importer.import_pairs(config, settings, tmp_path / "full", bundle=tiny_bundle)
    real_chunk, calls = importer.import_chunk, []

    def stop_at_the_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_chunk(*args)

    monkeypatch.setattr(importer, "import_chunk", stop_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        importer.import_pairs(config, settings, tmp_path / "cut", bundle=tiny_bundle)
    assert not (tmp_path / "cut" / "pairs.jsonl").exists()
    monkeypatch.setattr(importer, "import_chunk", real_chunk)
    resumed = importer.import_pairs(config, settings, tmp_path / "cut", bundle=tiny_bundle)
    assert (resumed.imported, resumed.skipped) == (full.imported, full.skipped)
    assert (tmp_path / "cut" / "pairs.jsonl").read_bytes() == (tmp_path / "full" / "pairs.jsonl").read_bytes()


# -- masks computed with the model's attention -----------------------------------------------------------------------
def test_without_their_masks_the_attention_pass_makes_them(authors, tiny_bundle, tmp_path):
    from ospo_fast import importer
    from ospo_fast.config import load_config
    from ospo_fast.stages.context import StageContext
    from ospo_fast.stages.steps import teacher_forced_masks
    from ospo_fast.train import read_pairs

    items = [dict(authors.items[i]) for i in range(5)]
    items[0]["nouns"] = ["book", "glass", "jar", "paper", "table"]  # their spaCy nouns; "table" is not in the prompt
    items[3]["prompt"] = "1 2 3"  # no word to take an object from
    data = tmp_path / "train.json"
    data.write_text(json.dumps(items))
    config = load_config("tiny", ["model.device=cpu"])
    settings = importer.ImportSettings(data=data, images=authors.images, strip_prefix=PREFIX)
    summary = importer.import_pairs(config, settings, tmp_path / "out", bundle=tiny_bundle)
    assert (summary.imported, summary.skipped) == (4, {"no_objects": 1})
    records = {r["pair_id"]: r for r in read_pairs(tmp_path / "out" / "pairs.jsonl")}
    objects = {"0000001": ["book", "glass", "jar", "paper"], "0000002": ["car", "bench"],
               "0000003": ["man", "horse"], "0000005": ["apple", "book"]}
    assert {k: r["mask_objects"] for k, r in records.items()} == objects
    ids = sorted(objects)
    tokens = torch.tensor([records[i][side]["tokens"] for side in ("chosen", "rejected") for i in ids])
    expected = teacher_forced_masks(StageContext(config, _bundle=tiny_bundle), [records[i]["prompt"] for i in ids] * 2,
                                    tokens, [objects[i] for i in ids] * 2).reshape(len(tokens), -1)
    got = [records[i][side]["mask"] for side in ("chosen", "rejected") for i in ids]
    assert got == expected.astype(int).tolist() and expected.any()


def test_prompt_objects_reads_back_every_rendered_prompt():
    from ospo_fast.config import PromptConfig
    from ospo_fast.stages.prompts import sample_prompts
    from ospo_fast.stages.structure import GENERAL, TOY, prompt_objects

    for vocab, name in ((GENERAL, "general"), (TOY, "toy")):
        config = PromptConfig(vocabulary=name, categories=list(vocab.categories))
        for record in sample_prompts(vocab, config, list(range(300)), seed=3):
            assert sorted(prompt_objects(record["prompt"])) == sorted(record["structure"]["objects"]), record
    assert prompt_objects("A paper book, and a glass jar.") == ["book", "jar"]


# -- a malformed JSON stops the import before anything is written ------------------------------------------------------
GOOD_ITEM = {"item_id": "0000001", "prompt": "a cat", "chosen": "a.png", "rejected": "b.png", "t2i_category": "color"}


@pytest.mark.parametrize("content, expect", [
    (b'[{"item_id": "1",', "not valid JSON"),
    (json.dumps({"data": [GOOD_ITEM]}).encode(), "holds a JSON dict, not a list"),
    (b"[]", "empty list"),
    (json.dumps([GOOD_ITEM, 7]).encode(), "item 1 is a JSON int"),
    (json.dumps([dict(GOOD_ITEM, chosen=5)]).encode(), "item 0 (item_id '0000001'): chosen must be"),
    (json.dumps([{k: v for k, v in GOOD_ITEM.items() if k != "t2i_category"}]).encode(), "t2i_category must be"),
    (json.dumps([dict(GOOD_ITEM, chosen_score="high")]).encode(), "chosen_score must be a finite number"),
    (json.dumps([dict(GOOD_ITEM, nouns="cat")]).encode(), "nouns must be a list"),
    (json.dumps([dict(GOOD_ITEM, prompt="a\x00cat")]).encode(), "without NUL"),
    (b'[{"item_id": "0000001", "prompt": "a caf\xe9"}]', "is not UTF-8"),
])
def test_a_malformed_json_is_one_line_before_any_write(authors, tmp_path, capsys, content, expect):
    data = tmp_path / "train.json"
    data.write_bytes(content)
    out = tmp_path / "out"
    args = ["import", "--data", str(data), "--images", str(authors.images), "--out", str(out), *TINY]
    assert main(args) == 2
    err = _one_line_error(capsys)
    assert str(data) in err and expect in err, err
    assert not out.exists()


def test_missing_folders_and_nothing_importable_are_one_line(authors, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["import", "--data", str(authors.data), "--images", str(tmp_path / "nope"), "--out", str(out), *TINY]
    assert main(args) == 2
    assert "--images" in _one_line_error(capsys) and not out.exists()
    data = tmp_path / "train.json"
    data.write_text(json.dumps([dict(GOOD_ITEM, chosen="missing.png")]))
    assert main(["import", "--data", str(data), "--images", str(authors.images), "--out", str(out), *TINY]) == 2
    err = _one_line_error(capsys)
    assert "no item" in err and "missing_image 1" in err and "rejects.jsonl" in err
