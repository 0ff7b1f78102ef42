"""The run directory and its record store. Stage code never touches files: it returns records, the store writes
them atomically and checks them when it reads them back.

Layout (all paths inside records are relative to the run directory):
    config.yaml                       resolved config
    manifest.json                     per stage: counts, reject reasons, seconds, checksums (the stage's commit
                                      point), and the fingerprint of the settings the stage was made with
    <stage>/rank<r>-of-<w>/chunk-<i>.jsonl          records of one chunk
    <stage>/rank<r>-of-<w>/chunk-<i>.rejects.jsonl  rejects of that chunk
    <stage>/rank<r>-of-<w>/chunk-<i>.done.json      checksums of both (written last: the chunk's commit point)
    <stage>/records.jsonl, <stage>/rejects.jsonl    the merged stage output, sorted by id
    images/<id>-<side>.png            images; their sha256 and token ids live in the records
    pairs.jsonl                       the final preference pairs (what the trainer reads)
A chunk is a fixed slice of this rank's records, so a re-run skips finished chunks and redoes only the one that
was cut off. Merging sorts by record id, so the output does not depend on the number of processes.

Every commit is one atomic write made after everything it vouches for: a chunk is done when its ``.done.json``
exists, a stage when its manifest entry does, the pairs when ``manifest["outputs"]["pairs.jsonl"]`` does. Every
read checks the sha256 it was committed with; damage is a ``StoreError`` naming the file and the fix.

The manifest is the root of that chain, so it is checked too (``verify``): each write raises its ``generation``
by one and records the sha256 of the manifest it replaces (``previous_sha256``), and every chunk marker records
the generation it was written under. A manifest that is deleted, or replaced by an older copy, while newer
commits exist is then found (a marker from a later generation), not read as "nothing done yet"; a top-level
output (``pairs.jsonl``, ``config.yaml``) that the manifest does not list is refused, not read unchecked.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ospo_fast.store import (
    StoreError,
    atomic_write_bytes,
    atomic_write_json,
    check_no_symlink,
    jsonl_bytes,
    parse_jsonl,
    safe_join,
    sha256_bytes,
    sha256_file,
)

MANIFEST = "manifest.json"
MARKERS = "*/rank*-of-*/chunk-*.done.json"  # every chunk's commit marker, relative to the run directory
IMAGE_KEY = "image"
IMAGE_SHA_KEY = "image_sha256"
Finalize = Callable[[list[dict], list[dict]], tuple[list[dict], list[dict]]]

__all__ = ["RunStore", "StoreError", "check_committed", "png_bytes", "sha256_file"]


def png_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image

    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"an image must be uint8 (H, W, 3), got {pixels.dtype} {pixels.shape}")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def is_run_directory(directory: Path) -> bool:
    """Whether ``directory`` holds (or held) a synthesis run: its manifest, or any stage's chunks."""
    directory = Path(directory)
    return (directory / MANIFEST).is_file() or any(directory.glob(MARKERS))


def check_committed(path: str | Path) -> None:
    """If ``path`` is a top-level output of a run directory, raise a StoreError unless the run's (verified)
    manifest lists it and it still matches the sha256 it was committed with; a file outside a run is not checked.
    A run whose manifest is missing or rolled back to before the output was committed is refused too."""
    path = Path(path)
    if not is_run_directory(path.parent):
        return
    store = RunStore.reader(path.parent)
    store.verify()
    manifest_path = path.parent / MANIFEST
    entry = store.manifest()["outputs"].get(path.name)
    if entry is None:
        raise StoreError(f"{path} is not listed in {manifest_path} (written outside the run, or the manifest was "
                         f"rolled back); run `ospo-fast synth --out {path.parent} --redo select` with the run's config "
                         "to rewrite it")
    if sha256_file(path) != entry["sha256"]:
        raise StoreError(f"{path} does not match its sha256 in {manifest_path} (changed after the run wrote it); "
                         f"run `ospo-fast synth --out {path.parent} --redo select` with the run's config to rewrite "
                         "it")


class RunStore:
    """Reads and writes one run directory for process ``rank`` of ``world``."""

    def __init__(self, root: str | Path, rank: int = 0, world: int = 1):
        self.root = Path(root)
        self.rank, self.world = rank, world
        self.root.mkdir(parents=True, exist_ok=True)

    @classmethod
    def reader(cls, root: str | Path) -> RunStore:
        """A store over an existing directory that creates nothing (for checks before a run writes)."""
        store = cls.__new__(cls)
        store.root, store.rank, store.world = Path(root), 0, 1
        return store

    def _inside(self, path: Path | str) -> Path:
        """``path`` (absolute, or relative to the root) after ``store.check_no_symlink``: every write, replace and
        delete of this store goes through here."""
        path = Path(path)
        if not path.is_absolute() and path.parts[:len(self.root.parts)] != self.root.parts:
            path = self.root / path  # a name relative to the root
        return check_no_symlink(self.root, path)

    def _write_checked(self, path: Path, data: bytes) -> str:
        atomic_write_bytes(self._inside(path), data)
        return sha256_bytes(data)

    def _read_checked(self, path: Path, sha256: str | None, commit: Path | str, fix: str) -> bytes:
        """The bytes of ``path``, which ``commit`` (a marker, the manifest, a record) vouches for with ``sha256``."""
        try:
            data = path.read_bytes()
        except FileNotFoundError as err:
            raise StoreError(f"{path} is missing although {commit} lists it; {fix}") from err
        if sha256 is not None and sha256_bytes(data) != sha256:
            raise StoreError(f"{path} does not match its sha256 in {commit} (damaged after it was written); {fix}")
        return data

    # -------------------------------------------------------------- chunks
    def _rank_dir(self, stage: str) -> Path:
        return self.root / stage / f"rank{self.rank:03d}-of-{self.world:03d}"

    def check_world(self, stage: str) -> None:
        """Chunks are fixed slices per (rank, world): a stage started with another process count cannot resume."""
        worlds = {p.name.split("-of-")[1] for p in (self.root / stage).glob("rank*-of-*")}
        other = sorted(worlds - {f"{self.world:03d}"})
        if other:
            raise StoreError(f"stage {stage!r} in {self.root} was started with {int(other[0])} process(es), this run "
                             f"has {self.world}; resume with the same number of processes or pass --redo {stage}")

    def _marker(self, stage: str, index: int) -> Path:
        return self._rank_dir(stage) / f"chunk-{index:05d}.done.json"

    def chunk_done(self, stage: str, index: int) -> bool:
        return self._marker(stage, index).is_file()

    def _read_marked(self, stage: str, marker: Path) -> tuple[list[dict], list[dict]]:
        """(records, rejects) of the chunk committed by ``marker``, checked against its checksums."""
        fix = f"delete {marker} to recompute that chunk, or pass --redo {stage}"
        try:
            sums = json.loads(marker.read_text())
            files = {k: (marker.parent / sums[k]["file"], sums[k]["sha256"]) for k in ("records", "rejects")}
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise StoreError(f"{marker} is damaged ({err}); {fix}") from err
        out = []
        for key in ("records", "rejects"):
            path, sha = files[key]
            out.append(parse_jsonl(self._read_checked(path, sha, marker, fix), path, fix))
        return out[0], out[1]

    def read_chunk(self, stage: str, index: int) -> list[dict]:
        return self._read_marked(stage, self._marker(stage, index))[0]

    def write_chunk(self, stage: str, index: int, records: list[dict], rejects: list[dict]) -> None:
        """Save images found in records (values under "image" that are arrays) as PNG, then the records and rejects,
        then the marker with their checksums, which commits the chunk."""
        records = [self._externalise_images(r) for r in records]
        rank_dir = self._rank_dir(stage)
        sums = {}
        for key, rows in (("rejects", rejects), ("records", records)):
            name = f"chunk-{index:05d}.{key}.jsonl" if key == "rejects" else f"chunk-{index:05d}.jsonl"
            sums[key] = {"file": name, "sha256": self._write_checked(rank_dir / name, jsonl_bytes(rows)),
                         "count": len(rows)}
        sums["generation"] = self.manifest().get("generation", 0)  # see ``verify``
        atomic_write_json(self._inside(self._marker(stage, index)), sums)

    def _externalise_images(self, record: dict, name: str | None = None) -> dict:
        name = name or record.get("id", "image")
        out: dict[str, Any] = {}
        for key, value in record.items():
            if isinstance(value, dict):
                out[key] = self._externalise_images(value, f"{name}-{key}")
            elif key == IMAGE_KEY and isinstance(value, np.ndarray):
                path = safe_join(self.root / "images", name, ".png")
                out[key] = path.relative_to(self.root).as_posix()
                out[IMAGE_SHA_KEY] = self._write_checked(path, png_bytes(value))
            else:
                out[key] = value
        return out

    def load_image(self, side: dict, fix: str = "pass --redo images") -> np.ndarray:
        """The (H, W, 3) uint8 pixels of ``side["image"]``, checked against ``side["image_sha256"]`` when the
        record carries it; a damaged or missing PNG is a StoreError naming it."""
        from PIL import Image, UnidentifiedImageError

        rel = Path(side[IMAGE_KEY])
        path = self.root / rel
        if rel.is_absolute() or ".." in rel.parts:
            raise StoreError(f"image path {str(rel)!r} in a record of {self.root} points outside the run directory; "
                             f"{fix}")
        data = self._read_checked(path, side.get(IMAGE_SHA_KEY), "its record", fix)
        try:
            return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        except (OSError, UnidentifiedImageError) as err:
            raise StoreError(f"{path} is not a readable PNG ({err}); {fix}") from err

    # -------------------------------------------------------------- merged stage outputs
    def stage_done(self, stage: str) -> bool:
        return "sha256" in self.manifest()["stages"].get(stage, {})

    def merge(self, stage: str, seconds: float = 0.0, finalize: Finalize | None = None,
              notes: dict | None = None) -> list[dict]:
        """Merge every rank's committed chunks (sorted by id), apply ``finalize(records, rejects)`` (e.g. a
        dedup), write records/rejects, then the manifest entry that commits the stage (with ``notes``: what the
        stage records besides its counts, e.g. its mask heads)."""
        stage_dir = self.root / stage
        records, rejects = [], []
        for marker in sorted(stage_dir.glob("rank*/chunk-*.done.json")):
            got, rej = self._read_marked(stage, marker)
            records += got
            rejects += rej
        records.sort(key=lambda r: r["id"])
        rejects.sort(key=lambda r: (r.get("id", ""), r.get("reason", "")))
        if finalize is not None:
            records, rejects = finalize(records, rejects)
        entry = {"records": len(records), "rejects": len(rejects),
                 "reject_reasons": dict(sorted(Counter(r["reason"] for r in rejects).items())),
                 "seconds": round(seconds, 3),
                 "rejects_sha256": self._write_checked(stage_dir / "rejects.jsonl", jsonl_bytes(rejects)),
                 "sha256": self._write_checked(stage_dir / "records.jsonl", jsonl_bytes(records)), **(notes or {})}
        self.update_manifest(stage, entry)
        return records

    def _read_stage_file(self, stage: str, name: str, key: str) -> list[dict]:
        entry = self.manifest()["stages"].get(stage)
        if entry is None or "sha256" not in entry:
            raise StoreError(f"stage {stage!r} has no merged output in {self.root}; run that stage first")
        path, fix = self.root / stage / name, f"pass --redo {stage} to recompute it"
        return parse_jsonl(self._read_checked(path, entry.get(key), self.root / MANIFEST, fix), path, fix)

    def read_stage(self, stage: str) -> list[dict]:
        return self._read_stage_file(stage, "records.jsonl", "sha256")

    def read_rejects(self, stage: str) -> list[dict]:
        return self._read_stage_file(stage, "rejects.jsonl", "rejects_sha256") if self.stage_done(stage) else []

    def clear_stage(self, stage: str) -> None:
        import shutil

        shutil.rmtree(self._inside(stage), ignore_errors=True)
        manifest = self.manifest()
        manifest["stages"].pop(stage, None)
        manifest["fingerprints"].pop(stage, None)
        self._write_manifest(manifest)

    # -------------------------------------------------------------- manifest
    def manifest(self) -> dict:
        path = self.root / MANIFEST
        if not path.is_file():
            return {"stages": {}, "fingerprints": {}, "outputs": {}}
        try:
            manifest = json.loads(path.read_text())
            if not all(isinstance(manifest.get(k, {}), dict) for k in ("stages", "fingerprints", "outputs")):
                raise ValueError("its sections are not objects")
        except (ValueError, AttributeError) as err:
            raise StoreError(f"{path} is damaged ({err}); it holds the checksums of the finished stages, so the run "
                             "cannot be trusted: pass --redo prompts to recompute the run") from err
        for key in ("stages", "fingerprints", "outputs"):
            manifest.setdefault(key, {})
        return manifest

    def reset_manifest(self) -> None:
        """Start the manifest afresh (``--redo`` of the first stage, which recomputes everything): every stage
        directory goes too, so no marker outlives the manifest that vouched for it. The generation keeps counting
        up from the old manifest's when it can be read."""
        import shutil

        try:
            generation = self.manifest().get("generation", 0)
        except StoreError:
            generation = self._newest_marker_generation()
        for marker_dir in {m.parent.parent for m in self.root.glob(MARKERS)}:
            shutil.rmtree(self._inside(marker_dir), ignore_errors=True)
        self._write_manifest({"stages": {}, "fingerprints": {}, "outputs": {}, "generation": generation}, fresh=True)

    def update_manifest(self, stage: str, entry: dict) -> None:
        manifest = self.manifest()
        manifest["stages"][stage] = entry
        self._write_manifest(manifest)

    def _write_manifest(self, manifest: dict, fresh: bool = False) -> None:
        """Write ``manifest`` one generation on from the one it replaces, recording that one's sha256 (``fresh``: a
        new start, no predecessor)."""
        path = self.root / MANIFEST
        previous = sha256_bytes(path.read_bytes()) if path.is_file() and not fresh else None
        manifest = dict(manifest, generation=manifest.get("generation", 0) + 1, previous_sha256=previous)
        atomic_write_json(self._inside(MANIFEST), manifest)

    def _newest_marker_generation(self) -> int:
        """The highest generation any chunk marker here was written under (0 when none says)."""
        newest = 0
        for marker in self.root.glob(MARKERS):
            try:
                newest = max(newest, int(json.loads(marker.read_text()).get("generation", 0)))
            except (OSError, ValueError, TypeError, AttributeError):
                continue  # a damaged marker is named when its chunk is read
        return newest

    def verify(self) -> None:
        """Raise a StoreError unless the manifest is the newest one this directory has seen: no chunk marker was
        written under a later generation (a deleted or rolled-back manifest would otherwise read as "those stages
        were never done" or vouch for older files), and its sections are objects."""
        manifest = self.manifest()
        generation = manifest.get("generation", 0)
        if not isinstance(generation, int):
            raise StoreError(f"{self.root / MANIFEST} is damaged (generation {generation!r}); pass --redo prompts "
                             "to recompute the run")
        newest = self._newest_marker_generation()
        if newest > generation:
            state = "missing" if not (self.root / MANIFEST).is_file() else f"at generation {generation}"
            raise StoreError(f"{self.root / MANIFEST} is {state}, but chunks here were committed under generation "
                             f"{newest}: the manifest was deleted or replaced by an older copy, so it cannot vouch "
                             "for this run; restore it, or pass --redo prompts to recompute the run")

    def fingerprint(self, stage: str) -> dict | None:
        """The settings ``stage`` was started with (``store.config_fingerprint``), None if none were recorded."""
        return self.manifest()["fingerprints"].get(stage)

    def record_fingerprint(self, stage: str, fingerprint: dict) -> None:
        manifest = self.manifest()
        manifest["fingerprints"][stage] = fingerprint
        self._write_manifest(manifest)

    # -------------------------------------------------------------- top-level outputs
    def final_done(self, name: str) -> bool:
        return name in self.manifest()["outputs"] and (self.root / name).is_file()

    def clear_final(self, name: str) -> None:
        self._inside(name).unlink(missing_ok=True)
        manifest = self.manifest()
        manifest["outputs"].pop(name, None)
        self._write_manifest(manifest)

    def read_final(self, name: str, fix: str = "pass --redo select to rewrite it", images: bool = True) -> list[dict]:
        """The records of a committed top-level output, checked against the manifest, with the images it names
        (``images=False``: not those, e.g. right after this process wrote them)."""
        entry = self.manifest()["outputs"].get(name)
        commit = self.root / MANIFEST
        if entry is None:
            raise StoreError(f"{self.root / name} was not committed (no entry in {commit}); {fix}")
        path = self.root / name
        records = parse_jsonl(self._read_checked(path, entry["sha256"], commit, fix), path, fix)
        for rel, sha in entry.get("images", {}).items() if images else ():
            self._read_checked(self.root / rel, sha, commit, "pass --redo images to recompute the images")
        return records

    def write_final(self, name: str, records: list[dict], extra: dict | None = None) -> Path:
        """A top-level output such as pairs.jsonl, then its manifest entry (the commit) with image checksums."""
        path = self.root / name
        sha = self._write_checked(path, jsonl_bytes(records))
        images = sorted({v for r in records for side in r.values() if isinstance(side, dict)
                         for k, v in side.items() if k == IMAGE_KEY})
        manifest = self.manifest()
        manifest["outputs"][name] = dict(records=len(records), sha256=sha,
                                         images={rel: sha256_file(self.root / rel) for rel in images}, **(extra or {}))
        self._write_manifest(manifest)
        return path

    def commit_file(self, name: str, data: bytes) -> Path:
        """Write a top-level file that is not records (``config.yaml``) and list its sha256 in the manifest."""
        sha = self._write_checked(self.root / name, data)
        manifest = self.manifest()
        manifest["outputs"][name] = {"sha256": sha}
        self._write_manifest(manifest)
        return self.root / name

    def read_committed(self, name: str, fix: str) -> bytes:
        """The bytes of a file ``commit_file`` wrote, checked against the manifest (a StoreError if unlisted)."""
        entry = self.manifest()["outputs"].get(name)
        if entry is None:
            raise StoreError(f"{self.root / name} is not listed in {self.root / MANIFEST}; {fix}")
        return self._read_checked(self.root / name, entry["sha256"], self.root / MANIFEST, fix)
