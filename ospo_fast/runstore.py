"""The run directory and its record store. Stage code never touches files: it returns records, the store writes
them atomically.

Layout (all paths inside records are relative to the run directory):
    config.yaml                       resolved config
    manifest.json                     per stage: counts, reject reasons, seconds, checksums
    <stage>/rank<r>-of-<w>/chunk-<i>.jsonl          records of one finished chunk (the commit point)
    <stage>/rank<r>-of-<w>/chunk-<i>.rejects.jsonl  rejects of that chunk (written first)
    <stage>/records.jsonl, <stage>/rejects.jsonl    the merged stage output, sorted by id
    images/<id>.png                   images; their token ids live in the records
    pairs.jsonl                       the final preference pairs (what the trainer reads)
A chunk is a fixed slice of this rank's records, so a re-run skips finished chunks and redoes only the one that
was cut off. Merging sorts by record id, so the output does not depend on the number of processes.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ospo_fast.store import atomic_write_bytes, atomic_write_json, atomic_write_jsonl, read_jsonl

IMAGE_KEY = "image"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def png_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image

    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"an image must be uint8 (H, W, 3), got {pixels.dtype} {pixels.shape}")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


class RunStore:
    """Reads and writes one run directory for process ``rank`` of ``world``."""

    def __init__(self, root: str | Path, rank: int = 0, world: int = 1):
        self.root = Path(root)
        self.rank, self.world = rank, world
        self.root.mkdir(parents=True, exist_ok=True)

    # -------------------------------------------------------------- chunks
    def _rank_dir(self, stage: str) -> Path:
        return self.root / stage / f"rank{self.rank:03d}-of-{self.world:03d}"

    def check_world(self, stage: str) -> None:
        """Chunks are fixed slices per (rank, world): a stage started with another process count cannot resume."""
        worlds = {p.name.split("-of-")[1] for p in (self.root / stage).glob("rank*-of-*")}
        other = sorted(worlds - {f"{self.world:03d}"})
        if other:
            raise ValueError(f"stage {stage!r} in {self.root} was started with {int(other[0])} process(es), this run "
                             f"has {self.world}; resume with the same number of processes or pass --redo {stage}")

    def chunk_done(self, stage: str, index: int) -> bool:
        return (self._rank_dir(stage) / f"chunk-{index:05d}.jsonl").is_file()

    def read_chunk(self, stage: str, index: int) -> list[dict]:
        return read_jsonl(self._rank_dir(stage) / f"chunk-{index:05d}.jsonl")

    def write_chunk(self, stage: str, index: int, records: list[dict], rejects: list[dict]) -> None:
        """Save images found in records (values under "image" that are arrays) as PNG, then the rejects, then the
        records file, which marks the chunk finished."""
        records = [self._externalise_images(r) for r in records]
        rank_dir = self._rank_dir(stage)
        atomic_write_jsonl(rank_dir / f"chunk-{index:05d}.rejects.jsonl", rejects)
        atomic_write_jsonl(rank_dir / f"chunk-{index:05d}.jsonl", records)

    def _externalise_images(self, record: dict, name: str | None = None) -> dict:
        name = name or record.get("id", "image")
        out: dict[str, Any] = {}
        for key, value in record.items():
            if isinstance(value, dict):
                out[key] = self._externalise_images(value, f"{name}-{key}")
            elif key == IMAGE_KEY and isinstance(value, np.ndarray):
                rel = Path("images") / f"{name}.png"
                atomic_write_bytes(self.root / rel, png_bytes(value))
                out[key] = rel.as_posix()
            else:
                out[key] = value
        return out

    # -------------------------------------------------------------- merged stage outputs
    def stage_done(self, stage: str) -> bool:
        return (self.root / stage / "records.jsonl").is_file()

    def merge(self, stage: str, seconds: float = 0.0) -> list[dict]:
        """Merge every rank's chunks (sorted by id), write records/rejects and the manifest entry."""
        stage_dir = self.root / stage
        records, rejects = [], []
        for path in sorted(stage_dir.glob("rank*/chunk-*.jsonl")):
            (rejects if path.name.endswith(".rejects.jsonl") else records).extend(read_jsonl(path))
        records.sort(key=lambda r: r["id"])
        rejects.sort(key=lambda r: (r.get("id", ""), r.get("reason", "")))
        atomic_write_jsonl(stage_dir / "rejects.jsonl", rejects)
        atomic_write_jsonl(stage_dir / "records.jsonl", records)
        self.update_manifest(stage, {
            "records": len(records), "rejects": len(rejects),
            "reject_reasons": dict(sorted(Counter(r["reason"] for r in rejects).items())),
            "seconds": round(seconds, 3),
            "sha256": sha256_file(stage_dir / "records.jsonl"),
        })
        return records

    def read_stage(self, stage: str) -> list[dict]:
        path = self.root / stage / "records.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"stage {stage!r} has no merged output in {self.root}; run that stage first")
        return read_jsonl(path)

    def read_rejects(self, stage: str) -> list[dict]:
        path = self.root / stage / "rejects.jsonl"
        return read_jsonl(path) if path.is_file() else []

    def clear_stage(self, stage: str) -> None:
        shutil.rmtree(self.root / stage, ignore_errors=True)
        manifest = self.manifest()
        manifest.get("stages", {}).pop(stage, None)
        atomic_write_json(self.root / "manifest.json", manifest)

    # -------------------------------------------------------------- manifest
    def manifest(self) -> dict:
        path = self.root / "manifest.json"
        return json.loads(path.read_text()) if path.is_file() else {"stages": {}}

    def update_manifest(self, stage: str, entry: dict) -> None:
        manifest = self.manifest()
        manifest.setdefault("stages", {})[stage] = entry
        atomic_write_json(self.root / "manifest.json", manifest)

    def write_final(self, name: str, records: list[dict], extra: dict | None = None) -> Path:
        """A top-level output such as pairs.jsonl; checksummed in the manifest with image checksums."""
        path = atomic_write_jsonl(self.root / name, records)
        images = sorted({v for r in records for side in r.values() if isinstance(side, dict)
                         for k, v in side.items() if k == IMAGE_KEY})
        manifest = self.manifest()
        manifest.setdefault("outputs", {})[name] = dict(
            records=len(records), sha256=sha256_file(path),
            images={rel: sha256_file(self.root / rel) for rel in images}, **(extra or {}))
        atomic_write_json(self.root / "manifest.json", manifest)
        return path
