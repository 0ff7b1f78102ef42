"""eval-gen writes each benchmark's official layout; bad prompt files get clear errors.

The official evaluators' discovery, sorting and grouping steps are re-implemented here from their sources
(GenEval evaluation/evaluate_images.py; T2I-CompBench BLIPvqa_eval/BLIP_vqa.py, UniDet_eval/experts/obj_detection/
generate_dataset.py + 2D_spatial_eval.py, 3_in_1_eval/3_in_1.py; ELLA dpg_bench/compute_dpg_bench.py) and run on
our output: every image must land on its own prompt."""

import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from ospo_fast.cli import main
from ospo_fast.config import ImageConfig
from ospo_fast.evalgen import DEFAULT_SAMPLES, PromptFileError, eval_gen, plan, where_to_point
from ospo_fast.store import FingerprintMismatch

CFG = ImageConfig(batch_size=8)


@pytest.fixture(scope="module")
def small_bundle():
    """The tiny random Janus with a 4x4 image grid (64 px images): layouts do not need more."""
    from ospo_fast.models import load_janus

    return load_janus("builtin:tiny-4", device="cpu")


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _is_image_of(path, bundle, prompt: str, seed: int) -> bool:
    """The PNG at ``path`` is ``prompt`` drawn with ``seed``: the same tokens decode to the same pixels up to one
    level of uint8 rounding (the VQ decoder's float sums depend on the batch they ran in)."""
    from ospo_fast.engine.image_gen import generate_images

    again = generate_images(bundle, [prompt], [seed], CFG).pixels[0].numpy().astype(int)
    return int(np.abs(_pixels(path).astype(int) - again).max()) <= 1


# ---------------------------------------------------------------- GenEval

def geneval_discover(imagedir) -> list[tuple[dict, str]]:
    """evaluate_images.py main(): digit-named folders, json.load of metadata.jsonl, every \\d+.png in samples/."""
    found = []
    for subfolder in os.listdir(imagedir):
        folderpath = os.path.join(imagedir, subfolder)
        if not os.path.isdir(folderpath) or not subfolder.isdigit():
            continue
        with open(os.path.join(folderpath, "metadata.jsonl")) as fp:
            metadata = json.load(fp)
        for imagename in os.listdir(os.path.join(folderpath, "samples")):
            imagepath = os.path.join(folderpath, "samples", imagename)
            if os.path.isfile(imagepath) and re.match(r"\d+\.png", imagename):
                found.append((metadata, imagepath))
    return found


def test_geneval_layout(small_bundle, tmp_path):
    meta = tmp_path / "evaluation_metadata.jsonl"
    rows = [{"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
            {"tag": "colors", "include": [], "prompt": "a photo of a red bench"}]
    meta.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert eval_gen(small_bundle, "geneval", meta, out, CFG, samples=2, seed=3) == 4
    found = geneval_discover(out)
    assert len(found) == 4
    for metadata, imagepath in found:
        index, name = imagepath.split(os.sep)[-3], os.path.basename(imagepath)
        assert metadata == rows[int(index)]
        # the generator's names: folder f"{index:0>5}", sample f"{sample_count:05}.png"
        assert index == f"{int(index):0>5}" and name == f"{int(name[:-4]):05}.png"
    assert _pixels(out / "00000" / "samples" / "00000.png").shape == (64, 64, 3)
    assert _is_image_of(out / "00001" / "samples" / "00001.png", small_bundle, rows[1]["prompt"], 3 + 1)
    # a second call resumes: nothing left to make
    assert eval_gen(small_bundle, "geneval", meta, out, CFG, samples=2, seed=3) == 0
    assert DEFAULT_SAMPLES["geneval"] == 4  # diffusers_generate.py --n_samples default


# ---------------------------------------------------------------- T2I-CompBench

def blip_order(samples_dir) -> list[tuple[int, str]]:
    """BLIP_vqa.py Create_annotation_for_BLIP: sort by the number after the last '_'; question_id = position;
    the prompt is the file name up to the first '_'. (CLIP_similarity.py sorts and reads the same way.)"""
    names = os.listdir(samples_dir)
    names.sort(key=lambda x: int(x.split("_")[-1].split(".")[0]))
    return [(qid, name.split("_")[0]) for qid, name in enumerate(names)]


def unidet_order(samples_dir) -> list[tuple[int, str]]:
    """UniDet generate_dataset.py sorts by int(x.split('_')[1]); 2D_spatial_eval.py takes question_id from the
    number after the last '_' and the prompt from before the first '_'."""
    names = os.listdir(samples_dir)
    names.sort(key=lambda x: int(x.split("_")[1].split(".")[0]))
    return [(int(n.split("_")[-1].split(".")[0]), n.split("_")[0]) for n in names]


def three_in_one_groups(prompt_file, num: int = 10) -> list[str]:
    """3_in_1.py: score position k belongs to line k // num of the prompt file (lower-cased, up to the first '.')."""
    with open(prompt_file) as f:
        data = [i.strip("\n").split(".")[0].lower() for i in f.readlines()]
    return [data[k // num] for k in range(num * len(data))]


def test_t2i_compbench_scores_land_on_their_prompts(small_bundle, tmp_path):
    prompts = tmp_path / "complex_val.txt"
    lines = ["a green bench and a red car", "A blue cup on a table"]  # not in sorted order
    prompts.write_text("".join(line + "\n" for line in lines))
    out = tmp_path / "out"
    assert eval_gen(small_bundle, "t2i-compbench", prompts, out, CFG, seed=0) == 20  # default: 10 per prompt
    samples = out / "samples"
    expected = three_in_one_groups(prompts)
    blip, unidet = blip_order(samples), unidet_order(samples)
    assert len(blip) == len(expected) == 20
    for position, (qid, prompt) in enumerate(blip):
        assert qid == position and prompt.split(".")[0].lower() == expected[position]
    for position, (qid, prompt) in enumerate(unidet):
        assert qid == position and prompt.split(".")[0].lower() == expected[position]
    # the pixels under a name are that prompt's image (prompt 1, sample 3 -> counter 13, seed 3)
    assert _is_image_of(samples / "A blue cup on a table_000013.png", small_bundle, "A blue cup on a table", 3)


def test_t2i_compbench_names_match_the_official_script(tmp_path):
    """inference_eval.py: f"{prompts[0]}_{base_count:06}.png", base_count counting across prompts; the prompt is
    the line's part before a tab."""
    prompts = tmp_path / "color_val.txt"
    prompts.write_text("a red cat\tcolor\na blue dog\n")
    names = [j.target.name for j in plan("t2i-compbench", prompts, tmp_path / "o", samples=2).jobs]
    assert names == ["a red cat_000000.png", "a red cat_000001.png", "a blue dog_000002.png", "a blue dog_000003.png"]
    assert DEFAULT_SAMPLES["t2i-compbench"] == 10  # inference_eval.py --n_iter default; 3_in_1.py num = 10


@pytest.mark.parametrize("content, match", [
    ("a cat\n\na dog\n", ":2 is blank"), ("a red_cat\n", "contains '_'"), ("a cat/dog\n", "contains '/'"),
    ("x" * 250 + "\n", "too long"),
])
def test_t2i_compbench_prompts_the_evaluators_cannot_read_back(tmp_path, content, match):
    path = tmp_path / "p.txt"
    path.write_text(content)
    with pytest.raises(PromptFileError, match=match):
        plan("t2i-compbench", path, tmp_path / "out")


# ---------------------------------------------------------------- DPG-Bench

def dpg_read(image_root, stems: set[str], resolution: int) -> dict[str, list[np.ndarray]]:
    """compute_dpg_bench.py: every entry of --image-root-path is opened as an image, looked up by its name up to
    the first '.', and cropped into --pic-num tiles of --resolution (left-right, then top-bottom)."""
    crops = [(0, 0, 1, 1), (1, 0, 2, 1), (0, 1, 1, 2), (1, 1, 2, 2)]
    found = {}
    for fn in os.listdir(image_root):
        key = os.path.basename(fn).split(".")[0]
        assert key in stems, f"{fn} is no prompt's image"
        image = Image.open(os.path.join(image_root, fn))  # a folder here fails: "Failed filename"
        found[key] = [np.asarray(image.crop(tuple(c * resolution for c in box)).convert("RGB")) for box in crops]
    return found


def test_dpg_bench_grid(small_bundle, tmp_path):
    src = tmp_path / "prompts"
    src.mkdir()
    texts = {"item1": "A long detailed prompt about a red cat on a wooden chair.", "item2": "A blue bird."}
    for name, text in texts.items():
        (src / f"{name}.txt").write_text(text)
    out = tmp_path / "out"
    eval_gen(small_bundle, "dpg-bench", src, out, CFG, seed=5)
    found = dpg_read(out / "images", set(texts), resolution=64)
    assert sorted(found) == sorted(texts)
    for name, crops in found.items():
        for n, crop in enumerate(crops):
            assert (crop == _pixels(out / "tiles" / name / f"{n}.png")).all()
    assert _is_image_of(out / "tiles" / "item2" / "3.png", small_bundle, texts["item2"], 5 + 3)
    hint = where_to_point(plan("dpg-bench", src, out, seed=5))
    assert f"--image-root-path {out / 'images'} --pic-num 4 --resolution 64" in hint


# ---------------------------------------------------------------- re-runs and bad inputs

def test_rerun_with_other_inputs_stops_naming_the_keys(small_bundle, tmp_path):
    prompts, out = tmp_path / "p.txt", tmp_path / "out"
    prompts.write_text("a cat\n")
    assert eval_gen(small_bundle, "t2i-compbench", prompts, out, CFG, samples=1, seed=0) == 1
    with pytest.raises(FingerprintMismatch, match=r"seed: 0 -> 1"):
        eval_gen(small_bundle, "t2i-compbench", prompts, out, CFG, samples=1, seed=1)
    prompts.write_text("a dog\n")
    with pytest.raises(FingerprintMismatch, match="prompts_sha256"):
        eval_gen(small_bundle, "t2i-compbench", prompts, out, CFG, samples=1, seed=0)
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["a cat_000000.png"]  # nothing mixed in


def test_out_with_foreign_images_is_refused(small_bundle, tmp_path):
    prompts, out = tmp_path / "p.txt", tmp_path / "out"
    prompts.write_text("a cat\n")
    (out / "samples").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(out / "samples" / "a cat_000000.png")
    with pytest.raises(FingerprintMismatch, match="no eval_gen.json"):
        eval_gen(small_bundle, "t2i-compbench", prompts, out, CFG, samples=1)


@pytest.mark.parametrize("fmt, content, match", [
    ("geneval", "", "no prompts"), ("geneval", "not json\n", "not JSON"), ("geneval", '{"tag": 1}\n', "prompt"),
    ("geneval", "[1, 2]\n", "prompt"), ("t2i-compbench", "", "no prompts"),
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


def test_cli_checks_the_prompts_before_loading_the_model(tmp_path, capsys):
    """A missing prompt file is reported, not the (also missing) model: inputs are checked first."""
    code = main(["eval-gen", "--format", "geneval", "--prompts", str(tmp_path / "x.jsonl"), "--out",
                 str(tmp_path / "o"), "--model", str(tmp_path / "no-model")])
    err = capsys.readouterr().err
    assert code == 2 and "x.jsonl does not exist" in err and "no-model" not in err
    assert not (tmp_path / "o").exists()


def test_a_nul_character_in_a_prompt_file_is_named_before_anything_is_written(tmp_path, capsys):
    from ospo_fast.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a red car\na blue\x00 bench\n")
    out = tmp_path / "out"
    assert main(["eval-gen", "--format", "t2i-compbench", "--prompts", str(prompts), "--out", str(out),
                 "--preset", "tiny", "model.path=builtin:tiny-4"]) == 2
    err = capsys.readouterr().err
    assert f"{prompts}:2 holds a NUL character" in err and err.count("\n") == 1
    assert not out.exists()
