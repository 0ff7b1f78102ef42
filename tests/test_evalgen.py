"""eval-gen writes each benchmark's official layout; bad prompt files get clear errors."""

import json

import numpy as np
import pytest
from PIL import Image

from ospo_fast.cli import main
from ospo_fast.config import ImageConfig
from ospo_fast.evalgen import PromptFileError, eval_gen, plan

CFG = ImageConfig(batch_size=4)


@pytest.fixture(scope="module")
def small_bundle():
    """The tiny random Janus with a 4x4 image grid (64 px images): layouts do not need more."""
    from ospo_fast.models import load_janus

    return load_janus("builtin:tiny-4", device="cpu")


def test_geneval_layout(small_bundle, tmp_path):
    meta = tmp_path / "evaluation_metadata.jsonl"
    rows = [{"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
            {"tag": "colors", "include": [], "prompt": "a photo of a red bench"}]
    meta.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert eval_gen(small_bundle, "geneval", meta, tmp_path / "out", CFG, samples=2) == 4
    for index, row in enumerate(rows):
        folder = tmp_path / "out" / f"{index:05d}"
        assert json.loads((folder / "metadata.jsonl").read_text()) == row
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["0000.png", "0001.png"]
    assert Image.open(tmp_path / "out" / "00000" / "samples" / "0000.png").size == (64, 64)
    # a second call resumes: nothing left to make
    assert eval_gen(small_bundle, "geneval", meta, tmp_path / "out", CFG, samples=2) == 0


def test_t2i_compbench_layout(small_bundle, tmp_path):
    prompts = tmp_path / "color_val.txt"
    prompts.write_text("a green bench and a red car\n\na blue cup\n")
    eval_gen(small_bundle, "t2i-compbench", prompts, tmp_path / "out", CFG, samples=2)
    names = sorted(p.name for p in (tmp_path / "out" / "samples").iterdir())
    assert names == ["a blue cup_000000.png", "a blue cup_000001.png",
                     "a green bench and a red car_000000.png", "a green bench and a red car_000001.png"]


def test_dpg_bench_grid(small_bundle, tmp_path):
    src = tmp_path / "prompts"
    src.mkdir()
    (src / "item1.txt").write_text("A long detailed prompt about a red cat on a wooden chair.")
    eval_gen(small_bundle, "dpg-bench", src, tmp_path / "out", CFG)
    grid = np.asarray(Image.open(tmp_path / "out" / "item1.png"))
    assert grid.shape == (128, 128, 3)
    tile = np.asarray(Image.open(tmp_path / "out" / "tiles" / "item1" / "3.png"))
    assert (grid[64:, 64:] == tile).all()


@pytest.mark.parametrize("fmt, content, match", [
    ("geneval", "", "no prompts"), ("geneval", "not json\n", "not JSON"), ("geneval", '{"tag": 1}\n', "prompt"),
    ("t2i-compbench", "\n\n", "no prompts"),
])
def test_bad_prompt_files(tmp_path, fmt, content, match):
    path = tmp_path / "p.txt"
    path.write_text(content)
    with pytest.raises(PromptFileError, match=match):
        plan(fmt, path, tmp_path / "out", 1)


def test_missing_inputs(tmp_path, capsys):
    with pytest.raises(PromptFileError, match="does not exist"):
        plan("t2i-compbench", tmp_path / "none.txt", tmp_path / "o", 1)
    with pytest.raises(PromptFileError, match="directory"):
        plan("dpg-bench", tmp_path / "none", tmp_path / "o", 1)
    code = main(["eval-gen", "--format", "geneval", "--prompts", str(tmp_path / "x.jsonl"), "--out", str(tmp_path),
                 "--preset", "tiny"])
    assert code == 2 and "does not exist" in capsys.readouterr().err
