"""Build the dev-suite categories (issue 12) from clones of the public data sets; deterministic for a seed.

    git clone https://github.com/2Obe/BSData /tmp/src/bsdata
    git clone https://github.com/DHW-Master/NEU_Seg /tmp/src/neuseg
    git clone https://github.com/abin24/Magnetic-tile-defect-datasets. /tmp/src/mtd
    git clone https://github.com/174ww/GLASS-Anomaly-datasets /tmp/src/glass
    git clone https://github.com/songpeixuan22/Unet-Defect-Detection-in-kolektorSSD /tmp/src/kolektor  # KolektorSDD
    git clone https://github.com/LinirZamir/AnomalyDetection /tmp/src/transistor       # MVTec AD transistor
    git clone https://github.com/BupeshKumarR/defect-segmentation-for-mpdd /tmp/src/mpdd  # MPDD metal_plate
    git clone https://github.com/dungdao1995/SkipGanomaly-MVTECAD /tmp/src/screw         # MVTec AD screw
    git clone https://github.com/zae-bayern/elpv-dataset /tmp/src/elpv                  # ELPV solar cells
    git clone https://github.com/tangsanli5201/DeepPCB /tmp/src/deeppcb                 # DeepPCB (MIT)
    git clone https://github.com/endzju/BRUSH-DEFECT-DETECTION /tmp/src/toothbrush     # MVTec AD toothbrush
    python benchmarks/prepare_dev_suite.py --bsdata /tmp/src/bsdata --neu /tmp/src/neuseg --mtd /tmp/src/mtd \
        --glass /tmp/src/glass --kolektor /tmp/src/kolektor --transistor /tmp/src/transistor/data/transistor \
        --mpdd /tmp/src/mpdd --screw /tmp/src/screw/data/screw --elpv /tmp/src/elpv --deeppcb /tmp/src/deeppcb \
        --toothbrush /tmp/src/toothbrush/toothbrush --out /tmp/devsuite

Writes under --out (images are symlinks into the clones; nothing is copied):
  bsdata/          MVTec layout, BSData type-2 images (the only type with defect-free images): a seeded
                   --bsdata-normal of the trustworthy normal images, split 75/25 into train/good and test/good,
                   plus a seeded --bsdata-pitting of the pitting images in test/pitting.
                   "Trustworthy": a normal image taken after pitting was already labelled at the same position
                   (pitting does not heal) is treated as unlabelled pitting and left out.
  mtd/, mtd_dev/   Magnetic-tile defects (grayscale, 875 sizes from about 100 to 600 px), two disjoint halves:
                   mtd_dev for tuning, mtd held out for reporting. Each: a seeded --mtd-normal of MT_Free split
                   75/25 into train/good and test/good, every other image of each defect type in
                   test/{blowhole,break,crack,fray,uneven}; masks binarised at 128 (the published PNGs have
                   soft edges; a defect image left empty by that is dropped) and written under .staging.
  glass/           Glass panes (held out, never tuned on; 256x256 gray): the repository's test/good (its top-level
                   good/ holds the same 18 files) split 50/50 into train/good and test/good, plus test/{angle,edge}
                   with their ground_truth masks (chipped corners and edges).
  kolektor/        KolektorSDD (held out; 500 x about 1260 px gray commutator surfaces, aspect 2.5): its 348
                   defect-free images split 75/25 into train/good and test/good, the 52 with a crack in test/crack
                   (masks: the *_label.bmp files). Names are kosNN_PartK (every kos folder has Part0..Part7).
  transistor/      MVTec AD transistor as published (held out; an object category: link to the category folder).
  mpdd/            MPDD metal_plate as re-split and resized to 512 px by that repository (its data_supervised/
                   train, val and test pooled): images with an empty mask are normal, split 75/25 into train/good
                   and test/good; the others go to test/defect (the types were merged there). Reserved in round 8
                   as unseen data: not run by any round yet.
  mpdd_strips/     mpdd/ cut into three 512 x 170 horizontal strips per image (3:1, round 9's unseen check of
                   `resize: auto` on elongated real parts): every strip of a normal image is normal, strips of a
                   defective image with defect pixels go to test/defect with their mask strip, the others are dropped.
  screw/           MVTec AD screw (grayscale, 1024 px; round 12's unseen image-level check): that repository keeps
                   the complete category (320 / 41 / 119) but merged the five defect types into test/1 and
                   renamed clashing names, so its masks cannot be paired with images: train/good, test/good
                   (its test/0) and test/defect (its test/1), without ground_truth (image metrics only).
  elpv_mono/, elpv_poly/
                   ELPV electroluminescence images of solar cells (300x300 gray, CC BY-NC-SA 4.0; round 13's
                   unseen image-level check), one category per cell type: the cells its experts rated defect-free
                   (probability 0) split 75/25 into train/good and test/good, those rated surely defective
                   (probability 1) in test/defect; the 0.33 and 0.67 ratings are left out. No masks.
  deeppcb/         DeepPCB (MIT; round 15's unseen check): 640x640 binarised line-scan crops of printed circuit
                   boards, each a defect-free template with its aligned tested image holding 3-12 small defects
                   (open, short, mousebite, spur, spurious copper, pin hole; many drawn in by the authors). A
                   seeded --deeppcb-test pairs give test/good (their templates) and test/defect (their tested
                   images; masks: the union of the annotated boxes, written under ground_truth), the templates
                   of --deeppcb-train other pairs give train/good. A normal and a defective test image of one pair
                   differ only by the defects.
  toothbrush/      MVTec AD toothbrush (round 26's unseen check; 1024 px RGB, CC BY-NC-SA 4.0 per MVTec's readme
                   in that repository): the repository keeps train/good (60) and the 30 defective test images
                   with their masks, under train/defective, but not the 12 test/good images; its 60 good images
                   are split 80/20 (MVTec's own 48 + 12 counts) into train/good and test/good.
  neu/             NEU-Seg test split, test-only (no normal image exists): test/{inclusion,patches,scratches}.
  synth_texture/   synthetic stripes, 200x600 (H x W); synth_object/: synthetic disk, 384x512.
  contact_*.png    contact sheets of the BSData normal images used, for checking them by eye.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from anomaly.data.importers import import_labelme, import_mask_folders  # noqa: E402
from anomaly.data.synthetic import make_synthetic_category  # noqa: E402

NEU_CLASSES = {1: "inclusion", 2: "patches", 3: "scratches"}  # NEU-Seg convention (Dong et al., PGA-Net)
SYNTHETIC = {"synth_texture": ("texture", (200, 600)), "synth_object": ("object", (384, 512))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bsdata", type=Path, required=True, help="clone of github.com/2Obe/BSData")
    parser.add_argument("--neu", type=Path, help="clone of github.com/DHW-Master/NEU_Seg (optional)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/devsuite"))
    parser.add_argument("--mtd", type=Path, help="clone of github.com/abin24/Magnetic-tile-defect-datasets. (optional)")
    parser.add_argument("--glass", type=Path, help="clone of github.com/174ww/GLASS-Anomaly-datasets (optional)")
    parser.add_argument("--kolektor", type=Path, help="clone holding KolektorSDD's data/kosNN folders (optional)")
    parser.add_argument("--transistor", type=Path, help="MVTec AD transistor category folder (optional)")
    parser.add_argument("--mpdd", type=Path, help="clone holding data_supervised/metal_plate (optional)")
    parser.add_argument("--screw", type=Path, help="that clone's data/screw folder (optional)")
    parser.add_argument("--elpv", type=Path, help="clone of github.com/zae-bayern/elpv-dataset (optional)")
    parser.add_argument("--deeppcb", type=Path, help="clone of github.com/tangsanli5201/DeepPCB (optional)")
    parser.add_argument("--toothbrush", type=Path, help="that clone's toothbrush folder (optional)")
    parser.add_argument("--deeppcb-train", type=int, default=300, help="DeepPCB templates in train/good")
    parser.add_argument("--deeppcb-test", type=int, default=100, help="DeepPCB pairs in test/good + test/defect")
    parser.add_argument("--mtd-normal", type=int, default=320, help="MT_Free images used (75 %% train)")
    parser.add_argument("--bsdata-normal", type=int, default=320, help="normal images used (75 %% train)")
    parser.add_argument("--bsdata-pitting", type=int, default=325, help="pitting images used (test; 325 = all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    normals = _bsdata(args)
    _contact_sheets(normals, args.out)
    if args.mtd is not None:
        _mtd(args)
    if args.glass is not None:
        summary = import_mask_folders(
            args.glass / "test", args.glass / "ground_truth", args.out / "glass", normal_test_ratio=0.5, seed=args.seed
        )
        print(f"glass: train/good {summary.n_train}, test/good {summary.n_test_good}, defects {summary.defects}")
    if args.kolektor is not None:
        _kolektor(args.kolektor, args.out, args.seed)
    if args.transistor is not None:
        link = args.out / "transistor"
        if link.is_symlink():
            link.unlink()
        link.symlink_to(args.transistor.resolve())
        print(f"transistor: linked to {args.transistor}")
    if args.mpdd is not None:
        _mpdd(args.mpdd, args.out, args.seed)
        _strips(args.out / "mpdd", args.out / "mpdd_strips")
    if args.screw is not None:
        _link_folders(
            args.out / "screw",
            {
                "train/good": args.screw / "train" / "good",
                "test/good": args.screw / "test" / "0",
                "test/defect": args.screw / "test" / "1",
            },
        )
    if args.elpv is not None:
        _elpv(args.elpv / "src" / "elpv_dataset" / "data", args.out, args.seed)
    if args.deeppcb is not None:
        _deeppcb(args.deeppcb, args.out / "deeppcb", args.deeppcb_train, args.deeppcb_test, args.seed)
    if args.toothbrush is not None:
        summary = import_mask_folders(
            args.toothbrush / "train", args.toothbrush / "ground_truth", args.out / "toothbrush", seed=args.seed
        )
        print(f"toothbrush: train/good {summary.n_train}, test/good {summary.n_test_good}, defects {summary.defects}")
    if args.neu is not None:
        root = args.neu
        summary = import_mask_folders(
            root / "images" / "test", root / "annotations" / "test", args.out / "neu", classes=NEU_CLASSES
        )
        print(f"neu: test-only, defects {summary.defects}")
    for name, (kind, size) in SYNTHETIC.items():
        if not (args.out / name).is_dir():
            make_synthetic_category(
                args.out, name, n_train=60, n_test_good=20, n_test_defect=30, size=size, kind=kind, seed=args.seed
            )
        print(f"{name}: {kind} {size[0]}x{size[1]}")


def _link_folders(category: Path, links: dict[str, Path]) -> None:
    """An MVTec-layout category whose split folders are symlinks to existing image folders."""
    for name, target in links.items():
        link = category / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink():
            link.unlink()
        link.symlink_to(target.resolve(), target_is_directory=True)
    counts = {name: sum(1 for _ in (category / name).iterdir()) for name in links}
    print(f"{category.name}: {counts}")


def _bsdata(args: argparse.Namespace) -> list[Path]:
    """Stage the chosen BSData images and labels as symlinks, import them, return the normal images used."""
    src = args.bsdata
    records = json.loads((src / "image_data.json").read_text())["images"]
    first_pitting: dict[str, str] = {}
    for r in records:
        _, time, *position = r["filename"].split("_")
        if r["annotations"]:
            key = "_".join(position)
            first_pitting[key] = min(first_pitting.get(key, time), time)
    type2 = [r for r in records if r["type"] == 2]
    pitting = sorted(r["filename"] for r in type2 if r["annotations"])
    normal, dropped = [], 0
    for r in type2:
        if r["annotations"]:
            continue
        _, time, *position = r["filename"].split("_")
        if time > first_pitting.get("_".join(position), "z"):
            dropped += 1
        else:
            normal.append(r["filename"])
    normal.sort()
    rng = np.random.default_rng(args.seed)
    normal = [normal[i] for i in sorted(rng.choice(len(normal), min(args.bsdata_normal, len(normal)), replace=False))]
    pitting = [
        pitting[i] for i in sorted(rng.choice(len(pitting), min(args.bsdata_pitting, len(pitting)), replace=False))
    ]
    stage = args.out / ".staging" / "bsdata"
    for sub in ("images", "labels"):
        (stage / sub).mkdir(parents=True, exist_ok=True)
        for old in (stage / sub).iterdir():
            old.unlink()
    for name in normal + pitting:
        (stage / "images" / name).symlink_to((src / "data" / name).resolve())
    for name in pitting:
        label = Path(name).with_suffix(".json").name
        (stage / "labels" / label).symlink_to((src / "label" / label).resolve())
    summary = import_labelme(
        stage / "images", stage / "labels", args.out / "bsdata", normal_test_ratio=0.25, seed=args.seed
    )
    print(
        f"bsdata: {len(type2)} type-2 images; dropped {dropped} normal images taken after pitting was labelled at "
        f"their position; used {len(normal)} normal + {len(pitting)} pitting -> train/good {summary.n_train}, "
        f"test/good {summary.n_test_good}, test/pitting {summary.defects.get('pitting', 0)}"
    )
    return [src / "data" / n for n in normal]


def _mtd(args: argparse.Namespace) -> None:
    """Split the magnetic-tile images into two disjoint categories, ``mtd_dev`` (tuning) and ``mtd`` (held out).

    Each gets a seeded --mtd-normal of MT_Free (75/25 train/good, test/good) and every other defect image
    of each type; images stay symlinks, masks are binarised at 128 and written under .staging.
    """
    rng = np.random.default_rng(args.seed)
    halves: dict[str, dict[str, list[tuple[Path, NDArray[np.uint8]]]]] = {"mtd": {}, "mtd_dev": {}}
    skipped = 0
    for folder in sorted(args.mtd.glob("MT_*")):
        kind = folder.name.removeprefix("MT_").lower()
        kind = "good" if kind == "free" else kind
        images = sorted((folder / "Imgs").glob("*.jpg"))
        order = rng.permutation(len(images))
        if kind == "good":
            n = min(args.mtd_normal, len(images) // 2)
            picks = {"mtd": order[:n], "mtd_dev": order[n : 2 * n]}
        else:
            picks = {"mtd": order[0::2], "mtd_dev": order[1::2]}
        for name, indices in picks.items():
            for i in sorted(indices):
                with Image.open(images[i].with_suffix(".png")) as mask:
                    binary = (np.asarray(mask.convert("L")) >= 128).astype(np.uint8) * 255
                if kind != "good" and not binary.any():
                    skipped += 1  # only faint (< 128) labels: neither a usable defect nor a trustworthy normal
                    continue
                halves[name].setdefault(kind, []).append((images[i], binary))
    for name, kinds in halves.items():
        stage = args.out / ".staging" / name
        for old in sorted(stage.rglob("*"), reverse=True):
            old.rmdir() if old.is_dir() else old.unlink()
        for kind, items in kinds.items():
            (stage / "images" / kind).mkdir(parents=True)
            (stage / "masks" / kind).mkdir(parents=True)
            for image, binary in items:
                (stage / "images" / kind / image.name).symlink_to(image.resolve())
                Image.fromarray(binary).save(stage / "masks" / kind / image.with_suffix(".png").name)
        summary = import_mask_folders(
            stage / "images", stage / "masks", args.out / name, normal_test_ratio=0.25, seed=args.seed
        )
        print(f"{name}: train/good {summary.n_train}, test/good {summary.n_test_good}, defects {summary.defects}")
    print(f"mtd: {skipped} defect images left out (mask empty at 128)")


def _kolektor(src: Path, out: Path, seed: int) -> None:
    """KolektorSDD: each kosNN/PartK.jpg with its PartK_label.bmp, renamed kosNN_PartK (names repeat)."""
    pairs = []
    for image in sorted(src.glob("data/kos*/Part*.jpg")):
        name = f"{image.parent.name}_{image.stem}"
        pairs.append((image, f"{name}.jpg", image.with_name(f"{image.stem}_label.bmp"), f"{name}.bmp"))
    _import_pairs(pairs, out, "kolektor", "crack", seed)


def _elpv(src: Path, out: Path, seed: int) -> None:
    """ELPV: per cell type, probability-0 cells split 75/25 into train/good and test/good, probability-1 cells as
    test/defect (symlinks; ``labels.csv`` rows are ``images/cellNNNN.png probability type``)."""
    rows = [line.split() for line in (src / "labels.csv").read_text().splitlines() if line.strip()]
    rng = np.random.default_rng(seed)
    for cell_type in sorted({row[2] for row in rows}):
        normal = [src / row[0] for row in rows if row[2] == cell_type and float(row[1]) == 0.0]
        defect = [src / row[0] for row in rows if row[2] == cell_type and float(row[1]) == 1.0]
        order = rng.permutation(len(normal))
        n_test = round(0.25 * len(normal))
        folders = {
            "test/good": [normal[i] for i in sorted(order[:n_test])],
            "train/good": [normal[i] for i in sorted(order[n_test:])],
            "test/defect": defect,
        }
        category = out / f"elpv_{cell_type}"
        for folder, images in folders.items():
            target = category / folder
            target.mkdir(parents=True, exist_ok=True)
            for old in target.iterdir():
                old.unlink()
            for image in images:
                (target / image.name).symlink_to(image.resolve())
        counts = {folder: len(images) for folder, images in folders.items()}
        print(f"{category.name}: {counts}")


def _deeppcb(src: Path, out: Path, n_train: int, n_test: int, seed: int) -> None:
    """DeepPCB: template / tested pairs found by their annotation files (``x1 y1 x2 y2 type`` per defect, the
    separator a space or a comma), split by pair (see the module docstring)."""
    pairs = []
    for notes in sorted(src.glob("PCBData/group*/*_not/*.txt")):
        folder = notes.parent.with_name(notes.parent.name.removesuffix("_not"))
        template, tested = folder / f"{notes.stem}_temp.jpg", folder / f"{notes.stem}_test.jpg"
        if template.is_file() and tested.is_file():
            pairs.append((template, tested, notes))
    order = np.random.default_rng(seed).permutation(len(pairs))
    test, train = order[:n_test], order[n_test : n_test + n_train]
    for folder in ("train/good", "test/good", "test/defect", "ground_truth/defect"):
        (out / folder).mkdir(parents=True, exist_ok=True)
        for old in (out / folder).iterdir():
            old.unlink()
    for i in train:
        (out / "train/good" / pairs[i][0].name).symlink_to(pairs[i][0].resolve())
    for i in test:
        template, tested, notes = pairs[i]
        (out / "test/good" / template.name).symlink_to(template.resolve())
        (out / "test/defect" / tested.name).symlink_to(tested.resolve())
        width, height = Image.open(tested).size
        mask = np.zeros((height, width), dtype=np.uint8)
        for line in notes.read_text().splitlines():
            if line.strip():
                x1, y1, x2, y2 = (int(v) for v in line.replace(",", " ").split()[:4])
                mask[max(y1, 0) : y2 + 1, max(x1, 0) : x2 + 1] = 255
        Image.fromarray(mask).save(out / "ground_truth/defect" / f"{tested.stem}_mask.png")
    print(f"deeppcb: train/good {len(train)}, test/good {len(test)}, test/defect {len(test)} (of {len(pairs)} pairs)")


def _mpdd(src: Path, out: Path, seed: int) -> None:
    """MPDD metal_plate: the repository's train, val and test splits pooled (masks share the images' names)."""
    images = sorted(src.glob("data_supervised/metal_plate/*/images/*.png"))
    pairs = [(p, p.name, p.parent.parent / "masks" / p.name, p.name) for p in images]
    _import_pairs(pairs, out, "mpdd", "defect", seed)


def _strips(src: Path, out: Path, n: int = 3) -> None:
    """An MVTec-layout category cut into ``n`` horizontal strips per image (see the module docstring)."""
    counts: dict[str, int] = {}
    for image in sorted(src.glob("t*/*/*.png")):
        split, kind = image.parent.parent.name, image.parent.name
        pixels = np.asarray(Image.open(image))
        mask = None
        if kind != "good":
            mask = np.asarray(Image.open(src / "ground_truth" / kind / f"{image.stem}_mask.png")) > 0
        step = pixels.shape[0] // n
        for i in range(n):
            rows = slice(i * step, (i + 1) * step)
            if mask is not None and not mask[rows].any():
                continue  # a defective part's strip without defect pixels: neither normal nor labelled
            name = f"{image.stem}_{i}"
            (out / split / kind).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels[rows]).save(out / split / kind / f"{name}.png")
            if mask is not None:
                truth = out / "ground_truth" / kind
                truth.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask[rows].astype(np.uint8) * 255).save(truth / f"{name}_mask.png")
            counts[f"{split}/{kind}"] = counts.get(f"{split}/{kind}", 0) + 1
    print(f"{out.name}: {counts}")


def _import_pairs(pairs: list[tuple[Path, str, Path, str]], out: Path, name: str, kind: str, seed: int) -> None:
    """Stage (image, image name, mask, mask name) as symlinks under one defect folder and import them.

    An empty mask makes its image normal; normal images are split 75/25 into train/good and test/good.
    """
    stage = out / ".staging" / name
    for sub in ("images", "masks"):
        (stage / sub / kind).mkdir(parents=True, exist_ok=True)
        for old in (stage / sub / kind).iterdir():
            old.unlink()
    for image, image_name, mask, mask_name in pairs:
        (stage / "images" / kind / image_name).symlink_to(image.resolve())
        (stage / "masks" / kind / mask_name).symlink_to(mask.resolve())
    summary = import_mask_folders(stage / "images", stage / "masks", out / name, normal_test_ratio=0.25, seed=seed)
    print(f"{name}: train/good {summary.n_train}, test/good {summary.n_test_good}, defects {summary.defects}")


def _contact_sheets(paths: list[Path], out: Path, cols: int = 3, rows: int = 8, width: int = 560) -> None:
    """Sheets of ``cols x rows`` thumbnails (``width`` px wide each), numbered contact_00.png, ..."""
    per = cols * rows
    for sheet in range(math.ceil(len(paths) / per)):
        thumbs = []
        for p in paths[sheet * per : (sheet + 1) * per]:
            with Image.open(p) as im:
                thumbs.append(im.convert("RGB").resize((width, round(im.height * width / im.width))))
        height = max(t.height for t in thumbs)
        canvas = Image.new("RGB", (cols * width, rows * height), "black")
        for i, t in enumerate(thumbs):
            canvas.paste(t, ((i % cols) * width, (i // cols) * height))
        canvas.save(out / f"contact_{sheet:02d}.png")


if __name__ == "__main__":
    main()
