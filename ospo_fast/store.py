"""Atomic file writes, strict JSONL reads, safe file names and config fingerprints. Every file the project writes
goes through here: write to a temporary file in the same directory, fsync, then ``os.replace`` so a reader sees
either the old file or the whole new one, never a part. New files get the mode ``open()`` would give them
(0o666 minus the umask), not mkstemp's 0o600.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping


class StoreError(ValueError):
    """A file the run reads is damaged, inconsistent with the manifest, or invalid; the message names the file and
    what to do."""


class FingerprintMismatch(StoreError):
    """An output was made with other settings than the ones given now; the message lists the keys that differ."""


# ---------------------------------------------------------------- atomic writes

def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0o600; follow the umask as open() does
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def check_no_symlink(root: str | Path, path: str | Path) -> Path:
    """``path`` (inside ``root``) as a Path, after checking that no component below ``root`` is a symlink: nothing in
    a run or training directory is written, replaced or deleted through one (a symlinked ``images/`` would send
    every PNG elsewhere). StoreError naming the link otherwise. ``root`` itself may be a link the user made."""
    root, path = Path(root), Path(path)
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        raise StoreError(f"{path} is not inside {root}") from None
    current = root
    for part in parts:
        current = current / part
        if current.is_symlink():
            raise StoreError(f"{current} is a symlink; ospo-fast writes nothing through links inside {root}: replace "
                             "it with a real directory (or file)")
    return path


CHECKSUM_FILE = "checksums.json"  # in a checkpoint or merged model directory: the sha256 of every other file in it


def directory_files(directory: Path) -> list[str]:
    """Every file under ``directory`` (relative POSIX paths, sorted) but ``checksums.json``."""
    directory = Path(directory)
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if p.is_file() and p.name != CHECKSUM_FILE)


def write_directory_checksums(directory: Path) -> None:
    """``checksums.json`` listing the sha256 of every file in ``directory`` (write it last)."""
    directory = Path(directory)
    atomic_write_json(directory / CHECKSUM_FILE, {"sha256": {name: sha256_file(directory / name)
                                                             for name in directory_files(directory)}})


def listed_checksums(directory: Path) -> dict[str, str] | None:
    """The sha256 per file that ``checksums.json`` lists, or None when it is missing or unreadable."""
    try:
        listed = json.loads((Path(directory) / CHECKSUM_FILE).read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return listed if isinstance(listed, dict) else None


def check_listed_files(directory: Path, listed: dict[str, str], names: list[str]) -> str | None:
    """None when every file in ``names`` exists and matches ``listed``; else the first problem, naming the file."""
    for name in names:
        path = Path(directory) / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256_file(path) != listed[name]:
            return f"{name} does not match its sha256 in {CHECKSUM_FILE} (damaged or truncated)"
    return None


def directory_damage(directory: Path, share: int = 0, shares: int = 1) -> str | None:
    """None when ``directory`` is intact: ``checksums.json`` lists every file in it, and each matches; else why not
    (one short phrase naming the file). A file the list lacks is damage too (a list cut short vouches for less).
    ``share`` of ``shares``: hash only every ``shares``-th listed file from the ``share``-th (several processes
    splitting the work; the list itself is checked by each)."""
    listed = listed_checksums(directory)
    if listed is None:
        return f"{CHECKSUM_FILE} is missing or unreadable"
    unlisted = sorted(set(directory_files(directory)) - set(listed))
    if unlisted:
        return f"{unlisted[0]} is not listed in {CHECKSUM_FILE}"
    return check_listed_files(directory, listed, sorted(listed)[share::shares])


def follow_umask(directory: Path) -> None:
    """Give every file under ``directory`` the mode open() would (0o666 minus the umask): some writers (safetensors)
    create 0o600 files, so saved weights would be unreadable to the group while every other output is not."""
    mode = 0o666 & ~_umask()
    for path in Path(directory).rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Remove what killed writers left under ``directory``: atomic writes' ``.<name>.*.tmp`` files and checkpoint or
    merge ``*.tmp`` directories (only call this while holding the directory's write lock). Returns them."""
    import shutil

    stale = [p for p in Path(directory).rglob("*.tmp") if not p.is_symlink()
             and ((p.is_file() and p.name.startswith(".")) or p.is_dir())]
    for path in sorted(stale, key=lambda p: len(p.parts)):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def jsonl_bytes(records: Iterable[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode("utf-8")


def atomic_write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> Path:
    return atomic_write_bytes(path, jsonl_bytes(records))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- strict reads

def parse_jsonl(data: bytes, path: Path, fix: str, error: type[ValueError] = StoreError) -> list[dict[str, Any]]:
    """Records of a JSONL file the project wrote. A torn last line (no final newline), a line that is not JSON or
    not an object raises ``error`` naming ``path``, the line and ``fix``: damage is never read as end of file."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line_no = data[:err.start].count(b"\n") + 1
        raise error(f"{path}:{line_no} is damaged (not UTF-8 at byte {err.start}); {fix}") from err
    if text and not text.endswith("\n"):
        raise error(f"{path} ends in a torn line (no final newline: the file was cut); {fix}")
    records = []
    for line_no, line in enumerate(text.split("\n")[:-1], 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise error(f"{path}:{line_no} is damaged (not JSON: {err.msg}); {fix}") from err
        if not isinstance(record, dict):
            raise error(f"{path}:{line_no} is damaged (a {type(record).__name__}, not a record); {fix}")
        records.append(record)
    return records


def read_jsonl(path: Path, fix: str = "re-run the command that wrote it") -> list[dict[str, Any]]:
    """Every record of a JSONL file the project wrote (strict: see ``parse_jsonl``)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise StoreError(f"cannot read {path} ({err.strerror}); {fix}") from err
    return parse_jsonl(data, path, fix)


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


# ---------------------------------------------------------------- names that become paths

SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")
SAFE_NAME_RULE = "1-100 characters from A-Z a-z 0-9 . _ -, not starting with '.'"


def check_name(value: object, where: str = "") -> str:
    """``value`` if it is safe as one file-name component (``SAFE_NAME_RULE``), else StoreError naming it and
    ``where`` (e.g. ``file:line``). Every id that becomes part of a path passes through here."""
    if not isinstance(value, str):
        raise StoreError(f"{where + ': ' if where else ''}id {value!r} is a {type(value).__name__}; ids must be "
                         f"strings of {SAFE_NAME_RULE}")
    if not SAFE_NAME.fullmatch(value):
        raise StoreError(f"{where + ': ' if where else ''}id {value!r} is not allowed; ids become file names, so "
                         f"use {SAFE_NAME_RULE}")
    return value


def safe_join(directory: Path, name: str, suffix: str = "") -> Path:
    """``directory / (name + suffix)`` with ``name`` checked by ``check_name``: never a path outside it."""
    return Path(directory) / (check_name(name) + suffix)


# ---------------------------------------------------------------- fingerprints

def _plain(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples -> lists, paths -> str, dataclasses -> dicts)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    return json.loads(json.dumps(value, default=str))


def config_fingerprint(parts: Mapping[str, Any]) -> dict[str, Any]:
    """Everything that determines an output, flat: ``{"images.guidance_scale": 5.0, "seed": 0, ...}``.

    ``parts`` maps a name to a config section (a dataclass), a dict, or a plain value (a model identity, an input
    file's sha256); sections and dicts are flattened into dotted keys. Store the result beside the output (it is
    JSON) and compare it with ``check_fingerprint`` before reusing that output."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key in sorted(value):
                walk(f"{prefix}.{key}", value[key])
        else:
            flat[prefix] = value

    for name, value in parts.items():
        walk(name, _plain(value))
    return flat


def fingerprint_diff(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``key: old -> new`` for every key whose value differs (or exists on one side only), sorted."""
    missing = object()
    out = []
    for key in sorted(set(stored) | set(current)):
        old, new = stored.get(key, missing), current.get(key, missing)
        if old != new:
            show = lambda v: "(unset)" if v is missing else json.dumps(v)
            out.append(f"{key}: {show(old)} -> {show(new)}")
    return out


def check_fingerprint(stored: Mapping[str, Any] | None, current: Mapping[str, Any], what: str, fix: str) -> None:
    """Raise FingerprintMismatch when ``stored`` (None: nothing recorded, accepted) differs from ``current``:
    ``"{what} was made with other settings (images.guidance_scale: 5.0 -> 1.0); {fix}"``."""
    if stored is None:
        return
    diff = fingerprint_diff(stored, current)
    if diff:
        shown = "; ".join(diff[:8]) + (f"; and {len(diff) - 8} more" if len(diff) > 8 else "")
        raise FingerprintMismatch(f"{what} was made with other settings ({shown}); {fix}")


def cache_dir() -> Path:
    """Where ospo-fast keeps what it can rebuild: built-in models and the digest cache (``$OSPO_FAST_CACHE``)."""
    return Path(os.environ.get("OSPO_FAST_CACHE", Path.home() / ".cache" / "ospo_fast"))


DIGEST_CACHE_FILE = "sha256-cache.json"
DIGEST_CACHE_MIN = 1 << 24  # files from 16 MiB up (weights) have their sha256 remembered; smaller ones are re-hashed


def _stat_key(path: Path) -> str:
    """What says a file is unchanged since it was hashed: its real path, size, inode and mtime in nanoseconds."""
    st = path.stat()
    return f"{os.path.realpath(path)}|{st.st_size}|{st.st_ino}|{st.st_mtime_ns}"


def cached_sha256(path: Path) -> str:
    """``sha256_file(path)``, remembered in ``<cache_dir>/sha256-cache.json`` for large files under their
    ``_stat_key``: a 7B model's 14 GB are hashed once, not at every fingerprint. A file rewritten in place gets a
    new mtime and is hashed again (one that is changed and then given its old mtime back is not noticed: delete the
    cache file to force a full re-hash). A damaged or unwritable cache only costs time."""
    path = Path(path)
    if path.stat().st_size < DIGEST_CACHE_MIN:
        return sha256_file(path)
    cache_file = cache_dir() / DIGEST_CACHE_FILE
    key = _stat_key(path)
    try:
        cache = json.loads(cache_file.read_text(encoding="utf-8"))
        cache = cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        cache = {}
    if isinstance(cache.get(key), str):
        return cache[key]
    digest = sha256_file(path)
    alive = {k: v for k, v in cache.items() if os.path.exists(k.split("|", 1)[0])}  # forget deleted files
    try:
        atomic_write_json(cache_file, alive | {key: digest})
    except OSError:
        pass  # a read-only home: the digest is still right, just not remembered
    return digest


def file_identity(path: str | Path) -> dict[str, Any]:
    """What a file or a model directory is, by content: ``{"sha256": ...}`` of a file, ``{"files": {name: sha256}}``
    of every file in a directory (the weights included, whole: ``cached_sha256``) but ``checksums.json``, so
    ``./m`` and ``/abs/m`` agree and one flipped byte anywhere differs; ``{"name": path}`` for what is not on disk
    (callers resolve ``builtin:`` and hub ids to their directories first: ``models.loader.model_identity``)."""
    path = Path(path)
    if path.is_file():
        return {"sha256": cached_sha256(path)}
    if not path.is_dir():
        return {"name": str(path)}
    return {"files": {name: cached_sha256(path / name) for name in directory_files(path)}}


LOCK_FILE = ".ospo-fast.lock"


class DirectoryBusy(StoreError):
    """Another process holds the write lock of a run or training directory."""


@contextlib.contextmanager
def directory_lock(directory: str | Path) -> Iterator[Path]:
    """Hold the write lock of ``directory`` (created if missing) for the block: an exclusive ``fcntl.flock`` on
    ``<directory>/.ospo-fast.lock``, which the kernel releases when the process ends, killed or not. A second
    writer stops at once with DirectoryBusy naming the holder's pid and host. Once held, temporaries a killed
    writer left are removed (``remove_stale_temporaries``). If the block fails before anything
    but the lock file was written into a directory it created, the directory is removed again (a refused or failed
    start leaves nothing behind)."""
    import fcntl
    import shutil
    import socket

    path = Path(directory)
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    lock_path = path / LOCK_FILE
    if lock_path.is_symlink():
        raise StoreError(f"{lock_path} is a symlink; remove it (nothing in a run directory is written through one)")
    handle = open(lock_path, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "an unknown process"
            raise DirectoryBusy(f"{path} is being written by {holder}; wait for it to finish (or stop it), or "
                                "choose another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        remove_stale_temporaries(path)  # no other writer can be mid-write now
        try:
            yield path
        except BaseException:
            if created and [p.name for p in path.iterdir()] == [LOCK_FILE]:
                shutil.rmtree(path, ignore_errors=True)
            raise
    finally:
        handle.close()
