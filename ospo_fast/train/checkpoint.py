"""Training checkpoints: ``out_dir/checkpoints/step-NNNNNN/`` holds the weights in safetensors (the LoRA adapter
in peft's format, or the whole model via ``save_pretrained``), the optimizer and scheduler state, one RNG file per
rank, ``trainer_state.json`` (step = data position, counters) and ``checksums.json`` (the sha256 of every other
file). Under FSDP the model and optimizer state for resuming are saved sharded with ``torch.distributed.checkpoint``
in ``distcp/`` (each rank writes and reads its own shard; nothing is gathered), else in ``optimizer.pt``.
A checkpoint is written to a ``.tmp`` directory and renamed when complete, so a directory named ``step-N`` is
always whole; ``checksums.json`` then tells a whole checkpoint from one damaged since (flipped bytes, a truncated
file): resume walks back from the newest checkpoint to the newest intact one and says which it skipped and why.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ospo_fast.store import (
    CHECKSUM_FILE,
    atomic_write_json,
    check_listed_files,
    directory_damage,
    follow_umask,
    listed_checksums,
    sha256_bytes,
)

STATE_FILE = "trainer_state.json"
SHARDED_DIR = "distcp"  # torch.distributed.checkpoint shards of model + optimizer (FSDP)
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dir(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"step-{step:06d}"


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Published checkpoints under ``out_dir/checkpoints`` (``step-N`` directories, not ``.tmp`` ones), oldest
    first; whether each is still intact is ``store.directory_damage``'s question."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def temp_dir_for(final: Path) -> Path:
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # a leftover of an interrupted save
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, final: Path) -> Path:
    """Rename a completed ``tmp`` checkpoint directory to ``final`` (replacing an older one of that name); its files
    follow the umask first (safetensors writes 0o600)."""
    follow_umask(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.replace(final)
    return final


def save_torch(obj: Any, path: Path) -> None:
    """``torch.save`` whose write failure is an OSError (ENOSPC: the usual cause, e.g. a full disk mid-checkpoint),
    which the command line reports in one line with how to resume, instead of torch's RuntimeError."""
    import errno

    try:
        torch.save(obj, path)
    except RuntimeError as err:
        if "write" not in str(err).lower():
            raise
        raise OSError(errno.ENOSPC, f"writing failed ({str(err).splitlines()[0][:200]}); is the disk full?",
                      str(path)) from err


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_rng(directory: Path, rank: int) -> None:
    save_torch(rng_state(), directory / f"rng-rank{rank}.pt")


def load_rng(directory: Path, rank: int) -> None:
    path = directory / f"rng-rank{rank}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the checkpoint was written by fewer processes than are "
                                "resuming it; resume with the same number of processes")
    set_rng_state(torch.load(path, weights_only=False))


def write_state(directory: Path, state: dict[str, Any]) -> None:
    atomic_write_json(directory / STATE_FILE, state)


def read_state(directory: Path) -> dict[str, Any]:
    return json.loads((Path(directory) / STATE_FILE).read_text())


# -- integrity -------------------------------------------------------------------------------------------------------
class CheckpointError(RuntimeError):
    """The training state in an out_dir cannot be resumed (no intact checkpoint, a damaged ``metrics.jsonl``); the
    message names each damaged file and what to do."""


def vouched_state(directory: Path) -> dict[str, Any]:
    """``trainer_state.json`` of a published checkpoint, checked against its ``checksums.json`` only (not the
    weights: cheap enough for every reader of the metrics)."""
    listed = listed_checksums(directory)
    if listed is None:
        problem = f"{CHECKSUM_FILE} is missing or unreadable"
    elif STATE_FILE not in listed:
        problem = f"{STATE_FILE} is unlisted"
    else:
        problem = check_listed_files(directory, listed, [STATE_FILE])
    if problem is not None:
        raise CheckpointError(f"checkpoint {directory} is damaged: {problem}; restore it or delete it")
    return read_state(directory)


def write_checksums(directory: Path, digests: dict[str, str]) -> None:
    atomic_write_json(Path(directory) / CHECKSUM_FILE, {"sha256": digests})


def latest_intact(out_dir: Path, checker=directory_damage, say: bool = True) -> Path | None:
    """The newest checkpoint that ``checker`` finds intact (None when there is no checkpoint at all). Each damaged
    newer one is skipped with one line on stderr naming the file; when every checkpoint is damaged, raises
    ``CheckpointError`` listing them."""
    found = list_checkpoints(out_dir)
    skipped = []
    for directory in reversed(found):
        problem = checker(directory)
        if problem is None:
            if skipped and say:
                print(f"ospo-fast: resuming from {directory.name}, the newest intact checkpoint", file=sys.stderr)
            return directory
        skipped.append(f"{directory.name}: {problem}")
        if say:
            print(f"ospo-fast: skipping checkpoint {directory}: {problem}", file=sys.stderr)
    if skipped:
        raise CheckpointError(f"no intact checkpoint in {Path(out_dir) / 'checkpoints'} ({'; '.join(skipped)}); "
                              "delete that directory to train from the start, or restore the files")
    return None


# -- metrics.jsonl ---------------------------------------------------------------------------------------------------
def append_line(path: Path, line: str) -> None:
    """Append one JSON line in a single ``write`` and fsync it, so that a kill leaves at most an unterminated
    last line (which ``read_metrics`` detects)."""
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    with open(path, "ab") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


METRICS_FILE = "metrics.jsonl"


def metrics_digest(path: Path) -> dict[str, Any]:
    """What a checkpoint records of ``metrics.jsonl`` when it is saved: the file's length and sha256 (every line
    of every step so far; ``check_metrics`` holds the file to it later)."""
    data = Path(path).read_bytes() if Path(path).is_file() else b""
    return {"bytes": len(data), "sha256": sha256_bytes(data)}


def check_metrics(path: Path, recorded: dict[str, Any], checkpoint: Path) -> bytes:
    """The first ``recorded["bytes"]`` bytes of ``metrics.jsonl``, the lines ``checkpoint`` vouches for; a
    CheckpointError when they are not what it recorded (an edited loss, a deleted or cut line), naming both."""
    data = Path(path).read_bytes() if Path(path).is_file() else b""
    head = data[:recorded["bytes"]]
    if len(head) < recorded["bytes"] or sha256_bytes(head) != recorded["sha256"]:
        raise CheckpointError(f"{path} is not what {checkpoint.name} recorded of it (a line of a finished step was "
                              f"edited, deleted or cut: the first {recorded['bytes']} bytes must match the sha256 in "
                              f"{checkpoint / STATE_FILE}); restore it, or delete {Path(path).parent} to train again")
    return head


def read_vouched_metrics(out_dir: Path, say: bool = True) -> list[dict[str, Any]]:
    """The records of ``out_dir/metrics.jsonl`` that its newest checkpoint vouches for (``check_metrics``): every
    step of a finished training. Lines after that checkpoint (a training cut off since) are left out; with no
    checkpoint yet (or one from before checkpoints recorded the metrics) the file is read as it is."""
    path = Path(out_dir) / METRICS_FILE
    latest = latest_checkpoint(out_dir)
    recorded = vouched_state(latest).get("metrics") if latest is not None else None
    if recorded is None:
        return read_metrics(path, say) if path.is_file() else []
    head = check_metrics(path, recorded, latest)
    return [json.loads(line) for line in head.decode("utf-8").splitlines() if line.strip()]


def read_metrics(path: Path, say: bool = True) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``. An unterminated last line that is not JSON is the trace of a kill in the
    middle of an append: it is dropped, with one line on stderr. Any other line that is not a JSON object raises
    ``CheckpointError`` naming the file and line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{path} holds a byte that is not UTF-8 at offset {err.start}: the file is damaged; "
                              "restore it or delete it (the metrics of finished steps are then lost)") from None
    lines = text.split("\n")  # the last item is "" when the file ends in a newline
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):  # unterminated last line: a torn append
                if say:
                    print(f"ospo-fast: {path}:{number} is an incomplete last line (a write cut off by a kill); "
                          "dropped", file=sys.stderr)
                break
            raise CheckpointError(f"{path}:{number} is not JSON ({err.msg}): the file is damaged; restore it or "
                                  "delete it (the metrics of finished steps are then lost)") from None
        if not isinstance(record, dict):
            raise CheckpointError(f"{path}:{number} is not a JSON object: the file is damaged; restore or delete it")
        records.append(record)
    return records
