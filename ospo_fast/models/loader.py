"""One loader for Janus checkpoints: a local directory, a hub id (when the hub is reachable), or a built-in
offline model (``builtin:tiny``, ``builtin:tiny-24`` for a 24x24 grid, ``builtin:toy`` shipped in the package).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import JanusForConditionalGeneration, JanusProcessor

from ospo_fast.store import cache_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ASSET_DIR = Path(__file__).resolve().parent.parent / "assets"


class ModelLoadError(ValueError):
    """A model path that cannot be loaded; the message names it and the fix."""


@dataclass
class JanusBundle:
    """A loaded model with its processor. ``grid``: image-token grid side; ``num_layers``: decoder layers."""

    model: JanusForConditionalGeneration
    processor: JanusProcessor
    source: str

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def grid(self) -> int:
        return self.model.config.vq_config.num_patches

    @property
    def num_image_tokens(self) -> int:
        return self.model.config.vision_config.num_image_tokens

    @property
    def num_layers(self) -> int:
        return self.model.config.text_config.num_hidden_layers

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def random_init(self) -> bool:
        return is_random_init(self.source)


def is_random_init(path: str) -> bool:
    """True for the random-initialised models: every ``builtin:`` model but the trained ``builtin:toy``, and
    directories saved by ``ospo-fast make-model`` for the published shapes (``*-shape``)."""
    return (path.startswith("builtin:") and path != "builtin:toy") or "-shape" in path


def model_identity(path: str) -> dict:
    """What a model is, by content (``store.file_identity`` of its directory: every file's sha256, weights
    included), whatever names it: a local directory, ``builtin:NAME`` (the built or shipped directory: a cached
    build replaced under a half-done run is then noticed) or a hub id (its snapshot in the Hugging Face cache,
    fetched first where the hub is reachable, exactly what ``from_pretrained`` would read). Fingerprints hold this,
    so outputs made by two different models never mix under one name."""
    from ospo_fast.store import file_identity

    identity = file_identity(resolve_model_path(path) if path.startswith("builtin:") else _local_or_hub_dir(path))
    if "files" in identity:  # documentation (README.md, BUILD.md) is not the model: editing it changes nothing
        identity["files"] = {name: sha for name, sha in identity["files"].items() if not name.endswith(".md")}
    return identity


def _local_or_hub_dir(path: str) -> str:
    """``path`` if it exists on disk, else the local snapshot of hub id ``path`` (downloaded when missing)."""
    if Path(path).expanduser().exists():
        return str(Path(path).expanduser())
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path, local_files_only=True)
    except Exception:  # noqa: BLE001  (not in the cache: any of the hub's several "not found" errors)
        pass
    try:
        return snapshot_download(path)
    except Exception as err:  # noqa: BLE001  (offline, unknown id, gated: the hub's errors all mean "not here")
        raise ModelLoadError(f"model {path!r} is neither a local directory nor a hub id this machine can fetch "
                             f"({type(err).__name__}): a hub id is downloaded into the Hugging Face cache only where "
                             f"the hub is reachable. Give a local Janus checkpoint directory (e.g. made with `hf "
                             f"download {path} --local-dir DIR` on a machine that reaches the hub) or builtin:tiny"
                             ) from None


def resolve_model_path(path: str) -> str:
    """Turn ``builtin:NAME`` into a directory (building random-init models on first use); other paths unchanged."""
    if not path.startswith("builtin:"):
        return path
    from ospo_fast.models.factory import KINDS, build_offline_model

    name = path.split(":", 1)[1]
    if name == "toy":
        toy = ASSET_DIR / "toy_janus"
        if not (toy / "config.json").is_file():
            raise ModelLoadError(f"builtin:toy is not shipped in this install (looked in {toy}); rebuild it with "
                                 "`python recipes/toy_janus/build_model.py` or use builtin:tiny")
        return str(toy)
    grid = 8
    kind = name
    if name.startswith("tiny-"):
        kind, grid = "tiny", int(name.split("-", 1)[1])
    if kind not in KINDS:
        raise ModelLoadError(f"unknown built-in model {path!r}; use builtin:toy, builtin:tiny, builtin:tiny-24, "
                             f"or builtin:<kind> with kind in {KINDS}")
    target = cache_dir() / f"{name}-v1"
    if not (target / "config.json").is_file():  # published whole (below), so config.json means complete
        build_cached(target, lambda tmp: build_offline_model(kind, tmp, grid=grid))
    return str(target)


def build_cached(target: Path, build) -> Path:
    """Build a cache directory once, whatever the number of processes asking at the same time (torchrun ranks).

    Under an exclusive ``fcntl.flock`` on ``<target>.lock``: if another process published ``target`` meanwhile,
    use it; else remove what killed builds left (``.<name>.tmp*`` directories, a ``target`` without
    ``config.json``), ``build(tmp)`` into a fresh temporary directory beside ``target`` and publish it with one
    ``os.replace``. A failed build removes its temporary directory."""
    import fcntl
    import shutil
    import tempfile

    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when the process dies
        if (target / "config.json").is_file():
            return target
        for stale in [*target.parent.glob(f".{target.name}.tmp*"), *target.parent.glob(f"{target.name}.tmp*")]:
            shutil.rmtree(stale, ignore_errors=True)  # this version's and the older naming's leftovers
        if target.exists():
            shutil.rmtree(target)  # incomplete: no config.json
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp"))
        try:
            build(tmp)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _check_checkpoint_dir(directory: Path) -> None:
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{directory} is not a Janus checkpoint: it has no config.json. Point model.path at "
                             "a directory saved by save_pretrained (e.g. one made with `hf download "
                             "deepseek-community/Janus-Pro-1B --local-dir DIR`)")
    for json_file in sorted(directory.glob("*.json")):  # config.json and the processor's files: a damaged one
        _read_json(json_file)  # would otherwise end in a raw JSONDecodeError inside from_pretrained
    model_type = _read_json(config_file).get("model_type")
    if model_type != "janus":
        raise ModelLoadError(f"{directory} holds a {model_type!r} model, not a Janus one (config.json model_type "
                             "must be 'janus'); convert the checkpoint with transformers' Janus conversion script")


def _check_listed_checksums(directory: Path) -> None:
    """A directory that carries ``checksums.json`` (a merged model, a training checkpoint) is read only when every
    file in it is listed there and matches: a flipped byte would otherwise draw images, or train iteration 2,
    with a damaged model."""
    from ospo_fast.store import CHECKSUM_FILE, directory_damage

    if (directory / CHECKSUM_FILE).is_file():
        problem = directory_damage(directory)
        if problem is not None:
            raise ModelLoadError(f"model {directory} is damaged: {problem}; restore it or make it again (a merged "
                                 "model: `ospo-fast merge-lora`, or delete it and re-run train)")


def _read_json(path: Path) -> dict:
    """The JSON object in ``path``; a ModelLoadError naming the file and the fault if it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        where = f" at line {err.lineno} column {err.colno}" if isinstance(err, json.JSONDecodeError) else ""
        reason = err.msg if isinstance(err, json.JSONDecodeError) else "not UTF-8 text"
        raise ModelLoadError(f"{path} is not valid JSON ({reason}{where}): the checkpoint is damaged or was cut off; "
                             "copy it again or re-save it with save_pretrained") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} holds a JSON {type(data).__name__}, not an object: the checkpoint is damaged; "
                             "copy it again or re-save it with save_pretrained")
    return data


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_model_path(path: str) -> None:
    """What ``load_janus`` checks of ``path`` before it loads, without loading or building anything: a built-in
    name that exists, a local directory that is a Janus checkpoint, or something shaped like a hub id. Raises
    ModelLoadError naming the path and the fix (a run calls this before it writes anything)."""
    if path.startswith("builtin:"):
        from ospo_fast.models.factory import KINDS

        name = path.split(":", 1)[1]
        kind = "tiny" if name.startswith("tiny-") and name.split("-", 1)[1].isdigit() else name
        if name == "toy":
            if not (ASSET_DIR / "toy_janus" / "config.json").is_file():
                raise ModelLoadError(f"builtin:toy is not shipped in this install (looked in {ASSET_DIR}); rebuild "
                                     "it with `python recipes/toy_janus/build_model.py` or use builtin:tiny")
        elif kind not in KINDS:
            raise ModelLoadError(f"unknown built-in model {path!r}; use builtin:toy, builtin:tiny, builtin:tiny-24, "
                                 f"or builtin:<kind> with kind in {KINDS}")
        return
    local = Path(path).expanduser()
    if local.exists():
        _check_checkpoint_dir(local)
        _check_listed_checksums(local)
    elif path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise ModelLoadError(f"model path {path!r} does not exist. Give a local Janus checkpoint directory, a hub "
                             "id like deepseek-community/Janus-Pro-1B (downloaded into the Hugging Face cache where "
                             "the hub is reachable), or builtin:tiny")


def load_janus(path: str, dtype: str = "float32", device: str = "auto",
               attn_implementation: str = "sdpa") -> JanusBundle:
    """Load a Janus model and processor.

    path: local directory, hub id, or ``builtin:NAME``; dtype: "float32" | "bfloat16" | "float16";
    device: "auto" | "cpu" | "cuda[:i]"; attn_implementation: "sdpa" | "eager" | "flash_attention_2".
    """
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype={dtype!r} is not supported; use one of {sorted(DTYPES)}")
    source = path
    resolved = resolve_model_path(path)
    check_model_path(resolved)
    local = Path(resolved).expanduser()
    try:
        model = JanusForConditionalGeneration.from_pretrained(
            str(local) if local.exists() else resolved, dtype=DTYPES[dtype],
            attn_implementation=attn_implementation)
        processor = JanusProcessor.from_pretrained(str(local) if local.exists() else resolved)
    except OSError as err:
        raise ModelLoadError(f"could not load {path!r}: {err}. Give a local Janus checkpoint directory; a hub id "
                             "loads from the Hugging Face cache, or where the hub is reachable (elsewhere, run `hf "
                             "download ID --local-dir DIR` on a machine that reaches it and pass DIR)") from err
    model.to(pick_device(device)).eval()
    return JanusBundle(model=model, processor=processor, source=source)
