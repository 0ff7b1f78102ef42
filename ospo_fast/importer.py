"""``ospo-fast import``: the OSPO authors' released preference pairs as a run directory that ``ospo-fast train``
reads as its own.

Their layout, as their loader reads it (KU-AGI/OSPO: ``ospo/dataclass/train_dataset.py`` ``PreferenceDataset``,
``configs/step4.yaml`` ``dataset.train.data_path`` / ``use_mask`` / ``mask_dir``):

- one JSON file (``json.load``) holding a list of items. Each has ``item_id``, ``prompt``, ``chosen`` and
  ``rejected`` (image paths) and ``t2i_category`` (all strings); their pair construction
  (``ospo/utils/step4/construct_pair.py``) adds ``rejected_prompt``, ``chosen_score`` and ``rejected_score`` and
  keeps the prompt-stage fields, and their object extraction (``ospo/attention/extract_object_v2.py``) adds
  ``nouns``. Their loader opens the image paths as written, relative to their repository root (it changes into
  it); their image generation writes ``<root>/{base,negative}/<t2i_category>/<item_id>/<NN>.png``
  (``ospo/wrapper/image_generate.py``) and their files hold those as absolute paths of their own machines (the
  example item in ``ospo/attention/extract_mask.py``: ``/nas2/.../images_pairwise/base/attribute/0003355/00.png``).
  Here every path is read under a root the user gives (``--images``), after removing a leading part the user
  names (``--strip-prefix``);
- object masks (``use_mask: True``, the default of their training config):
  ``<mask_dir>/base/<t2i_category>/<item_id>/<name>_mask.pt`` for the chosen image and
  ``<mask_dir>/negative/<t2i_category>/<item_id>/<name>_mask.pt`` for the rejected one, where ``<name>`` is the
  chosen image's file name up to ``.png`` for both (their loader; their pairing only pairs images of the same file
  name). A mask is a ``torch.save``d (24, 24) uint8 tensor of 0/1 on Janus-Pro's image-token grid, row-major like
  the tokens (``ospo/attention/extract_mask.py`` ``save_binary_mask``; their loss flattens it to 576 weights).

What an import makes of an item (``import_chunk``): both images opened, converted to RGB and resized to the
model's image side (``train.data.load_rgb``; non-square images are refused, not distorted), tokens from the
model's own VQ encoder (``train.data.encode_rgb``, as ``train.token_source=reencode`` re-encodes), and object masks:
the authors' ``_mask.pt`` files when ``--masks`` is given (a mask on another grid than the model's is brought to
it by an area vote: a token cell is 1 when at least half of the mask it covers is 1, ``mask_on_grid``), else the
project's own teacher-forced attention pass on the item's prompt (``stages.steps.teacher_forced_masks``, as the
images stage with ``masks.context=base``) with the object words of the item's ``nouns`` (``--objects-field``)
that occur in the prompt, or, for an item without that field, the objects read from the prompt's phrases
(``stages.structure.prompt_objects``). The images are stored as the PNGs that were encoded, so a re-encode gives the
same tokens. Records are committed as the pipeline's are (chunks, a merged ``import`` stage, ``pairs.jsonl`` in
``pipeline.to_pair``'s format with its image checksums in ``manifest.json``). An item that cannot be imported is
a reject with its reason in ``import/rejects.jsonl``, never dropped silently; a malformed JSON file stops the
import before anything is written.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from ospo_fast.config import OSPOConfig
from ospo_fast.models.loader import model_identity
from ospo_fast.store import StoreError, check_fingerprint, check_no_symlink, config_fingerprint, file_identity

STAGE = "import"
PAIRS = "pairs.jsonl"
REQUIRED = ("item_id", "prompt", "chosen", "rejected", "t2i_category")
SIDES = (("chosen", "base"), ("rejected", "negative"))  # our side, the authors' mask folder for it
JSON_FIX = ("each item needs item_id, prompt, chosen, rejected and t2i_category as strings (the authors' train "
            "JSON); fix the item or download the file again")


class PairsImportError(StoreError):
    """An import that cannot start or finish: a malformed authors' JSON, a missing folder, nothing importable. The
    message names the file (and item) and the fix."""


@dataclass
class ImportSettings:
    """What an import reads and how it cuts the work.

    data: the authors' train JSON; images: the folder their image paths are read under (nothing outside it is
    read); masks: their ``mask_dir`` (None: compute the masks with the model); strip_prefix: a leading part of
    their image paths to remove first (their absolute paths); objects_field: the item field that lists object
    words for computed masks; chunk_size: items per committed chunk (the unit of resume); batch_size: pairs per
    forward of the model."""

    data: Path
    images: Path
    masks: Path | None = None
    strip_prefix: str | None = None
    objects_field: str = "nouns"
    chunk_size: int = 64
    batch_size: int = 8


@dataclass
class ImportSummary:
    """What an import did: pairs imported, items skipped per reason, where the masks came from, and whether the
    directory already held this import (then nothing was done)."""

    out: Path
    imported: int
    skipped: dict[str, int]
    masks: str
    already_done: bool = False

    def format(self) -> str:
        skipped = sum(self.skipped.values())
        reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(self.skipped.items()))
        lead = f"nothing to do: {self.out} already holds this import; " if self.already_done else ""
        text = (f"{lead}imported {self.imported} pairs into {self.out / PAIRS}; skipped {skipped}"
                + (f" ({reasons}), see {self.out / STAGE / 'rejects.jsonl'}" if skipped else ""))
        return f"{text}; masks: {self.masks}"


# ---------------------------------------------------------------- the authors' JSON

def _item_error(path: Path, index: int, item: dict, what: str) -> PairsImportError:
    name = item.get("item_id") if isinstance(item.get("item_id"), str) else None
    where = f"item {index}" + (f" (item_id {name!r})" if name is not None else "")
    return PairsImportError(f"{path}: {where}: {what}; {JSON_FIX}")


def _check_item(path: Path, index: int, item: object, objects_field: str) -> dict:
    """One item of the authors' JSON, type-checked: the fields an import uses, plus its position."""
    if not isinstance(item, dict):
        raise PairsImportError(f"{path}: item {index} is a JSON {type(item).__name__}, not an object; {JSON_FIX}")
    for key in REQUIRED:
        value = item.get(key)
        if not isinstance(value, str) or not value.strip() or "\x00" in value:
            got = "missing" if key not in item else f"{value!r} ({type(value).__name__})"
            raise _item_error(path, index, item, f"{key} must be a non-empty string without NUL, got {got}")
    rejected_prompt = item.get("rejected_prompt")
    if rejected_prompt is not None and not isinstance(rejected_prompt, str):
        raise _item_error(path, index, item, f"rejected_prompt must be a string, got {rejected_prompt!r}")
    scores = {}
    for key in ("chosen_score", "rejected_score"):
        value = item.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            raise _item_error(path, index, item, f"{key} must be a finite number, got {value!r}")
        scores[key] = None if value is None else float(value)
    objects = item.get(objects_field)
    if objects is not None and (not isinstance(objects, list)
                                or not all(isinstance(o, str) and o.strip() for o in objects)):
        raise _item_error(path, index, item, f"{objects_field} must be a list of non-empty strings (object words), "
                                             f"got {objects!r}")
    return {"index": index, **{key: item[key] for key in REQUIRED}, "rejected_prompt": rejected_prompt or None,
            "objects": objects, **scores}


def read_authors_json(path: str | Path, objects_field: str = "nouns") -> list[dict]:
    """The items of the authors' train JSON, strictly: a file that is not UTF-8 JSON holding a non-empty list of
    objects with the required string fields raises PairsImportError naming the file, the item and the fix. Fields
    the import does not use are ignored (their items carry their prompt-stage fields too)."""
    path = Path(path)
    if not path.is_file():
        raise PairsImportError(f"--data {path} does not exist; give the authors' train JSON (a list of items with "
                               "item_id, prompt, chosen, rejected, t2i_category)")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise PairsImportError(f"{path}:{line}: byte {data[err.start:err.start + 1]!r} at offset {err.start} is not "
                               "UTF-8; the authors' JSON is UTF-8 text: download it again") from None
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise PairsImportError(f"{path}:{err.lineno}:{err.colno}: not valid JSON ({err.msg}); it must be one JSON "
                               "list of items, as the authors' loader reads it: download it again") from None
    if not isinstance(items, list):
        raise PairsImportError(f"{path} holds a JSON {type(items).__name__}, not a list of items; {JSON_FIX}")
    if not items:
        raise PairsImportError(f"{path} holds an empty list: there is nothing to import")
    return [_check_item(path, index, item, objects_field) for index, item in enumerate(items)]


# ---------------------------------------------------------------- files under a root

def _under(root: Path, parts: tuple[str, ...], flag: str) -> tuple[Path | None, str, str]:
    """``root / parts`` if no component below ``root`` is a symlink and it is a file: (path, "", ""), else
    (None, reason, detail); details name paths relative to ``root`` (the folder given as ``flag``), so the rejects
    file names no directory of this machine. ``root`` itself may be a link the user made."""
    current = root
    for depth, part in enumerate(parts, start=1):
        current = current / part
        if current.is_symlink():
            return None, "symlink", f"{'/'.join(parts[:depth])} under {flag} is a symlink; the import follows none"
    if not current.is_file():
        return None, "missing", f"{'/'.join(parts)} does not exist under {flag}"
    return current, "", ""


def image_path(root: Path, raw: str, strip_prefix: str | None) -> tuple[Path | None, str, str]:
    """Where the authors' image path ``raw`` lies under ``root``: (path, "", "") or (None, reject reason, detail).

    ``strip_prefix`` is removed from the front first (their paths are absolute paths of their machines). What is
    left must be a relative path without ``..`` (reason ``path_outside_root``), with no symlink below ``root``
    (``symlink``), naming a file (``missing_image``)."""
    text = raw[len(strip_prefix):].lstrip("/") if strip_prefix and raw.startswith(strip_prefix) else raw
    rel = PurePosixPath(text)
    if rel.is_absolute():
        return None, "path_outside_root", (f"{raw!r} is absolute; pass --strip-prefix with the part before the "
                                           "images folder to read it under --images")
    if ".." in rel.parts or not rel.parts:
        return None, "path_outside_root", f"{raw!r} leaves --images (a '..' component) or is empty"
    path, reason, detail = _under(root, rel.parts, "--images")
    return path, ("missing_image" if reason == "missing" else reason), detail


def mask_on_grid(mask: object, grid: int) -> tuple[np.ndarray | None, str]:
    """A loaded ``_mask.pt`` as (grid * grid,) uint8 0/1 on the model's token grid, row-major: (mask, "") or
    (None, what is wrong).

    The authors' masks are (24, 24) 0/1 tensors on Janus-Pro's grid, used as they are on a model with that grid.
    On another grid a cell takes the area vote of the mask it covers: ``adaptive_avg_pool2d`` of the 0/1 mask to
    (grid, grid), then >= 0.5 (24 -> 8: a cell is 1 when at least 5 of its 3x3 mask values are 1)."""
    import torch

    if not isinstance(mask, torch.Tensor):
        return None, f"holds a {type(mask).__name__}, not a tensor"
    if mask.dim() != 2 or mask.shape[0] != mask.shape[1] or mask.shape[0] == 0:
        return None, f"has shape {tuple(mask.shape)}, not a square 2-D grid like (24, 24)"
    values = mask.detach().cpu().double()
    if not bool(((values == 0) | (values == 1)).all()):
        odd = values[(values != 0) & (values != 1)][0].item()
        return None, f"holds values other than 0 and 1 (e.g. {odd!r}); a mask is binary"
    if mask.shape[0] != grid:
        values = torch.nn.functional.adaptive_avg_pool2d(values[None, None], grid)[0, 0] >= 0.5  # (grid, grid)
    return values.to(torch.uint8).reshape(-1).numpy(), ""


def _load_mask(path: Path, grid: int) -> tuple[np.ndarray | None, str]:
    import pickle

    import torch

    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: no code from the file runs
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
        return None, f"is not a readable torch tensor file ({type(err).__name__})"
    return mask_on_grid(loaded, grid)


# ---------------------------------------------------------------- one item's files

@dataclass
class _Loaded:
    """An item whose files all passed: its images' paths under --images, pixels (2, S, S, 3) uint8, masks
    (2, G*G) from the authors' files or None, the object words for its structure (and a computed mask)."""

    item: dict
    paths: list[str]
    pixels: list[np.ndarray]
    masks: list[np.ndarray] | None
    objects: list[str]


def _reject(item: dict, reason: str, detail: str) -> dict:
    return {"id": item["item_id"], "stage": STAGE, "reason": reason, "index": item["index"], "detail": detail}


def _object_words(item: dict) -> list[str]:
    """The item's object words that occur in its prompt: its own list (the authors' ``nouns``) when it has one,
    else ``prompt_objects`` of the prompt; matched as ``object_attention.object_token_positions`` matches them."""
    from ospo_fast.stages.structure import prompt_objects

    words = item["objects"] if item["objects"] is not None else prompt_objects(item["prompt"])
    found = []
    for word in words:
        pattern = rf"(?<![\w]){re.escape(word.strip())}(?![\w])"
        if re.search(pattern, item["prompt"], flags=re.IGNORECASE) and word.strip() not in found:
            found.append(word.strip())
    return found


def _load_item(settings: ImportSettings, item: dict, size: int, grid: int) -> _Loaded | dict:
    """Open both images (and masks) of ``item``: a ``_Loaded``, or the reject naming the first problem.
    ``size``: the model's image side in pixels; ``grid``: its token grid side."""
    from PIL import Image, UnidentifiedImageError

    from ospo_fast.store import check_name
    from ospo_fast.train.data import load_rgb

    try:
        check_name(item["item_id"])  # it names the pair's files, as in their mask layout
    except StoreError:
        return _reject(item, "unsafe_item_id", f"item_id {item['item_id']!r} is not a safe file name")
    pixels, paths = [], []
    for key, _ in SIDES:
        path, reason, detail = image_path(settings.images, item[key], settings.strip_prefix)
        if path is None:
            return _reject(item, reason, f"{key}: {detail}")
        paths.append(path.relative_to(settings.images).as_posix())
        try:
            with Image.open(path) as image:
                width, height = image.size
            if width != height:  # resizing would distort it; the authors' images are square
                return _reject(item, "image_not_square", f"{key}: {paths[-1]} is {width}x{height}")
            pixels.append(load_rgb(path, size))
        except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as err:
            return _reject(item, "unreadable_image", f"{key}: {paths[-1]} ({type(err).__name__})")
    masks = None
    if settings.masks is not None:
        try:
            check_name(item["t2i_category"])
        except StoreError:
            return _reject(item, "unsafe_category", f"t2i_category {item['t2i_category']!r} is not a safe folder name")
        name = PurePosixPath(item["chosen"]).name.split(".png")[0]  # their loader: the chosen name for both sides
        masks = []
        for key, folder in SIDES:
            parts = (folder, item["t2i_category"], item["item_id"], f"{name}_mask.pt")
            path, reason, detail = _under(settings.masks, parts, "--masks")
            if path is None:
                return _reject(item, "missing_mask" if reason == "missing" else reason, f"{key} mask: {detail}")
            mask, problem = _load_mask(path, grid)
            if mask is None:
                return _reject(item, "bad_mask", f"{key} mask: {'/'.join(parts)} {problem}")
            masks.append(mask)
    return _Loaded(item=item, paths=paths, pixels=pixels, masks=masks, objects=_object_words(item))


# ---------------------------------------------------------------- the stage function

def _candidate(loaded: _Loaded) -> dict:
    """The item as a selected candidate of the pipeline (what ``pipeline.to_pair`` turns into a pair)."""
    from ospo_fast.stages.structure import empty_structure

    item = loaded.item
    perturbed = item["rejected_prompt"] or item["prompt"]
    return {"id": item["item_id"], "base_id": item["item_id"], "base_prompt": item["prompt"], "prompt": perturbed,
            "category": item["t2i_category"], "kind": "imported", "dense_base": item["prompt"],
            "dense_prompt": perturbed, "questions": [], "base_structure": dict(empty_structure(),
                                                                               objects=loaded.objects),
            "mask_objects": [] if loaded.masks is not None else loaded.objects,
            "verdict": {"score_chosen": item["chosen_score"], "score_rejected": item["rejected_score"]},
            "source": {"index": item["index"], "chosen": loaded.paths[0], "rejected": loaded.paths[1],
                       "masks": "authors" if loaded.masks is not None else "attention"}}


def import_chunk(ctx, settings: ImportSettings, items: list[dict], duplicates: set[int]) -> tuple[list, list]:
    """Items of the authors' JSON -> (candidate records with pixels, tokens and masks, rejects).

    ``ctx``: a ``stages.context.StageContext`` (the model, the mask settings); ``duplicates``: positions of
    items whose item_id an earlier item has (rejected, the first one is kept)."""
    from ospo_fast.stages.steps import fit_context, teacher_forced_masks
    from ospo_fast.train.data import encode_rgb, image_side

    bundle = ctx.bundle
    size, grid = image_side(bundle.model), bundle.grid
    rejects, loaded = [], []
    for item in items:
        if item["index"] in duplicates:
            rejects.append(_reject(item, "duplicate_item_id", f"item_id {item['item_id']!r} repeats an earlier item"))
            continue
        got = _load_item(settings, item, size, grid)
        if isinstance(got, dict):
            rejects.append(got)
        elif got.masks is None and not got.objects:
            rejects.append(_reject(item, "no_objects", f"no object word found in the prompt {item['prompt']!r}; "
                                   f"give the item a {settings.objects_field} list or pass --masks"))
        else:
            loaded.append(got)
    candidates = {got.item["item_id"]: (_candidate(got), got) for got in loaded}
    fits, too_long = fit_context(ctx, [candidate for candidate, _ in candidates.values()])
    rejects += [dict(r, stage=STAGE, index=candidates[r["id"]][1].item["index"]) for r in too_long]
    kept = [candidates[c["id"]] for c in fits]
    records = []
    for start in range(0, len(kept), settings.batch_size):
        batch = kept[start:start + settings.batch_size]
        pixels = [got.pixels[0] for _, got in batch] + [got.pixels[1] for _, got in batch]  # chosen rows, rejected
        tokens = encode_rgb(bundle.model, pixels, batch_size=2 * settings.batch_size)  # (2B, G*G)
        if settings.masks is not None:
            masks = np.stack([got.masks[0] for _, got in batch] + [got.masks[1] for _, got in batch])  # (2B, G*G)
        else:  # both sides are scored against the prompt x they are trained on (masks.context=base)
            prompts = [got.item["prompt"] for _, got in batch] * 2
            objects = [got.objects for _, got in batch] * 2
            masks = teacher_forced_masks(ctx, prompts, tokens, objects).reshape(len(pixels), -1)  # (2B, G*G) bool
        masks, tokens = masks.astype(np.uint8).tolist(), tokens.tolist()
        for i, (candidate, _) in enumerate(batch):
            j = i + len(batch)
            records.append(dict(candidate,
                                chosen={"image": pixels[i], "tokens": tokens[i], "mask": masks[i], "vqa": []},
                                rejected={"image": pixels[j], "tokens": tokens[j], "mask": masks[j], "vqa": []}))
    return records, rejects


# ---------------------------------------------------------------- the run directory

def import_fingerprint(config: OSPOConfig, settings: ImportSettings, out: Path) -> dict:
    """``store.config_fingerprint`` of everything that determines an import's output: the JSON's sha256, the
    folders relative to ``out`` (the run's files hold no absolute path), the options, the model's identity and,
    for computed masks, the mask settings. The images are not hashed here (a rerun that does nothing would read
    the whole set again); each pair records the paths under --images its images came from."""
    where = lambda folder: os.path.relpath(os.path.abspath(folder), os.path.abspath(out))
    parts = {"import.data": file_identity(settings.data), "import.images": where(settings.images),
             "import.masks": None if settings.masks is None else where(settings.masks),
             "import.strip_prefix": settings.strip_prefix, "import.objects_field": settings.objects_field,
             "import.chunk_size": settings.chunk_size, "import.batch_size": settings.batch_size,
             "model.identity": model_identity(config.model.path), "model.dtype": config.model.dtype,
             "model.attn_implementation": config.model.attn_implementation}
    if settings.masks is None:
        parts["masks"] = config.masks
    return config_fingerprint(parts)


def _check_directory(out: Path, fingerprint: dict, redo: bool) -> None:
    """Before anything is written: ``out`` holds no synthesis run, and an import in it was made from the same
    inputs (unless ``redo``). Reads only, so a refused import leaves the directory byte-identical."""
    from ospo_fast.runstore import RunStore, is_run_directory

    if not is_run_directory(out):
        return
    store = RunStore.reader(out)
    store.verify()  # the manifest is the directory's newest (not deleted or rolled back)
    manifest = store.manifest()
    others = sorted((set(manifest["stages"]) | set(manifest["fingerprints"])) - {STAGE})
    if others:
        raise PairsImportError(f"{out} holds a synthesis run (stages {', '.join(others)}), not an import; give "
                               "the import its own --out")
    if PAIRS in manifest["outputs"] and STAGE not in manifest["fingerprints"]:
        raise PairsImportError(f"{out} holds a {PAIRS} that no import wrote; give the import its own --out")
    if not redo:
        check_fingerprint(store.fingerprint(STAGE), fingerprint, f"the import in {out}",
                          "pass the inputs and settings of that import to resume it, --redo to import again into "
                          "this directory, or another --out")


def _summary(store, masks: str, already_done: bool) -> ImportSummary:
    manifest = store.manifest()
    return ImportSummary(out=store.root, imported=manifest["outputs"][PAIRS]["records"],
                         skipped=dict(manifest["stages"][STAGE]["reject_reasons"]), masks=masks,
                         already_done=already_done)


def import_pairs(config: OSPOConfig, settings: ImportSettings, out: str | Path, redo: bool = False,
                 bundle=None) -> ImportSummary:
    """Import the authors' pairs (``settings``) into the run directory ``out`` with the model of ``config``
    (``bundle``: that model already loaded). Resumable: finished chunks are kept; a finished import with the same
    inputs does nothing; other inputs are refused (FingerprintMismatch) unless ``redo``, which imports again.
    The caller holds ``out``'s write lock (``store.directory_lock``)."""
    from ospo_fast.pipeline import to_pair
    from ospo_fast.runstore import RunStore
    from ospo_fast.stages.context import StageContext

    out = Path(out)
    items = read_authors_json(settings.data, settings.objects_field)  # all inputs checked before any write
    for flag, folder in (("--images", settings.images), ("--masks", settings.masks)):
        if folder is not None and not folder.is_dir():
            raise PairsImportError(f"{flag} {folder} is not a directory; give the folder "
                                   + ("the JSON's image paths are read under" if flag == "--images" else
                                      "holding base/ and negative/ of the authors' _mask.pt files"))
    if settings.chunk_size < 1 or settings.batch_size < 1:
        raise PairsImportError(f"--chunk-size {settings.chunk_size} and --batch-size {settings.batch_size} must be "
                               ">= 1")
    fingerprint = import_fingerprint(config, settings, out)
    _check_directory(out, fingerprint, redo)
    for name in ("manifest.json", STAGE, "images", PAIRS):  # the store checks every write; this says so at once
        check_no_symlink(out, out / name)
    masks = "the authors' _mask.pt files" if settings.masks is not None else "the model's teacher-forced attention"
    store = RunStore(out)
    if redo:
        store.clear_stage(STAGE)
        store.clear_final(PAIRS)
    if store.final_done(PAIRS):
        return _summary(store, masks, already_done=True)
    if store.fingerprint(STAGE) is None:
        store.record_fingerprint(STAGE, fingerprint)
    if not store.stage_done(STAGE):
        ctx = StageContext(config, _bundle=bundle)
        seen, duplicates = set(), set()  # positions of items whose item_id an earlier item has
        for item in items:
            if item["item_id"] in seen:
                duplicates.add(item["index"])
            seen.add(item["item_id"])
        start = time.perf_counter()
        chunks = [items[i:i + settings.chunk_size] for i in range(0, len(items), settings.chunk_size)]
        for index, chunk in enumerate(_bar(chunks)):
            if not store.chunk_done(STAGE, index):
                store.write_chunk(STAGE, index, *import_chunk(ctx, settings, chunk, duplicates))
        store.merge(STAGE, seconds=time.perf_counter() - start)
    records = store.read_stage(STAGE)
    if not records:
        reasons = Counter(r["reason"] for r in store.read_rejects(STAGE))
        shown = ", ".join(f"{reason} {count}" for reason, count in reasons.most_common())
        raise PairsImportError(f"no item of {settings.data} could be imported ({shown}); the reasons per item are in "
                               f"{out / STAGE / 'rejects.jsonl'}: fix --images/--strip-prefix/--masks and pass "
                               "--redo")
    store.write_final(PAIRS, [dict(to_pair(r), source=r["source"]) for r in records])
    return _summary(store, masks, already_done=False)


def _bar(chunks: list):
    from tqdm import tqdm

    return tqdm(chunks, desc="import", unit="chunk", disable=None)  # None: only on a terminal
