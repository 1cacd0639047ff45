"""The export directory's manifest: what the runtime needs besides the network, every file checksummed."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from anomaly._fs import file_sha256
from anomaly.errors import DataError
from anomaly.model_dir import signed

__all__ = ["EXPORT_FORMAT", "EXPORT_VERSION", "MANIFEST", "is_export_dir", "read_manifest", "write_manifest"]

EXPORT_FORMAT = "anomaly-export"
EXPORT_VERSION = 2
# Exports of whole stretched images are written as format 1, which every release reads alike; those that cut views
# (``input.resize: keep_aspect``, ``input.tile``) as format 2, so that a runtime from before views could be exported
# refuses them ("written by a newer anomaly") instead of scoring stretched images against a tiled model's threshold.
_STRETCHED_VERSION = 1
MANIFEST = "manifest.json"


def is_export_dir(path: str | os.PathLike[str]) -> bool:
    """True for a folder written by ``anomaly export`` (it holds a manifest.json)."""
    return (Path(path) / MANIFEST).is_file()


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Write ``folder/manifest.json``: ``manifest`` plus the SHA-256 of every file already in ``folder``."""
    files = {
        p.name: file_sha256(p) for p in sorted(folder.iterdir()) if p.name != MANIFEST and not p.name.startswith(".")
    }
    model_input = manifest.get("input", {})
    views = (model_input.get("resize", "stretch"), model_input.get("tile")) != ("stretch", None)
    version = EXPORT_VERSION if views else _STRETCHED_VERSION
    body = {"format": EXPORT_FORMAT, "format_version": version, **manifest, "files": files}
    (folder / MANIFEST).write_text(json.dumps(signed(body), indent=2))


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and verify an export directory's manifest.

    Refused with DataError: a missing, unreadable or edited manifest, another format or version, a listed
    file that is missing, modified or outside the folder, a network file that is not listed. Unlisted files are
    never loaded.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: export directory not found")
    if not is_export_dir(root):
        raise DataError(f"{root}: not an export directory ({MANIFEST} missing)")
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{root / MANIFEST}: unreadable ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
        raise DataError(f"{root / MANIFEST}: not an anomaly export manifest")
    version = manifest.get("format_version")
    if isinstance(version, int) and version > EXPORT_VERSION:
        raise DataError(f"{root}: written by a newer anomaly (export format {version}; this one reads "
                        f"{EXPORT_VERSION}); upgrade anomaly or export the model again")  # fmt: skip
    if manifest != signed(manifest):  # a missing digest too: removing it must not skip the check
        raise DataError(f"{root / MANIFEST}: modified since the export; export the model again")
    if version not in (_STRETCHED_VERSION, EXPORT_VERSION) or isinstance(version, bool):
        raise DataError(
            f"{root}: export format {manifest.get('format_version')!r} is incompatible with this version "
            f"(expects {_STRETCHED_VERSION} or {EXPORT_VERSION}); export the model again with `anomaly export`"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise DataError(f"{root / MANIFEST}: no file list")
    for name, digest in files.items():
        file = root / name  # a symbolic link (DVC, git-annex) is read: the digest below checks what it names
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise DataError(f"{root / MANIFEST}: file {name!r} lies outside the export directory")
        if not file.is_file() or file_sha256(file) != digest:
            raise DataError(f"{file}: missing or modified since the export; export the model again")
    network = manifest.get("network")
    if isinstance(network, dict) and isinstance(network.get("file"), str):  # (absent: "incomplete export" at load)
        graph = network["file"]  # and OpenVINO's weights, which it reads from beside model.xml
        for name in (graph, str(Path(graph).with_suffix(".bin"))) if network.get("format") == "openvino" else (graph,):
            if name not in files:  # a graph unlisted, or outside the folder, would be loaded unchecked
                raise DataError(f"{root / MANIFEST}: network file {name!r} is not one of its checksummed files")
    return manifest  # files not listed (a user's notes) are never read: loaders take names from the list
