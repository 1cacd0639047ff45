"""Input policy shared by the API and the CLI: which images a fit, a score or a reference set uses.

* a dataset category root (it has ``train/good``) given for fitting or as references is narrowed to
  ``train/good``: a fit never reads test images or masks by accident; given for scoring, to its test split;
* references that are also inputs are dropped from the references (an image never scores itself);
* folders written by ``anomaly`` (scores, models, reports) are never read as inputs;
* ``predict`` takes one image or a list, and ``on_error`` is ``raise`` or ``skip``, in every predictor.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from anomaly._fs import BENCHMARK_MARKER, OUTPUT_MARKER
from anomaly.data.datasets import is_category_root, labelled_split_dirs
from anomaly.data.io import GLOB_CHARS, glob_paths, is_image_file, list_images
from anomaly.data.loader import ImageInput, is_encoded_array, is_stream, read_streams
from anomaly.errors import DataError

__all__ = [
    "OnError",
    "check_on_error",
    "image_paths",
    "many",
    "one_or_many",
    "reference_paths",
    "scoring_inputs",
    "training_paths",
]

log = logging.getLogger(__name__)
_NOT_NORMAL = {"ground_truth", "masks", "Masks", "Anomaly"}  # MVTec / folder-dataset masks, VisA's masks and defects
OnError = Literal["raise", "skip"]  # an unreadable input raises DataError, or gets a result with ``error`` set


def check_on_error(on_error: Any) -> None:
    """DataError unless ``on_error`` is one of :data:`OnError`."""
    if on_error not in ("raise", "skip"):
        raise DataError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def one_or_many(images: ImageInput | Sequence[ImageInput] | Iterator[ImageInput]) -> tuple[list[ImageInput], bool]:
    """The images of a ``predict`` call as a list, and whether one image was passed alone (not in a list).

    Many: a list, tuple, set, range, generator or other iterator, a 1-D array or pandas Series of paths, and a 4-D
    array or tensor (a stack of N images); one: a path, bytes (a memoryview or a 1-D uint8 array too), a binary file
    object (read here, once: :func:`anomaly.data.loader.read_streams`), a PIL image, a 2-D or 3-D array or tensor."""
    if is_stream(images):  # iterable by lines, but one encoded image
        return read_streams([images]), True
    if isinstance(images, (list, tuple)):
        return read_streams(images), False
    if is_encoded_array(images):  # np.fromfile or cv2.imencode's output: one encoded image, not N inputs
        return [images], True
    if getattr(images, "ndim", None) == 4:  # (N, H, W, C) array, (N, C, H, W) tensor
        return list(images), False  # type: ignore[arg-type]  # an array or tensor iterates over its first axis
    if (
        isinstance(images, Iterable)
        and not isinstance(images, (str, bytes, bytearray, memoryview, os.PathLike))
        and getattr(images, "ndim", None) in (None, 1)
    ):  # a generator of frames, a set of paths, ``df["path"]``; not one image, though some iterate too
        return read_streams(images), False
    return [images], True  # type: ignore[list-item]


def many(images: ImageInput | Iterable[ImageInput]) -> list[ImageInput]:
    """The images of a call that takes several (``fit``, ``predict_stream``) as a list, as :func:`one_or_many` tells
    them: a 3-D array is not iterated as rows of gray images, a CHW tensor as channels, a path as characters, nor a
    file object as lines."""
    items, _ = one_or_many(images)  # type: ignore[arg-type]
    return items


def image_paths(inputs: Iterable[str | os.PathLike[str]], *, exclude: Sequence[Path] = ()) -> list[Path]:
    """Image files of ``inputs`` (files, folders, globs), leaving out anything under ``exclude``."""
    paths, ignored = list_images(list(inputs))
    if ignored:
        log.info("ignored %d non-image file(s)", ignored)
    if exclude:
        roots = [Path(os.path.abspath(e)) for e in exclude]
        kept = [p for p in paths if not any(Path(os.path.abspath(p)).is_relative_to(r) for r in roots)]
        if len(kept) < len(paths):
            log.info("left out %d image(s) inside the output folder", len(paths) - len(kept))
        if not kept:
            raise DataError("no input image left outside the output folder")
        paths = kept
    return paths


def scoring_inputs(inputs: Iterable[str | os.PathLike[str]]) -> list[str | os.PathLike[str]]:
    """``inputs`` with each dataset category root narrowed to its labelled test split (``test/``, MVTec AD 2's
    ``test_public/``), as a fit narrows it to ``train/good``: its training images and its ground-truth masks are not
    what a test scores (the masks scored as images, and joined a zero-shot pool). A test-only category (no
    ``train/good``, its masks beside its test split) is narrowed too. MVTec AD 2 keeps its masks inside
    ``test_public/``: its other entries are given instead. A VisA category as published (``<object>/`` or
    ``<object>/Data/``) is narrowed to ``Data/Images``, leaving ``Data/Masks`` out. A root without a test split is
    kept."""
    narrowed: list[str | os.PathLike[str]] = []
    for item in inputs:
        if images := _visa_images(Path(item)):
            log.info("%s is a VisA category: scoring %s (not its masks)", item, images)
            narrowed.append(images)
            continue
        split, masks = labelled_split_dirs(Path(item))
        if not split.is_dir() or not (is_category_root(item) or masks.is_dir()):  # test-only: test/ + ground_truth/
            narrowed.append(item)
            continue
        log.info("%s is a dataset category: scoring its test split %s (not train/good, nor the masks)", item, split)
        if masks.parent == split:  # test_public/ground_truth: left out, not scored as images
            entries = sorted(p for p in split.iterdir() if p != masks and not p.name.startswith("."))
            kept = [p for p in entries if is_image_file(p) or (p.is_dir() and any(map(is_image_file, p.rglob("*"))))]
            narrowed += kept or [split]
        else:
            narrowed.append(split)
    return narrowed


def _visa_images(folder: Path) -> Path | None:
    """``Data/Images`` of a VisA category as published, given as ``<object>/`` or ``<object>/Data/``; else None."""
    for data in (folder / "Data", folder):
        if (data / "Images").is_dir() and (data / "Masks").is_dir():
            return data / "Images"
    return None


def training_paths(inputs: Iterable[str | os.PathLike[str]], *, for_fit: bool = True) -> list[Path]:
    """Normal images for a fit: category roots narrowed to ``train/good``; a folder that holds masks or anomalous
    images (a VisA category, a folder dataset's root) is refused rather than learnt as normal, and with ``for_fit``
    so are images of VisA's ``Data/Images/Normal``, which holds test images too. A glob's matches are checked one by
    one as if each was given (``'data/bot*'`` is the category root it matches)."""
    narrowed, checked = [], set()
    for item in (match for given in inputs for match in _glob_matches(given)):
        folder = Path(item) if Path(item).is_dir() else Path(item).parent
        if folder not in checked:
            checked.add(folder)
            _refuse_mask_folder(item, folder)
            if for_fit:
                _refuse_visa_normal_folder(folder)
        if is_category_root(item):
            log.info("%s is a dataset category: using its train/good only", item)
            item = Path(item) / "train" / "good"
            if not any(is_image_file(p) for p in item.rglob("*")):  # a test-only set (NEU-Seg, an import)
                raise DataError(
                    f"no image found in: {item} (a test-only category: score it zero-shot, `anomaly score --zero-shot`)"
                )
        elif Path(item).is_dir():
            _refuse_labelled_folders(Path(item))
        narrowed.append(item)
    return image_paths(narrowed)


def _glob_matches(item: str | os.PathLike[str]) -> list[str | os.PathLike[str]]:
    """``item`` itself, or for a glob pattern (no such path exists) its matches; a pattern that matches nothing is
    kept for :func:`list_images` to name."""
    if Path(item).exists() or GLOB_CHARS.isdisjoint(str(item)):
        return [item]
    matches = glob_paths(item)  # sorted as folders are listed, earlier outputs of anomaly left out
    for match in (Path(m) for m in matches if not Path(m).is_dir()):
        if found := _NOT_NORMAL & set(match.parts[-3:-1]):
            raise DataError(f"{item}: matches {match} in {found.pop()}/ (masks or anomalous images): a fit would "
                            "learn it as normal; give the folder of normal images")  # fmt: skip
    # the folders matched, and those holding the files matched: good/ beside defect folders is a test split
    folders = {Path(m) if Path(m).is_dir() else Path(m).parent for m in matches}
    for good in sorted(f for f in folders if f.name.lower() == "good"):  # Good/ too, as the loaders read it
        others = sorted(f.name for f in folders if f.parent == good.parent and f != good)
        if others:
            where = good.parent / others[0]
            raise DataError(f"{item}: matches {good} beside {', '.join(others[:3])}: a fit would learn {where} "
                            f"(anomalous images, by the layout) as normal; give {good}")  # fmt: skip
    return [*matches] or [item]


def _refuse_labelled_folders(folder: Path) -> None:
    visited: set[str] = set()
    for dirpath, dirnames, _ in os.walk(folder, followlinks=True):  # as list_images walks: links too
        if (real := os.path.realpath(dirpath)) in visited:
            dirnames.clear()  # a folder seen (a link loop)
            continue
        visited.add(real)
        # hidden folders and earlier outputs of anomaly (scores beside the images) are never read as images
        dirnames[:] = [
            d
            for d in dirnames
            if not d.startswith(".")
            and not any(os.path.isfile(os.path.join(dirpath, d, m)) for m in (OUTPUT_MARKER, BENCHMARK_MARKER))
        ]
        found = sorted(set(dirnames) & _NOT_NORMAL)
        if found:
            where = (Path(dirpath) / found[0]).relative_to(folder)
            if found[0] in ("Anomaly", "Masks"):
                hint = "a VisA category: convert it to the MVTec layout, or benchmark it with --dataset visa"
            else:
                hint = f"give {folder / 'good'}" if (folder / "good").is_dir() else "give the folder of normal images"
            raise DataError(f"{folder}: a fit would learn {where} (masks or anomalous images) as normal; {hint}")
        good = [d for d in dirnames if d.lower() == "good"]  # Good/ too, as the loaders read it
        others = sorted(d for d in dirnames if d not in good)
        if good and others:  # a test split: good/ beside one folder per defect type
            where = Path(dirpath).relative_to(folder) / others[0]
            raise DataError(f"{folder}: holds {good[0]}/ beside {', '.join(others[:3])}: a fit would learn {where} "
                            f"(anomalous images, by the layout) as normal; give {Path(dirpath) / good[0]}")  # fmt: skip


def _refuse_mask_folder(item: str | os.PathLike[str], folder: Path) -> None:
    """A folder of masks or anomalous images by its layout's names (MVTec's ``ground_truth`` and
    ``ground_truth/<type>``, VisA's ``Images/Anomaly`` and ``Masks/Anomaly``), or a file in one. A product named
    ``masks`` is not refused by its name alone."""
    parts = Path(os.path.abspath(folder)).parts
    name, parent = parts[-1], parts[-2] if len(parts) > 1 else ""
    if "ground_truth" in (name, parent) or (name == "Anomaly" and parent in ("Images", "Masks")):
        where = folder if name in ("ground_truth", "Anomaly") else folder.parent
        raise DataError(f"{item}: in {where.name}/ (masks or anomalous images): a fit would learn it as normal; give "
                        "the folder of normal images")  # fmt: skip


def _refuse_visa_normal_folder(folder: Path) -> None:
    """VisA's ``<object>/Data/Images/Normal`` holds its test split's normal images too (``split_csv/1cls.csv``)."""
    path = Path(os.path.abspath(folder))
    for root in list(path.parents)[:4]:
        if path.relative_to(root).parts[1:3] == ("Data", "Images") and (root / "split_csv" / "1cls.csv").is_file():
            raise DataError(f"{folder}: inside a VisA dataset ({root}), whose split file puts part of these images in "
                            "the test split; benchmark it with --dataset visa, or convert it to the MVTec layout and "
                            "fit on train/good")  # fmt: skip


def reference_paths(references: Iterable[str | os.PathLike[str]], inputs: Sequence[Path]) -> list[Path]:
    """Few-shot references (narrowed like training images) that are not also among ``inputs``."""
    scored = {p.resolve() for p in inputs}
    given = training_paths(references, for_fit=False)  # VisA's Normal images are fine as references
    refs = [p for p in given if p.resolve() not in scored]
    if not refs:
        raise DataError("--reference: no reference image left that is not also an input")
    if len(refs) < len(given):  # a reference scored against itself would vouch for its own patches
        dropped = [str(p) for p in given if p.resolve() in scored]
        log.warning("--reference: %d image(s) are also inputs and are scored, not used as references, first: %s",
                    len(dropped), dropped[0])  # fmt: skip
    return refs
