from __future__ import annotations

import csv
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from anomaly.cli import app
from anomaly.data.datasets import load_mvtec
from anomaly.report.content import load_content

SMALL = ["--set", "backbone.image_size=[128,128]", "--set", "batch_size=4"]
runner = CliRunner()


def _run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def _rows(out: Path) -> list[dict[str, str]]:
    with (out / "scores.csv").open() as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def model_dir(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "model"
    result = _run("fit", "--config", "patchcore", "--out", out, *SMALL, synthetic_root)
    assert result.exit_code == 0, result.output
    assert "train/good only" in result.output  # a category root is narrowed to its train split
    return out


def test_fit_gives_long_parts_an_input_of_their_aspect(tmp_path: Path) -> None:
    from anomaly.data import make_synthetic_category

    root = make_synthetic_category(
        tmp_path, "strip", n_train=6, n_test_good=2, n_test_defect=2, size=(64, 192), kind="texture", seed=0
    )
    small = ["--set", "backbone.image_size=[128,128]", "--set", "threshold.folds=3"]
    result = _run("fit", "--out", tmp_path / "m", *small, root)
    assert result.exit_code == 0, result.output
    assert "at 64x224 (H x W; a patch covers 8x7 image px)" in result.output  # 3:1 parts, 128x128's pixel count
    # stride-8 patches: 8 of 64 rows; 224 input columns hold the 192 image columns, 8 input px = 6.9 image px
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["backbone"]["image_size"] == [64, 224] and config["preprocess"]["resize"] == "stretch"
    result = _run("score", "--model", tmp_path / "m", "--out", tmp_path / "s", "--maps", root / "test")
    assert result.exit_code == 0, result.output
    assert all(np.load(tmp_path / "s" / row["map_path"]).shape == (64, 192) for row in _rows(tmp_path / "s"))


def test_fit_then_score_writes_csv_maps_and_overlays(model_dir: Path, synthetic_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "scores"
    result = _run("score", "--model", model_dir, "--out", out, "--maps", synthetic_root / "test")
    assert result.exit_code == 0, result.output
    rows = _rows(out)
    assert len(rows) == 10
    assert {"path", "score", "is_anomalous", "map_path"} <= set(rows[0])
    for row in rows:
        assert row["is_anomalous"] in ("true", "false") and np.isfinite(float(row["score"]))
        assert row["map_path"].startswith("maps/test/")
        amap = np.load(out / row["map_path"])
        assert amap.dtype == np.float32 and amap.shape == (128, 128)
        assert (out / row["overlay_path"]).is_file()
    good = [r["is_anomalous"] for r in rows if Path(r["path"]).parent.name == "good"]
    assert good == ["false"] * 4  # every good image, not the last one read


def test_evaluate_reads_scores_and_maps(model_dir: Path, synthetic_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "scores"
    assert _run("score", "--model", model_dir, "--out", out, "--maps", synthetic_root / "test").exit_code == 0
    result = _run("evaluate", "--scores", out, "--root", synthetic_root, "--out", tmp_path / "eval")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["image_auroc"] >= 0.9 and metrics["pixel_auroc"] >= 0.9
    rows = _rows(out)  # what the model's own threshold did, from the is_anomalous column
    normal = [r["is_anomalous"] == "true" for r in rows if "/good/" in r["path"]]
    anomalous = [r["is_anomalous"] == "true" for r in rows if "/good/" not in r["path"]]
    assert metrics["flagged_normal"] == sum(normal) and metrics["flagged_anomalous"] == sum(anomalous) > 0
    assert metrics["realised_fpr"] == sum(normal) / len(normal) and metrics["realised_tpr"] == np.mean(anomalous)
    assert f"flagged_anomalous: {sum(anomalous)}\n" in result.output
    assert "the scores cover" not in result.output and "are not files of" not in result.output
    small = _run("evaluate", "--scores", out, "--root", synthetic_root, "--eval-size", "64x48")
    assert small.exit_code == 0 and "pixel_auroc" in small.output
    assert _run("evaluate", "--scores", out, "--root", synthetic_root, "--eval-size", "big").exit_code == 2
    theirs = tmp_path / "theirs"  # a folder that is not an evaluation: refused before any metric, left as it was
    theirs.mkdir()
    (theirs / "metrics.json").write_text("their own")
    refused = _run("evaluate", "--scores", out, "--root", synthetic_root, "--out", theirs)
    assert refused.exit_code == 2 and "theirs" in refused.output and "pixel_auroc" not in refused.output
    assert [p.name for p in theirs.iterdir()] == ["metrics.json"] and (
        theirs / "metrics.json"
    ).read_text() == "their own"
    (out / "metrics.json").write_text("{}")  # as an older `evaluate --out` left it in the scores folder
    into_scores = _run("evaluate", "--scores", out, "--root", synthetic_root, "--out", out)
    assert into_scores.exit_code == 2 and "another kind of anomaly output" in into_scores.output
    assert len(_rows(out)) == 10 and (out / "maps").is_dir()  # replacing the folder would have dropped the scores
    plain = tmp_path / "no_maps"  # scored without --maps: image metrics, and a line that says why
    assert _run("score", "--model", model_dir, "--out", plain, synthetic_root / "test").exit_code == 0
    result = _run("evaluate", "--scores", plain, "--root", synthetic_root)
    assert result.exit_code == 0 and "has no maps (`anomaly score --maps` writes them)" in result.output


def test_evaluate_scales_a_map_of_another_size_to_its_image(
    model_dir: Path, synthetic_root: Path, tmp_path: Path
) -> None:
    """A map not at its image's size (another tool's, at 64 px) had its mask scaled down to it instead, silently:
    pixel metrics at the map's size while metrics.json said ``eval_size: original``."""
    from anomaly.data.datasets import load_ground_truth
    from anomaly.evaluation import evaluate_samples
    from anomaly.tables import read_scores

    out = tmp_path / "scores"
    assert _run("score", "--model", model_dir, "--out", out, "--maps", synthetic_root / "test").exit_code == 0
    rows = read_scores(out)
    flagged = next(r for r in rows if r["is_anomalous"] == "true")
    full = np.load(out / flagged["map_path"])
    np.save(out / flagged["map_path"], cv2.resize(full, (64, 64), interpolation=cv2.INTER_AREA))
    result = _run("evaluate", "--scores", out, "--root", synthetic_root, "--out", tmp_path / "ev")
    assert result.exit_code == 0, result.output
    assert f"1 map(s) are not at their image's size and are scaled to it, first: {flagged['path']} (64x64 for" in (
        result.output
    )
    samples = load_ground_truth(synthetic_root).match_test([r["path"] for r in rows], "scores.csv")
    maps = [np.load(out / r["map_path"]) for r in rows]
    maps = [
        cv2.resize(m, full.shape[::-1], interpolation=cv2.INTER_LINEAR) if m.shape != full.shape else m for m in maps
    ]
    expected = evaluate_samples([float(r["score"]) for r in rows], samples, maps).metrics
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["pixel_auroc"] == expected["pixel_auroc"] and metrics["aupro"] == expected["aupro"]


def test_evaluate_test_only_and_unannotated_roots(model_dir: Path, synthetic_root: Path, tmp_path: Path) -> None:
    """A test-only category (scored zero-shot) needs no train/good; one without masks gets image metrics."""
    out = tmp_path / "scores"
    assert _run("score", "--model", model_dir, "--out", out, "--maps", synthetic_root / "test").exit_code == 0
    full = _run("evaluate", "--scores", out, "--root", synthetic_root, "--out", tmp_path / "full")
    copy = Path(shutil.copytree(synthetic_root, tmp_path / "widget"))
    shutil.rmtree(copy / "train")
    test_only = _run("evaluate", "--scores", out, "--root", copy, "--out", tmp_path / "test_only")
    assert full.exit_code == 0 and test_only.exit_code == 0, test_only.output
    assert (tmp_path / "test_only" / "metrics.json").read_text() == (tmp_path / "full" / "metrics.json").read_text()
    assert "10 scored image(s) are not files of" in test_only.output  # matched on folder and name, and said so
    shutil.rmtree(copy / "ground_truth")
    images_only = _run("evaluate", "--scores", out, "--root", copy, "--out", tmp_path / "images_only")
    assert images_only.exit_code == 0, images_only.output
    assert "no ground_truth masks: image metrics only" in images_only.output
    metrics = json.loads((tmp_path / "images_only" / "metrics.json").read_text())
    assert metrics["image_auroc"] == json.loads((tmp_path / "full" / "metrics.json").read_text())["image_auroc"]
    assert "pixel_auroc" not in metrics


def test_evaluate_says_when_the_scores_cover_part_of_the_test_split(
    model_dir: Path, synthetic_root: Path, tmp_path: Path
) -> None:
    """Metrics of 4 of 10 test images read like the category's: the run says whose they are."""
    out = tmp_path / "scores"
    defect = next(p for p in sorted((synthetic_root / "test").iterdir()) if p.name != "good")
    some = sorted((synthetic_root / "test" / "good").glob("*.png"))[:2] + sorted(defect.glob("*.png"))[:2]
    assert _run("score", "--model", model_dir, "--out", out, *some).exit_code == 0
    result = _run("evaluate", "--scores", out, "--root", synthetic_root)
    assert result.exit_code == 0, result.output
    assert "the scores cover 4 of the 10 test images" in result.output


def test_evaluate_names_masks_of_another_aspect(model_dir: Path, synthetic_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "scores"
    assert _run("score", "--model", model_dir, "--out", out, "--maps", synthetic_root / "test").exit_code == 0
    root = Path(shutil.copytree(synthetic_root, tmp_path / "widget"))
    result = _run("evaluate", "--scores", out, "--root", root)
    assert result.exit_code == 0 and "another aspect" not in result.output
    mask = sorted((root / "ground_truth").glob("*/*.png"))[0]
    image = cv2.imread(str(mask), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(mask), cv2.resize(image, (image.shape[1] // 2, image.shape[0]), interpolation=cv2.INTER_NEAREST))
    result = _run("evaluate", "--scores", out, "--root", root)
    assert result.exit_code == 0, result.output
    assert "1 ground-truth mask(s) have another aspect than their image" in result.output
    assert f"{mask} (64x128 for 128x128)" in result.output
    noisy = sorted((root / "ground_truth").glob("*/*.png"))[1]  # a mask saved as JPEG, under the PNG's name
    cv2.imwrite(str(noisy), cv2.imdecode(cv2.imencode(".jpg", cv2.imread(str(noisy)))[1], cv2.IMREAD_COLOR))
    result = _run("evaluate", "--scores", out, "--root", root)
    assert (
        result.exit_code == 0 and "1 ground-truth mask(s) have many levels (soft edges, or lossy JPEG" in result.output
    )
    inverted = sorted((root / "ground_truth").glob("*/*.png"))[2]  # black defect on white, as PIPED's masks
    cv2.imwrite(str(inverted), 255 - cv2.imread(str(inverted), cv2.IMREAD_GRAYSCALE))
    result = _run("evaluate", "--scores", out, "--root", root)
    assert result.exit_code == 0 and "1 ground-truth mask(s) mark their whole border as defect" in result.output
    assert "whole border" not in _run("evaluate", "--scores", out, "--root", synthetic_root).output
    for drawn in (root / "ground_truth").glob("*/*.png"):  # masks whose defects did not survive an export
        cv2.imwrite(str(drawn), np.zeros((128, 128), np.uint8))
    result = _run("evaluate", "--scores", out, "--root", root, "--out", tmp_path / "ev")
    assert result.exit_code == 0, result.output  # was a traceback (exit 1): no positive pixel
    assert f"{root / 'ground_truth'}: no mask has a defect pixel (above 0): image metrics only" in result.output
    assert "6 ground-truth mask(s) of defective images are empty" in result.output
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["image_auroc"] > 0.5 and "pixel_auroc" not in metrics


def test_zero_shot_score_without_model(synthetic_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "zs"
    result = _run("score", "--zero-shot", "--out", out, "--maps", "--no-overlays", *SMALL, synthetic_root / "test")
    assert result.exit_code == 0, result.output
    rows = _rows(out)
    assert len(rows) == 10 and all(r["map_path"] and not r["overlay_path"] for r in rows)
    assert not (out / "overlays").exists()
    warning = "a zero-shot pool of 10 image(s): with fewer than 80 images in all, its threshold (is_anomalous) is"
    assert f"{warning} unreliable" in result.output and "give 4 or more good images as references" in result.output


def test_a_zero_shot_pool_of_one_and_references_among_the_inputs(synthetic_root: Path, tmp_path: Path) -> None:
    good = sorted((synthetic_root / "train" / "good").glob("*.png"))
    alone = _run("score", "--zero-shot", "--out", tmp_path / "new" / "deep" / "one", *SMALL, good[0])
    assert alone.exit_code == 2 and "needs at least 2 images in the pool" in alone.output
    assert not (tmp_path / "new").exists()  # nor the folders the output check made
    both = _run("score", "--zero-shot", "--reference", good[0], "--reference", good[1], "--out", tmp_path / "r",
                "--no-overlays", *SMALL, good[1], good[2], good[3])  # fmt: skip
    assert both.exit_code == 0, both.output
    assert f"--reference: 1 image(s) are also inputs and are scored, not used as references, first: {good[1]}" in (
        both.output
    )
    assert len(_rows(tmp_path / "r")) == 3
    counted = "pool of 3 image(s) and 1 reference(s): with fewer than 80 images in all"  # one way of counting the pool
    assert counted in both.output and "give 4 or more good images as references" in both.output  # 1 sets no rule


def test_no_small_pool_note_at_the_reliable_size(
    synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("anomaly.detector.RELIABLE_POOL_SIZE", 10)
    result = _run("score", "--zero-shot", "--out", tmp_path / "zs", "--no-overlays", *SMALL, synthetic_root / "test")
    assert result.exit_code == 0, result.output
    assert "is unreliable" not in result.output
    assert "zero-shot pool of 10 image(s) and 0 reference(s): threshold " in result.output  # and how it was chosen


def test_image_level_scorer_writes_no_maps(synthetic_root: Path, tmp_path: Path) -> None:
    model = tmp_path / "gauss"
    assert _run("fit", "--config", "gaussian", "--out", model, *SMALL, synthetic_root).exit_code == 0
    out = tmp_path / "g"
    result = _run("score", "--model", model, "--out", out, "--maps", synthetic_root / "test")
    assert result.exit_code == 0, result.output
    assert all(r["map_path"] == "" for r in _rows(out))
    assert not (out / "maps").exists()
    evaluated = _run("evaluate", "--scores", out, "--root", synthetic_root)  # not "score with --maps", as it was
    assert evaluated.exit_code == 0 and "its scorer gives image scores only (no maps): image metrics only" in (
        evaluated.output
    )


def test_user_errors_exit_2_with_one_line_and_leave_nothing(
    model_dir: Path, synthetic_root: Path, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bad.png").write_bytes(b"not an image")
    unreadable = tmp_path / "unreadable"  # every training image, so every image of the auto settings' sample
    unreadable.mkdir()
    for i in range(3):
        (unreadable / f"bad{i}.png").write_bytes(b"not an image")
    cases = [
        (["fit", "--out", tmp_path / "o0", *SMALL, unreadable], "bad0.png"),
        (["score", "--zero-shot", "--out", tmp_path / "o00", *SMALL, unreadable], "bad0.png"),
        (["score", "--model", model_dir, "--out", tmp_path / "o1", empty], "empty"),
        (["score", "--model", model_dir, "--out", tmp_path / "o2", broken], "bad.png"),
        (["score", "--model", tmp_path / "nope", "--out", tmp_path / "o3", synthetic_root / "test"], "nope"),
        (
            ["fit", "--config", "patchcore", "--out", tmp_path / "o4", "--set", "scorer.params.kk=1", synthetic_root],
            "kk",
        ),
        (["fit", "--config", "nosuch", "--out", tmp_path / "o5", synthetic_root], "nosuch"),
        (
            ["fit", "--config", "patchcore", "--out", tmp_path / "o6", "--set", "backbone.lyers=[x]", synthetic_root],
            "lyers",
        ),
        (
            ["fit", "--out", tmp_path / "o7", "--set", "preprocess.standardize=sometimes", synthetic_root],
            "preprocess.standardize",
        ),
        (
            ["fit", "--out", tmp_path / "o7b", "--set", "preprocess.bit_depth=20", synthetic_root],
            "preprocess.bit_depth: expected an integer in [8, 16] or auto, got 20",
        ),
        (
            ["score", "--zero-shot", "--out", tmp_path / "o8", "--set", "scorer.params.map_layers=[0,5]", empty],
            "map_layers",
        ),
        (
            ["fit", "--out", tmp_path / "o9", "--set", "scorer.params.grid_layer=2", synthetic_root],
            "grid_layer",
        ),
        (
            ["fit", "--out", tmp_path / "o10", "--set", "scorer.params.patch_kernel=gauss", synthetic_root],
            "error: scorer.params.patch_kernel must be 'mean' or 'binomial', got 'gauss'",  # the key named once
        ),
        (
            ["score", "--zero-shot", "--out", tmp_path / "o11", "--set", "scorer.params.norm_exponent=2", empty],
            "norm_exponent must be a number in [0, 1], got 2",
        ),
        (["score", "--model", model_dir, "--device", "tpu", "--out", tmp_path / "o12", synthetic_root], "device"),
        (
            ["fit", "--out", tmp_path / "o14", "--set", "threshold.outlier_z=0", synthetic_root],
            "threshold.outlier_z: must be a positive number or null, got 0",
        ),
    ]
    for args, needle in cases:
        result = _run(*args)
        assert result.exit_code == 2, (args, result.output)
        error_lines = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(error_lines) == 1 and needle in error_lines[0], result.output
        assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "empty", "unreadable"]  # nothing half-written


def test_config_defects_are_one_line_naming_the_file_and_key_with_exit_2(
    model_dir: Path, synthetic_root: Path, tmp_path: Path
) -> None:
    """A key given twice in a YAML config or a --set value, and a model whose config.json was given other
    backbone.layers and re-signed (FAISS failed on the first image with a bare AssertionError)."""
    from anomaly._fs import file_sha256
    from anomaly.model_dir import signed

    twice = tmp_path / "twice.yaml"
    twice.write_text("backbone:\n  name: resnet18\n  name: tf_efficientnet_lite0\n")
    edited = Path(shutil.copytree(model_dir, tmp_path / "edited"))
    config = json.loads((edited / "config.json").read_text())
    config["backbone"]["layers"] = ["blocks.2", "blocks.3"]  # 40 + 80 channels, the bank's rows 40 + 112
    (edited / "config.json").write_text(json.dumps(config))
    meta = json.loads((edited / "meta.json").read_text())
    meta["files"]["config.json"] = file_sha256(edited / "config.json")
    (edited / "meta.json").write_text(json.dumps(signed(meta)))
    test = synthetic_root / "test"
    for args, message in [
        (
            ["fit", "--config", twice, "--out", tmp_path / "o1", synthetic_root],
            f"{twice}: invalid YAML (line 3, column 3: duplicate key 'name', first on line 2)",
        ),
        (
            ["fit", "--set", "threshold={folds: 3, folds: 5}", "--out", tmp_path / "o2", synthetic_root],
            "--set threshold={folds: 3, folds: 5}: duplicate key 'folds', first on line 1",
        ),
        (
            ["score", "--model", edited, "--out", tmp_path / "o3", test],
            f"{edited}: config.json backbone.layers give 120 (40 + 80) channels but the model was fitted on "
            "152 (40 + 112); refit the model",
        ),
    ]:
        result = _run(*args)
        assert result.exit_code == 2, (args, result.output)
        assert [line for line in result.output.splitlines() if line.startswith("error:")] == [f"error: {message}"]
        assert "Traceback" not in result.output
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3))


def test_score_device_overrides_the_models(model_dir: Path, synthetic_root: Path, tmp_path: Path) -> None:
    import torch

    saved = _run("score", "--model", model_dir, "--out", tmp_path / "saved", "--no-overlays", synthetic_root / "test")
    on_cpu = _run(
        "score",
        "--model",
        model_dir,
        "--device",
        "cpu",
        "--out",
        tmp_path / "cpu",
        "--no-overlays",
        synthetic_root / "test",
    )
    assert saved.exit_code == 0 and on_cpu.exit_code == 0, saved.output + on_cpu.output
    if not torch.cuda.is_available():  # the model's "auto" ran on the CPU too: the same numbers
        assert [r["score"] for r in _rows(tmp_path / "saved")] == [r["score"] for r in _rows(tmp_path / "cpu")]
        result = _run("score", "--model", model_dir, "--device", "cuda", "--out", tmp_path / "gpu", synthetic_root)
        assert result.exit_code == 2 and "error: device: 'cuda' requested but no CUDA GPU" in result.output
        assert not (tmp_path / "gpu").exists()


def test_benchmark_writes_tables_and_resumes(synthetic_root: Path, tmp_path: Path, caplog) -> None:
    out = tmp_path / "bench"
    args = [
        "benchmark",
        "--dataset",
        "mvtec",
        "--root",
        synthetic_root.parent,
        "--category",
        "widget",
        "--config",
        "patchcore",
        "--out",
        out,
        *SMALL,
    ]
    result = _run(*args)
    assert result.exit_code == 0, result.output
    with (out / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["category"] for r in rows] == ["widget", "mean"]
    for col in ["image_auroc", "pixel_auroc", "aupro", "aupimo", "fit_s", "ms_per_image", "peak_mem_mb"]:
        assert col in rows[0]
    assert 0.9 <= float(rows[0]["image_auroc"]) <= 1
    assert (out / "results.md").is_file() and (out / "results.json").is_file()
    assert len(list((out / "widget" / "scores" / "overlays").rglob("*.png"))) == len(_rows(out / "widget" / "scores"))
    assert (out / "widget" / "report" / "index.html").is_file()
    assert json.loads((out / "widget" / "evaluation" / "metrics.json").read_text())["image_auroc"] >= 0.9
    assert 0 <= float(rows[0]["realised_fpr"]) <= 1
    record = json.loads((out / "widget" / "result.json").read_text())
    del record["source"]  # as an earlier version wrote it: still this run's
    (out / "widget" / "result.json").write_text(json.dumps(record))
    with caplog.at_level(logging.INFO, logger="anomaly"):
        again = _run(*args)
    assert again.exit_code == 0 and "already done" in caplog.text
    earlier = json.loads((out / "widget" / "result.json").read_text())  # a category run before, same config
    earlier["row"]["category"] = "gadget"
    (out / "gadget").mkdir()
    (out / "gadget" / "result.json").write_text(json.dumps(earlier))
    assert _run(*args).exit_code == 0
    with (out / "results.csv").open() as fh:
        assert [r["category"] for r in csv.DictReader(fh)] == ["gadget", "widget", "mean"]  # by name, not run order
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="anomaly"):  # another config: gadget's rows are not this table's
        assert _run(*args, "--set", "postprocess.blur_sigma=3").exit_code == 0
    assert "gadget: results of another config or --eval-size, left out of the table" in caplog.text
    with (out / "results.csv").open() as fh:
        assert [r["category"] for r in csv.DictReader(fh)] == ["widget", "mean"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="anomaly"):  # pixel metrics at another size: a re-run, not a skip
        assert _run(*args, "--set", "postprocess.blur_sigma=3", "--eval-size", "24x32").exit_code == 0
    assert "already done" not in caplog.text
    metrics = json.loads((out / "widget" / "evaluation" / "metrics.json").read_text())
    assert metrics["eval_size"] == "24x32" and json.loads((out / "widget" / "result.json").read_text())[
        "eval_size"
    ] == [
        24,
        32,
    ]
    assert 0.5 < metrics["pixel_auroc"] <= 1
    bad = _run(*args, "--eval-size", "big")
    assert bad.exit_code == 2 and "--eval-size: expected N or HxW, got 'big'" in bad.output


def test_a_benchmark_evaluation_says_what_the_threshold_did_as_evaluate_does(
    synthetic_root: Path, tmp_path: Path
) -> None:
    """A category's evaluation folder lacked the counts of flagged images that `anomaly evaluate --out` writes:
    its report showed no share of normal or anomalous images flagged."""
    out = tmp_path / "bench"
    args = ["--dataset", "mvtec", "--root", synthetic_root.parent, "--category", "widget", "--out", out, *SMALL]
    assert _run("benchmark", *args).exit_code == 0
    evaluated = _run(
        "evaluate", "--scores", out / "widget" / "scores", "--root", synthetic_root, "--out", tmp_path / "ev"
    )
    assert evaluated.exit_code == 0, evaluated.output
    ours, theirs = (
        json.loads((d / "metrics.json").read_text()) for d in (out / "widget" / "evaluation", tmp_path / "ev")
    )
    keys = ["n_images", "flagged_normal", "realised_fpr", "flagged_anomalous", "realised_tpr"]
    assert [ours.get(k) for k in keys] == [theirs[k] for k in keys]
    assert "Normal images flagged (share)" in (out / "widget" / "report" / "index.html").read_text()


def test_benchmark_without_masks_reports_image_metrics(synthetic_root: Path, tmp_path: Path, caplog) -> None:
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root / "widget", ignore=shutil.ignore_patterns("ground_truth"))
    out = tmp_path / "bench"
    with caplog.at_level(logging.WARNING, logger="anomaly"):
        result = _run("benchmark", "--dataset", "mvtec", "--root", root, "--out", out, *SMALL)
    assert result.exit_code == 0, result.output
    assert "widget/test/blob (and 2 more folder(s)): defective images without masks, image metrics only" in caplog.text
    with (out / "results.csv").open() as fh:
        row = next(csv.DictReader(fh))
    assert float(row["image_auroc"]) >= 0.9
    assert row["pixel_auroc"] == row["aupro"] == row["aupimo"] == ""  # the contract's columns, empty


def test_benchmark_folder_dataset_reads_plain_and_mvtec_layouts(synthetic_root: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    shutil.copytree(synthetic_root / "train" / "good", plain / "good")
    for defect in sorted(p.name for p in (synthetic_root / "test").iterdir() if p.name != "good"):
        shutil.copytree(synthetic_root / "test" / defect, plain / defect)
        shutil.copytree(synthetic_root / "ground_truth" / defect, plain / "masks" / defect)
    for junk in (".ipynb_checkpoints", "__MACOSX"):  # copies of good images: were read as defect types
        shutil.copytree(synthetic_root / "train" / "good", plain / junk)
    n_test = {"plain": None, synthetic_root.name: len(load_mvtec(synthetic_root).test)}
    for root in (plain, synthetic_root):  # an MVTec-layout category root is one folder dataset too
        out = tmp_path / f"bench_{root.name}"
        result = _run("benchmark", "--dataset", "folder", "--root", root, "--out", out, *SMALL)
        assert result.exit_code == 0, result.output
        with (out / "results.csv").open() as fh:
            row = next(csv.DictReader(fh))
        assert row["category"] == root.name and float(row["image_auroc"]) >= 0.9 and float(row["pixel_auroc"]) >= 0.9
        if n_test[root.name] is not None:
            assert len(_rows(out / root.name / "scores")) == n_test[root.name]
        assert not [r for r in _rows(out / root.name / "scores") if "ipynb" in r["path"] or "MACOSX" in r["path"]]


def test_benchmark_refuses_a_one_class_test_split_and_leaves_out_sets_without_training_images(
    synthetic_root: Path, tmp_path: Path, caplog
) -> None:
    """A test split of good images only crashed the run with a traceback (exit 1, no table); an imported test-only
    set (empty train/good) stopped the whole root; a folder without train/good was dropped without a word; a
    category found under the root without test images, or with one kind of them, stopped the whole root."""
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root / "widget")
    shutil.copytree(synthetic_root, root / "onlygood", ignore=shutil.ignore_patterns("ground_truth"))
    for defect in (root / "onlygood" / "test").iterdir():
        if defect.name != "good":
            shutil.rmtree(defect)
    shutil.copytree(synthetic_root / "train", root / "untested" / "train")  # still being collected: no test/ yet
    out = tmp_path / "bench"
    result = _run("benchmark", "--dataset", "mvtec", "--root", root, "--category", "onlygood", "--out", out, *SMALL)
    assert result.exit_code == 2 and not out.exists()
    assert f"error: {root / 'onlygood'}: the test split has no defective image" in result.output
    with caplog.at_level(logging.WARNING, logger="anomaly"):
        result = _run("benchmark", "--dataset", "mvtec", "--root", root, "--out", out, *SMALL)
    assert result.exit_code == 0, result.output
    assert "left out untested: no test images in test/<type>/" in caplog.text
    assert "left out onlygood: the test split has no defective image" in caplog.text
    with (out / "results.csv").open() as fh:
        assert [r["category"] for r in csv.DictReader(fh)] == ["widget", "mean"]
    shutil.rmtree(out)
    shutil.rmtree(root / "untested")
    result = _run("benchmark", "--dataset", "mvtec", "--root", root / "widget", "--out", out, *SMALL)
    assert result.exit_code == 2 and f"give its dataset root: --root {root} --category widget" in result.output
    shutil.rmtree(root / "onlygood" / "train" / "good")
    (root / "onlygood" / "train" / "good").mkdir()  # as `anomaly import` leaves a test-only set
    shutil.copytree(root / "onlygood", root / "testonly", ignore=shutil.ignore_patterns("train"))
    with caplog.at_level(logging.WARNING, logger="anomaly"):
        result = _run("benchmark", "--dataset", "mvtec", "--root", root, "--out", out, *SMALL)
    assert result.exit_code == 0, result.output
    assert "left out onlygood, testonly: no training images in train/good" in caplog.text
    with (out / "results.csv").open() as fh:
        assert [r["category"] for r in csv.DictReader(fh)] == ["widget", "mean"]


def test_benchmark_finds_a_category_whose_training_images_lie_in_sub_folders(tmp_path: Path, caplog) -> None:
    """load_mvtec reads train/good recursively, as a fit does, and `--category nested` ran; found under the root, the
    same category was left out as having 'no training images in train/good' (only its top level was looked at)."""
    from anomaly.data import make_synthetic_category

    root = tmp_path / "data"
    for name in ("flat", "nested"):
        make_synthetic_category(root, name, n_train=6, n_test_good=3, n_test_defect=3, size=64)
    good = root / "nested" / "train" / "good"
    (good / "cam1").mkdir()
    for image in list(good.glob("*.png")):
        image.rename(good / "cam1" / image.name)
    out = tmp_path / "bench"
    with caplog.at_level(logging.WARNING, logger="anomaly"):
        result = _run("benchmark", "--dataset", "mvtec", "--root", root, "--out", out, "--set",
                      "backbone.image_size=[64,64]", "--set", "batch_size=4")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "left out" not in caplog.text
    with (out / "results.csv").open() as fh:
        assert [r["category"] for r in csv.DictReader(fh)] == ["flat", "nested", "mean"]


def test_backbones_lists_the_packaged_lite0() -> None:
    result = _run("backbones")
    assert result.exit_code == 0
    assert "tf_efficientnet_lite0" in result.output and "packaged" in result.output
    assert "blocks.3" not in result.output


def test_backbones_lists_each_layer_with_channels_and_stride() -> None:
    result = _run("backbones", "--layers")
    assert result.exit_code == 0
    lite0 = result.output.split("tf_efficientnet_lite0", 1)[1].split("\ntf_", 1)[0]  # lite1/2 may follow
    lines = [line.split() for line in lite0.splitlines() if line.startswith("    ")]
    table = {parts[0]: (int(parts[1]), int(parts[-1])) for parts in lines}
    assert table["blocks.2"] == (40, 8) and table["blocks.4"] == (112, 16) and table["blocks.6"] == (320, 32)
    assert table["blocks.3"] == (80, 16)  # inside the stride-16 stage, a layer timm's feature_info leaves out


def test_backbones_lists_the_layers_of_a_named_hub_backbone_without_its_weights() -> None:
    """A hub backbone (DINOv2 with registers, Swin) is not usable offline, but its layers are the architecture's."""
    result = _run("backbones", "vit_small_patch14_reg4_dinov2.lvd142m", "swin_tiny_patch4_window7_224", "--layers")
    assert result.exit_code == 0, result.output
    vit, swin = result.output.split("swin_tiny_patch4_window7_224\n")
    assert vit.startswith("vit_small_patch14_reg4_dinov2.lvd142m\n")
    assert "    blocks.11" in vit and "384 channels, stride 14" in vit
    assert [line.split()[0] for line in swin.splitlines()] == ["layers.0", "layers.1", "layers.2", "layers.3"]
    assert "tf_efficientnet_lite0" not in result.output


def test_backbones_refuses_an_unknown_name_in_one_line() -> None:
    result = _run("backbones", "no_such_net")
    assert result.exit_code == 2
    assert "unknown timm model 'no_such_net'" in result.output and "Traceback" not in result.output


def test_backbones_refuses_an_unknown_pretrained_tag_in_one_line() -> None:
    """timm.is_model reads the architecture alone: a bad tag reached timm.create_model and printed a traceback."""
    result = _run("backbones", "vit_small_patch14_dinov2.no_such_tag")
    assert result.exit_code == 2
    assert "has no pretrained tag 'no_such_tag'" in result.output and "Traceback" not in result.output


def test_library_warnings_print_as_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import warnings

    import anomaly.features

    def warn_and_list() -> list:
        warnings.warn("the lower FPR bound is not exactly achieved", UserWarning, stacklevel=1)
        return []

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # restored after the CLI replaces it
    monkeypatch.setattr(anomaly.features, "list_offline_backbones", warn_and_list)
    result = _run("backbones")
    assert result.exit_code == 0
    lines = [line for line in result.output.splitlines() if "FPR bound" in line]
    assert lines == ["warning: the lower FPR bound is not exactly achieved"]
    assert "warn_and_list" not in result.output and ".py" not in result.output


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["score"], "error: Missing argument 'INPUT...' (see `"),
        (["fit", "--bogus", "x"], "error: No such option: --bogus"),
        (["nosuch"], "error: No such command 'nosuch' (see `"),
        (["score", "--model"], "error: Option '--model' requires an argument (see `anomaly score --help`)"),
    ],
)
def test_usage_errors_are_one_line_with_exit_2(
    args: list[str], expected: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The console entry point, as a user runs it: no boxed usage, one `error:` line."""
    from anomaly.cli import main

    monkeypatch.setattr("sys.argv", ["anomaly", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [err.strip()] and err.startswith(expected), err
    assert err.rstrip().endswith(f"{' '.join(args[:1]) if args[0] != 'nosuch' else 'anomaly'} --help`)"), err


def test_the_entry_point_returns_0_after_help(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from anomaly.cli import main

    monkeypatch.setattr("sys.argv", ["anomaly", "score", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 0 and "--model" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["fit", "score"])
def test_help_keeps_the_extra_in_brackets(command: str) -> None:
    """Rich reads '[ray]' as a style tag unless it is escaped; the install hint must survive."""
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "pip install 'anomaly[ray]'" in result.output


def test_demo_runs_end_to_end_and_reports_its_metrics(tmp_path: Path) -> None:
    """The first command a new user runs: data, model, scores and one metrics line, the threshold said once."""
    result = _run("demo", "--out", tmp_path / "demo")
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if line.startswith("image_auroc="))
    metrics = dict(item.split("=") for item in line.split())
    assert float(metrics["image_auroc"]) >= 0.95 and float(metrics["pixel_auroc"]) >= 0.9
    assert (tmp_path / "demo" / "model" / "meta.json").is_file()
    assert len(_rows(tmp_path / "demo" / "scores")) == 30  # 10 good + 20 defective test images
    assert sum(line.startswith("threshold ") for line in result.output.splitlines()) == 1


def test_demo_refuses_an_unwritable_out_in_one_line(tmp_path: Path) -> None:
    """A file in --out's path is a user error (exit 2, one line), not a traceback from the data's generation."""
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    result = _run("demo", "--out", blocker / "demo")
    assert result.exit_code == 2, result.output
    assert result.output.strip().startswith("error: ") and len(result.output.strip().splitlines()) == 1
    assert blocker.read_text() == "x"


def test_demo_refuses_a_users_model_folder_before_drawing_and_fitting(tmp_path: Path, monkeypatch) -> None:
    """OUT/model holding the user's files: one error line before the data is drawn, not after the fit."""
    import anomaly.data.synthetic as synthetic

    def drawn(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the data was drawn before OUT/model was checked")

    monkeypatch.setattr(synthetic, "make_synthetic_category", drawn)
    (tmp_path / "demo" / "model").mkdir(parents=True)
    (tmp_path / "demo" / "model" / "mine.txt").write_text("x")
    result = _run("demo", "--out", tmp_path / "demo")
    assert result.exit_code == 2, result.output
    assert result.output.strip().startswith("error: ") and "model" in result.output
    assert not (tmp_path / "demo" / "data").exists()
    assert (tmp_path / "demo" / "model" / "mine.txt").read_text() == "x"


def test_an_interrupted_demo_leaves_no_half_drawn_data(tmp_path: Path, monkeypatch) -> None:
    """The demo reuses OUT/data/widget when it exists: one killed while drawing it left a partial set that every
    later run fitted and scored as if complete."""
    import anomaly.data.synthetic as synthetic

    drawn = synthetic.make_synthetic_category

    def killed(out_root, name, **kwargs):  # type: ignore[no-untyped-def]
        drawn(out_root, name, n_train=2, n_test_good=1, n_test_defect=1, size=64)
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "make_synthetic_category", killed)
    assert _run("demo", "--out", tmp_path / "demo").exit_code == 130
    assert not (tmp_path / "demo" / "data").exists()
    assert [p.name for p in (tmp_path / "demo").iterdir()] == []


def test_score_checks_its_inputs_before_loading_the_model(model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from anomaly.detector import Detector

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(Detector, "load", never)
    result = _run("score", "--model", model_dir, "--out", tmp_path / "s", tmp_path / "missing")
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"error: no such file or folder: {tmp_path / 'missing'}"]
    negative = _run("score", "--model", model_dir, "--out", tmp_path / "s", "--overlay-size", "-5", tmp_path)
    assert negative.exit_code == 2 and "--overlay-size must be 0 (the original size) or more, got -5" in negative.output
    assert not (tmp_path / "s").exists()


def test_benchmark_table_gives_metrics_four_decimals_and_costs_one() -> None:
    """A sub-second fit printed as 0.9456 beside 1.7 read like a metric: costs take one decimal whatever their size."""
    from anomaly.benchmark import format_table

    rows = [
        {"category": "a", "image_auroc": 1.0, "pixel_auroc": 0.98314, "fit_s": 0.9456, "ms_per_image": 28.3},
        {"category": "b", "image_auroc": 0.5, "pixel_auroc": float("nan"), "fit_s": 12.04, "ms_per_image": 0.04},
    ]
    lines = format_table(rows).splitlines()
    assert lines[2] == "| a | 1.0000 | 0.9831 | 0.9 | 28.3 |"
    assert lines[3] == "| b | 0.5000 | nan | 12.0 | 0.0 |"


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux restarts the peak; elsewhere it is nan")
def test_peak_memory_is_measured_per_category_in_one_process() -> None:
    """The benchmark's peak_mem_mb column restarts for each category: the process's peak grew with run order."""
    from anomaly._runtime import peak_rss_mb, reset_peak_rss

    big = np.ones(50_000_000)  # 400 MB, then freed
    big[::512] = 2
    del big
    before = peak_rss_mb()
    assert reset_peak_rss()
    assert peak_rss_mb() < before - 300


def test_a_categorys_clock_counts_no_first_import(synthetic_root: Path, tmp_path: Path) -> None:
    """The pipeline imports FAISS, timm, SciPy and scikit-learn on first use: the first category's fit_s held the
    process's one-time import cost (4.2 s against 1.7 s for the same category run next). In a fresh interpreter,
    nothing outside the standard library is first imported while a category's fit or scores are timed."""
    import subprocess
    import sys

    code = """
import sys
from anomaly import benchmark
from anomaly.config import apply_overrides, load_config
from anomaly.detector import Detector
first = {}
fit, stream = Detector.fit, Detector.predict_stream
def imported_since(before):
    return sorted({m.split(".")[0] for m in set(sys.modules) - before} - set(sys.stdlib_module_names) - {"anomaly"})
def timed_fit(self, *args, **kwargs):
    before = set(sys.modules)
    fitted = fit(self, *args, **kwargs)
    first["fit"] = imported_since(before)
    return fitted
def timed_stream(self, *args, **kwargs):
    before = set(sys.modules)
    yield from stream(self, *args, **kwargs)
    first["predict_stream"] = imported_since(before)
Detector.fit, Detector.predict_stream = timed_fit, timed_stream
config = apply_overrides(load_config("patchcore"), ["backbone.image_size=[64,64]", "threshold.folds=3"])
benchmark.run_benchmark("folder", sys.argv[1], [], config, sys.argv[2])
print(first)
"""
    args = [sys.executable, "-c", code, str(synthetic_root), str(tmp_path / "bench")]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "{'fit': [], 'predict_stream': []}"


def test_peak_memory_where_the_peak_cannot_restart_is_the_risen_mark_or_a_said_nan(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Without /proc/self/clear_refs the column was nan for every category without a word. The process's mark is
    still a category's peak where it rose during that category; where it did not, nan comes with its reason."""
    import math

    from anomaly import benchmark

    marks = iter([100.0, 250.0, 250.0, 250.0])  # first category: 100 -> 250 MiB; second: stays under 250
    monkeypatch.setattr(benchmark, "reset_peak_rss", lambda: False)
    monkeypatch.setattr(benchmark, "peak_rss_mb", lambda: next(marks))
    assert benchmark._CategoryPeak().mb("first") == 250.0 and not caplog.records
    with caplog.at_level("WARNING", logger="anomaly.benchmark"):
        assert math.isnan(benchmark._CategoryPeak().mb("second"))
    assert [r.getMessage().split(" (nan)")[0] for r in caplog.records] == ["second: peak_mem_mb not measured"]
    assert "clear_refs" in caplog.records[0].getMessage()
    monkeypatch.setattr(benchmark, "reset_peak_rss", lambda: True)  # Linux: restarted, whatever was before
    monkeypatch.setattr(benchmark, "peak_rss_mb", lambda: 80.0)
    assert benchmark._CategoryPeak().mb("third") == 80.0


def test_benchmark_checks_every_category_first_and_a_rerun_keeps_its_table(tmp_path: Path) -> None:
    """An undefined AUPIMO (6 good images of 128 px: under AUPIMO's 100,000 normal pixels) read back from a
    finished category as an empty cell, so a re-run's mean left it out; a mistyped second category failed only
    after the first had run; ``--category`` with ``--dataset folder`` ran the root once per name."""
    from anomaly.data import make_synthetic_category

    make_synthetic_category(tmp_path / "data", "tiny", n_train=8, n_test_good=6, n_test_defect=4, size=128, seed=1)
    small = [*SMALL, "--set", "threshold.folds=3"]
    args = ["benchmark", "--dataset", "mvtec", "--root", tmp_path / "data", "--out", tmp_path / "out", *small]
    typo = _run(*args, "--category", "tiny", "--category", "tinny")
    assert (
        typo.exit_code == 2
        and "--category tinny: not found under" in typo.output
        and "(categories there: tiny)" in typo.output
    )
    assert not (tmp_path / "out").exists()  # refused before tiny ran
    (tmp_path / "file").write_text("")
    unwritable = [*args[: -len(small) - 2], "--out", tmp_path / "file" / "out", *small, "--category", "tiny"]
    blocked = _run(*unwritable)  # was refused only after the first category's fit
    assert blocked.exit_code == 2 and f"--out {tmp_path / 'file' / 'out'}: cannot write here" in blocked.output
    assert "fit took" not in blocked.output
    first = _run(*args, "--category", "tiny")
    assert first.exit_code == 0, first.output
    assert "fit took" in first.output  # what a fit says: its absence above means no fit ran
    table = (tmp_path / "out" / "results.csv").read_text()
    assert "nan" in table.splitlines()[1]  # the undefined AUPIMO, and why
    assert "tiny: AUPIMO is nan:" in first.output
    again = _run(*args, "--category", "tiny")
    assert again.exit_code == 0 and "already done" in again.output
    assert (tmp_path / "out" / "results.csv").read_text() == table
    folder = _run(
        "benchmark",
        "--dataset",
        "folder",
        "--root",
        tmp_path / "data" / "tiny",
        "--category",
        "x",
        "--out",
        tmp_path / "f",
    )
    assert folder.exit_code == 2 and "--dataset folder reads one category" in folder.output


def test_a_finished_category_whose_images_changed_is_re_run_not_skipped(tmp_path: Path) -> None:
    """A test image removed and another added after a run: the re-run skipped the category and kept its stale row
    (and a result.json listing the removed image)."""
    from anomaly.data import make_synthetic_category

    root = make_synthetic_category(tmp_path / "data", "t", n_train=6, n_test_good=3, n_test_defect=3, size=64)
    args = ["benchmark", "--dataset", "mvtec", "--root", tmp_path / "data", "--out", tmp_path / "out", "--set",
            "backbone.image_size=[64,64]", "--set", "threshold.folds=2"]  # fmt: skip
    assert _run(*args).exit_code == 0
    assert "already done" in _run(*args).output  # unchanged: skipped
    shutil.copy(root / "test" / "good" / "000.png", root / "test" / "good" / "099.png")
    again = _run(*args)
    assert again.exit_code == 0 and "already done" not in again.output
    assert "t: results of another config, --eval-size, --dataset, --root or set of images" in again.output
    record = json.loads((tmp_path / "out" / "t" / "result.json").read_text())
    assert str(root / "test" / "good" / "099.png") in [r["path"] for r in record["per_image"]]


def test_an_image_removed_while_another_category_runs_is_named_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The inputs' fingerprint stat()ed every file at the start of its category's run: a file removed while an
    earlier category ran ended the benchmark with FileNotFoundError (a traceback, exit 1)."""
    from anomaly import benchmark
    from anomaly.data import make_synthetic_category

    for name in ("a", "b"):
        make_synthetic_category(tmp_path / "data", name, n_train=6, n_test_good=3, n_test_defect=3, size=64)
    run = benchmark._run_category

    def remove_one_of_bs(data: Any, *args: Any) -> Any:
        if data.name == "a":
            (tmp_path / "data" / "b" / "test" / "good" / "000.png").unlink()
        return run(data, *args)

    monkeypatch.setattr(benchmark, "_run_category", remove_one_of_bs)
    result = _run("benchmark", "--dataset", "mvtec", "--root", tmp_path / "data", "--out", tmp_path / "out", "--set",
                  "backbone.image_size=[64,64]", "--set", "threshold.folds=2")  # fmt: skip
    assert result.exit_code == 2 and "b: image not found:" in result.output, result.output


def test_a_category_that_fails_is_named_and_the_finished_ones_keep_their_table(tmp_path: Path) -> None:
    from anomaly.data import make_synthetic_category

    make_synthetic_category(tmp_path / "data", "a", n_train=8, n_test_good=4, n_test_defect=4, size=128, seed=1)
    make_synthetic_category(tmp_path / "data", "b", n_train=2, n_test_good=4, n_test_defect=4, size=128, seed=2)
    args = ["benchmark", "--dataset", "mvtec", "--root", tmp_path / "data", "--out", tmp_path / "out", *SMALL]
    result = _run(*args, "--set", "threshold.folds=3")
    assert result.exit_code == 2
    assert "error: b: fit: the memory_bank scorer needs at least 3 normal images" in result.output, result.output
    assert (tmp_path / "out" / "results.csv").read_text().splitlines()[1].startswith("a,")


def test_zero_shot_benchmark_takes_test_only_categories(tmp_path: Path) -> None:
    from anomaly.data import make_synthetic_category

    root = make_synthetic_category(tmp_path / "data", "loose", n_train=1, n_test_good=6, n_test_defect=6, size=96)
    shutil.rmtree(root / "train")  # a test-only set, as `anomaly import` writes
    args = ["benchmark", "--dataset", "mvtec", "--root", tmp_path / "data", "--config", "musc", "--out", tmp_path / "o"]
    result = _run(*args, "--set", "backbone.image_size=[96,96]")
    assert result.exit_code == 0, result.output
    with (tmp_path / "o" / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["category"] for r in rows] == ["loose", "mean"] and float(rows[0]["image_auroc"]) > 0.5
    trained = _run("benchmark", "--dataset", "mvtec", "--root", tmp_path / "data", "--out", tmp_path / "p", *SMALL)
    assert trained.exit_code == 2 and "no mvtec category found" in trained.output
    assert "(loose: a test split without training images in train/good; a zero-shot config" in trained.output


def test_evaluate_refuses_or_names_what_would_change_its_figures(
    model_dir: Path, synthetic_root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "scores"
    assert _run("score", "--model", model_dir, "--out", out, "--maps", synthetic_root / "test").exit_code == 0
    base = ["evaluate", "--scores", out, "--root", synthetic_root]
    done = _run(*base, "--out", tmp_path / "ev", "--eval-size", "64")
    assert done.exit_code == 0 and json.loads((tmp_path / "ev" / "metrics.json").read_text())["eval_size"] == "64x64"
    (tmp_path / "afile").write_text("x")
    for args, needle in (
        (["--out", tmp_path / "afile"], "exists and is not a folder"),  # was a traceback after the metrics
        (["--eval-size", "100000"], "MP of the largest image"),  # was an OpenCV out-of-memory traceback
    ):
        result = _run(*base, *args)
        assert result.exit_code == 2 and needle in result.output and "Traceback" not in result.output, result.output
    with (out / "scores.csv").open() as fh:
        lines = fh.read().splitlines()
    (out / "scores.csv").write_text("\n".join([*lines, lines[1]]) + "\n")  # one row twice: counted twice before
    twice = _run(*base)
    assert twice.exit_code == 2 and "is listed twice" in twice.output
    header = lines[0].split(",")
    cells = lines[1].split(",")
    cells[header.index("map_path")] = ""
    (out / "scores.csv").write_text("\n".join([lines[0], ",".join(cells), *lines[2:]]) + "\n")
    partial = _run(*base)
    assert partial.exit_code == 0 and "1 of the 10 rows of scores.csv have no map" in partial.output
    assert "pixel_auroc" not in partial.output
    for bad, needle in (("nan", "score is nan"), ("high", "score 'high' is not a number")):
        cells = lines[1].split(",")
        cells[header.index("score")] = bad  # a hand-edited score: NaN ranked anywhere, text was a traceback
        (out / "scores.csv").write_text("\n".join([lines[0], ",".join(cells), *lines[2:]]) + "\n")
        edited = _run(*base)
        assert edited.exit_code == 2 and needle in edited.output and "Traceback" not in edited.output, edited.output


def _as_visa(category: Path, root: Path) -> Path:
    """``category`` (MVTec layout) as a VisA root as published: JPEGs, 0/1 masks, split_csv/1cls.csv."""
    rows = [["object", "split", "label", "image", "mask"]]
    data = load_mvtec(category)
    for split, samples in (("train", data.train), ("test", data.test)):
        for i, s in enumerate(samples):
            kind = "Anomaly" if s.label else "Normal"
            image = f"widget/Data/Images/{kind}/{split}{i:03d}.JPG"
            (root / image).parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / image), cv2.imread(str(s.image_path)))
            mask = ""
            if s.mask_path is not None:
                mask = f"widget/Data/Masks/Anomaly/{split}{i:03d}.png"
                (root / mask).parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(root / mask), (cv2.imread(str(s.mask_path), cv2.IMREAD_GRAYSCALE) > 0).astype("uint8"))
            rows.append(["widget", split, "anomaly" if s.label else "normal", image, mask])
    (root / "split_csv").mkdir()
    with (root / "split_csv" / "1cls.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return root


def test_a_visa_benchmark_reports_the_loaders_ground_truth_and_resumes_only_on_the_same_data(
    synthetic_root: Path, tmp_path: Path, caplog
) -> None:
    """The report of a VisA category took its labels from folder names (every Normal/ image counted anomalous) and
    had no masks; a re-run on another --root skipped the category and kept the other data's figures; a damaged mask
    ended the run after the fit and left the category's scores behind."""
    visa = _as_visa(synthetic_root, tmp_path / "visa")
    out = tmp_path / "bench"
    args = ["benchmark", "--dataset", "visa", "--root", visa, "--category", "widget", "--out", out, *SMALL]
    at_category = _run("benchmark", "--dataset", "visa", "--root", visa / "widget", "--out", out)
    assert at_category.exit_code == 2 and f"--root {visa} --category widget" in at_category.output
    assert not out.exists()
    assert _run(*args).exit_code == 0
    page = (out / "widget" / "report" / "index.html").read_text()
    assert "6 anomalous, 4 normal (ground truth from the evaluation)" in page and 'class="category">widget<' in page
    content = load_content(out / "widget" / "scores", out / "widget" / "evaluation")
    assert sorted((it.label, it.ground_truth is not None) for it in content.items) == [(0, False)] * 4 + [(1, True)] * 6
    assert content.title == "widget" and all(
        "Masks/Anomaly" in str(it.ground_truth) for it in content.items if it.label
    )
    other = tmp_path / "other"
    shutil.copytree(visa, other)
    (out / "widget" / "NOTES.txt").write_text("mine")
    with caplog.at_level(logging.INFO, logger="anomaly"):
        assert _run(*[other if a == visa else a for a in args]).exit_code == 0
    assert "already done" not in caplog.text and "--dataset, --root or set of images in" in caplog.text
    assert (out / "widget" / "NOTES.txt").read_text() == "mine"  # a re-run keeps what the user put there
    assert json.loads((out / "widget" / "result.json").read_text())["source"]["root"] == str(other.resolve())
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    damaged = next((other / "widget" / "Data" / "Masks" / "Anomaly").iterdir())
    damaged.write_bytes(damaged.read_bytes()[:60])
    failed = _run(*[other if a == visa else a for a in args], "--force")
    assert failed.exit_code == 2 and str(damaged) in failed.output and "fit" not in failed.output.lower()
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # the earlier complete results stand
    truth = json.loads((out / "widget" / "evaluation" / "ground_truth.json").read_text())
    assert all(Path(m).is_absolute() for m in truth["masks"] if m) and sum(map(bool, truth["masks"])) == 6
    damaged.unlink()  # a mask moved away since: the report is built without its outline, and says so
    report = _run("report", "--scores", out / "widget" / "scores", "--evaluation", out / "widget" / "evaluation",
                  "--out", tmp_path / "report")  # fmt: skip
    assert report.exit_code == 0 and "1 ground-truth mask(s) are not found here" in report.output, report.output


def test_a_visa_benchmark_names_a_normal_row_with_a_mask_once(synthetic_root: Path, tmp_path: Path, caplog) -> None:
    """The warning about a normal image with a mask cell was logged twice per category (checked, then loaded again)."""
    visa = _as_visa(synthetic_root, tmp_path / "visa")
    split = visa / "split_csv" / "1cls.csv"
    rows = list(csv.reader(split.open()))
    normal = next(r for r in rows if r[1] == "test" and r[2] == "normal")
    normal[4] = next(r[4] for r in rows if r[4])  # a mislabelled row: normal, with a defect's mask
    with split.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    args = ["benchmark", "--dataset", "visa", "--root", visa, "--config", "musc", "--out", tmp_path / "o"]
    with caplog.at_level(logging.WARNING, logger="anomaly"):
        assert _run(*args, "--set", "backbone.image_size=[128,128]").exit_code == 0
    assert caplog.text.count("a normal image with a mask") == 1, caplog.text


def test_a_converted_visa_category_without_training_images_runs_zero_shot(synthetic_root: Path, tmp_path: Path) -> None:
    """VisA converted to the MVTec layout without train/good was refused by --dataset visa (not by --dataset mvtec)
    with a message that said it was not in the MVTec layout."""
    shutil.copytree(synthetic_root, tmp_path / "visa" / "widget", ignore=shutil.ignore_patterns("train"))
    args = ["benchmark", "--dataset", "visa", "--root", tmp_path / "visa", "--config", "musc", "--out", tmp_path / "o"]
    result = _run(*args, "--set", "backbone.image_size=[128,128]")
    assert result.exit_code == 0, result.output
    with (tmp_path / "o" / "results.csv").open() as fh:
        assert [r["category"] for r in csv.DictReader(fh)] == ["widget", "mean"]


def test_benchmark_names_its_categories_as_folders_inside_out(synthetic_root: Path, tmp_path: Path) -> None:
    """A path given as --category wrote scores/ and result.json into the dataset folder itself; `widget/` and
    `widget` given together ran twice and weighted the mean; `--root ..` of a folder dataset wrote beside --out;
    a defect folder without its masks folder was named as a missing file only."""
    root = synthetic_root.parent
    args = ["benchmark", "--dataset", "mvtec", "--root", root, *SMALL, "--set", "threshold.folds=3"]
    path = _run(*args, "--category", synthetic_root, "--out", tmp_path / "p")
    assert path.exit_code == 2 and "give a category's folder name under --root (e.g. bottle), not a path" in path.output
    assert not (synthetic_root / "result.json").exists() and not (tmp_path / "p").exists()
    once = _run(*args, "--category", "widget/", "--category", "widget", "--out", tmp_path / "o")
    assert once.exit_code == 0, once.output
    with (tmp_path / "o" / "results.csv").open() as fh:
        assert [r["category"] for r in csv.DictReader(fh)] == ["widget", "mean"]
    assert (tmp_path / "o" / "widget" / "result.json").is_file()
    plain = tmp_path / "plain"
    shutil.copytree(synthetic_root / "train" / "good", plain / "good")
    shutil.copytree(synthetic_root / "test" / "good", plain / "notes")  # not a defect type, but read as one
    (plain / "masks").mkdir()
    folder = _run("benchmark", "--dataset", "folder", "--root", plain / "good" / "..", "--out", tmp_path / "f")
    assert folder.exit_code == 2
    assert (
        f"{plain / 'good' / '..' / 'notes'}: read as a defect type (every folder beside good/ is one)" in folder.output
    )
    shutil.rmtree(plain / "notes")
    shutil.rmtree(plain / "masks")
    shutil.copytree(synthetic_root / "test" / "scratch", plain / "scratch")
    folder = _run("benchmark", "--dataset", "folder", "--root", plain / "good" / "..", "--out", tmp_path / "f", *SMALL)
    assert folder.exit_code == 0, folder.output
    assert (tmp_path / "f" / "plain" / "result.json").is_file()


def test_fit_explains_its_threshold_once(synthetic_root: Path, tmp_path: Path) -> None:
    """The threshold's sentence was printed twice: logged by the fit, then again in the summary line."""
    result = _run("fit", "--out", tmp_path / "m", synthetic_root, *SMALL, "--set", "threshold.folds=3")
    assert result.exit_code == 0, result.output
    assert sum("target FPR" in line for line in result.output.splitlines()) == 1
    summary = next(line for line in result.output.splitlines() if line.startswith("fitted memory_bank on 12 images"))
    assert re.search(r"; threshold [\d.]+ \([a-z-]+\)$", summary), summary
    quiet = _run("-q", "fit", "--out", tmp_path / "q", synthetic_root, *SMALL, "--set", "threshold.folds=3")
    assert quiet.exit_code == 0 and "target FPR" not in quiet.output and "; threshold " in quiet.output


def test_evaluate_measures_pixels_of_a_set_of_defective_images_alone(
    model_dir: Path, synthetic_root: Path, tmp_path: Path
) -> None:
    """NEU-Seg has no normal image: `evaluate` refused it whole, though its defect images' normal pixels rank
    against the defects as any set's do. Pixel metrics now, image metrics nan and said; all-normal sets still
    refused."""
    defects = [p for p in (synthetic_root / "test").iterdir() if p.name != "good"]
    out = tmp_path / "scores"
    assert _run("score", "--model", model_dir, "--out", out, "--maps", *defects).exit_code == 0
    result = _run("evaluate", "--scores", out, "--root", synthetic_root, "--out", tmp_path / "ev")
    assert result.exit_code == 0, result.output
    assert "image metrics are undefined (nan), pixel metrics only" in result.output
    assert f"evaluation written to {tmp_path / 'ev'}" in result.output.splitlines()
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["image_auroc"] is None and metrics["aupimo"] is None  # NaN in JSON: null
    assert 0.9 <= metrics["pixel_auroc"] <= 1 and 0 < metrics["aupro"] <= 1
    good = tmp_path / "good_only"
    assert _run("score", "--model", model_dir, "--out", good, "--maps", synthetic_root / "test" / "good").exit_code == 0
    refused = _run("evaluate", "--scores", good, "--root", synthetic_root)
    assert refused.exit_code == 2 and "no anomalous image among the scored images" in refused.output
    test_only = Path(shutil.copytree(synthetic_root, tmp_path / "test_only", ignore=shutil.ignore_patterns("*.png")))
    fit = _run("fit", "--out", tmp_path / "m", test_only)  # as NEU-Seg is imported: train/good empty
    assert (
        fit.exit_code == 2 and "(a test-only category: score it zero-shot, `anomaly score --zero-shot`)" in fit.output
    )


def test_score_with_a_model_refuses_a_config_and_warns_that_an_image_scorer_writes_no_maps(
    model_dir: Path, synthetic_root: Path, tmp_path: Path
) -> None:
    """`score --model m --config padim` was silently ignored (the model keeps its fitted config); `--maps` for a
    scorer without maps was a note that --quiet hid."""
    refused = _run("score", "--model", model_dir, "--config", "padim", "--out", tmp_path / "s", synthetic_root / "test")
    assert refused.exit_code == 2 and "--config, --set and --backbone apply to --zero-shot" in refused.output
    assert not (tmp_path / "s").exists()
    fitted = _run("fit", "--config", "gaussian", "--out", tmp_path / "g", *SMALL, synthetic_root)
    assert fitted.exit_code == 0, fitted.output
    scored = _run("-q", "score", "--model", tmp_path / "g", "--maps", "--out", tmp_path / "gs", synthetic_root / "test")
    assert scored.exit_code == 0 and "warning: scorer gaussian gives image scores only" in scored.output
    assert not (tmp_path / "gs" / "maps").exists()
    assert {(row["map_path"], row["pixel_threshold"]) for row in _rows(tmp_path / "gs")} == {("", "")}
    # a category root is scored as its test split, as a fit takes its train/good: its masks were scored as images
    # (and joined zero-shot pools), and `evaluate --root` then refused the scores
    whole = _run("score", "--model", model_dir, "--out", tmp_path / "r", "--no-overlays", synthetic_root)
    assert whole.exit_code == 0 and f"scoring its test split {synthetic_root / 'test'}" in whole.output
    rows = _rows(tmp_path / "r")
    assert {Path(row["path"]).relative_to(synthetic_root).parts[0] for row in rows} == {"test"}
    assert len(rows) == len(list((synthetic_root / "test").glob("*/*.png")))
    evaluated = _run("evaluate", "--scores", tmp_path / "r", "--root", synthetic_root, "--out", tmp_path / "e")
    assert evaluated.exit_code == 0, evaluated.output


def _plain_folder(category: Path, root: Path) -> Path:
    """``category`` (MVTec layout) as a plain folder dataset: good/ + <defect>/ + masks/<defect>/."""
    shutil.copytree(category / "train" / "good", root / "good")
    for defect in sorted(p.name for p in (category / "test").iterdir() if p.name != "good"):
        shutil.copytree(category / "test" / defect, root / defect)
        shutil.copytree(category / "ground_truth" / defect, root / "masks" / defect)
    return root


def test_a_folder_benchmark_whose_first_run_stopped_reruns_with_out_inside_its_root(
    synthetic_root: Path, tmp_path: Path
) -> None:
    """A run that stopped in its first category (a training image cut off mid-file) left its empty --out folder
    inside the --root; every re-run then read it as a defect type and refused the dataset (no masks/<out>)."""
    root = _plain_folder(synthetic_root, tmp_path / "part")
    png = sorted((root / "good").iterdir())[0]
    image = png.with_suffix(".jpg")
    cv2.imwrite(str(image), cv2.imread(str(png)))
    png.unlink()
    whole = image.read_bytes()
    image.write_bytes(whole[: len(whole) // 2])  # its header reads, its pixels do not: found by the fit
    args = ["benchmark", "--dataset", "folder", "--root", root, "--out", root / "bench", *SMALL]
    failed = _run(*args)
    assert failed.exit_code == 2 and str(image) in failed.output, failed.output
    image.write_bytes(whole)
    result = _run(*args)
    assert result.exit_code == 0, result.output
    with (root / "bench" / "results.csv").open() as fh:
        assert [r["category"] for r in csv.DictReader(fh)] == ["part", "mean"]


def test_benchmark_refuses_a_non_image_file_of_any_category_before_the_first_runs(
    synthetic_root: Path, tmp_path: Path
) -> None:
    """A file that is not an image among a later category's images was found only when that category was fitted or
    scored: the categories before it had been run and written (minutes each), against "an unreadable file is an error
    naming the file, before any output is written"."""
    for dataset in ("mvtec", "visa"):
        if dataset == "mvtec":
            root = tmp_path / "mvtec"
            shutil.copytree(synthetic_root, root / "a_first")
            shutil.copytree(synthetic_root, root / "b_second")
            bad = sorted((root / "b_second" / "train" / "good").iterdir())[2]
        else:
            root = _as_visa(synthetic_root, tmp_path / "visa")
            bad = sorted((root / "widget" / "Data" / "Images" / "Anomaly").iterdir())[1]
        bad.write_bytes(b"not an image\n")
        out = tmp_path / f"out_{dataset}"
        result = _run("benchmark", "--dataset", dataset, "--root", root, "--out", out, *SMALL)
        assert result.exit_code == 2 and str(bad) in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and not out.exists()


def test_a_visa_object_with_test_rows_alone_is_left_out_of_a_fit_and_run_zero_shot(
    synthetic_root: Path, tmp_path: Path, caplog
) -> None:
    """An object of 1cls.csv without training rows ended the whole root's benchmark ("has no train image"), and a
    zero-shot config could not run it either; MVTec roots leave such categories out, named, and musc runs them."""
    visa = _as_visa(synthetic_root, tmp_path / "visa")
    with (visa / "split_csv" / "1cls.csv").open(newline="") as fh:
        rows = list(csv.reader(fh))
    rows += [["gadget", *row[1:]] for row in rows[1:] if row[1] == "test"]  # the same test images, no train rows
    with (visa / "split_csv" / "1cls.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    fitted = _run("benchmark", "--dataset", "visa", "--root", visa, "--out", tmp_path / "fit", *SMALL)
    assert fitted.exit_code == 0, fitted.output
    with (tmp_path / "fit" / "results.csv").open() as fh:
        assert [r["category"] for r in csv.DictReader(fh)] == ["widget", "mean"]
    assert "left out gadget: no training rows" in caplog.text
    args = ["--dataset", "visa", "--root", visa, "--category", "gadget", "--config", "musc", "--out", tmp_path / "zs"]
    zero_shot = _run("benchmark", *args, *SMALL)
    assert zero_shot.exit_code == 0, zero_shot.output
    refused = _run("benchmark", "--dataset", "visa", "--root", visa, "--category", "gadget", "--out", tmp_path / "x")
    assert refused.exit_code == 2 and "category 'gadget'" in refused.output and "has no train image" in refused.output


def test_threshold_chooses_the_models_threshold_again_without_a_refit(
    model_dir: Path, synthetic_root: Path, tmp_path: Path
) -> None:
    """`anomaly threshold` gives the threshold a fit at that target gives (the same cross-fitted normal scores),
    in place or into --out, and the model scores with it."""
    from anomaly import Detector
    from anomaly.model_dir import signed

    fitted = Detector.load(model_dir).decision_
    result = _run("threshold", "--model", model_dir, "--target-fpr", 0.3, "--out", tmp_path / "loose")
    assert result.exit_code == 0, result.output
    refit = _run("fit", "--out", tmp_path / "refit", *SMALL, "--set", "threshold.target_fpr=0.3", synthetic_root)
    assert refit.exit_code == 0, refit.output
    loose = Detector.load(tmp_path / "loose")
    assert loose.decision_.image == Detector.load(tmp_path / "refit").decision_.image < fitted.image
    assert loose.config.threshold.target_fpr == 0.3 and loose.decision_.n_normal == fitted.n_normal
    assert f"threshold {fitted.image:.6g} -> {loose.decision_.image:.6g} (conformal, target FPR 0.3" in result.output
    assert Detector.load(model_dir).decision_ == fitted  # --out leaves the model as it was
    good = sorted((synthetic_root / "test" / "good").glob("*.png"))
    assert sum(r.is_anomalous for r in loose.predict(good)) >= sum(
        r.is_anomalous for r in Detector.load(model_dir).predict(good)
    )
    in_place = Path(shutil.copytree(model_dir, tmp_path / "in_place"))
    assert _run("threshold", "--model", in_place, "--target-fpr", 0.3).exit_code == 0
    assert Detector.load(in_place).decision_.image == loose.decision_.image

    old = Path(shutil.copytree(model_dir, tmp_path / "old"))  # saved before models kept their normal scores
    meta = json.loads((old / "meta.json").read_text())
    del meta["normal_scores"], meta["normal_peaks"]
    (old / "meta.json").write_text(json.dumps(signed(meta)))
    assert Detector.load(old).decision_ == fitted  # still loads and scores
    for args, message in [
        (["--model", old, "--target-fpr", 0.3], f"{old}: this model was saved without the normal scores"),
        (["--model", model_dir, "--target-fpr", 0.9], "threshold.target_fpr: must be in (0, 0.5], got 0.9"),
        (["--model", tmp_path / "none", "--target-fpr", 0.1], "model directory not found"),
    ]:
        result = _run("threshold", *args)
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert message in result.output
    assert Detector.load(old).decision_ == fitted


def test_threshold_of_a_model_fitted_on_a_gpu_runs_without_one_and_keeps_its_device(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Choosing a threshold runs no network: a model fitted with device=cuda gets one on a machine without a GPU,
    and is saved with its own device; a zero-shot model is one line naming it."""
    import torch

    from anomaly import Detector
    from anomaly._fs import file_sha256
    from anomaly.model_dir import signed

    gpu = Path(shutil.copytree(model_dir, tmp_path / "gpu"))
    config = json.loads((gpu / "config.json").read_text())
    config["device"] = "cuda"
    (gpu / "config.json").write_text(json.dumps(config))
    meta = json.loads((gpu / "meta.json").read_text())
    meta["files"]["config.json"] = file_sha256(gpu / "config.json")
    (gpu / "meta.json").write_text(json.dumps(signed(meta)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = _run("threshold", "--model", gpu, "--target-fpr", 0.3)
    assert result.exit_code == 0, result.output
    assert json.loads((gpu / "config.json").read_text())["device"] == "cuda"
    loose = Detector.load(gpu, device="cpu")
    assert loose.config.threshold.target_fpr == 0.3
    assert loose.decision_.image < Detector.load(model_dir).decision_.image

    zero_shot = tmp_path / "musc"
    Detector("musc").save(zero_shot)
    refused = _run("threshold", "--model", zero_shot, "--target-fpr", 0.3)
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    assert f"{zero_shot}: a zero-shot model chooses its threshold per pool" in refused.output
