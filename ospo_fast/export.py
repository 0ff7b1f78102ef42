"""Export the selected pairs as a Parquet dataset that Hugging Face ``datasets`` reads with images decoded.

Columns: ``prompt`` (the base prompt x), ``chosen`` / ``rejected`` (the two images, ``datasets.Image`` features:
``{"bytes", "path"}`` structs plus the ``huggingface`` schema metadata that tells ``datasets`` to decode them to
PIL images; paths are relative to the synth directory), the dense prompts, the perturbation, token ids, masks,
Self-VQA scores and metadata. Load it with ``datasets.load_dataset("parquet", data_files=...)``.

Which trainer reads it: this is text-to-image preference data (text prompt in, image out, chosen vs rejected
image). ``ospo-fast train`` trains on it (from ``pairs.jsonl``, the same records). TRL 1.16 has no trainer for
image outputs: its preference trainers (``DPOTrainer``, ``experimental.cpo.CPOTrainer``) score text completions,
and DPOTrainer's vision mode (``DataCollatorForVisionPreference``: ``images`` + ``prompt`` + text ``chosen`` /
``rejected``) puts images in the prompt, not in the answers; so no TRL trainer can read these rows.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ospo_fast.runstore import RunStore, is_run_directory
from ospo_fast.store import StoreError, atomic_write_bytes, sha256_bytes

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # the arrow type of datasets.Image
HF_METADATA = {"info": {"features": {"chosen": {"_type": "Image"}, "rejected": {"_type": "Image"}}}}
SCHEMA = pa.schema([
    ("pair_id", pa.string()), ("prompt", pa.string()), ("chosen", IMAGE_TYPE), ("rejected", IMAGE_TYPE),
    ("chosen_prompt", pa.string()), ("rejected_prompt", pa.string()), ("perturbed_prompt", pa.string()),
    ("category", pa.string()), ("perturbation", pa.string()),
    ("chosen_tokens", pa.list_(pa.int32())), ("rejected_tokens", pa.list_(pa.int32())),
    ("chosen_mask", pa.list_(pa.int8())), ("rejected_mask", pa.list_(pa.int8())),
    ("chosen_score", pa.float64()), ("rejected_score", pa.float64()),
    ("questions", pa.list_(pa.string())), ("structure", pa.string()), ("grid", pa.int32()),
], metadata={b"huggingface": json.dumps(HF_METADATA).encode()})


class RunDirError(StoreError):
    """A directory that is neither a run nor a synth directory, or holds no pairs; the message names it and what
    to run."""


def _committed_images(root: Path) -> dict[str, str] | None:
    """{relative PNG path: sha256} that ``manifest.json`` committed with pairs.jsonl (``read_pairs`` has checked
    that manifest and its pairs entry); None outside a run, where nothing vouches for the images."""
    if not is_run_directory(root):
        return None
    return RunStore.reader(root).manifest()["outputs"].get("pairs.jsonl", {}).get("images", {})


def _image(root: Path, rel: str, committed: dict[str, str] | None) -> dict:
    """The PNG ``rel`` as a datasets Image cell, checked against its committed sha256 inside a run (an image the
    manifest does not list is refused there)."""
    path = (root / rel).resolve()
    if not path.is_relative_to(root.resolve()):
        raise RunDirError(f"{root / 'pairs.jsonl'} names image {rel!r} outside {root}; re-run the selection stage")
    if not path.is_file():
        raise RunDirError(f"image {root / rel} named in {root / 'pairs.jsonl'} does not exist; keep images/ next to "
                          "pairs.jsonl")
    data = path.read_bytes()
    if committed is not None and sha256_bytes(data) != committed.get(rel):
        raise RunDirError(f"{root / rel} does not match its sha256 in {root / 'manifest.json'} (damaged after it was "
                          f"written, or not listed there); pass --redo images to `ospo-fast synth --out {root}`")
    return {"bytes": data, "path": rel}


def synth_dirs(run_dir: str | Path) -> list[Path]:
    """The synth directories under ``run_dir``: itself when it holds a synth run's files, else
    ``<run_dir>/iter<i>/synth`` of every iteration (in order). RunDirError when there are none."""
    root = Path(run_dir)
    if not root.is_dir():
        raise RunDirError(f"{root} does not exist; pass the directory `ospo-fast run` or `ospo-fast synth` wrote")
    if (root / "manifest.json").is_file() or (root / "pairs.jsonl").is_file():
        return [root]
    iters = sorted((p for p in root.glob("iter*/synth") if re.fullmatch(r"iter\d+", p.parent.name)),
                   key=lambda p: int(p.parent.name[4:]))
    if not iters:
        raise RunDirError(f"{root} is neither a run directory (iter<i>/synth/) nor a synth directory "
                          "(manifest.json, pairs.jsonl); pass the --out of `ospo-fast run` or `ospo-fast synth`")
    return iters


def pairs_table(synth_dir: str | Path) -> pa.Table:
    """The pairs of one synth directory as an Arrow table (``SCHEMA``)."""
    from ospo_fast.train.data import read_pairs

    root = Path(synth_dir)
    pairs_file = root / "pairs.jsonl"
    if not pairs_file.is_file():
        raise RunDirError(f"{root} has no pairs.jsonl (stages 1-4 have not finished); resume them with "
                          f"`ospo-fast synth --out {root}` (or `ospo-fast run` on the run directory)")
    pairs = read_pairs(pairs_file)
    committed = _committed_images(root)
    columns = {
        "pair_id": [p["pair_id"] for p in pairs],
        "prompt": [p["prompt"] for p in pairs],
        "chosen": [_image(root, p["chosen"]["image"], committed) for p in pairs],
        "rejected": [_image(root, p["rejected"]["image"], committed) for p in pairs],
        "chosen_prompt": [p["dense_chosen"] for p in pairs],
        "rejected_prompt": [p["dense_rejected"] for p in pairs],
        "perturbed_prompt": [p["perturbed_prompt"] for p in pairs],
        "category": [p["category"] for p in pairs],
        "perturbation": [p["kind"] for p in pairs],
        "chosen_tokens": [p["chosen"]["tokens"] for p in pairs],
        "rejected_tokens": [p["rejected"]["tokens"] for p in pairs],
        "chosen_mask": [p["chosen"]["mask"] for p in pairs],
        "rejected_mask": [p["rejected"]["mask"] for p in pairs],
        "chosen_score": [p["chosen"]["score"] for p in pairs],
        "rejected_score": [p["rejected"]["score"] for p in pairs],
        "questions": [p["questions"] for p in pairs],
        "structure": [json.dumps(p["structure"], sort_keys=True) for p in pairs],
        "grid": [p["grid"] for p in pairs],
    }
    return pa.table(columns, schema=SCHEMA)


def _write(table: pa.Table, path: Path) -> Path:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return atomic_write_bytes(path, sink.getvalue().to_pybytes())


def export_parquet(run_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    """Export every synth directory under ``run_dir`` (see ``synth_dirs``) atomically; returns the files.

    Default target: ``<synth dir>/dataset/train.parquet``. ``out``: the file to write for a synth directory, or
    for a run directory a folder that gets ``iter<i>/train.parquet``."""
    dirs = synth_dirs(run_dir)
    tables = [pairs_table(d) for d in dirs]  # all checked before anything is written
    if out is None:
        targets = [d / "dataset" / "train.parquet" for d in dirs]
    elif dirs == [Path(run_dir)]:
        targets = [Path(out)]
    else:
        targets = [Path(out) / d.parent.name / "train.parquet" for d in dirs]
    return [_write(table, target) for table, target in zip(tables, targets)]
