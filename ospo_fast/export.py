"""Export the selected pairs as a Parquet dataset with TRL-style columns (``prompt``, ``chosen``, ``rejected``;
images as ``{"bytes", "path"}`` structs, the layout Hugging Face ``datasets`` reads as an Image feature), plus
token ids, masks, scores and metadata. Load it with ``datasets.load_dataset("parquet", data_files=...)`` or
``pyarrow.parquet.read_table``."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ospo_fast.store import atomic_write_bytes, read_jsonl


def _image(root: Path, rel: str) -> dict:
    return {"bytes": (root / rel).read_bytes(), "path": rel}


def pairs_table(run_dir: str | Path) -> pa.Table:
    root = Path(run_dir)
    pairs_file = root / "pairs.jsonl"
    if not pairs_file.is_file():
        raise FileNotFoundError(f"{pairs_file} does not exist; run stages 1-4 (`ospo-fast synth`) first")
    pairs = read_jsonl(pairs_file)
    columns = {
        "pair_id": [p["pair_id"] for p in pairs],
        "prompt": [p["prompt"] for p in pairs],
        "chosen": [_image(root, p["chosen"]["image"]) for p in pairs],
        "rejected": [_image(root, p["rejected"]["image"]) for p in pairs],
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
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([
        ("pair_id", pa.string()), ("prompt", pa.string()), ("chosen", image_type), ("rejected", image_type),
        ("chosen_prompt", pa.string()), ("rejected_prompt", pa.string()), ("perturbed_prompt", pa.string()),
        ("category", pa.string()), ("perturbation", pa.string()),
        ("chosen_tokens", pa.list_(pa.int32())), ("rejected_tokens", pa.list_(pa.int32())),
        ("chosen_mask", pa.list_(pa.int8())), ("rejected_mask", pa.list_(pa.int8())),
        ("chosen_score", pa.float64()), ("rejected_score", pa.float64()),
        ("questions", pa.list_(pa.string())), ("structure", pa.string()), ("grid", pa.int32()),
    ])
    return pa.table(columns, schema=schema)


def export_parquet(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``<run_dir>/dataset/train.parquet`` (or ``out``) atomically; returns the path."""
    table = pairs_table(run_dir)
    path = Path(out) if out else Path(run_dir) / "dataset" / "train.parquet"
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return atomic_write_bytes(path, sink.getvalue().to_pybytes())
