"""Images for text-to-image benchmarks, in the layout each official evaluator reads.

- GenEval: ``evaluation_metadata.jsonl`` in (one JSON object per line with a "prompt"); out
  ``<out>/<index:05d>/metadata.jsonl`` (that line) and ``<out>/<index:05d>/samples/<n:04d>.png``.
- T2I-CompBench++: a text file, one prompt per line; out ``<out>/samples/<prompt>_<n:06d>.png``.
- DPG-Bench: a directory of ``.txt`` files, one prompt per file; out ``<out>/<file stem>.png``, a 2x2 grid of
  four samples.
Seeds are ``seed + n`` for sample n, so a prompt's images do not depend on its batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ospo_fast.config import ImageConfig
from ospo_fast.runstore import png_bytes
from ospo_fast.store import atomic_write_bytes, atomic_write_text, read_jsonl_rows

FORMATS = ("geneval", "t2i-compbench", "dpg-bench")


@dataclass
class Job:
    prompt: str
    n: int
    target: Path


class PromptFileError(ValueError):
    """A benchmark prompt file that is missing, empty or malformed."""


def read_geneval(path: Path) -> list[dict]:
    if not path.is_file():
        raise PromptFileError(f"GenEval metadata {path} does not exist; pass evaluation_metadata.jsonl")
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
    if not path.is_file():
        raise PromptFileError(f"prompt file {path} does not exist; pass a text file with one prompt per line")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise PromptFileError(f"{path} holds no prompts (one prompt per line expected)")
    return prompts


def read_dpg(path: Path) -> dict[str, str]:
    if not path.is_dir():
        raise PromptFileError(f"DPG-Bench prompts {path} must be a directory of .txt files, one prompt per file")
    prompts = {p.stem: p.read_text(encoding="utf-8").strip() for p in sorted(path.glob("*.txt"))}
    empty = [name for name, text in prompts.items() if not text]
    if not prompts or empty:
        raise PromptFileError(f"{path}: " + (f"empty prompt files {empty[:5]}" if empty else "no .txt files"))
    return prompts


def plan(fmt: str, prompts_path: str | Path, out: str | Path, samples: int) -> list[Job]:
    """Every image to make, with its target path (grids for DPG are assembled afterwards)."""
    src, out = Path(prompts_path), Path(out)
    if fmt == "geneval":
        jobs = []
        for index, row in enumerate(read_geneval(src)):
            folder = out / f"{index:05d}"
            atomic_write_text(folder / "metadata.jsonl", json.dumps(row) + "\n")
            jobs += [Job(row["prompt"], n, folder / "samples" / f"{n:04d}.png") for n in range(samples)]
        return jobs
    if fmt == "t2i-compbench":
        return [Job(p, n, out / "samples" / f"{p}_{n:06d}.png") for p in read_lines(src) for n in range(samples)]
    if fmt == "dpg-bench":
        return [Job(text, n, out / "tiles" / name / f"{n}.png") for name, text in read_dpg(src).items()
                for n in range(4)]
    raise PromptFileError(f"format {fmt!r} is not one of {FORMATS}")


def grid_2x2(tiles: list[np.ndarray]) -> np.ndarray:
    top, bottom = np.concatenate(tiles[:2], axis=1), np.concatenate(tiles[2:4], axis=1)
    return np.concatenate([top, bottom], axis=0)


def eval_gen(bundle, fmt: str, prompts_path: str | Path, out: str | Path, config: ImageConfig,
             samples: int = 4, seed: int = 0) -> int:
    """Generate the benchmark's images (skipping ones already written). Returns the number of images made."""
    from ospo_fast.engine.image_gen import generate_images

    jobs = [j for j in plan(fmt, prompts_path, out, samples) if not j.target.is_file()]
    for start in range(0, len(jobs), config.batch_size):
        batch = jobs[start:start + config.batch_size]
        result = generate_images(bundle, [j.prompt for j in batch], [seed + j.n for j in batch], config)
        for job, pixels in zip(batch, result.pixels.cpu().numpy()):
            atomic_write_bytes(job.target, png_bytes(pixels))
    if fmt == "dpg-bench":
        from PIL import Image

        for folder in sorted((Path(out) / "tiles").iterdir()):
            tiles = [np.asarray(Image.open(folder / f"{n}.png").convert("RGB")) for n in range(4)]
            atomic_write_bytes(Path(out) / f"{folder.name}.png", png_bytes(grid_2x2(tiles)))
    return len(jobs)
