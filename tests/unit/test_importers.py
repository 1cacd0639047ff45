from __future__ import annotations

import base64
import io
import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from anomaly.cli import app
from anomaly.data import load_mvtec, read_mask
from anomaly.data.importers import import_labelme, import_mask_folders
from anomaly.data.io import list_images
from anomaly.errors import DataError

W, H = 20, 16


def _image(path: Path, size: tuple[int, int] = (W, H)) -> Path:
    """A gray image whose first pixels spell its name's CRC: photos are never byte-identical copies of each other."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, (90, 90, 90))
    image.putpixel((0, 0), tuple(zlib.crc32(path.name.encode()).to_bytes(4, "big")[:3]))
    image.save(path)
    return path


def _labelme(path: Path, image: str, shapes: list[dict], size: tuple[int, int] = (W, H)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"shapes": shapes, "imagePath": f"..\\data\\{image}", "imageWidth": size[0], "imageHeight": size[1]}
    path.write_text(json.dumps(doc))


def _poly(points: list[list[Any]], label: str | None = "Pitting", kind: str = "polygon") -> dict:
    return {"label": label, "points": points, "shape_type": kind}


@pytest.fixture
def labelme_src(tmp_path: Path) -> Path:
    for i in range(10):
        _image(tmp_path / "data" / f"n{i}.jpg")
    for name in ("a.png", "b.png", "c.png"):
        _image(tmp_path / "data" / name)
    rect = [[2, 3], [11, 3], [11, 8], [2, 8]]  # outline included: 10 x 6 = 60 pixels
    _labelme(tmp_path / "label" / "a.json", "a.png", [_poly(rect)])
    triangle = [[0, 0], [10, 0], [0, 10]]  # x + y <= 10: 66 pixels
    box = _poly([[15, 10], [18, 12]], "Dent Mark", "rectangle")  # 4 x 3 = 12 pixels
    _labelme(tmp_path / "label" / "b.json", "b.png", [_poly(triangle, "dent mark"), box])
    _labelme(tmp_path / "label" / "c.json", "c.png", [_poly(rect), _poly(triangle, "scratch")])
    _labelme(tmp_path / "label" / "n0.json", "n0.jpg", [])  # reviewed, no defect: normal
    return tmp_path


def test_labelme_polygons_become_masks_in_a_loadable_category(labelme_src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "cat"
    summary = import_labelme(labelme_src / "data", labelme_src / "label", out, normal_test_ratio=0.3, seed=1)
    assert (summary.n_train, summary.n_test_good) == (7, 3)
    assert summary.defects == {"combined": 1, "dent_mark": 1, "pitting": 1}
    data = load_mvtec(out)
    assert len(data.train) == 7 and len(data.test_normal) == 3
    counts = {s.image_path.stem: int(read_mask(s.mask_path).sum()) for s in data.test_anomalous}
    assert counts == {"a": 60, "b": 66 + 12, "c": 60 + 66 - 21}  # c: overlap 6+5+4+3+2+1 (rows y=3..8)
    linked = out / "test" / "pitting" / "a.png"
    assert linked.is_symlink() and linked.resolve() == (labelme_src / "data" / "a.png").resolve()
    manifest = json.loads((out / ".anomaly-import.json").read_text())
    assert manifest["counts"] == {"train_good": 7, "test_good": 3, "combined": 1, "dent_mark": 1, "pitting": 1}
    assert sorted(p.name for p in out.iterdir()) == [".anomaly-import.json", "ground_truth", "test", "train"]


def test_split_is_seeded_and_max_normal_subsamples(labelme_src: Path, tmp_path: Path) -> None:
    def split(seed: int, out: str, **kw: int) -> list[str]:
        import_labelme(labelme_src / "data", labelme_src / "label", tmp_path / out, seed=seed, **kw)
        return sorted(p.name for p in (tmp_path / out / "test" / "good").iterdir())

    assert split(3, "x") == split(3, "y") != split(4, "z")
    sub = import_labelme(labelme_src / "data", labelme_src / "label", tmp_path / "s", max_normal=5, link="hardlink")
    assert (sub.n_train, sub.n_test_good) == (4, 1)
    assert not next((tmp_path / "s" / "train" / "good").iterdir()).is_symlink()


def test_mask_folders_with_classes_and_normals(tmp_path: Path) -> None:
    for name in ("p.png", "q.png", "r.png", "s.png"):
        _image(tmp_path / "img" / name)
    values = np.zeros((H, W), np.uint8)
    values[0:4, 0:5] = 2
    values[10:11, 0:3] = 1  # fewer class-1 pixels: type is the dominant class 2
    (tmp_path / "msk").mkdir()
    Image.fromarray(values).save(tmp_path / "msk" / "p.png")
    Image.fromarray(np.zeros((H, W), np.uint8)).save(tmp_path / "msk" / "q_mask.png")  # empty: normal
    scratch = np.zeros((H, W), np.uint8)
    scratch[5, 2:9] = 3
    Image.fromarray(scratch).save(tmp_path / "msk" / "r.png")  # s.png has no mask: normal
    summary = import_mask_folders(
        tmp_path / "img",
        tmp_path / "msk",
        tmp_path / "cat",
        classes={1: "hole", 2: "patch", 3: "scratch"},
        normal_test_ratio=0.5,
    )
    assert (summary.n_train, summary.n_test_good, summary.defects) == (1, 1, {"patch": 1, "scratch": 1})
    data = load_mvtec(tmp_path / "cat")
    assert {s.defect_type: int(read_mask(s.mask_path).sum()) for s in data.test_anomalous} == {
        "patch": 23,
        "scratch": 7,
    }


def test_masks_that_match_no_image_are_named_not_imported_as_normal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Masks named <stem>_gt.png matched no image, and every defective image went to train/good without a word."""
    for name in ("p.png", "q.png", "r.png"):
        _image(tmp_path / "img" / name)
    values = np.zeros((H, W), np.uint8)
    values[0:4, 0:5] = 255
    (tmp_path / "msk").mkdir()
    for name in ("p_gt.png", "q_gt.png"):
        Image.fromarray(values).save(tmp_path / "msk" / name)
    with pytest.raises(DataError, match=r"none of its 2 masks matches an image .* first: .*p_gt.png"):
        import_mask_folders(tmp_path / "img", tmp_path / "msk", tmp_path / "cat")
    assert not (tmp_path / "cat").exists()
    Image.fromarray(values).save(tmp_path / "msk" / "r.png")
    with caplog.at_level("WARNING", logger="anomaly"):
        summary = import_mask_folders(tmp_path / "img", tmp_path / "msk", tmp_path / "cat")
    assert summary.defects == {"defect": 1}
    assert "2 of 3 masks match no image" in caplog.text


def test_labelme_sizes_are_those_of_the_displayed_exif_rotated_image(tmp_path: Path) -> None:
    """labelme draws on the image as shown: a JPEG stored 20 x 16 with EXIF orientation 6 is 16 wide, 20 high."""
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "data").mkdir()
    Image.new("RGB", (W, H), (90, 90, 90)).save(tmp_path / "data" / "d.jpg", exif=exif)
    for i in range(4):
        _image(tmp_path / "data" / f"n{i}.png", (H, W))
    box = _poly([[1, 12], [5, 18]], "crack", "rectangle")  # inside 16 x 20 only: 5 x 7 = 35 pixels
    _labelme(tmp_path / "label" / "d.json", "d.jpg", [box], size=(H, W))
    import_labelme(tmp_path / "data", tmp_path / "label", tmp_path / "cat", normal_test_ratio=0.25)
    (sample,) = load_mvtec(tmp_path / "cat").test_anomalous
    mask = read_mask(sample.mask_path)
    assert mask.shape == (W, H) and int(mask.sum()) == 35


def test_mask_folders_without_normals_is_test_only_and_types_from_subfolders(tmp_path: Path) -> None:
    for defect in ("crack", "dent"):
        _image(tmp_path / "img" / defect / f"{defect}1.png")
        mask = np.zeros((H, W), np.uint8)
        mask[1:3, 1:3] = 255
        (tmp_path / "msk" / defect).mkdir(parents=True)
        Image.fromarray(mask).save(tmp_path / "msk" / defect / f"{defect}1.png")
    summary = import_mask_folders(tmp_path / "img", tmp_path / "msk", tmp_path / "cat")
    assert summary.test_only and summary.defects == {"crack": 1, "dent": 1}
    assert int(read_mask(tmp_path / "cat" / "ground_truth" / "dent" / "dent1_mask.png").sum()) == 4


@pytest.mark.parametrize(
    ("shapes", "size", "message"),
    [
        ([_poly([[1, 1], [5, 5]])], (W, H), "shape 1 (polygon): 2 point(s)"),
        ([_poly([[1, 1], [5, 1], [5, 5]]), None], (W, H), "shape 2: not a labelme shape"),
        ([_poly([["a", "b"], [5, 1], [5, 5]])], (W, H), "shape 1 (polygon): points must be"),
        ([_poly([[1], [5, 1], [5, 5]])], (W, H), "shape 1 (polygon): points must be"),
        ([_poly([[1, 1], [5, 1], [5, 5]], kind="ellipse")], (W, H), "shape 1: unsupported shape_type 'ellipse'"),
        ([_poly([[1, 1], [5, 1], [5, 5]], label=None)], (W, H), "shape 1: label None cannot be a defect type"),
        ([_poly([[1, 1], [5, 1], [5, 5]], label="Good")], (W, H), "shape 1: label 'Good' cannot be a defect type"),
        ([{**_poly([[1, 1], [4, 4]], kind="mask"), "mask": "no image"}], (W, H), "'mask' is not a base64-encoded"),
        ([_poly([[1, 1], [5, 5]], kind="line")], (W, H), "only shapes without area (line)"),
        ([_poly([[1, 1], [5, 1], [5, 5]])], (W + 1, H), "differ from the image's size"),
        ([_poly([[100, 100], [105, 100], [105, 105]])], (W, H), "cover no pixel"),
    ],
)
def test_labelme_invalid_shapes_raise(tmp_path: Path, shapes: list[dict], size: tuple[int, int], message: str) -> None:
    _image(tmp_path / "data" / "a.png")
    _labelme(tmp_path / "label" / "a.json", "a.png", shapes, size)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        import_labelme(tmp_path / "data", tmp_path / "label", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_import_writes_category(labelme_src: Path, tmp_path: Path) -> None:
    out = tmp_path / "cat"
    args = ["import", "--format", "labelme", "--images", str(labelme_src / "data")]
    result = CliRunner().invoke(app, [*args, "--annotations", str(labelme_src / "label"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "train/good 8, test/good 2" in result.output and len(load_mvtec(out).test_anomalous) == 3
    again = CliRunner().invoke(app, [*args, "--annotations", str(labelme_src / "label"), "--out", str(out)])
    assert again.exit_code == 0  # an earlier import is replaced


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--format", "coco"], "--format must be labelme or mask-folders"),
        (["--format", "labelme", "--classes", "1=a"], "--classes applies to --format mask-folders only"),
        (["--format", "mask-folders", "--classes", "x=a"], "--classes: expected VALUE=NAME"),
        (["--format", "mask-folders", "--classes", "1=a,01=b"], "--classes: value 1 is given twice"),
        (["--format", "labelme", "--normal-test-ratio", "1.5"], "--normal-test-ratio must be in [0, 1]"),
        (["--format", "labelme", "--link", "move"], "--link must be symlink, hardlink or copy"),
        (["--format", "labelme", "--seed", "-1"], "--seed must be a whole number >= 0, got -1"),  # was a traceback
        (["--format", "labelme", "--annotations", "/nonexistent"], "--annotations /nonexistent: folder not found"),
        (["--format", "labelme", "--out", "{occupied}"], "is not an anomaly output"),
    ],
)
def test_cli_import_user_errors(labelme_src: Path, tmp_path: Path, extra: list[str], message: str) -> None:
    occupied = tmp_path / "occupied"
    _image(occupied / "keep.png")
    out = tmp_path / "new"
    base = {"--images": str(labelme_src / "data"), "--annotations": str(labelme_src / "label"), "--out": str(out)}
    extra = [e.format(occupied=occupied) for e in extra]
    for key in set(base) & set(extra):
        del base[key]
    result = CliRunner().invoke(app, ["import", *[x for kv in base.items() for x in kv], *extra])
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and message in result.output and result.output.count("\n") == 1
    assert not out.exists() and sorted(p.name for p in occupied.iterdir()) == ["keep.png"]


def test_benchmark_rows_report_realised_fpr(synthetic_root: Path, tmp_path: Path) -> None:
    from anomaly.benchmark import run_benchmark
    from anomaly.config import apply_overrides, load_config

    config = apply_overrides(load_config("patchcore"), ["backbone.image_size=[128,128]"])
    row = run_benchmark("mvtec", synthetic_root.parent, [synthetic_root.name], config, tmp_path)[0]
    n_good = len(load_mvtec(synthetic_root).test_normal)
    assert 0 <= row["realised_fpr"] <= 1 and (row["realised_fpr"] * n_good).is_integer()


def test_labelme_quirks_of_real_annotations(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A crack drawn as a line beside a polygon rejected the file; a JSON whose image was renamed (or whose imagePath
    is empty) was not found though it shares the image's name; two JSONs for one image named neither; a label '..'
    wrote the defect outside test/."""
    for name in ("a.png", "b.png", "n0.png", "n1.png"):
        _image(tmp_path / "data" / name)
    square = [[1, 1], [6, 1], [6, 6], [1, 6]]
    _labelme(tmp_path / "label" / "a.json", "a.png", [_poly(square), _poly([[1, 1], [9, 9]], "note", kind="line")])
    _labelme(tmp_path / "label" / "b.json", "renamed.png", [_poly(square, label="dent")])
    caplog.set_level("WARNING", logger="anomaly")
    summary = import_labelme(tmp_path / "data", tmp_path / "label", tmp_path / "out")
    assert summary.defects == {"dent": 1, "pitting": 1}  # a line labelled otherwise would not make a "combined"
    assert "shapes without area (line) left out of the mask" in caplog.text
    assert "imagePath 'renamed.png' not found under" in caplog.text and "read as b.png" in caplog.text
    _labelme(tmp_path / "label" / "b2.json", "b.png", [_poly(square)])
    with pytest.raises(DataError, match=r"b2.json and .*b.json both annotate"):
        import_labelme(tmp_path / "data", tmp_path / "label", tmp_path / "out2")
    (tmp_path / "label" / "b2.json").unlink()
    _labelme(tmp_path / "label" / "a.json", "a.png", [_poly(square, label="..")])
    with pytest.raises(DataError, match=r"a.json: shape 1: label '\.\.' cannot be a defect type"):
        import_labelme(tmp_path / "data", tmp_path / "label", tmp_path / "out3")


def test_labelme_images_of_one_name_in_several_sub_folders(tmp_path: Path) -> None:
    """Two cameras' folders with the same file names were refused outright; labelme's JSON beside each image names it
    by a path relative to the JSON, which tells them apart."""
    square = [[1, 1], [6, 1], [6, 6], [1, 6]]
    for cam in ("cam1", "cam2"):
        for name in ("0.png", "1.png", "2.png"):
            _image(tmp_path / "data" / cam / name)
        doc = {"shapes": [_poly(square, cam)], "imagePath": "1.png", "imageWidth": W, "imageHeight": H}
        (tmp_path / "data" / cam / "1.json").write_text(json.dumps(doc))
    summary = import_labelme(tmp_path / "data", tmp_path / "data", tmp_path / "out", normal_test_ratio=0)
    assert (summary.n_train, summary.defects) == (4, {"cam1": 1, "cam2": 1})
    assert sorted(p.name for p in (tmp_path / "out" / "train" / "good").iterdir()) == [
        "cam1_0.png", "cam1_2.png", "cam2_0.png", "cam2_2.png"
    ]  # fmt: skip
    assert (tmp_path / "out" / "test" / "cam2" / "1.png").resolve() == (tmp_path / "data" / "cam2" / "1.png").resolve()
    _labelme(tmp_path / "label" / "x.json", "0.png", [_poly(square)])  # ..\data\0.png: neither of the two
    with pytest.raises(DataError, match=r"x.json: imagePath '../data/0.png' is none of the 2 images named '0.png'"):
        import_labelme(tmp_path / "data", tmp_path / "label", tmp_path / "out2")


def test_labelme_rectangles_of_four_points_and_mask_shapes_fill_their_area(tmp_path: Path) -> None:
    """A rectangle saved with its four corners became a one-pixel line; a `mask` shape (labelme 5.3+, a base64 PNG
    from its first point) was left out as a shape without area."""
    import base64
    import io

    _image(tmp_path / "data" / "a.png")
    _image(tmp_path / "data" / "b.png")
    _labelme(tmp_path / "label" / "a.json", "a.png", [_poly([[2, 3], [8, 3], [8, 6], [2, 6]], kind="rectangle")])
    bitmap = np.zeros((4, 5), np.uint8)
    bitmap[1:3, 1:4] = 255  # 2 x 3 = 6 pixels, from (x, y) = (10, 5) + (1, 1)
    png = io.BytesIO()
    Image.fromarray(bitmap).save(png, format="PNG")
    shape = {**_poly([[10, 5], [14, 8]], kind="mask"), "mask": base64.b64encode(png.getvalue()).decode()}
    _labelme(tmp_path / "label" / "b.json", "b.png", [shape])
    import_labelme(tmp_path / "data", tmp_path / "label", tmp_path / "out")
    rect = read_mask(tmp_path / "out" / "ground_truth" / "pitting" / "a_mask.png")
    assert rect.sum() == 7 * 4 and rect[3:7, 2:9].all()
    pasted = read_mask(tmp_path / "out" / "ground_truth" / "pitting" / "b_mask.png")
    assert pasted.sum() == 6 and pasted[6:8, 11:14].all()


def test_mask_folders_quirks_of_real_exports(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An opaque RGBA mask became a whole-image defect (the alpha channel won the maximum); images beside their
    `_mask` files made every image a defect of itself; a defect-folder image without a mask went to train/good
    unnamed; a JPEG mask's noise, or an inverted mask (white background), was taken as defect unnamed."""

    def mask_of(box: tuple[slice, slice], value: int = 255) -> np.ndarray:
        mask = np.zeros((H, W), np.uint8)
        mask[box] = value
        return mask

    for i in range(4):
        _image(tmp_path / "img" / "good" / f"g{i}.png")
    for i in range(4):
        _image(tmp_path / "img" / "dent" / f"d{i}.png")
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[..., 3] = 255  # opaque, as image editors export
    rgba[2:6, 3:8, :3] = 255
    (tmp_path / "msk" / "dent").mkdir(parents=True)
    Image.fromarray(rgba).save(tmp_path / "msk" / "dent" / "d0.png")
    graded = mask_of((slice(2, 6), slice(3, 8)))
    graded[8:10, 8:18] = np.arange(1, 21).reshape(2, 10)  # many levels: JPEG noise or soft edges
    Image.fromarray(graded).save(tmp_path / "msk" / "dent" / "d1.png")  # d2 has no mask
    Image.fromarray(255 - mask_of((slice(2, 6), slice(3, 8)))).save(tmp_path / "msk" / "dent" / "d3.png")  # inverted
    caplog.set_level("WARNING", logger="anomaly")
    summary = import_mask_folders(tmp_path / "img", tmp_path / "msk", tmp_path / "cat")
    assert summary.defects == {"dent": 3} and summary.n_train + summary.n_test_good == 5
    assert "1 mask(s) mark their whole border as defect: inverted" in caplog.text and "d3.png" in caplog.text
    assert int(read_mask(tmp_path / "cat" / "ground_truth" / "dent" / "d0_mask.png").sum()) == 20
    assert "1 mask(s) have many levels" in caplog.text and "d1.png" in caplog.text
    assert "1 image(s) in folders of defects have no mask and are imported as normal" in caplog.text

    flat = tmp_path / "flat"  # masks beside their images: x.png beside x_mask.png
    for i in range(3):
        _image(flat / f"p{i}.png")
        Image.fromarray(mask_of((slice(1, 3), slice(1, 3)), 255 if i == 0 else 0)).save(flat / f"p{i}_mask.png")
    summary = import_mask_folders(flat, flat, tmp_path / "flatcat")
    assert summary.defects == {"defect": 1} and summary.n_train + summary.n_test_good == 2
    spelled = Path(os.path.relpath(flat))  # the same folder, one path relative and one absolute
    assert import_mask_folders(spelled, flat.absolute(), tmp_path / "flat2").defects == {"defect": 1}
    assert int(read_mask(tmp_path / "flatcat" / "ground_truth" / "defect" / "p0_mask.png").sum()) == 4


def test_kolektorsdd_as_shipped_imports_in_place(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """KolektorSDD ships kosNN/PartK.jpg beside PartK_label.bmp, every part with a label (most empty) and the names
    repeating across kosNN: refused as masks not named <stem>_mask, then as repeated file names."""
    data = tmp_path / "data"
    for kos in ("kos01", "kos02"):
        for k in range(3):
            _image(data / kos / f"Part{k}.jpg")
            label = np.zeros((H, W), np.uint8)
            label[2:5, 2:6] = 1 if (kos, k) == ("kos02", 1) else 0
            Image.fromarray(label).save(data / kos / f"Part{k}_label.bmp")
    caplog.set_level("WARNING", logger="anomaly")
    summary = import_mask_folders(data, data, tmp_path / "cat", classes={1: "crack"}, normal_test_ratio=0)
    assert summary.defects == {"crack": 1} and summary.n_train == 5 and "have no mask" not in caplog.text
    names = sorted(p.name for p in (tmp_path / "cat" / "train" / "good").iterdir())
    assert names == ["Part1.jpg", "kos01_Part0.jpg", "kos01_Part2.jpg", "kos02_Part0.jpg", "kos02_Part2.jpg"]
    assert int(read_mask(tmp_path / "cat" / "ground_truth" / "crack" / "Part1_mask.png").sum()) == 12
    assert len(load_mvtec(tmp_path / "cat").test) == 1


def test_mask_folders_read_masks_as_displayed_like_their_images(tmp_path: Path) -> None:
    """A mask saved with its photo's EXIF orientation was read as stored, while its image and the evaluation read
    both as displayed: a square one was imported misaligned, this one refused as another size."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to display
    (tmp_path / "img" / "dent").mkdir(parents=True)
    Image.new("RGB", (W, H), (90, 90, 90)).save(tmp_path / "img" / "dent" / "a.jpg", exif=exif)
    stored = np.zeros((H, W), np.uint8)
    stored[0:3, 0:5] = 255
    (tmp_path / "msk" / "dent").mkdir(parents=True)
    Image.fromarray(stored).save(tmp_path / "msk" / "dent" / "a.png", exif=exif)
    import_mask_folders(tmp_path / "img", tmp_path / "msk", tmp_path / "cat")
    imported = read_mask(tmp_path / "cat" / "ground_truth" / "dent" / "a_mask.png")
    assert imported.shape == (W, H) and (imported == read_mask(tmp_path / "msk" / "dent" / "a.png")).all()


def test_a_reimport_inside_its_source_reads_no_copy_of_itself_and_keeps_the_users_files(
    labelme_src: Path, tmp_path: Path
) -> None:
    """An --out inside the source folder was read back on the next run (its ground-truth masks imported as normal
    images); a re-import deleted the notes a user had put into the category."""
    data, out = labelme_src / "data", labelme_src / "data" / "imported"
    first = import_labelme(data, labelme_src / "label", out)
    (out / "NOTES.txt").write_text("mine")
    again = import_labelme(data, labelme_src / "label", out)
    assert (again.n_train, again.n_test_good, again.defects) == (first.n_train, first.n_test_good, first.defects)
    assert (out / "NOTES.txt").read_text() == "mine" and not list(out.rglob("*_mask_mask.png"))
    scored = list_images([data])[0]  # `anomaly score data/` still reads the imported category: only import skips it
    assert len(scored) > len(list_images([data], skip_imports=True)[0]) and any(p.is_relative_to(out) for p in scored)


def test_names_repeat_only_within_one_output_folder_to_take_a_prefix(tmp_path: Path) -> None:
    """`crack/000.png`, `dent/000.png` and `good/000.png` land in three folders: no prefix for any of them."""
    for folder in ("crack", "dent", "good"):
        _image(tmp_path / "img" / folder / "000.png")
    _image(tmp_path / "img" / "good" / "001.png")
    for folder in ("crack", "dent"):
        Image.fromarray(np.full((H, W), 255, np.uint8)).save(_image(tmp_path / "msk" / folder / "000.png"))
    import_mask_folders(tmp_path / "img", tmp_path / "msk", tmp_path / "cat", normal_test_ratio=0)
    names = sorted(p.relative_to(tmp_path / "cat").as_posix() for p in (tmp_path / "cat").rglob("*.png"))
    assert names == [
        "ground_truth/crack/000_mask.png",
        "ground_truth/dent/000_mask.png",
        "test/crack/000.png",
        "test/dent/000.png",
        "train/good/000.png",
        "train/good/001.png",
    ]


@pytest.mark.parametrize("other", ["p_mask.png", "p.bmp"])
def test_two_masks_for_one_image_are_refused_naming_both(tmp_path: Path, other: str) -> None:
    """masks/p.png beside masks/p_mask.png (or p.bmp): one was used without a word, the other called unmatched (or
    not named at all), so a defect drawn in the ignored file was lost."""
    _image(tmp_path / "img" / "p.png")
    _image(tmp_path / "img" / "q.png")
    values = np.zeros((H, W), np.uint8)
    values[0:4, 0:5] = 255
    (tmp_path / "msk").mkdir()
    Image.fromarray(values).save(tmp_path / "msk" / "p.png")
    Image.fromarray(np.zeros((H, W), np.uint8)).save(tmp_path / "msk" / other)
    with pytest.raises(DataError, match=r"p.png: 2 masks match it \(.*msk[/\\]p.png.*\); keep one") as raised:
        import_mask_folders(tmp_path / "img", tmp_path / "msk", tmp_path / "cat")
    assert other in str(raised.value)
    assert not (tmp_path / "cat").exists()
    result = CliRunner().invoke(
        app,
        ["import", "--format", "mask-folders", "--images", str(tmp_path / "img"), "--annotations",
         str(tmp_path / "msk"), "--out", str(tmp_path / "cat")],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "cat").exists()


@pytest.mark.parametrize("fmt", ["labelme", "mask-folders"])
@pytest.mark.parametrize("content", [b"", b"<html>404 Not Found</html>"])
def test_an_unreadable_normal_image_is_refused_before_anything_is_written(
    tmp_path: Path, fmt: str, content: bytes
) -> None:
    """A zero-byte or non-image file among the normal images went into train/good with exit 0; `anomaly fit` on
    the imported category then failed on it, naming the link in the new category instead of the source file."""
    for name in ("p.png", "q.png", "r.png"):
        _image(tmp_path / "img" / name)
    (tmp_path / "img" / "z.jpg").write_bytes(content)
    values = np.zeros((H, W), np.uint8)
    values[0:4, 0:5] = 255
    (tmp_path / "ann").mkdir()
    if fmt == "labelme":
        _labelme(tmp_path / "ann" / "p.json", "p.png", [_poly([[0, 0], [5, 0], [5, 4]])])
    else:
        Image.fromarray(values).save(tmp_path / "ann" / "p.png")
    result = CliRunner().invoke(
        app,
        ["import", "--format", fmt, "--images", str(tmp_path / "img"), "--annotations", str(tmp_path / "ann"),
         "--normal-test-ratio", "0", "--out", str(tmp_path / "cat")],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "z.jpg" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "cat").exists()


def _truncated_ihdr_png() -> bytes:
    """A PNG whose IHDR chunk is 5 bytes long (CRC intact): Pillow raises ValueError, not OSError, opening it."""
    buffer = io.BytesIO()
    Image.new("L", (W, H)).save(buffer, "PNG")
    head = buffer.getvalue()[16:21]
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 5) + b"IHDR" + head + struct.pack(">I", zlib.crc32(b"IHDR" + head))


@pytest.mark.parametrize("fmt", ["labelme", "mask-folders"])
@pytest.mark.parametrize("bad", ["malformed", "bomb"])
def test_a_malformed_or_huge_mask_is_one_error_line_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str, bad: str
) -> None:
    """Pillow raises more than OSError on malformed files (ValueError, SyntaxError, struct.error) and
    DecompressionBombError (an Exception) for images over twice its limit: both were tracebacks with exit code 1."""
    for name in ("p.png", "q.png"):
        _image(tmp_path / "img" / name)
    (tmp_path / "ann").mkdir()
    if bad == "bomb":  # Pillow's limit is twice max(ANOMALY_MAX_PIXELS, 89 MP): lowered here, not a 300 MP file
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)  # refused above 400 px: the 20 x 16 images pass
        buffer = io.BytesIO()
        Image.new("L", (40, 40), 255).save(buffer, "PNG")
        data = buffer.getvalue()
    else:
        data = _truncated_ihdr_png()
    if fmt == "labelme":
        shape = {"label": "dent", "points": [[0, 0]], "shape_type": "mask", "mask": base64.b64encode(data).decode()}
        _labelme(tmp_path / "ann" / "p.json", "p.png", [shape])
        needle = f"{tmp_path / 'ann' / 'p.json'}: shape 1 (mask): its 'mask' "
    else:
        (tmp_path / "ann" / "p.png").write_bytes(data)
        needle = f"{tmp_path / 'ann' / 'p.png'}: "
    result = CliRunner().invoke(
        app,
        ["import", "--format", fmt, "--images", str(tmp_path / "img"), "--annotations", str(tmp_path / "ann"),
         "--out", str(tmp_path / "cat")],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: {needle}") and result.output.count("\n") == 1, result.output
    assert ("decompression bomb" in result.output) == (bad == "bomb")
    assert not (tmp_path / "cat").exists()


def test_byte_identical_normal_images_stay_on_one_side_of_the_split(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """PIPED ships identical normal images under different names: a copy in train/good made its twin in test/good
    a memorised normal image. Copies now go to one side together (and a warning counts them)."""
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(data / f"n{i}.png")
    for copy in ("n0_copy.png", "n0_again.png"):
        (data / copy).write_bytes((data / "n0.png").read_bytes())
    caplog.set_level("WARNING", logger="anomaly")
    _image(data / "d.png")  # one defective image, so that the mask folder holds a mask
    mask = np.zeros((H, W), np.uint8)
    mask[2:5, 2:6] = 255
    (tmp_path / "masks").mkdir()
    Image.fromarray(mask).save(tmp_path / "masks" / "d_mask.png")
    for seed in range(8):
        out = tmp_path / f"cat{seed}"
        summary = import_mask_folders(data, tmp_path / "masks", out, normal_test_ratio=0.5, seed=seed)
        sides = {side: {p.read_bytes() for p in (out / side / "good").iterdir()} for side in ("train", "test")}
        assert not sides["train"] & sides["test"], seed
        assert summary.n_train + summary.n_test_good == 12 and summary.n_test_good in (6, 7, 8)
    assert "2 normal image(s) are byte-identical copies of another" in caplog.text


def test_a_missing_normal_image_is_named_before_the_split_reads_it(tmp_path: Path) -> None:
    """The split hashes every normal image to keep copies together: a dangling link among them was a traceback
    (FileNotFoundError) instead of the one-line error naming it."""
    data = tmp_path / "data"
    for name in ("a.png", "b.png", "d.png"):
        _image(data / name)
    (data / "gone.png").symlink_to(tmp_path / "nowhere.png")
    mask = np.zeros((H, W), np.uint8)
    mask[2:5, 2:6] = 255
    (tmp_path / "masks").mkdir()
    Image.fromarray(mask).save(tmp_path / "masks" / "d_mask.png")
    with pytest.raises(DataError, match="gone.png"):
        import_mask_folders(data, tmp_path / "masks", tmp_path / "cat")
    assert not (tmp_path / "cat").exists()


def test_a_large_set_of_copies_does_not_empty_train_good(tmp_path: Path) -> None:
    """Nine copies of one normal image and one other, a 0.2 share: the copies went to test/good whole whenever the
    split's order met them first (9 or 10 of 10 held out, train/good 1 or 0 images). A set of copies now goes in
    only where it brings the held-out count nearer the share."""
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(data / "n0.png")
    for i in range(1, 9):
        (data / f"n{i}.png").write_bytes((data / "n0.png").read_bytes())
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(data / "n9.png")
    _image(data / "d.png")
    mask = np.zeros((H, W), np.uint8)
    mask[2:5, 2:6] = 255
    (tmp_path / "masks").mkdir()
    Image.fromarray(mask).save(tmp_path / "masks" / "d_mask.png")
    for seed in range(4):
        summary = import_mask_folders(
            data, tmp_path / "masks", tmp_path / f"cat{seed}", normal_test_ratio=0.2, seed=seed
        )
        assert (summary.n_train, summary.n_test_good) == (9, 1), seed
