"""Importers: annotated image collections -> an MVTec-layout category folder.

Two sources are read: labelme JSON polygons (:func:`import_labelme`) and an image folder beside a mask folder
(:func:`import_mask_folders`). Both write ``<out>/train/good``, ``test/good``, ``test/<defect>/`` and
``ground_truth/<defect>/<stem>_mask.png`` (0/255 PNG), readable by :func:`anomaly.data.load_mvtec`. Images are
linked, not copied (symlink by default); only masks are new files. Normal images are split between
``train/good`` and ``test/good`` by a seeded random draw. The folder is built beside ``out`` and renamed into
place, with a manifest ``.anomaly-import.json`` recording the source and the split.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageOps

from anomaly._fs import IMPORT_MARKER, atomic_write_text, file_sha256, staged_dir
from anomaly.data.io import (
    MAX_PIXELS,
    SOFT_MASK_LEVELS,
    border_all_set,
    drawn_levels,
    list_images,
    mask_level_count,
    read_image_size,
)
from anomaly.errors import DataError

log = logging.getLogger(__name__)

__all__ = ["ImportSummary", "import_labelme", "import_mask_folders", "parse_classes"]

Link = Literal["symlink", "hardlink", "copy"]
_AREA_SHAPES = ("polygon", "rectangle", "circle", "mask")
_FLAT_SHAPES = ("point", "points", "line", "linestrip")  # labelme's shapes that mark no area
_MASK_SUFFIXES = ("_mask", "_label")  # a mask's name beside its image: x_mask.png, or KolektorSDD's x_label.bmp


@dataclass(frozen=True)
class ImportSummary:
    """What an import wrote: the category folder and its image counts."""

    root: Path
    n_train: int
    n_test_good: int
    defects: dict[str, int]

    @property
    def test_only(self) -> bool:
        """True when there was no normal image: the category cannot be used for training."""
        return self.n_train == 0


@dataclass(frozen=True)
class _Defect:
    image: Path
    mask: NDArray[np.bool_]
    defect_type: str


def import_labelme(
    images: str | os.PathLike[str],
    annotations: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    normal_test_ratio: float = 0.2,
    max_normal: int | None = None,
    seed: int = 0,
    link: Link = "symlink",
) -> ImportSummary:
    """Import images annotated with labelme.

    Every image under ``images`` (recursive) is normal unless a JSON file under ``annotations`` names it with at
    least one shape: its ``imagePath`` relative to the JSON's folder (as labelme reads it), else the one image of
    that file name. File names that repeat in one output folder take their sub-folders as a prefix. The mask is
    the union of the image's shapes, filled as labelme does (PIL polygon with outline). The defect type is the shape
    label, lower-cased with spaces as ``_``; an image whose shapes carry several labels gets the type ``combined``.

    Args:
        images: Folder of all images, normal and defective.
        annotations: Folder of labelme ``.json`` files (recursive).
        out: Category folder to write (e.g. ``/data/bsdata``); an earlier import there is replaced (files you added
            to it are kept).
        normal_test_ratio: Share of the normal images put in ``test/good``; the rest go to ``train/good``.
        max_normal: Use at most this many normal images (a seeded random subset) before splitting.
        seed: Seed of the subset and of the split.
        link: ``symlink`` (default), ``hardlink`` or ``copy`` for the images.

    Returns:
        The summary of what was written.

    Raises:
        DataError: Missing folders, unreadable or invalid JSON, an annotated image that is not found, named
            ambiguously or whose size differs from the JSON's, a shape without area, an image file that cannot
            be opened (empty, or not an image), or no image at all.
    """
    _check_options(normal_test_ratio, max_normal, link, seed)
    image_paths = _listed(images, "--images")
    json_files = sorted(p for p in _walk_dir(annotations, "--annotations") if p.suffix.lower() == ".json")
    if not json_files:
        raise DataError(f"--annotations {annotations}: no .json file found")
    by_path = {os.path.abspath(p): p for p in image_paths}
    by_name: dict[str, list[Path]] = {}
    by_stem: dict[str, list[Path]] = {}
    for path in image_paths:
        by_name.setdefault(path.name, []).append(path)
        by_stem.setdefault(path.stem, []).append(path)
    defects: list[_Defect] = []
    annotated: dict[Path, Path] = {}  # image -> its JSON file
    for json_file in json_files:
        doc = _read_json(json_file)
        image_path = str(doc.get("imagePath", "")).replace("\\", "/")
        name = Path(image_path).name
        named = by_name.get(name, [])
        # labelme reads imagePath relative to its JSON; else the one image of that file name
        image = by_path.get(os.path.abspath(json_file.parent / image_path)) if name else None
        if image is None and len(named) > 1:
            raise DataError(f"{json_file}: imagePath {image_path!r} is none of the {len(named)} images named {name!r} "
                            f"under {images} ({named[0]}, ...); give the path from the JSON's folder")  # fmt: skip
        image = image or (named[0] if named else None)
        if image is None and len(by_stem.get(json_file.stem, [])) == 1:  # renamed, or an empty imagePath
            image = by_stem[json_file.stem][0]
            log.warning("%s: imagePath %r not found under %s; read as %s (the JSON's own name)", json_file, name,
                        images, image.name)  # fmt: skip
        if image is None:
            raise DataError(f"{json_file}: imagePath {name!r} not found under {images}, nor an image named "
                            f"{json_file.stem}.*")  # fmt: skip
        if image in annotated:
            raise DataError(f"{json_file} and {annotated[image]} both annotate {image}; keep one")
        annotated[image] = json_file
        shapes = doc.get("shapes") or []
        if not shapes:
            continue  # labelme saves an empty shape list for a reviewed, defect-free image
        size = _image_size(image)
        declared = (doc.get("imageWidth"), doc.get("imageHeight"))
        if None not in declared and declared != size:
            raise DataError(f"{json_file}: imageWidth x imageHeight {declared} differ from the image's size {size}")
        mask = labelme_mask(shapes, size, json_file)  # checks each shape first
        labels = {
            _defect_type(s.get("label"), f"{json_file}: shape {i + 1}")
            for i, s in enumerate(shapes)
            if (s.get("shape_type") or "polygon") in _AREA_SHAPES  # a point or line labels nothing in the mask
        }
        defects.append(_Defect(image, mask, labels.pop() if len(labels) == 1 else "combined"))
    normals = [p for p in image_paths if p not in {d.image for d in defects}]
    return _write_category(
        out,
        normals,
        defects,
        normal_test_ratio=normal_test_ratio,
        max_normal=max_normal,
        seed=seed,
        link=link,
        source={"format": "labelme", "images": os.path.abspath(images), "annotations": os.path.abspath(annotations)},
        images_root=Path(images),
    )


def import_mask_folders(
    images: str | os.PathLike[str],
    masks: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    classes: dict[int, str] | None = None,
    normal_test_ratio: float = 0.2,
    max_normal: int | None = None,
    seed: int = 0,
    link: Link = "symlink",
) -> ImportSummary:
    """Import an image folder with a parallel mask folder.

    The mask of ``images/<sub>/<stem>.<ext>`` is ``masks/<sub>/<stem>.<ext>``, ``<stem>_mask.<ext>`` or
    ``<stem>_label.<ext>`` (any image suffix). Non-zero mask pixels are defective; an image with an all-zero mask is
    normal, and so is one without a mask (named in a warning inside a folder of defects). File names that repeat in
    one output folder take their sub-folders as a prefix. The defect type is, with ``classes``, the class of the
    most frequent non-zero mask value; without it, the image's first sub-folder under ``images`` (``defect`` for
    images directly in it).

    Args:
        images: Image folder (recursive).
        masks: Mask folder with the same sub-folders.
        out: Category folder to write; an earlier import there is replaced (files you added to it are kept).
        classes: Mask value -> defect type (e.g. ``{1: "inclusion", 2: "patches"}``).
        normal_test_ratio, max_normal, seed, link: As in :func:`import_labelme`.

    Returns:
        The summary of what was written.

    Raises:
        DataError: Missing folders, several masks for one image (``x.png`` and ``x_mask.png``, or ``x.png`` and
            ``x.tif``), an image file that cannot be opened (empty, or not an image), a mask whose size differs from
            its image's, a mask value missing from
            ``classes``, duplicate file names, or no image at all.
    """
    _check_options(normal_test_ratio, max_normal, link, seed)
    image_paths, mask_paths = _listed(images, "--images"), _listed(masks, "--annotations")
    if Path(images).resolve() == Path(masks).resolve():  # masks beside their images: <stem>_mask, <stem>_label
        mask_paths = [p for p in mask_paths if p.stem.endswith(_MASK_SUFFIXES)]
        if not mask_paths:
            raise DataError(f"--annotations {masks} is the --images folder: its masks must be named "
                            "<stem>_mask.<ext> or <stem>_label.<ext> there (or give a folder of masks)")  # fmt: skip
    taken = {p.resolve() for p in mask_paths}
    image_paths = [p for p in image_paths if p.resolve() not in taken]  # a mask folder inside the image folder
    kept = {p.resolve() for p in image_paths}
    mask_paths = [p for p in mask_paths if p.resolve() not in kept]  # the image folder inside the mask folder
    mask_index: dict[tuple[str, ...], list[Path]] = {}  # x.png and x.tif share a key: both are kept
    for mask in mask_paths:
        rel = mask.relative_to(masks)
        mask_index.setdefault((*rel.parent.parts, rel.stem), []).append(mask)
    normals: list[Path] = []
    defects: list[_Defect] = []
    used: set[Path] = set()
    graded: list[Path] = []
    inverted: list[Path] = []  # defect along the whole border: a white background with black defects?
    maskless: list[Path] = []  # normal for want of a mask file (an empty mask says so explicitly)
    for image in image_paths:
        rel = image.relative_to(images)
        key = rel.parent.parts
        found = [m for suffix in (*_MASK_SUFFIXES, "") for m in mask_index.get((*key, f"{rel.stem}{suffix}"), [])]
        if len(found) > 1:  # x.png beside x_mask.png (or x.tif): which one is meant cannot be told
            raise DataError(f"{image}: {len(found)} masks match it ({', '.join(map(str, found))}); keep one")
        mask_path = found[0] if found else None
        if mask_path is not None:
            used.add(mask_path)
        values = _read_label_mask(mask_path) if mask_path is not None else None
        if values is None or not values.any():
            normals.append(image)
            if values is None:
                maskless.append(image)
            continue
        assert mask_path is not None  # values were read from it
        if classes is None and mask_level_count(values) > SOFT_MASK_LEVELS:
            graded.append(mask_path)
        if border_all_set(values):
            inverted.append(mask_path)
        size = _image_size(image)
        if (values.shape[1], values.shape[0]) != size:
            raise DataError(f"{mask_path}: mask size {values.shape[1]}x{values.shape[0]} differs from {image} {size}")
        if classes is None:
            defect_type = key[0] if key else "defect"
        else:
            counts = Counter(values[values > 0].tolist())
            unknown = sorted(set(counts) - set(classes))
            if unknown:
                raise DataError(f"{mask_path}: mask value(s) {unknown} not in --classes")
            defect_type = classes[counts.most_common(1)[0][0]]
        defects.append(_Defect(image, values > 0, defect_type))
    all_masks = {m for listed in mask_index.values() for m in listed}
    _check_masks_matched(sorted(all_masks - used), len(all_masks), Path(masks))
    if graded:
        log.warning("%d mask(s) have many levels (soft edges, or lossy JPEG noise): every pixel above 0 is taken as "
                    "defect, first: %s", len(graded), graded[0])  # fmt: skip
    if inverted:
        log.warning("%d mask(s) mark their whole border as defect: inverted (a white background)? Every pixel above 0 "
                    "is taken as defect, first: %s", len(inverted), inverted[0])  # fmt: skip
    defect_folders = {_sub_folder(d.image, images) for d in defects} - {None}
    unmasked = [p for p in maskless if _sub_folder(p, images) in defect_folders]
    if unmasked:  # no mask means normal; in a folder of defects that is worth a look
        log.warning("%d image(s) in folders of defects have no mask and are imported as normal, first: %s",
                    len(unmasked), unmasked[0])  # fmt: skip
    return _write_category(
        out,
        normals,
        defects,
        normal_test_ratio=normal_test_ratio,
        max_normal=max_normal,
        seed=seed,
        link=link,
        source={
            "format": "mask-folders",
            "images": os.path.abspath(images),
            "masks": os.path.abspath(masks),
            "classes": classes,
        },
        images_root=Path(images),
    )


def _sub_folder(path: Path, root: str | os.PathLike[str]) -> str | None:
    """The first sub-folder of ``root`` that ``path`` lies in; None directly in it."""
    parts = path.relative_to(root).parts
    return parts[0] if len(parts) > 1 else None


def _check_masks_matched(unmatched: list[Path], n_masks: int, masks: Path) -> None:
    """A mask that matches no image is a naming mismatch, and its image would be imported as a normal one."""
    if not unmatched:
        return
    rule = "a mask is named <stem>.<ext>, <stem>_mask.<ext> or <stem>_label.<ext> in the image's sub-folder"
    if len(unmatched) == n_masks:
        raise DataError(f"--annotations {masks}: none of its {n_masks} masks matches an image ({rule}), first: "
                        f"{unmatched[0]}")  # fmt: skip
    log.warning("%d of %d masks match no image (%s), first: %s", len(unmatched), n_masks, rule, unmatched[0])


def parse_classes(text: str) -> dict[int, str]:
    """Parse ``"1=inclusion,2=patches"`` into ``{1: "inclusion", 2: "patches"}``."""
    classes: dict[int, str] = {}
    for item in text.split(","):
        value, sep, name = item.partition("=")
        if not sep or not value.strip().isdigit() or not name.strip():
            raise DataError(f"--classes: expected VALUE=NAME[,VALUE=NAME...], got {text!r}")
        if int(value) in classes:
            raise DataError(f"--classes: value {int(value)} is given twice in {text!r}")
        classes[int(value)] = name.strip()
    return classes


def labelme_mask(shapes: list[Any], size: tuple[int, int], where: Path) -> NDArray[np.bool_]:
    """Union of labelme shapes as a boolean ``(H, W)`` mask; ``size`` is ``(W, H)``.

    Filled like labelme's own ``shape_to_mask`` (PIL, outline included), so masks match the tool's export; a
    rectangle is the box around its points, a ``mask`` shape (labelme 5.3+) its PNG pasted at its first point.
    A malformed shape is a DataError naming the file and the shape.
    """
    kinds = [_shape_kind(shape, f"{where}: shape {i + 1}") for i, shape in enumerate(shapes)]
    flat = sorted({kind for kind in kinds if kind in _FLAT_SHAPES})
    if all(kind in _FLAT_SHAPES for kind in kinds):
        raise DataError(f"{where}: only shapes without area ({', '.join(flat)}); supported: {', '.join(_AREA_SHAPES)}")
    if flat:
        log.warning("%s: shapes without area (%s) left out of the mask", where, ", ".join(flat))
    canvas = Image.new("L", size, 0)
    draw = ImageDraw.Draw(canvas)
    pasted = np.zeros((size[1], size[0]), dtype=bool)
    for i, (shape, kind) in enumerate(zip(shapes, kinds)):
        if kind in _FLAT_SHAPES:
            continue
        label = f"{where}: shape {i + 1} ({kind})"
        points = _shape_points(shape, label)
        if len(points) < {"polygon": 3, "rectangle": 2, "circle": 2, "mask": 1}[kind]:
            raise DataError(f"{label}: {len(points)} point(s)")
        if kind == "polygon":
            draw.polygon(points, fill=1, outline=1)
        elif kind == "rectangle":
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            draw.rectangle([min(xs), min(ys), max(xs), max(ys)], fill=1, outline=1)
        elif kind == "circle":
            (cx, cy), (px, py) = points[:2]
            r = float(np.hypot(px - cx, py - cy))
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1, outline=1)
        else:
            _paste(pasted, _shape_bitmap(shape, label), points[0])
    mask = np.asarray(canvas, dtype=bool) | pasted
    if not mask.any():
        raise DataError(f"{where}: the shapes cover no pixel of the {size[0]}x{size[1]} image")
    return mask


def _shape_kind(shape: Any, where: str) -> str:
    if not isinstance(shape, dict):
        raise DataError(f"{where}: not a labelme shape (an object with points), got {shape!r:.40}")
    kind = shape.get("shape_type") or "polygon"
    if kind not in _AREA_SHAPES + _FLAT_SHAPES:
        raise DataError(
            f"{where}: unsupported shape_type {kind!r}; labelme's: {', '.join(_AREA_SHAPES + _FLAT_SHAPES)}"
        )
    return str(kind)


def _shape_points(shape: dict[str, Any], where: str) -> list[tuple[float, float]]:
    try:
        points = [(float(x), float(y)) for x, y in shape.get("points") or []]
    except (TypeError, ValueError):
        raise DataError(f"{where}: points must be [x, y] pairs of numbers, got {shape.get('points')!r:.60}") from None
    if not all(np.isfinite(points).ravel()):
        raise DataError(f"{where}: a point is not finite")
    return points


def _shape_bitmap(shape: dict[str, Any], where: str) -> NDArray[np.bool_]:
    """The bitmap of a labelme ``mask`` shape: a base64 PNG covering the box from its first point."""
    try:
        with Image.open(io.BytesIO(base64.b64decode(str(shape.get("mask") or ""), validate=True))) as image:
            if image.width * image.height > MAX_PIXELS:
                raise DataError(f"{where}: its 'mask' of {image.width}x{image.height} px exceeds the "
                                f"{MAX_PIXELS / 1e6:.3g} MP limit; set ANOMALY_MAX_PIXELS to allow it")  # fmt: skip
            return np.asarray(image.convert("L")) > 0
    except DataError:
        raise
    except Image.DecompressionBombError:
        raise DataError(f"{where}: its 'mask' is far over the {MAX_PIXELS / 1e6:.3g} MP limit (a decompression "
                        "bomb?); set ANOMALY_MAX_PIXELS to allow it") from None  # fmt: skip
    except Exception:  # binascii.Error is a ValueError; Pillow raises SyntaxError, struct.error... on malformed data
        raise DataError(f"{where}: its 'mask' is not a base64-encoded image") from None


def _paste(into: NDArray[np.bool_], bitmap: NDArray[np.bool_], origin: tuple[float, float]) -> None:
    """OR ``bitmap`` into ``into`` with its top-left corner at ``origin`` (x, y), clipped to ``into``."""
    x, y = int(origin[0]), int(origin[1])
    h, w = into.shape
    top, left = max(0, y), max(0, x)
    bottom, right = min(h, y + bitmap.shape[0]), min(w, x + bitmap.shape[1])
    if bottom > top and right > left:
        into[top:bottom, left:right] |= bitmap[top - y : bottom - y, left - x : right - x]


def _defect_type(label: Any, where: str) -> str:
    """A shape's label as a defect folder name (lower case, spaces as ``_``), refused where it cannot be one."""
    name = label.strip().lower().replace(" ", "_") if isinstance(label, str) else ""
    if _bad_defect_type(name):
        raise DataError(f"{where}: label {label!r} cannot be a defect type (a folder name next to test/good)")
    return name


def _bad_defect_type(name: str) -> bool:
    """``..`` would write outside test/, ``.x`` be a folder the loaders skip as hidden, ``good`` be normal."""
    return not name or name == "good" or name.startswith(".") or "/" in name or "\\" in name


def _write_category(
    out: str | os.PathLike[str],
    normals: list[Path],
    defects: list[_Defect],
    *,
    normal_test_ratio: float,
    max_normal: int | None,
    seed: int,
    link: Link,
    source: dict[str, Any],
    images_root: Path,
) -> ImportSummary:
    """Split the normal images, link every image into place, write masks and the manifest."""
    if not normals and not defects:
        raise DataError("no image to import")
    bad = sorted({d.defect_type for d in defects if _bad_defect_type(d.defect_type)})
    if bad:
        raise DataError(f"defect type(s) {bad} cannot be folder names next to test/good")
    rng = np.random.default_rng(seed)
    if max_normal is not None and len(normals) > max_normal:
        normals = [normals[i] for i in sorted(rng.choice(len(normals), max_normal, replace=False))]
    for path in normals:  # defective images were measured against their masks already
        read_image_size(path)  # an empty, missing or non-image file: one error naming it, before anything is read whole
    held_out = _held_out(normals, round(len(normals) * normal_test_ratio), rng.permutation(len(normals)).tolist())
    train = [p for i, p in enumerate(normals) if i not in held_out]
    test_good = [p for i, p in enumerate(normals) if i in held_out]
    folders = [(p, Path("train", "good")) for p in train] + [(p, Path("test", "good")) for p in test_good]
    folders += [(d.image, Path("test", d.defect_type)) for d in defects]
    name = _output_names(folders, images_root)
    placed = [(p, folder / name[p]) for p, folder in folders]
    _check_unique([rel for _, rel in placed])
    target = Path(out)
    with staged_dir(target, IMPORT_MARKER, output=False, owned=("train", "test", "ground_truth", IMPORT_MARKER)) as tmp:
        for src, rel in placed:
            _place(src, tmp / rel, link)
        for d in defects:
            mask_file = tmp / "ground_truth" / d.defect_type / f"{Path(name[d.image]).stem}_mask.png"
            mask_file.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(d.mask.astype(np.uint8) * 255).save(mask_file)
        (tmp / "train" / "good").mkdir(parents=True, exist_ok=True)
        summary = ImportSummary(
            target, len(train), len(test_good), dict(sorted(Counter(d.defect_type for d in defects).items()))
        )
        manifest = {
            "source": source,
            "seed": seed,
            "normal_test_ratio": normal_test_ratio,
            "max_normal": max_normal,
            "link": link,
            "counts": {"train_good": summary.n_train, "test_good": summary.n_test_good, **summary.defects},
        }
        atomic_write_text(tmp / IMPORT_MARKER, json.dumps(manifest, indent=2))
    return summary


def _held_out(normals: list[Path], n_test: int, order: list[int]) -> set[int]:
    """Indices of the normal images for test/good: the first ``n_test`` of ``order``, byte-identical copies kept on
    one side of the split (a copy in train/good would vouch for its twin in test/good), so a share with copies may
    hold a few more or fewer (a set of copies goes in only where it brings the count nearer ``n_test``)."""
    groups: dict[str, list[int]] = {}
    for i, path in enumerate(normals):
        groups.setdefault(file_sha256(path), []).append(i)
    copies = sum(len(members) - 1 for members in groups.values())
    if copies:
        log.warning("%d normal image(s) are byte-identical copies of another: each set of copies stays on one side "
                    "of the train/test split", copies)  # fmt: skip
    group_of = {i: members for members in groups.values() for i in members}
    held_out: set[int] = set()
    for i in order:
        short = n_test - len(held_out)
        if short <= 0:
            break
        # a set of copies goes in when that brings the share nearer n_test: one set larger than it (9 copies
        # of 10 normal images, a 0.2 share) put every normal image in test/good, none left to fit on
        if i not in held_out and len(group_of[i]) - short <= short:
            held_out.update(group_of[i])
    return held_out


def _check_options(normal_test_ratio: float, max_normal: int | None, link: str, seed: int = 0) -> None:
    """The options, before any file is read."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:  # numpy's generators refuse it
        raise DataError(f"--seed must be a whole number >= 0, got {seed!r}")
    if not 0 <= normal_test_ratio <= 1:
        raise DataError(f"--normal-test-ratio must be in [0, 1], got {normal_test_ratio}")
    if max_normal is not None and max_normal < 1:
        raise DataError(f"--max-normal must be at least 1, got {max_normal}")
    if link not in ("symlink", "hardlink", "copy"):
        raise DataError(f"--link must be symlink, hardlink or copy, got {link!r}")


def _output_names(folders: list[tuple[Path, Path]], root: Path) -> dict[Path, str]:
    """Each image's file name in its category folder (``folders``: image and destination); names that repeat
    within one destination take their sub-folders of ``root`` as a prefix (KolektorSDD's ``kos01/Part0.jpg`` ->
    ``kos01_Part0.jpg``): the layout is flat."""
    count = Counter((folder, p.name) for p, folder in folders)
    return {p: "_".join(p.relative_to(root).parts) if count[folder, p.name] > 1 else p.name for p, folder in folders}


def _place(src: Path, dst: Path, link: Link) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        if link == "symlink":
            dst.symlink_to(src.resolve())
        elif link == "hardlink":
            dst.hardlink_to(src)
        else:
            shutil.copy2(src, dst)
    except OSError as exc:
        raise DataError(f"cannot {link} {src} -> {dst}: {exc.strerror or exc}") from None


def _check_unique(rels: list[Path]) -> None:
    """File names must be unique per output folder (MVTec layout is flat)."""
    dupes = [str(rel) for rel, n in Counter(rels).items() if n > 1]
    if dupes:
        raise DataError(f"{len(dupes)} output file name(s) occur twice, e.g. {dupes[0]}; rename the sources")
    stems = Counter((rel.parent, rel.stem) for rel in rels if rel.parts[1] != "good")
    clash = [f"{folder}/{stem}" for (folder, stem), n in stems.items() if n > 1]
    if clash:
        raise DataError(f"defective images share a file stem (their masks would clash): {clash[0]}")


def _walk_dir(folder: str | os.PathLike[str], option: str) -> list[Path]:
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"{option} {root}: folder not found")
    return sorted(
        p for p in root.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(root).parts)
    )


def _listed(folder: str | os.PathLike[str], option: str) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted)."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"{option} {root}: folder not found")
    paths = list_images([root], skip_imports=True)[0]  # an earlier import inside the folder (an --out there) left out
    if not paths:
        raise DataError(f"{option} {root}: no image found")
    return paths


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("shapes"), list):
        raise DataError(f"{path}: not a labelme file (no 'shapes' list)")
    return doc


def _image_size(path: Path) -> tuple[int, int]:
    """``(W, H)`` as the image is shown and read (EXIF-oriented: labelme draws on the displayed image)."""
    height, width = read_image_size(path)  # DataError naming the file when it cannot be read
    return width, height


def _read_label_mask(path: Path) -> NDArray[np.integer[Any]]:
    """Mask values ``(H, W)``, EXIF-oriented as images and evaluation read them; colour masks are reduced to their
    per-pixel maximum, palette masks keep their indices (the classes of a VOC-style mask)."""
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_PIXELS:
                raise DataError(f"{path}: a mask of {image.width}x{image.height} px exceeds the {MAX_PIXELS / 1e6:.3g} "
                                "MP limit; set ANOMALY_MAX_PIXELS to allow it")  # fmt: skip
            values = np.asarray(ImageOps.exif_transpose(image))
            has_alpha = image.mode in ("RGBA", "LA")
    except DataError:
        raise
    except Image.DecompressionBombError:  # Pillow's own check, before the size is known here: far over the limit
        raise DataError(f"{path}: a mask far over the {MAX_PIXELS / 1e6:.3g} MP limit (a decompression bomb?); set "
                        "ANOMALY_MAX_PIXELS to allow it") from None  # fmt: skip
    except Exception as exc:  # Pillow raises OSError, ValueError, SyntaxError, struct.error... on malformed files
        raise DataError(f"{path}: not a readable mask ({exc})") from None
    if not has_alpha:
        return values.max(axis=2) if values.ndim == 3 else values
    return drawn_levels(values[:, :, :-1].max(axis=2), values[:, :, -1])
