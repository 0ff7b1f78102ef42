"""Images for text-to-image benchmarks, in the layout each official evaluator reads.

- GenEval (djghosh13/geneval, ``generation/diffusers_generate.py``): ``evaluation_metadata.jsonl`` in (one JSON
  object per line with a "prompt"); out ``<out>/<index:05d>/metadata.jsonl`` (that object) and
  ``<out>/<index:05d>/samples/<n:05d>.png``, 4 samples per prompt. ``evaluation/evaluate_images.py`` reads every
  digit-named folder of ``<out>`` and every ``\\d+.png`` in its ``samples/``.
- T2I-CompBench++ (Karine-Huang/T2I-CompBench, ``GORS_finetune/inference_eval.py``): a text file, one prompt per
  line (the part before a tab); out ``<out>/samples/<prompt>_<counter:06d>.png`` with ONE counter across prompts
  (prompt i, sample n -> counter ``i * samples + n``), 10 samples per prompt. BLIP-VQA, CLIPScore and UniDet sort
  the files by that counter and read the prompt back as the part before the first ``_``; ``3_in_1.py`` then
  assigns scores by position, 10 per prompt line. So prompts may hold no ``_`` or ``/`` and the file no blank line.
- DPG-Bench (TencentQQGYLab/ELLA, ``dpg_bench/compute_dpg_bench.py``): a directory of ``<item_id>.txt`` files, one
  prompt each; out ``<out>/images/<item_id>.png``, a 2x2 grid of four samples (pass ``--image-root-path
  <out>/images --resolution <tile side> --pic-num 4``: the script opens every entry of that folder, so the tiles
  live in ``<out>/tiles/<item_id>/<n>.png`` beside it).
Seeds are ``seed + n`` for sample n, so a prompt's images do not depend on its batch. ``<out>/eval_gen.json``
fingerprints the inputs (format, prompt file, samples, seed, model, image settings): re-running into the same
``--out`` resumes, and a run with other inputs stops naming the keys that differ.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ospo_fast.config import ImageConfig
from ospo_fast.runstore import png_bytes
from ospo_fast.store import (
    FingerprintMismatch,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    check_fingerprint,
    config_fingerprint,
    read_jsonl_rows,
    sha256_bytes,
)

FORMATS = ("geneval", "t2i-compbench", "dpg-bench")
DEFAULT_SAMPLES = {"geneval": 4, "t2i-compbench": 10, "dpg-bench": 4}  # the official scripts' defaults
FINGERPRINT = "eval_gen.json"
MAX_NAME_BYTES = 255  # one file-name component on common file systems


@dataclass
class Job:
    prompt: str
    n: int  # sample index within the prompt: seed = seed + n
    target: Path


@dataclass
class EvalPlan:
    """What eval-gen will write: every image (``jobs``), GenEval's metadata files and the input fingerprint."""

    fmt: str
    out: Path
    jobs: list[Job]
    fingerprint: dict
    metadata: dict[Path, str] = field(default_factory=dict)  # file -> text (GenEval)
    grids: dict[Path, list[Path]] = field(default_factory=dict)  # DPG grid -> its four tiles


class PromptFileError(ValueError):
    """A benchmark prompt file that is missing, empty or malformed."""


def _text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise PromptFileError(f"{path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from err
    if "\x00" in text:  # a prompt becomes a file name and a tokenizer input: neither takes a NUL
        line = text[:text.index("\x00")].count("\n") + 1
        raise PromptFileError(f"{path}:{line} holds a NUL character; remove it")
    return text


def read_geneval(path: Path) -> list[dict]:
    if not path.is_file():
        raise PromptFileError(f"GenEval metadata {path} does not exist; pass evaluation_metadata.jsonl")
    _text(path)
    rows = []
    for line_no, row in read_jsonl_rows(path, PromptFileError):
        if not isinstance(row, dict) or not str(row.get("prompt", "")).strip():
            raise PromptFileError(f"{path}:{line_no} has no \"prompt\" field; GenEval lines look like "
                                  '{"tag": "single_object", "include": [...], "prompt": "a photo of a cat"}')
        rows.append(row)
    if not rows:
        raise PromptFileError(f"{path} holds no prompts")
    return rows


def read_lines(path: Path) -> list[str]:
    """T2I-CompBench prompts: line i of the file is prompt i (its part before a tab, as the official script
    reads it). A blank line is an error: ``3_in_1.py`` counts every line, so it would shift every later score."""
    if not path.is_file():
        raise PromptFileError(f"prompt file {path} does not exist; pass a text file with one prompt per line")
    prompts = []
    for line_no, line in enumerate(_text(path).splitlines(), 1):
        prompt = line.split("\t")[0].strip()
        if not prompt:
            raise PromptFileError(f"{path}:{line_no} is blank; T2I-CompBench's 3_in_1.py counts every line, so "
                                  "remove blank lines")
        bad = [c for c in ("_", "/", "\\") if c in prompt]
        if bad:
            raise PromptFileError(f"{path}:{line_no}: prompt {prompt!r} contains {bad[0]!r}; the official scripts "
                                  "read the prompt back from the file name '<prompt>_<counter>.png', so remove it")
        if len(f"{prompt}_000000.png".encode()) > MAX_NAME_BYTES:
            raise PromptFileError(f"{path}:{line_no}: prompt is too long for a file name ({len(prompt.encode())} "
                                  f"bytes, at most {MAX_NAME_BYTES - 11}); shorten it")
        prompts.append(prompt)
    if not prompts:
        raise PromptFileError(f"{path} holds no prompts (one prompt per line expected)")
    return prompts


def read_dpg(path: Path) -> dict[str, str]:
    if not path.is_dir():
        raise PromptFileError(f"DPG-Bench prompts {path} must be a directory of .txt files, one prompt per file")
    prompts = {p.stem: _text(p).strip() for p in sorted(path.glob("*.txt"))}
    if not prompts:
        raise PromptFileError(f"{path} holds no .txt files; pass DPG-Bench's prompts/ directory")
    empty = [name for name, text in prompts.items() if not text]
    if empty:
        raise PromptFileError(f"{path}: empty prompt files {empty[:5]}; give each a prompt or remove it")
    dotted = [name for name in prompts if "." in name]
    if dotted:
        raise PromptFileError(f"{path}: file names {dotted[:5]} hold a '.' besides '.txt'; compute_dpg_bench.py "
                              "looks images up by the name up to the first '.', so rename them")
    return prompts


def _inputs(fmt: str, src: Path) -> list | dict:
    """The parsed prompts of ``src`` for ``fmt``."""
    if fmt == "geneval":
        return read_geneval(src)
    if fmt == "t2i-compbench":
        return read_lines(src)
    if fmt == "dpg-bench":
        return read_dpg(src)
    raise PromptFileError(f"format {fmt!r} is not one of {FORMATS}")


def plan(fmt: str, prompts_path: str | Path, out: str | Path, samples: int | None = None, seed: int = 0,
         images: ImageConfig | None = None, model: object = "") -> EvalPlan:
    """Read and check the prompts, lay out every image to make, and fingerprint the inputs (``model``: what
    identifies the model, e.g. ``model_identity(path)``). Writes nothing."""
    src, out = Path(prompts_path), Path(out)
    prompts = _inputs(fmt, src)
    samples = DEFAULT_SAMPLES[fmt] if samples is None else samples
    if samples < 1:
        raise PromptFileError(f"--samples {samples} must be >= 1")
    if fmt == "dpg-bench" and samples != 4:
        raise PromptFileError(f"--samples {samples}: DPG-Bench images are 2x2 grids of 4 samples; drop --samples")
    source = {"prompts": sorted(prompts.items()) if isinstance(prompts, dict) else prompts}
    fingerprint = config_fingerprint({"format": fmt, "samples": samples, "seed": seed, "model": model,
                                      "prompts_sha256": _digest(source), "images": _image_settings(images)})
    result = EvalPlan(fmt=fmt, out=out, jobs=[], fingerprint=fingerprint)
    if fmt == "geneval":
        for index, row in enumerate(prompts):
            folder = out / f"{index:05d}"
            result.metadata[folder / "metadata.jsonl"] = json.dumps(row) + "\n"
            result.jobs += [Job(row["prompt"], n, folder / "samples" / f"{n:05d}.png") for n in range(samples)]
    elif fmt == "t2i-compbench":
        result.jobs = [Job(p, n, out / "samples" / f"{p}_{i * samples + n:06d}.png")
                       for i, p in enumerate(prompts) for n in range(samples)]
    else:
        for name, text in prompts.items():
            tiles = [out / "tiles" / name / f"{n}.png" for n in range(samples)]
            result.jobs += [Job(text, n, tile) for n, tile in enumerate(tiles)]
            result.grids[out / "images" / f"{name}.png"] = tiles
    return result


def _digest(obj: object) -> str:
    return sha256_bytes(json.dumps(obj, sort_keys=True).encode("utf-8"))


def _image_settings(images: ImageConfig | None) -> dict:
    """The image settings that change pixels (batch size and compilation do not)."""
    images = images or ImageConfig()
    return {"guidance_scale": images.guidance_scale, "temperature": images.temperature, "top_k": images.top_k,
            "top_p": images.top_p}


def check_out(p: EvalPlan) -> None:
    """Refuse an ``--out`` whose images were made from other inputs (keys that differ are named), or one that
    holds images without a fingerprint (another tool's or an older layout)."""
    stored_file = p.out / FINGERPRINT
    if stored_file.is_file():
        try:
            stored = json.loads(stored_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise PromptFileError(f"{stored_file} is damaged ({err.msg}); delete {p.out} or choose another --out") \
                from err
        check_fingerprint(stored, p.fingerprint, f"{p.out}",
                          f"choose another --out or delete {p.out} to start over")
        return
    if p.out.is_dir() and any(f.suffix == ".png" for f in p.out.rglob("*.png")):
        raise FingerprintMismatch(f"{p.out} already holds images but no {FINGERPRINT} (made by another tool or an "
                                  "older ospo-fast); choose another --out or empty it")


def generate(bundle, p: EvalPlan, config: ImageConfig, progress: bool = True) -> int:
    """Make the images ``p`` lists that are not on disk yet (then DPG's grids). Returns the number made."""
    from ospo_fast.engine.image_gen import generate_images

    check_out(p)
    atomic_write_json(p.out / FINGERPRINT, p.fingerprint)
    for path, text in p.metadata.items():
        atomic_write_text(path, text)
    jobs = [j for j in p.jobs if not j.target.is_file()]
    batches = [jobs[i:i + config.batch_size] for i in range(0, len(jobs), config.batch_size)]
    if progress and batches:
        from tqdm import tqdm

        batches = tqdm(batches, desc="eval-gen", unit="batch")
    for batch in batches:
        result = generate_images(bundle, [j.prompt for j in batch], [p.fingerprint["seed"] + j.n for j in batch],
                                 config)
        for job, pixels in zip(batch, result.pixels.cpu().numpy()):  # (H, W, 3) uint8
            atomic_write_bytes(job.target, png_bytes(pixels))
    made = {j.target for j in jobs}
    for grid, tiles in p.grids.items():
        if not grid.is_file() or made.intersection(tiles):
            atomic_write_bytes(grid, png_bytes(grid_2x2([_read_png(t) for t in tiles])))
    return len(jobs)


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def grid_2x2(tiles: list[np.ndarray]) -> np.ndarray:
    """Four (H, W, 3) tiles -> one (2H, 2W, 3) image: tile 0 top left, 1 top right, 2 bottom left, 3 bottom right
    (the crop order of compute_dpg_bench.py)."""
    top, bottom = np.concatenate(tiles[:2], axis=1), np.concatenate(tiles[2:4], axis=1)
    return np.concatenate([top, bottom], axis=0)


def eval_gen(bundle, fmt: str, prompts_path: str | Path, out: str | Path, config: ImageConfig,
             samples: int | None = None, seed: int = 0, model: object = "") -> int:
    """Plan and generate in one call (see ``plan`` and ``generate``). Returns the number of images made."""
    p = plan(fmt, prompts_path, out, samples=samples, seed=seed, images=config, model=model)
    return generate(bundle, p, config)


def where_to_point(p: EvalPlan) -> str:
    """What to pass the official evaluator, for the closing message."""
    if p.fmt == "geneval":
        return f"evaluate with: python evaluation/evaluate_images.py {p.out} --outfile <results.jsonl>"
    if p.fmt == "t2i-compbench":
        return f"evaluate with: --out_dir {p.out} (BLIP-VQA, UniDet, CLIPScore read {p.out}/samples)"
    grids = [g for g in p.grids if g.is_file()]
    side = str(_read_png(grids[0]).shape[0] // 2) if grids else "<image side>"
    return f"evaluate with: --image-root-path {p.out / 'images'} --pic-num 4 --resolution {side}"
