"""Atomic outputs: build in a temp folder beside the target, then rename it into place."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from anomaly.errors import DataError

__all__ = ["atomic_write_text", "file_sha256", "new_temp_dir", "replace_dir"]


def new_temp_dir(target: Path, marker: str) -> Path:
    """A temp folder beside ``target``, refusing a target that is not ours to replace.

    ``target`` may be missing, empty, or a folder holding ``marker`` (an earlier output of the
    same kind); anything else (a file, someone's folder) raises DataError so nothing is lost.
    """
    if target.exists():
        if not target.is_dir():
            raise DataError(f"{target}: exists and is not a folder; choose another output path")
        if any(target.iterdir()) and not (target / marker).exists():
            raise DataError(f"{target}: folder exists and is not an anomaly output (no {marker}); choose another")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; outputs are shared like any folder
    return tmp


def replace_dir(tmp: Path, target: Path) -> None:
    """Move ``tmp`` to ``target``; an existing target is swapped out only once the new one is complete."""
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(target)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temp file beside ``path`` and rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def file_sha256(path: Path) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
