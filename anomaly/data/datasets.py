"""Dataset loaders: MVTec AD layout, VisA original layout, and plain folders.

Loaders only list files; they return :class:`CategoryData` with sorted, validated :class:`Sample` lists and
raise :class:`~anomaly.errors.DataError` for any layout problem, naming the offending path.
"""

from __future__ import annotations

import csv
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from anomaly.data.io import is_image_file, list_images
from anomaly.errors import DataError

__all__ = [
    "CategoryData",
    "Sample",
    "find_categories",
    "has_training_images",
    "has_visa_split",
    "is_category_root",
    "load_folder",
    "load_ground_truth",
    "load_mvtec",
    "load_visa",
    "visa_trained_categories",
    "labelled_split_dirs",
]

log = logging.getLogger(__name__)
Split = Literal["train", "test"]
_VISA_SPLIT_CSV = Path("split_csv", "1cls.csv")
_VISA_COLUMNS = ("object", "split", "label", "image", "mask")
_VISA_LABELS = {"normal": 0, "anomaly": 1}


@dataclass(frozen=True, slots=True)
class Sample:
    """One image of a dataset.

    Attributes:
        image_path: Image file.
        mask_path: Ground-truth mask file, or a folder of mask files whose union is the mask (MVTec LOCO's
            ``ground_truth/<type>/<stem>/``); ``None`` for normal images (and unannotated folder datasets).
        label: 0 normal, 1 anomalous.
        defect_type: ``"good"`` for normal images, otherwise the defect folder name (``"bad"`` for VisA).
        split: ``"train"`` or ``"test"``; training samples are always normal.
    """

    image_path: Path
    mask_path: Path | None
    label: int
    defect_type: str
    split: Split

    def __post_init__(self) -> None:
        if self.label not in (0, 1):
            raise ValueError(f"label must be 0 or 1, got {self.label!r} for {self.image_path}")
        if self.split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {self.split!r} for {self.image_path}")
        if self.split == "train" and self.label != 0:
            raise ValueError(f"training samples must be normal: {self.image_path}")


@dataclass(frozen=True)
class CategoryData:
    """The samples of one dataset category.

    Attributes:
        name: Category name (``"bottle"``).
        root: Category folder.
        train: Normal training samples, sorted.
        test: Test samples (normal and anomalous), sorted by defect type then path.
    """

    name: str
    root: Path
    train: list[Sample]
    test: list[Sample]

    @property
    def test_normal(self) -> list[Sample]:
        """Normal test samples."""
        return [s for s in self.test if s.label == 0]

    @property
    def test_anomalous(self) -> list[Sample]:
        """Anomalous test samples."""
        return [s for s in self.test if s.label == 1]

    @property
    def defect_types(self) -> list[str]:
        """Sorted defect types of the anomalous test samples (``"good"`` excluded)."""
        return sorted({s.defect_type for s in self.test_anomalous})

    def match_test(self, paths: list[str], where: str) -> list[Sample]:
        """The test sample of each scored path, matched on (defect folder, file name) so that a copy of the split
        elsewhere, or a path of another machine, still matches, else on (defect folder, stem) where one test image
        has that stem (a copy re-encoded to another format); DataError naming ``where`` for a path that is none.
        """
        by_name = {(s.defect_type, s.image_path.name): s for s in self.test}
        stems = Counter((s.defect_type, s.image_path.stem) for s in self.test)
        by_stem = {key: s for s in self.test if stems[key := (s.defect_type, s.image_path.stem)] == 1}
        matched = []
        for text in paths:
            path = Path(text)
            folder = "good" if path.parent.name.lower() == "good" else path.parent.name  # test/Good/: as loaded
            sample = by_name.get((folder, path.name)) or by_stem.get((folder, path.stem))
            if sample is None:
                raise DataError(f"{where}: {text} is not a test image of {self.root}")
            matched.append(sample)
        return matched

    def summary(self) -> dict[str, Any]:
        """JSON-safe counts: images per split and label, masks, and test images per defect type."""
        return {
            "name": self.name,
            "root": str(self.root),
            "n_train": len(self.train),
            "n_test": len(self.test),
            "n_test_normal": len(self.test_normal),
            "n_test_anomalous": len(self.test_anomalous),
            "n_masks": sum(s.mask_path is not None for s in self.test),
            "defect_types": dict(sorted(Counter(s.defect_type for s in self.test_anomalous).items())),
        }


def has_visa_split(root: str | os.PathLike[str]) -> bool:
    """Tell whether ``root`` is a VisA root as published: it holds ``split_csv/1cls.csv``."""
    return (Path(root) / _VISA_SPLIT_CSV).is_file()


def is_category_root(path: str | os.PathLike[str]) -> bool:
    """Tell whether ``path`` is an MVTec-layout category folder, i.e. it has ``train/good``."""
    return Path(path, "train", "good").is_dir()


def load_mvtec(category_root: str | os.PathLike[str]) -> CategoryData:
    """Load a category in MVTec AD layout.

    Layout: ``train/good/*``, ``test/<defect>/*`` (``good`` = normal) and ``ground_truth/<defect>/<stem>_mask.png``
    (MVTec AD 2: ``test_public/<defect>/*`` and ``test_public/ground_truth/<defect>/``).
    Masks named ``<stem>.png`` (VisA converted to MVTec layout) and folders ``ground_truth/<defect>/<stem>/`` of
    masks (MVTec LOCO: their union) are accepted too. A category without any mask loads with image labels alone
    (``mask_path`` None: image metrics only).

    Args:
        category_root: Category folder, e.g. ``.../mvtec_ad/bottle``.

    Returns:
        The category; its name is the folder name.

    Raises:
        DataError: No ``train/good`` or ``test`` folder, no training or test image, or masks for some
            defective images but not for others.
    """
    root = Path(category_root)
    if not is_category_root(root):
        raise DataError(f"not an MVTec-layout category folder (no train/good): {root}")
    # recursive, as `anomaly fit CATEGORY` reads it (a fit and a benchmark of one category learn the same images)
    train = [Sample(p, None, 0, "good", "train") for p in _training_images(root)]
    if not train:
        raise DataError(f"no training image in {root / 'train' / 'good'}")
    return CategoryData(root.name, root, train, _test_samples(root))


def load_ground_truth(category_root: str | os.PathLike[str]) -> CategoryData:
    """Load only the test split of an MVTec-layout category: what evaluation needs.

    Unlike :func:`load_mvtec`, ``train/good`` may be missing (a test-only set scored zero-shot), and a set
    without any ``ground_truth`` mask loads with image labels alone (``mask_path`` None: image metrics only).

    Raises:
        DataError: No ``test`` folder or test image, or masks for some defective images but not for others.
    """
    root = Path(category_root)
    return CategoryData(root.name, root, [], _test_samples(root))


def _test_samples(root: Path) -> list[Sample]:
    """``test/<defect>/*`` samples with their ground-truth masks (every defective image's, or none at all)."""
    test_dir, truth_dir = labelled_split_dirs(root)
    if not test_dir.is_dir():
        raise DataError(f"no test folder in category: {root} (the MVTec layout: test/<type>/, ground_truth/<type>/)"
                        f"{_category_hint(root)}")  # fmt: skip
    test: list[Sample] = []
    unmasked: list[Path] = []
    for defect_dir in sorted(d for d in test_dir.iterdir() if d.is_dir() and not d.name.startswith(".")):
        defect = defect_dir.name
        if defect_dir == truth_dir:
            continue
        images = _images_in(defect_dir)
        if defect.lower() == "good":  # test/Good/ too: taken as a defect type, its normal images counted as defects
            test.extend(Sample(p, None, 0, "good", "test") for p in images)
            continue
        mask_dir = truth_dir / defect
        masks = _mask_index(mask_dir) if mask_dir.is_dir() else {}
        found = 0
        for image in images:
            mask = masks.get((f"{image.stem}_mask",)) or masks.get((image.stem,))
            if mask is None and (mask_dir / image.stem).is_dir() and _images_in(mask_dir / image.stem):
                mask = mask_dir / image.stem  # MVTec LOCO: one mask per defect region, read as their union
            if mask is None:
                unmasked.append(image)
            found += mask is not None
            test.append(Sample(image, mask, 1, defect, "test"))
        if masks and images and not found:  # masks there, none of them named for this folder's images
            raise DataError(
                f"{mask_dir}: none of its {len(masks)} masks matches an image of {defect_dir} (expected "
                f"<stem>_mask.png, <stem>.png or a folder <stem>/ of masks, e.g. {images[0].stem}_mask.png), first: "
                f"{next(iter(masks.values())).relative_to(mask_dir)}"
            )
    if not test:
        raise DataError(f"no test image in {test_dir}")
    if unmasked and any(s.mask_path is not None for s in test):  # masks for some defects but not all
        raise _no_mask(root, unmasked)
    return test


def labelled_split_dirs(root: Path) -> tuple[Path, Path]:
    """The labelled test split of a category and its masks' folder: ``test/`` and ``ground_truth/``, or for MVTec
    AD 2 (no ``test/``) ``test_public/`` and the ``ground_truth/`` inside it."""
    if not (root / "test").is_dir() and (root / "test_public").is_dir():
        return root / "test_public", root / "test_public" / "ground_truth"
    return root / "test", root / "ground_truth"


def _no_mask(root: Path, unmasked: list[Path]) -> DataError:
    """The first defective image without a mask, and how many more have none (all are to be mended, not one a run)."""
    image = unmasked[0]
    expected = labelled_split_dirs(root)[1] / image.parent.name / f"{image.stem}_mask.png"
    more = f"; {len(unmasked) - 1} more defective image(s) have no mask" if len(unmasked) > 1 else ""
    return DataError(f"no mask for defective image {image} (expected {expected}){more}")


def load_visa(root: str | os.PathLike[str], category: str, *, require_train: bool = True) -> CategoryData:
    """Load a VisA category.

    Original layout: ``<root>/<category>/Data/Images/{Normal,Anomaly}/*.JPG``, ``.../Data/Masks/Anomaly/*.png``
    and the split file ``<root>/split_csv/1cls.csv`` (columns ``object,split,label,image,mask``; labels
    ``normal``/``anomaly``; paths relative to ``root``). Anomalous images get the defect type ``"bad"``. Without
    a split file, a category converted to MVTec layout (``<root>/<category>/train/good``) is loaded with
    :func:`load_mvtec`.

    Args:
        root: VisA root folder (holding ``split_csv`` and one folder per category).
        category: Category name, e.g. ``"candle"``.
        require_train: False accepts a category without training rows (its test rows alone, for zero-shot
            scoring and evaluation).

    Returns:
        The category.

    Raises:
        DataError: Missing split file or category, a malformed row, an anomalous training image, or a listed
            image or mask that does not exist.
    """
    root = Path(root)
    csv_path = root / _VISA_SPLIT_CSV
    if not csv_path.is_file():
        if is_category_root(root / category):
            return load_mvtec(root / category)
        hint = ""
        if (root.parent / _VISA_SPLIT_CSV).is_file():  # --root at the category, not the dataset
            hint = f"; {root.parent} holds the split file: --root {root.parent} --category {root.name}"
        raise DataError(
            f"VisA split file not found: {csv_path} (and {root / category} is not in MVTec layout either){hint}"
        )
    rows, objects = _read_visa_csv(csv_path, category)
    if not rows:
        raise DataError(f"category {category!r} not in {csv_path}; available: {', '.join(sorted(objects))}")
    train: list[Sample] = []
    test: list[Sample] = []
    listed: dict[Path, int] = {}  # image -> its line
    masked_normal: list[int] = []  # lines of normal images with a mask cell
    for line, row in rows:
        where = f"{csv_path}, line {line}"
        split, label_name = row["split"].strip().lower(), row["label"].strip().lower()
        if split not in ("train", "test"):
            raise DataError(f"{where}: split must be 'train' or 'test', got {split!r}")
        if label_name not in _VISA_LABELS:
            raise DataError(f"{where}: label must be 'normal' or 'anomaly', got {label_name!r}")
        label = _VISA_LABELS[label_name]
        if split == "train" and label:
            raise DataError(f"{where}: anomalous image in the training split")
        image = root / _relative(row["image"])
        if not image.is_file():
            raise DataError(f"{where}: image not found: {image}")
        if image in listed:  # a test image learnt by the fit, or counted twice by the metrics
            raise DataError(f"{where}: {image} is listed again (first on line {listed[image]})")
        listed[image] = line
        mask = None
        if not label and row["mask"].strip():
            masked_normal.append(line)
        if label:
            if not row["mask"].strip():
                raise DataError(f"{where}: anomalous image without mask: {image}")
            mask = root / _relative(row["mask"])
            if not mask.is_file():
                raise DataError(f"{where}: mask not found: {mask}")
        if split == "train":
            train.append(Sample(image, None, 0, "good", "train"))
        else:
            test.append(Sample(image, mask, label, "bad" if label else "good", "test"))
    if masked_normal:
        log.warning("%s, line %d: a normal image with a mask (%d such line(s)): mislabelled? The mask is not used",
                    csv_path, masked_normal[0], len(masked_normal))  # fmt: skip
    if (require_train and not train) or not test:
        raise DataError(f"category {category!r} in {csv_path} has no {'test' if not test else 'train'} image")
    train.sort(key=lambda s: s.image_path.parts)
    test.sort(key=lambda s: (s.defect_type, s.image_path.parts))
    return CategoryData(category, root / category, train, test)


def load_folder(
    normal_dir: str | os.PathLike[str],
    defect_dirs: list[str | os.PathLike[str]],
    mask_dirs: list[str | os.PathLike[str]] | None = None,
    *,
    normal_test_dir: str | os.PathLike[str] | None = None,
    normal_test_ratio: float = 0.2,
    seed: int = 0,
) -> CategoryData:
    """Load a dataset made of plain folders.

    Folders are searched recursively. A defect image's mask is found in the matching mask folder at the same
    relative sub-folder, named ``<stem>_mask.<ext>`` or ``<stem>.<ext>``; without mask folders, files named
    ``<stem>_mask.<ext>`` beside a defect folder's images are its masks (never scored). Normal test images come from
    ``normal_test_dir`` or, without it, from a seeded random split of ``normal_dir``.

    Args:
        normal_dir: Normal images.
        defect_dirs: Anomalous images, one folder per defect type (the folder name is the type).
        mask_dirs: Masks, one folder per entry of ``defect_dirs``; ``None`` for an unannotated dataset.
        normal_test_dir: Normal test images; when given, all of ``normal_dir`` is used for training.
        normal_test_ratio: Fraction of ``normal_dir`` held out for testing when ``normal_test_dir`` is None.
        seed: Seed of that split.

    Returns:
        The dataset, named after the deepest folder that holds all the given folders.

    Raises:
        DataError: A folder is missing or holds no image, ``mask_dirs`` does not match ``defect_dirs``, a mask
            is missing, or an image is both normal and defective.
        ValueError: ``normal_test_ratio`` is not in ``[0, 1)``.
    """
    if not 0 <= normal_test_ratio < 1:
        raise ValueError(f"normal_test_ratio must be in [0, 1), got {normal_test_ratio}")
    if not defect_dirs:
        raise DataError("a folder dataset needs at least one defect folder")
    if mask_dirs is not None and len(mask_dirs) != len(defect_dirs):
        raise DataError(f"got {len(mask_dirs)} mask folders for {len(defect_dirs)} defect folders")
    normals = list_images([normal_dir])[0]
    if normal_test_dir is not None:
        train_paths, test_paths = normals, list_images([normal_test_dir])[0]
    else:
        n_test = round(len(normals) * normal_test_ratio)
        held_out = set(np.random.default_rng(seed).permutation(len(normals))[:n_test].tolist())
        train_paths = [p for i, p in enumerate(normals) if i not in held_out]
        test_paths = [p for i, p in enumerate(normals) if i in held_out]
    if not train_paths:
        raise DataError(f"no normal image left for training in {normal_dir}")
    normal_files = {p.resolve() for p in normals + test_paths}
    test = [Sample(p, None, 0, "good", "test") for p in test_paths]
    masks_for: list[str | os.PathLike[str] | None] = (
        [*mask_dirs] if mask_dirs is not None else [None] * len(defect_dirs)
    )
    for defect_dir, mask_dir in zip(map(Path, defect_dirs), masks_for, strict=True):
        masks = _mask_index(Path(mask_dir)) if mask_dir is not None else None
        images: list[Path] = []
        inline: list[Path] = []
        for file in list_images([defect_dir])[0]:
            (inline if file.stem.endswith("_mask") else images).append(file)
        if inline and masks is None:  # masks kept beside their images: <stem>_mask.<ext>
            masks = {(*p.relative_to(defect_dir).parent.parts, p.stem): p for p in inline}
            mask_dir = defect_dir
        elif inline:
            log.warning(
                "%s: %d file(s) named <stem>_mask beside the images are neither scored nor read as masks (the masks "
                "are read from %s), first: %s", defect_dir, len(inline), mask_dir, inline[0],
            )  # fmt: skip
        for image in images:
            if image.resolve() in normal_files:
                raise DataError(f"image is listed both as normal and as defective: {image}")
            mask = None
            if masks is not None:
                rel = image.relative_to(defect_dir)
                key = rel.parent.parts
                mask = masks.get((*key, f"{rel.stem}_mask")) or masks.get((*key, rel.stem))
                if mask is None:
                    raise DataError(f"no mask for defective image {image} in {mask_dir}")
            test.append(Sample(image, mask, 1, defect_dir.name, "test"))
    dirs = [normal_dir, *defect_dirs, *([normal_test_dir] if normal_test_dir is not None else [])]
    root = Path(os.path.commonpath([Path(d).resolve() for d in dirs]))
    train = [Sample(p, None, 0, "good", "train") for p in train_paths]
    test.sort(key=lambda s: (s.defect_type, s.image_path.parts))
    return CategoryData(root.name, root, train, test)


def find_categories(root: str | os.PathLike[str], dataset: Literal["mvtec", "visa"]) -> list[str]:
    """List the categories of a dataset root.

    Args:
        root: Dataset root (``.../mvtec_ad`` or the VisA root).
        dataset: ``"mvtec"``: sub-folders with ``train/good``. ``"visa"``: the objects of
            ``split_csv/1cls.csv``, or without it the sub-folders in MVTec layout (converted VisA).

    Returns:
        Sorted category names.

    Raises:
        DataError: ``root`` is not a folder or holds no category.
        ValueError: Unknown ``dataset``.
    """
    if dataset not in ("mvtec", "visa"):
        raise ValueError(f"dataset must be 'mvtec' or 'visa', got {dataset!r}")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset root not found: {root}")
    csv_path = root / _VISA_SPLIT_CSV
    if dataset == "visa" and csv_path.is_file():
        categories = sorted(_read_visa_csv(csv_path, None)[1])
    else:
        categories = sorted(d.name for d in root.iterdir() if not d.name.startswith(".") and is_category_root(d))
    if not categories:
        raise DataError(f"no {dataset} category found in {root}{_root_hint(root, dataset)}")
    return categories


def _category_hint(root: Path) -> str:
    """What a folder given as a category is instead: a folder inside a category (its test/ or one defect type's), a
    dataset root, or a VisA category in its original layout."""
    folder = Path(os.path.abspath(root))
    for above in folder.parents[:2] if root.is_dir() else ():
        split, masks = labelled_split_dirs(above)
        if split.is_dir() and any(d in (folder, folder.parent) for d in (split, masks)):
            return f"; a folder inside the category {above}: give that"
    if (root / "Data" / "Images").is_dir():
        return "; a VisA category as published: benchmark it with --dataset visa, or convert it to the MVTec layout"
    if root.is_dir():
        inside = sorted(d.name for d in root.iterdir() if d.is_dir() and is_category_root(d))
        if inside:
            return f"; a dataset root: give one of its categories, e.g. {root / inside[0]}"
    return ""


def _root_hint(root: Path, dataset: str) -> str:
    """Where the categories of a root that holds none probably are: VisA's split file, or a folder one level down."""
    if dataset == "mvtec" and (root / _VISA_SPLIT_CSV).is_file():
        return f" (it holds {_VISA_SPLIT_CSV.as_posix()}: use --dataset visa)"
    if dataset == "visa" and (root.parent / _VISA_SPLIT_CSV).is_file():
        return f" ({root.parent} holds the split file: --root {root.parent} --category {root.name})"
    for sub in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
        if any(is_category_root(d) for d in sub.iterdir() if d.is_dir()):
            return f" (categories found under {sub}: give it as --root)"
    if is_category_root(root):
        return f" ({root} is itself a category: --root {root.parent} --category {root.name})"
    if dataset == "mvtec":
        tested = sorted(
            d.name
            for d in root.iterdir()
            if d.is_dir() and not d.name.startswith(".") and labelled_split_dirs(d)[0].is_dir()
        )
        if tested:
            return (f" ({', '.join(tested[:3])}: a test split without training images in train/good; a zero-shot "
                    "config, e.g. --config musc, runs them)")  # fmt: skip
    return ""


def has_training_images(category_root: str | os.PathLike[str]) -> bool:
    """Whether a category's ``train/good`` holds an image at any depth, as :func:`load_mvtec` reads it."""
    return bool(_training_images(Path(category_root)))


def _training_images(root: Path) -> list[Path]:
    """``train/good``'s images as a fit lists that folder (:func:`~anomaly.data.io.list_images`: recursive, sorted,
    hidden folders skipped); empty when it holds none."""
    try:
        return list_images([root / "train" / "good"])[0]
    except DataError:  # no image there
        return []


def _images_in(folder: Path) -> list[Path]:
    """Non-hidden image files directly in ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_file() and is_image_file(p))


def _mask_index(mask_dir: Path) -> dict[tuple[str, ...], Path]:
    """Map ``(*relative sub-folders, stem)`` to each mask under ``mask_dir``; empty for a folder without any."""
    try:
        masks = list_images([mask_dir])[0]
    except DataError:
        if mask_dir.is_dir():  # empty, or .DS_Store alone: no mask (a missing one is named by its image)
            return {}
        raise
    index: dict[tuple[str, ...], Path] = {}
    for mask in masks:
        rel = mask.relative_to(mask_dir)
        index.setdefault((*rel.parent.parts, rel.stem), mask)
    return index


def _relative(cell: str) -> str:
    """A split file's path cell as a POSIX relative path (files written on Windows use backslashes)."""
    return cell.strip().replace("\\", "/")


def _text_encoding(path: Path) -> str:
    """The encoding of a split file: UTF-16 when it starts with that byte-order mark (a spreadsheet's "Unicode
    text"), else UTF-8 (with or without BOM); anything else is one error line naming the file."""
    with path.open("rb") as f:
        head = f.read()
    if head[:4] in (b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff"):
        return "utf-32"
    if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return "utf-16"
    try:
        head.decode("utf-8-sig")
        if b"\x00" in head:  # UTF-16 or UTF-32 without a byte-order mark
            raise UnicodeDecodeError("utf-8", head, head.index(b"\x00"), head.index(b"\x00") + 1, "NUL byte")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}); save it as CSV UTF-8") from None
    return "utf-8-sig"


def visa_trained_categories(root: str | os.PathLike[str]) -> set[str]:
    """The objects of a VisA split file with at least one training row."""
    rows, _ = _read_visa_csv(Path(root) / _VISA_SPLIT_CSV, None)
    return {row["object"].strip() for _, row in rows if row["split"].strip().lower() == "train"}


def _read_visa_csv(csv_path: Path, category: str | None) -> tuple[list[tuple[int, dict[str, str]]], set[str]]:
    """Read the split file: ``(line number, row)`` pairs of ``category`` (all if None) and all object names."""
    with csv_path.open(newline="", encoding=_text_encoding(csv_path)) as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is not None:  # "object, split, ..." as a spreadsheet may write it
            reader.fieldnames = [name.strip().lower() for name in reader.fieldnames]
        missing = [c for c in _VISA_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{csv_path}: missing column(s) {', '.join(missing)}; expected {','.join(_VISA_COLUMNS)}")
        rows: list[tuple[int, dict[str, str]]] = []
        objects: set[str] = set()
        for row in reader:
            if not any((value or "").strip() for value in row.values() if isinstance(value, str)):
                continue  # an empty row (",,,,"), as spreadsheets and pandas leave at the end
            name = (row["object"] or "").strip()
            if not name:  # read as a category '': a run of its own, written into the benchmark's --out itself
                raise DataError(f"{csv_path}, line {reader.line_num}: no object (category) named")
            if name in (".", "..") or "/" in name or "\\" in name:  # a path: its outputs would land outside --out
                raise DataError(f"{csv_path}, line {reader.line_num}: object {name!r} is not a category folder name")
            objects.add(name)
            if category is None or name == category:
                rows.append((reader.line_num, {k: row[k] or "" for k in _VISA_COLUMNS}))
    return rows, objects
