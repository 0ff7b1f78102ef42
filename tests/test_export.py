"""The Parquet export: Hugging Face ``datasets`` decodes the two image columns as images, a run directory (every
iteration) is accepted as well as a synth directory, and a directory without pairs is a one-line error."""


import numpy as np
import pytest
from PIL import Image

from ospo_fast.cli import main
from ospo_fast.export import RunDirError, export_parquet, synth_dirs
from ospo_fast.pipeline import to_pair
from ospo_fast.runstore import RunStore, png_bytes
from ospo_fast.store import atomic_write_bytes

datasets = pytest.importorskip("datasets")
GRID = 2


def _pixels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)


def make_synth_dir(root, n_pairs: int = 2, seed: int = 0) -> list[dict]:
    """A synth directory as stages 1-4 leave it: PNGs under images/, pairs.jsonl written through ``to_pair``."""
    pairs = []
    for i in range(n_pairs):
        record = {"id": f"p{i}-n0", "base_id": f"p{i}", "base_prompt": f"a red cat {i}", "category": "color",
                  "kind": "replace", "prompt": f"a blue cat {i}", "dense_base": f"a red cat {i}, detailed",
                  "dense_prompt": f"a blue cat {i}, detailed", "questions": ["Is there a red cat?"],
                  "base_structure": {"objects": ["cat"]}, "mask_objects": ["cat"],
                  "verdict": {"score_chosen": 0.9, "score_rejected": -0.5, "keep": True, "reason": "kept"}}
        for k, side in enumerate(("chosen", "rejected")):
            rel = f"images/p{i}-n0-{side}.png"
            atomic_write_bytes(root / rel, png_bytes(_pixels(seed * 100 + 2 * i + k)))
            record[side] = {"image": rel, "tokens": [i, k, 3, 4], "mask": [1, 0, 0, 1], "vqa": [[0.9, 0.1]]}
        pairs.append(to_pair(record))
    RunStore(root).write_final("pairs.jsonl", pairs)  # and its manifest entry, as selection commits them
    return pairs


def test_datasets_decodes_chosen_and_rejected_as_images(tmp_path):
    pairs = make_synth_dir(tmp_path)
    [path] = export_parquet(tmp_path)
    ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
    assert isinstance(ds.features["chosen"], datasets.Image) and isinstance(ds.features["rejected"], datasets.Image)
    assert ds.features["prompt"] == datasets.Value("string")
    for row, pair in zip(ds, pairs):
        assert row["prompt"] == pair["prompt"] and row["chosen_tokens"] == pair["chosen"]["tokens"]
        for side in ("chosen", "rejected"):
            assert isinstance(row[side], Image.Image)
            assert (np.asarray(row[side].convert("RGB")) ==
                    np.asarray(Image.open(tmp_path / pair[side]["image"]).convert("RGB"))).all()
    stored = ds.cast_column("chosen", datasets.Image(decode=False))[0]["chosen"]["path"]
    assert stored == pairs[0]["chosen"]["image"]  # relative, never this machine's absolute path


def test_run_directory_exports_every_iteration(tmp_path, capsys):
    run = tmp_path / "run"
    first = make_synth_dir(run / "iter1" / "synth", n_pairs=2, seed=1)
    second = make_synth_dir(run / "iter2" / "synth", n_pairs=1, seed=2)
    assert synth_dirs(run) == [run / "iter1" / "synth", run / "iter2" / "synth"]
    assert main(["export", str(run)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(run / f"iter{i}" / "synth" / "dataset" / "train.parquet") for i in (1, 2)]
    for file, pairs in zip(printed, (first, second)):
        ds = datasets.load_dataset("parquet", data_files=file, split="train")
        assert ds["pair_id"] == [p["pair_id"] for p in pairs]


def test_directory_without_pairs_is_one_line(tmp_path, capsys):
    (tmp_path / "synth").mkdir()
    (tmp_path / "synth" / "manifest.json").write_text('{"stages": {}}')
    assert main(["export", str(tmp_path / "synth")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no pairs.jsonl" in err and "ospo-fast synth --out" in err
    assert main(["export", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(RunDirError, match="neither a run directory"):
        export_parquet(tmp_path)
