"""Atomic file writes. Every file the project writes goes through here: write to a temporary file in the same
directory, fsync, then ``os.replace`` so a reader sees either the old file or the whole new one, never a part.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> Path:
    lines = [json.dumps(r, sort_keys=True) for r in records]
    return atomic_write_text(path, "".join(line + "\n" for line in lines))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def read_jsonl_rows(path: Path, error: type[ValueError] = ValueError) -> list[tuple[int, object]]:
    """(line number, parsed value) for every non-blank line of a user-supplied JSONL file; a line that is not
    JSON raises ``error`` naming the file and line."""
    rows = []
    for line_no, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((line_no, json.loads(line)))
        except json.JSONDecodeError as err:
            raise error(f"{path}:{line_no} is not JSON ({err.msg}); fix that line") from err
    return rows
