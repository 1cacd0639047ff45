"""Model directories: written atomically with a manifest, trusted only when the manifest checks out.

A directory is trusted when ``meta.json`` parses as the expected structure and matches its own digest
(``meta_sha256``: an edited threshold is refused as an edited file is), its ``files`` manifest is complete
(it lists ``config.json`` and at least one file), every listed name is a file of the directory (or a symbolic
link, as DVC and git-annex keep them) whose SHA-256 matches, and the loader reads nothing that is not listed
(:func:`verified_files` hands out only listed paths).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from anomaly._fs import OUTPUT_MARKER, file_sha256, staged_dir, umask
from anomaly.errors import DataError

__all__ = ["FORMAT_VERSION", "META_FILE", "read_meta", "signed", "verified_files", "write_model_dir"]

FORMAT_VERSION = 2
META_FILE = "meta.json"
_DIGEST = "meta_sha256"


def write_model_dir(target: str | os.PathLike[str], write: Callable[[Path], dict[str, Any]]) -> Path:
    """Create ``target`` atomically: ``write(tmp)`` writes the files and returns the metadata."""
    target = Path(target)
    try:
        with staged_dir(target, META_FILE) as tmp:
            meta = write(tmp)
            files = sorted(p.name for p in tmp.iterdir() if p.is_file() and not p.name.startswith("."))
            for name in files:
                (tmp / name).chmod(0o666 & ~umask())
            meta = {"format_version": FORMAT_VERSION, **meta, "files": {n: file_sha256(tmp / n) for n in files}}
            (tmp / META_FILE).write_text(json.dumps(signed(meta), indent=2))
    except OSError as exc:
        raise DataError(f"{target}: could not write the model ({exc.strerror or exc})") from None
    return target


def read_meta(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse and structurally check ``meta.json`` of a model directory."""
    path = Path(directory)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        if (path / "manifest.json").is_file():  # runtime.manifest.MANIFEST (that module imports this one)
            raise DataError(f"{path}: an export directory (for `anomaly score` and `serve`), not a model directory")
        raise DataError(f"{path}: not a model directory ({META_FILE} missing)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{meta_path}: unreadable ({exc})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{meta_path}: expected a JSON object")
    version = meta.get("format_version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise DataError(f"{path}: saved by a newer anomaly (model format {version}; this one reads "
                        f"{FORMAT_VERSION}); upgrade anomaly or refit")  # fmt: skip
    if meta.get(_DIGEST) != signed(meta)[_DIGEST]:  # a missing digest too: removing it must not skip the check
        raise DataError(f"{meta_path}: modified since the model was saved (or saved without its {_DIGEST} by an "
                        "early version); refit the model")  # fmt: skip
    if version != FORMAT_VERSION:
        raise DataError(
            f"{path}: model format {version!r} is incompatible with this version "
            f"(expects {FORMAT_VERSION}); refit with `anomaly fit`"
        )
    files = meta.get("files")
    if not isinstance(files, dict) or "config.json" not in files:
        raise DataError(f"{meta_path}: 'files' manifest missing or incomplete; refit the model")
    return meta


def signed(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` with its digest: the SHA-256 of its canonical JSON without the digest."""
    body = {k: v for k, v in meta.items() if k != _DIGEST}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return {**body, _DIGEST: hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()}


def verified_files(directory: str | os.PathLike[str], meta: dict[str, Any]) -> dict[str, Path]:
    """The listed files, each checked to be a regular file inside ``directory`` with its recorded digest."""
    root = Path(directory).resolve()
    verified: dict[str, Path] = {}
    for name, digest in meta["files"].items():
        if (
            not isinstance(name, str)
            or not isinstance(digest, str)
            or name in ("", ".", "..", META_FILE, OUTPUT_MARKER)
            or "/" in name
            or "\\" in name
        ):
            raise DataError(f"{root / META_FILE}: invalid manifest entry {name!r}")
        path = root / name  # a symbolic link (DVC, git-annex) is read: the digest below checks what it names
        if not path.is_file():
            raise DataError(f"{path}: missing or not a regular file in the model directory; refit the model")
        if file_sha256(path) != digest:
            raise DataError(f"{path}: modified since the model was saved; refit the model")
        verified[name] = path
    return verified
