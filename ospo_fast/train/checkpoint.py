"""Training checkpoints: ``out_dir/checkpoints/step-NNNNNN/`` holds the weights in safetensors (the LoRA adapter
in peft's format, or the whole model via ``save_pretrained``), ``optimizer.pt`` and ``scheduler.pt``, one RNG file
per rank and ``trainer_state.json`` (step = data position, counters). A checkpoint is written to a ``.tmp``
directory and renamed when complete, so a directory named ``step-N`` is always whole.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ospo_fast.store import atomic_write_json

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dir(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"step-{step:06d}"


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints under ``out_dir/checkpoints``, oldest first."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()]
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
    """Rename a completed ``tmp`` checkpoint directory to ``final`` (replacing an older one of that name)."""
    if final.exists():
        shutil.rmtree(final)
    tmp.replace(final)
    return final


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
    torch.save(rng_state(), directory / f"rng-rank{rank}.pt")


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
