"""Atomic output folders: build in a temp folder beside the target, then rename it into place.

Guarantees, whatever is killed when:

* the target is either the previous complete folder or the new complete one; a kill between the
  two renames of :func:`replace_dir` leaves ``.<name>.old``, which the next run (or read) renames back;
* temp folders of dead runs (their owner process is gone, or a minute old, empty and without an owner file: killed
  between creating it and naming its owner) are removed by the next run;
* files a user added to an earlier output folder are carried into the new one: every folder lists
  what it wrote in ``.anomaly-output.json``, anything else is the user's. An error or Ctrl-C while they move puts
  them back at once; a run killed then leaves them listed in its temp folder's owner file, and the next run puts
  them back.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from anomaly.errors import DataError

__all__ = [
    "BENCHMARK_MARKER",
    "IMPORT_MARKER",
    "OUTPUT_MARKER",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_output_dir",
    "file_sha256",
    "finish_dir",
    "load_tensors",
    "new_temp_dir",
    "replace_dir",
    "restore_interrupted",
    "save_tensors",
    "staged_dir",
    "umask",
]

OUTPUT_MARKER = ".anomaly-output.json"
"""Marks a folder written by anomaly and lists what it wrote; such folders are never read as inputs."""
IMPORT_MARKER = ".anomaly-import.json"
"""The manifest of a category written by ``anomaly import``: an import does not read one inside its source folder
(an --out there) as a source again."""
BENCHMARK_MARKER = ".anomaly-benchmark"
"""Marks the folder of an ``anomaly benchmark`` run (its tables; one folder of outputs and a PIMO plot per category):
never read as inputs either."""
_OWNER_FILE = ".anomaly-owner"
_OWNERLESS_AGE_S = 60.0  # an empty temp folder without an owner file older than this is a killed run's


def new_temp_dir(target: Path, marker: str, *, output: bool = True) -> Path:
    """A temp folder beside ``target``, refusing a target that is not ours to replace.

    ``target`` may be missing, empty, or a folder holding ``marker`` (an earlier output of the
    same kind) and, for an ``output``, the :data:`OUTPUT_MARKER` that tells its files from the user's;
    anything else (a file, someone's folder, a symbolic link) raises DataError so nothing is lost.
    Unwritable locations raise DataError before any work is done.
    """
    target = Path(target)
    if target.resolve() == Path.cwd().resolve() or target.resolve() == Path(target.resolve().anchor):
        raise DataError(f"'{target}': cannot replace the current folder or a root; give a new output folder")
    _recover(target)
    if target.is_symlink():  # renaming would replace the link, and leave the folder it names behind
        raise DataError(f"{target}: a symbolic link (to {os.readlink(target)}); give the folder itself")
    refuse_non_folder(target)
    if target.exists():
        if any(target.iterdir()):
            if not (target / marker).exists():
                other = (target / OUTPUT_MARKER).exists()  # another kind of anomaly output: a model, scores, a report
                what = "another kind of anomaly output" if other else "not an anomaly output"
                raise DataError(f"{target}: folder exists and is {what} (no {marker}); choose another")
            owned = _owned(target) if output else set()
            if owned is None:  # e.g. a model's files copied without the hidden marker
                raise DataError(
                    f"{target}: folder holds {marker} but no readable {OUTPUT_MARKER}, so its files cannot be told "
                    "from yours; choose another output folder or empty this one"
                )
            if output and marker not in owned:  # e.g. scores that an older `evaluate --out` wrote metrics.json into:
                raise DataError(  # replacing it would drop the scores, which its marker lists as its own
                    f"{target}: folder is another kind of anomaly output ({marker} is not one of its own files); "
                    "choose another output folder"
                )
        if not _writable(target):  # replaced by renames in its parent, the folder's own mode would never apply
            raise DataError(f"{target}: folder is not writable; choose another output folder")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        (tmp / _OWNER_FILE).write_text(f"{socket.gethostname()} {os.getpid()}")
    except OSError as exc:
        raise DataError(f"{target}: cannot write here ({exc.strerror or exc})") from None
    tmp.chmod(0o777 & ~umask())  # mkdtemp makes 0700; outputs are shared like any folder
    return tmp


def refuse_non_folder(target: Path) -> None:
    """DataError (one line naming the path) for an output folder that cannot be one: a file, or a path below one."""
    if target.exists() and not target.is_dir():
        raise DataError(f"{target}: exists and is not a folder; choose another output path")
    blocking = next((p for p in target.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise DataError(f"{target}: {blocking} is a file, not a folder; choose another output path")


@contextlib.contextmanager
def staged_dir(
    target: Path, marker: str, *, output: bool = True, owned: Collection[str] | None = None
) -> Iterator[Path]:
    """A temp folder (:func:`new_temp_dir`) to write ``target``'s files into; when the block ends it becomes
    ``target`` (:func:`finish_dir`; without ``output``, a data folder: :func:`replace_dir`, no output marker, and
    the entries of the old folder not named in ``owned`` are the user's and move into the new one), and when the
    block raises it is removed."""
    tmp = new_temp_dir(target, marker, output=output)
    try:
        yield tmp
        if output:
            finish_dir(tmp, target)
        else:
            replace_dir(tmp, target, owned)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output_dir(target: Path, marker: str) -> None:
    """DataError now, before a long run, when ``target`` could not take an output (:func:`new_temp_dir`); the
    folders that check creates are removed again (a run that fails later leaves nothing behind)."""
    created = [p for p in Path(target).absolute().parents if not p.exists()]  # innermost first
    shutil.rmtree(new_temp_dir(target, marker))
    for folder in created:
        with contextlib.suppress(OSError):  # another process may have put something there since
            folder.rmdir()


def finish_dir(tmp: Path, target: Path) -> None:
    """Record what ``tmp`` holds as ours, then move it into place with :func:`replace_dir`."""
    owned = sorted(p.name for p in tmp.iterdir() if p.name != _OWNER_FILE)  # the owner file is not the output's
    try:
        (tmp / OUTPUT_MARKER).write_text(json.dumps({"owned": owned}))
        replace_dir(tmp, target)
    except OSError as exc:
        raise DataError(f"{target}: could not write the output ({exc.strerror or exc})") from None


def replace_dir(tmp: Path, target: Path, owned: Collection[str] | None = None) -> None:
    """Move ``tmp`` to ``target``; an existing target is swapped out only once the new one is complete.

    Entries of the old target that it did not write itself (not listed in its marker, or not in ``owned`` for a
    data folder) move into the new folder first, so a user's notes or photos survive a re-run.
    """
    with _lock(target):
        _swap(tmp, target, owned)
    # Only now, in place: a run killed before the rename leaves a temp folder whose owner the next run finds dead.
    with contextlib.suppress(FileNotFoundError):
        (target / _OWNER_FILE).unlink()


def restore_interrupted(target: Path) -> None:
    """Before reading ``target``: a run killed between :func:`replace_dir`'s two renames left the previous folder
    as ``.<name>.old``; it is renamed back (where the parent is writable; otherwise it stays for the next run)."""
    target = Path(target)
    if target.exists() or not target.name or not target.parent.is_dir():  # "." or "/": nothing was swapped there
        return
    old = target.with_name(f".{target.name}.old")
    if old.is_dir():
        with _lock(target), contextlib.suppress(OSError):  # a save swapping right now holds the lock
            if not target.exists():
                old.rename(target)


def _swap(tmp: Path, target: Path, owned: Collection[str] | None = None) -> None:
    if not target.exists():
        tmp.rename(target)
        return
    ours = _owned(target) if owned is None else set(owned)
    users = [] if ours is None else [e for e in target.iterdir() if e.name not in ours | {OUTPUT_MARKER}]
    users = [e for e in users if not (tmp / e.name).exists()]
    if users:  # a run killed from here on leaves them in the temp folder: its owner file lists them for the next
        # run to put back (_recover), and the clean-up of dead runs' temp folders keeps a folder that holds them
        owner = f"{socket.gethostname()} {os.getpid()}\n{json.dumps([e.name for e in users])}"
        (tmp / _OWNER_FILE).write_text(owner)
    old = target.with_name(f".{target.name}.old")
    moved: list[str] = []
    try:
        for entry in users:
            entry.rename(tmp / entry.name)
            moved.append(entry.name)
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        tmp.rename(target)
    except BaseException:  # an error or Ctrl-C midway: the previous folder and the user's files back in place, before
        if not target.exists() and old.is_dir():  # the caller's clean-up removes the temp folder
            with contextlib.suppress(OSError):
                old.rename(target)
        for name in moved:
            with contextlib.suppress(OSError):
                (tmp / name).rename(target / name)
        raise
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to a temp file beside ``path`` and rename it over ``path``."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path`` and rename it over ``path``; nothing is left on failure."""
    name = path.name if len(os.fsencode(path.name)) <= 180 else hashlib.sha256(os.fsencode(path.name)).hexdigest()
    tmp = path.with_name(f".{name}.{os.getpid()}.{threading.get_ident()}.tmp")  # a 255-byte name's stays below 255
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise DataError(f"{path}: cannot write ({exc.strerror or exc})") from None


def file_sha256(path: Path) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_tensors(path: Path) -> dict[str, Any]:
    """The arrays of a safetensors file as NumPy arrays; a damaged file raises ValueError naming it (safetensors'
    own error type derives from Exception alone, so the loaders' ``except ValueError`` would miss it).

    safetensors validates the header; the arrays are then read straight from the file into their own buffers. Its
    NumPy loaders hold the file's bytes (or its mapped pages) and the copies at once: twice the state at load, which
    for PaDiM's per-position factors (158 MiB at 256 px) set the runtime's peak memory.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as checked:
            keys = list(checked.keys())
    except SafetensorError as exc:
        raise ValueError(f"{path.name}: {exc}") from None
    with open(path, "rb") as fh:
        (header_size,) = struct.unpack("<Q", fh.read(8))
        header, start = json.loads(fh.read(header_size)), 8 + header_size
        arrays = {}
        for key in keys:
            entry = header[key]
            if entry["dtype"] not in _SAFETENSORS_DTYPES:
                raise ValueError(f"{path.name}: tensor {key!r} has dtype {entry['dtype']}, which NumPy cannot read")
            dtype = np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]])
            begin, end = entry["data_offsets"]
            fh.seek(start + begin)
            arrays[key] = np.fromfile(fh, dtype, (end - begin) // dtype.itemsize).reshape(entry["shape"])
    return arrays


_SAFETENSORS_DTYPES = {"BOOL": "?", "U8": "u1", "I8": "i1", "U16": "<u2", "I16": "<i2", "F16": "<f2", "U32": "<u4",
                       "I32": "<i4", "F32": "<f4", "U64": "<u8", "I64": "<i8", "F64": "<f8"}  # fmt: skip


def save_tensors(arrays: dict[str, Any], path: Path) -> None:
    """Write ``arrays`` (NumPy) as a safetensors file, with the mode of any file the process writes (safetensors
    creates 0600: an export's state would be unreadable to the service account that scores with it). A failed write
    (a full disk) raises OSError, as any write does: safetensors reports it as its own error type, which the writers'
    ``except OSError`` would miss."""
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    try:
        save_file({key: np.ascontiguousarray(value) for key, value in arrays.items()}, str(path))
    except SafetensorError as exc:
        code = re.search(r"\(os error (\d+)\)", str(exc))  # "I/O error: No space left on device (os error 28)"
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None
    path.chmod(0o666 & ~umask())


@contextlib.contextmanager
def _lock(target: Path) -> Iterator[None]:
    """Serialise swaps between processes (two runs writing the same --out): a lock on the parent folder."""
    import fcntl

    fd = os.open(target.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _owned(folder: Path) -> set[str] | None:
    """What an output folder lists as written by anomaly; None without a readable marker (a data folder that
    :func:`replace_dir` replaces whole: outputs without one are refused by :func:`new_temp_dir`)."""
    try:
        data = json.loads((folder / OUTPUT_MARKER).read_text())
        return {str(name) for name in data["owned"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _recover(target: Path) -> None:
    """Undo what a killed run left beside ``target``: restore ``.old``, remove dead runs' temp folders."""
    parent = target.parent
    if not parent.is_dir():
        return
    old = parent / f".{target.name}.old"
    restore_interrupted(target)  # killed between the two renames: the previous output comes back
    if old.is_dir() and target.exists():  # a newer target is in place: the old one is done with
        shutil.rmtree(old, ignore_errors=True)
    host = socket.gethostname()
    for tmp in parent.glob(f".{target.name}.*"):
        owner = tmp / _OWNER_FILE
        if tmp == old or not tmp.is_dir():
            continue
        if not owner.is_file():  # killed between creating it and writing its owner: empty, named as mkdtemp names
            # them. A minute's age spares a run between the two steps; rmdir spares a folder with files (the user's,
            # which swaps before this version moved there without an owner file)
            with contextlib.suppress(OSError):  # another run may remove or fill it meanwhile
                old_enough = time.time() - tmp.stat().st_mtime >= _OWNERLESS_AGE_S
                if old_enough and re.fullmatch(rf"\.{re.escape(target.name)}\.[a-z0-9_]{{8}}", tmp.name):
                    tmp.rmdir()
            continue
        try:
            first, _, listed = owner.read_text().partition("\n")
            owner_host, pid = first.split()
            users = [str(name) for name in json.loads(listed)] if listed else []
        except (OSError, ValueError, TypeError):
            continue
        if owner_host == host and not _alive(int(pid)):
            if _put_back(tmp, target, users):
                shutil.rmtree(tmp, ignore_errors=True)


def _put_back(tmp: Path, target: Path, users: list[str]) -> bool:
    """Move the user's entries ``users`` that a killed swap left in ``tmp`` back into ``target``; True when none is
    left in ``tmp`` (an entry the target holds again under that name stays, as does everything when it cannot go)."""
    for name in users:
        entry = tmp / name
        if (entry.exists() or entry.is_symlink()) and target.is_dir() and not (target / name).exists():
            with contextlib.suppress(OSError):
                entry.rename(target / name)
    return not any((tmp / name).exists() or (tmp / name).is_symlink() for name in users)


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True


def umask() -> int:
    """The process's file-mode creation mask (read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
