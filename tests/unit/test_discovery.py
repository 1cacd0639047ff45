"""Type discovery: MEBin regions, clustering, the clustering metrics (golden values) and the CLI."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from anomaly.cli import app
from anomaly.data.io import read_mask
from anomaly.discovery import cluster_descriptors, find_regions, pool_by_image
from anomaly.discovery.describe import crop_box
from anomaly.discovery.regions import mebin_threshold
from anomaly.errors import DataError
from anomaly.metrics.clustering import cluster_accuracy, clustering_metrics

runner = CliRunner()


def _blobs(centres: list[tuple[int, int]], size: int = 128, sigma: float = 5.0) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    amap = np.zeros((size, size), np.float32)
    for cy, cx in centres:
        amap += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2)).astype(np.float32)
    return amap


# --- regions ---------------------------------------------------------------------------------------------------


def test_mebin_counts_separate_blobs() -> None:
    amap = _blobs([(30, 30), (90, 100)])
    threshold, count = mebin_threshold(amap, 0.0, 1.0, erode=3)  # type: ignore[misc]
    assert count == 2 and 0 < threshold < 1


def test_find_regions_locates_each_blob_per_map() -> None:
    maps = [_blobs([(30, 30), (90, 100)]), _blobs([(64, 64)], sigma=12), _blobs([(20, 100)]) * 0.7]
    regions, choices = find_regions(maps, erode=3, scale="shared")
    # the weakest map never rises far into the shared sweep range: it is swept over its own range
    assert [c.method for c in choices] == ["stable", "stable", "stable_own"]
    by_image = {i: [r for r in regions if r.image == i] for i in range(3)}
    assert [len(by_image[i]) for i in range(3)] == [2, 1, 1]
    centres = sorted(((r.box[0] + r.box[2]) / 2, (r.box[1] + r.box[3]) / 2) for r in by_image[0])
    assert np.allclose(centres, [(30, 30), (100, 90)], atol=3)
    assert by_image[1][0].mask[64, 64] and by_image[2][0].mask[20, 100]
    assert not by_image[2][0].mask[90, 30]


def test_flat_map_falls_back_to_pixel_threshold_then_half_max() -> None:
    noisy = np.random.default_rng(0).random((64, 64)).astype(np.float32)  # no stable run of components
    regions, choices = find_regions([noisy], pixel_thresholds=[0.5], min_run=64, scale="shared")
    assert choices[0].method == "pixel_threshold" and regions
    regions, choices = find_regions([noisy], pixel_thresholds=[2.0], min_run=64, scale="shared")
    assert choices[0].method == "half_max" and regions  # the map never reaches its pixel threshold


@pytest.mark.parametrize("scale", ["per_image", "shared"])
def test_find_regions_refuses_a_non_finite_or_non_2d_map(scale: str) -> None:
    good = _blobs([(30, 30)])
    spotted = good.copy()
    spotted[5, 5] = np.nan  # a map from another tool: one NaN pixel left the map without any region (IndexError)
    with pytest.raises(DataError, match="map 1 holds NaN or infinite"):
        find_regions([good, spotted], scale=scale)
    with pytest.raises(DataError, match="map 0 must be"):
        find_regions([good[None]], scale=scale)


def test_per_image_scale_binarises_each_map_against_its_own_level() -> None:
    # A pool-relative map: the same blob on a raised floor and at a smaller height. Per image, each map
    # is cut half way between its own median (the floor) and its peak, so both blobs get the same region.
    strong = _blobs([(40, 40)], sigma=8)
    weak = 0.5 + 0.3 * _blobs([(80, 80)], sigma=8)
    regions, choices = find_regions([strong, weak], erode=3)  # per_image is the default
    assert [c.method for c in choices] == ["half_max", "half_max"]
    assert choices[1].threshold == pytest.approx(0.5 * (np.median(weak) + weak.max()))
    by_image = {r.image: r for r in regions}
    # a Gaussian cut at half its height: radius sigma * sqrt(2 ln 2), area about pi * 2 ln 2 * sigma^2 = 279 px
    assert by_image[0].area == pytest.approx(279, rel=0.15) and by_image[1].area == pytest.approx(279, rel=0.15)
    assert by_image[0].mask[40, 40] and by_image[1].mask[80, 80] and len(regions) == 2
    with pytest.raises(ValueError, match="scale"):
        find_regions([strong], scale="global")


# --- clustering ------------------------------------------------------------------------------------------------


def test_crop_box_keeps_a_pixel_floor_on_small_images_and_stays_inside() -> None:
    box = (60.0, 60.0, 66.0, 66.0)  # a 6 px region of a 128 px image
    assert crop_box(box, (128, 128)) == (50, 50, 76, 76)  # 0.2 x 128 = 26 px: the relative floor alone
    left, top, right, bottom = crop_box(box, (128, 128), min_pixels=64)
    assert (right - left, bottom - top) == (64, 64) and left <= 60 and right >= 66
    assert crop_box(box, (900, 900), min_pixels=64) == crop_box(box, (900, 900))  # 180 px already
    assert crop_box((0.0, 0.0, 4.0, 4.0), (40, 300), min_pixels=64) == (0, 0, 40, 40)  # capped by the short side


def test_cluster_descriptors_estimates_k_and_labels_by_size() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (12, 8)), rng.normal(10, 1, (8, 8)), rng.normal(-10, 1, (5, 8))])
    found = cluster_descriptors(x)
    assert found.k == 3 and found.k_method == "eigengap" and found.k_confidence > 0.5
    assert list(found.labels) == [0] * 12 + [1] * 8 + [2] * 5
    assert np.allclose(found.memberships.sum(1), 1) and found.memberships.max(1).min() > 0.9
    given = cluster_descriptors(x, k=2)
    assert given.k == 2 and given.k_method == "given" and given.k_scores == {}


def test_identical_descriptors_are_a_tie_not_a_confident_k() -> None:
    """Six copies of one image were split into 5 types with confidence 1.00: the eigengap picked rounding noise."""
    found = cluster_descriptors(np.ones((6, 4)))
    assert found.k == 2 and found.k_confidence == 0.0 and set(found.k_scores.values()) == {0.0}


def test_k_estimated_from_one_candidate_has_no_confidence() -> None:
    """From 3 images K = 2 is the only candidate: it was reported with confidence 1.00, though nothing was compared."""
    x = np.array([[0.0, 0.0], [0.0, 1.0], [5.0, 5.0], [5.0, 6.0]])
    assert list(cluster_descriptors(x[:3]).k_scores) == [2] and cluster_descriptors(x[:3]).k_confidence == 0.0
    assert sorted(cluster_descriptors(x).k_scores) == [2, 3]


@pytest.mark.parametrize("k", [0, 6])
def test_cluster_descriptors_refuses_k_outside_row_count(k: int) -> None:
    with pytest.raises(DataError, match="number of regions"):
        cluster_descriptors(np.eye(5), k=k, unit="regions")


def test_pool_by_image_weights_regions_by_area() -> None:
    descriptors = np.array([[0.0, 4.0], [1.0, 1.0], [8.0, 0.0], [3.0, 3.0]])
    # image 0 owns regions 0 and 2 (areas 0.3 and 0.1), image 1 regions 1 and 3 (0.1 and 0.2)
    pooled = pool_by_image(descriptors, np.array([0, 1, 0, 1]), np.array([0.3, 0.1, 0.1, 0.2]), 2)
    assert pooled == pytest.approx(np.array([[2.0, 3.0], [7 / 3, 7 / 3]]))
    with pytest.raises(ValueError, match="at least one region"):
        pool_by_image(descriptors, np.array([0, 0, 0, 0]), np.ones(4), 2)


def test_an_outlier_speck_moves_its_image_but_founds_no_cluster() -> None:
    # two types of four images, one region each; image 0 also has a small region far from everything
    rng = np.random.default_rng(1)
    regions = np.concatenate([rng.normal(0, 0.1, (4, 3)), rng.normal(10, 0.1, (4, 3)), [[-40.0, -40.0, -40.0]]])
    owner = np.array([0, 1, 2, 3, 4, 5, 6, 7, 0])
    area = np.array([0.2] * 8 + [0.01])
    by_region = cluster_descriptors(regions, k=2, unit="regions")
    assert by_region.labels[-1] != by_region.labels[0] and len(set(by_region.labels[:8])) == 1  # the speck split off
    pooled = pool_by_image(regions, owner, area, 8)
    assert pooled[0] == pytest.approx((0.2 * regions[0] + 0.01 * regions[8]) / 0.21)  # about -1.9: still type 0's side
    by_image = cluster_descriptors(pooled, k=2)
    assert list(by_image.labels) == [0] * 4 + [1] * 4 or list(by_image.labels) == [1] * 4 + [0] * 4


# --- metrics (hand-computed) ------------------------------------------------------------------------------------


def test_metrics_golden_split_cluster() -> None:
    # contingency (clusters x classes): [[2,0],[1,1],[0,2]]
    r = clustering_metrics([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2])
    assert r.f1 == pytest.approx(4 / 6)  # clusters 0->0 and 2->1; cluster 1 left unmatched
    # ARI: index 2, expected 6*3/15 = 1.2, max (6+3)/2 = 4.5
    assert r.ari == pytest.approx((2 - 1.2) / (4.5 - 1.2))
    # NMI: MI = 2/3 ln2, H(true) = ln2, H(pred) = ln3, arithmetic mean normalisation
    assert r.nmi == pytest.approx((2 / 3 * math.log(2)) / ((math.log(2) + math.log(3)) / 2))
    assert r.mapping == {0: 0, 2: 1}


def test_metrics_golden_fewer_clusters_than_classes() -> None:
    r = clustering_metrics(["a", "a", "b", "b", "c", "c"], [7, 7, 7, 7, 9, 9])
    assert r.f1 == pytest.approx(4 / 6) and r.mapping[9] == "c" and r.mapping[7] in ("a", "b")
    # ARI: index C(2,2)*3 = 3, true pairs 3, predicted pairs C(4,2)+C(2,2) = 7, C(6,2) = 15
    assert r.ari == pytest.approx((3 - 3 * 7 / 15) / ((3 + 7) / 2 - 3 * 7 / 15))


def test_metrics_permutation_is_perfect() -> None:
    r = clustering_metrics(["x", "y", "y", "z"], [2, 0, 0, 1])
    assert (r.nmi, r.ari, r.f1) == (pytest.approx(1.0), pytest.approx(1.0), 1.0)
    assert cluster_accuracy(["x", "y", "y", "z"], [2, 0, 0, 1])[1] == {2: "x", 0: "y", 1: "z"}
    with pytest.raises(ValueError):
        clustering_metrics([0, 1], [0])


# --- CLI -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scores_dir(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A hand-made `anomaly score --maps` folder: the maps are the blurred ground-truth masks (a perfect detector)."""
    out = tmp_path_factory.mktemp("discovery") / "scores"
    rows = []
    for image in sorted((synthetic_root / "test").glob("*/*.png")):
        defect = image.parent.name
        if defect == "good":
            amap = np.zeros((128, 128), np.float32)
        else:
            mask = read_mask(synthetic_root / "ground_truth" / defect / f"{image.stem}_mask.png")
            amap = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 2)
        rel = f"maps/test/{defect}/{image.stem}.npy"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        np.save(out / rel, amap)
        flagged = "true" if defect != "good" else "false"
        rows.append(
            {"path": str(image), "score": str(amap.max()), "is_anomalous": flagged, "threshold": "0.3", "map_path": rel}
        )
    with (out / "scores.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


def test_scores_and_clusters_csv_keep_odd_file_names_exactly(tmp_path: Path) -> None:
    """A name a spreadsheet would run as a formula, and one that is not UTF-8, read back as written: discovery read
    scores.csv with its own code, which crashed on the second and kept the first's escape apostrophe."""
    from anomaly.discovery.outputs import read_scored_images
    from anomaly.tables import read_clusters, read_scores, write_clusters, write_scores

    names = ["=cmd.png", "test/crack/caf\\udce9.png", "-1.png", "'=cmd.png"]  # the last: a name of its own
    (tmp_path / "maps").mkdir()
    rows = []
    for i, name in enumerate(names):
        np.save(tmp_path / "maps" / f"{i}.npy", np.zeros((4, 4), np.float32))
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()  # found relative to the scores folder
        rows.append({"path": name, "score": "1.0", "is_anomalous": "true", "threshold": "0.5",
                     "pixel_threshold": "0.5", "map_path": f"maps/{i}.npy", "overlay_path": ""})  # fmt: skip
    write_scores(tmp_path / "scores.csv", rows)
    assert b"\n'=cmd.png," in (tmp_path / "scores.csv").read_bytes()  # safe to open in a spreadsheet
    assert [r["path"] for r in read_scores(tmp_path)] == names
    selected = read_scored_images(tmp_path)
    assert selected.paths == names and selected.images == [tmp_path / name for name in names]
    clusters = [{"path": name, "cluster": "0", "confidence": "0.9", "n_regions": "1"} for name in names]
    write_clusters(tmp_path / "clusters.csv", clusters)
    assert [r["path"] for r in read_clusters(tmp_path)] == names
    write_clusters(tmp_path / "clusters.csv", clusters + clusters[:1])
    with pytest.raises(DataError, match="clusters.csv: =cmd.png is listed twice"):
        read_clusters(tmp_path)


def test_discover_cli_clusters_flagged_images_and_evaluates(
    scores_dir: Path, synthetic_root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "types"
    result = runner.invoke(app, ["discover", "--scores", str(scores_dir), "--out", str(out), "--k", "3"])
    assert result.exit_code == 0, result.output
    with (out / "clusters.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    flagged = [r["path"] for r in csv.DictReader((scores_dir / "scores.csv").open()) if r["is_anomalous"] == "true"]
    assert [r["path"] for r in rows] == flagged  # paths exactly as in scores.csv, flagged ones only
    assert {r["cluster"] for r in rows} == {"0", "1", "2"}
    assert all(1 / 3 <= float(r["confidence"]) <= 1 and int(r["n_regions"]) >= 1 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["k"] == 3 and summary["k_method"] == "given" and sum(summary["images_per_cluster"].values()) == 6
    for cluster in range(3):
        sheet = cv2.imread(str(out / "sheets" / f"cluster_{cluster}.png"))
        assert sheet is not None and sheet.shape[0] >= 160
    evaluated = runner.invoke(
        app, ["evaluate", "--discovery", str(out), "--root", str(synthetic_root), "--out", str(tmp_path / "eval")]
    )
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads((tmp_path / "eval" / "discovery_metrics.json").read_text())
    assert metrics["n_images"] == 6 and metrics["f1"] == 1.0 and metrics["nmi"] == pytest.approx(1.0)


def test_discover_all_includes_unflagged_and_estimates_k(scores_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["discover", "--scores", str(scores_dir), "--out", str(tmp_path / "t"), "--all"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((tmp_path / "t" / "clusters.csv").open()))
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert len(rows) == 10 and summary["k_method"] == "eigengap" and 2 <= summary["k"] <= 9


def test_discover_config_describes_with_its_backbone(scores_dir: Path, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """`--config patchcore` is the default describer (lite0, its measured layers and statistics): same clusters."""
    from anomaly.discovery.describe import RegionDescriber

    used = []
    build = RegionDescriber.from_backbone.__func__  # type: ignore[attr-defined]
    monkeypatch.setattr(
        RegionDescriber, "from_backbone", classmethod(lambda cls, config: used.append(config) or build(cls, config))
    )
    base = ["discover", "--scores", str(scores_dir), "--k", "3"]
    for name, extra in (("default", []), ("patchcore", ["--config", "patchcore"])):
        result = runner.invoke(app, [*base, "--out", str(tmp_path / name), *extra])
        assert result.exit_code == 0, result.output
    assert [c.name for c in used] == ["tf_efficientnet_lite0"]
    assert (tmp_path / "patchcore" / "clusters.csv").read_text() == (tmp_path / "default" / "clusters.csv").read_text()
    assert "unknown config 'nosuch'" in _error([*base, "--out", str(tmp_path / "o"), "--config", "nosuch"])
    assert not (tmp_path / "o").exists()


def test_describer_from_a_backbone_config() -> None:
    from anomaly import ConfigError
    from anomaly.config import load_config
    from anomaly.discovery.describe import DEFAULT_LAYERS, RegionDescriber

    lite = load_config("patchcore").backbone  # lite0 with its own 0.5/0.5 statistics for detection
    assert lite.mean == (0.5, 0.5, 0.5)
    described = RegionDescriber.from_backbone(lite, input_size=64)
    assert described.extractor.layer_names == list(DEFAULT_LAYERS)  # the describer's layers and statistics
    assert described.extractor.mean.flatten().tolist() == pytest.approx([0.485 * 255, 0.456 * 255, 0.406 * 255])
    other = load_config("patchcore_wrn50").backbone  # no blocks.4 / blocks.6: the config's own layers
    other = dataclasses.replace(other, name="resnet18", pretrained=False, mean=(0.5, 0.5, 0.5), std=(0.25,) * 3)
    described = RegionDescriber.from_backbone(other, input_size=64)
    assert described.extractor.layer_names == list(other.layers)  # and the config's statistics
    assert described.extractor.mean.flatten().tolist() == pytest.approx([127.5] * 3)
    # a ViT has blocks.4 and blocks.6 too, but as early transformer blocks: it keeps the config's layers
    vit = load_config("musc_dinov2").backbone
    vit = dataclasses.replace(vit, name="vit_small_patch14_dinov2", pretrained=False, layers=("blocks.9", "blocks.11"))
    described = RegionDescriber.from_backbone(vit, input_size=56)
    assert described.extractor.layer_names == ["blocks.9", "blocks.11"]
    assert described.extractor.final_norm  # the config's tokens, after the final norm as musc_dinov2 takes them
    with pytest.raises(ConfigError, match="backbone.final_norm: 'tf_efficientnet_lite0' returns feature maps"):
        RegionDescriber.from_backbone(dataclasses.replace(lite, final_norm=True), input_size=64)  # not ignored


@pytest.mark.parametrize(
    ("name", "layers", "input_size"),
    [("vit_small_patch14_dinov2", ("blocks.9", "blocks.11"), 64), ("resnet18", ("layer2",), 64)],
)
def test_a_describer_builds_its_backbone_once(monkeypatch, name: str, layers: tuple[str, ...], input_size: int) -> None:  # type: ignore[no-untyped-def]
    """A ViT describer (`--config musc_dinov2`) was built four times: once with the describer's layers to find it
    was a ViT, and each time once at 64 px and again at its whole patches (56 px); a CNN without blocks.4 twice.
    The structure is read on the meta device (no weights), the model built once."""
    import timm

    from anomaly.config import BackboneConfig
    from anomaly.discovery.describe import RegionDescriber

    built: list[str] = []
    create = timm.create_model

    def counted(*args: object, **kwargs: object) -> torch.nn.Module:
        model = create(*args, **kwargs)  # type: ignore[arg-type]
        if not next(model.parameters()).is_meta:
            built.append(str(args[0]))
        return model

    monkeypatch.setattr(timm, "create_model", counted)
    config = BackboneConfig(name=name, layers=layers, pretrained=False)
    described = RegionDescriber.from_backbone(config, input_size=input_size)
    assert described.extractor.layer_names == list(layers) and built == [name]
    if name.startswith("vit"):
        assert described.input_size == 70  # 64 px rounds to 5 whole patches of 14


def _error(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def test_discover_scale_option(scores_dir: Path, tmp_path: Path) -> None:
    for n, extra in enumerate(([], ["--scale", "shared"])):
        out = tmp_path / f"t{n}"
        result = runner.invoke(app, ["discover", "--scores", str(scores_dir), "--out", str(out), "--k", "3", *extra])
        assert result.exit_code == 0, result.output
        counts = json.loads((out / "summary.json").read_text())["binarization"]
        assert sum(counts.values()) == 6 and counts["half_max"] == (0 if extra else 6), counts
    assert "--scale" in _error(["discover", "--scores", str(scores_dir), "--out", str(tmp_path / "o"), "--scale", "x"])


def test_discover_cli_user_errors(scores_dir: Path, tmp_path: Path) -> None:
    no_maps = tmp_path / "no_maps"
    no_maps.mkdir()
    text = (scores_dir / "scores.csv").read_text().splitlines()
    header = text[0].split(",")
    col = header.index("map_path")
    body = [",".join(v if i != col else "" for i, v in enumerate(line.split(","))) for line in text[1:]]
    (no_maps / "scores.csv").write_text("\n".join([text[0], *body]) + "\n")
    assert "no anomaly maps" in _error(["discover", "--scores", str(no_maps), "--out", str(tmp_path / "o")])
    assert "not found" in _error(["discover", "--scores", str(tmp_path), "--out", str(tmp_path / "o")])
    the_file = _error(["discover", "--scores", str(scores_dir / "scores.csv"), "--out", str(tmp_path / "o")])
    assert f"{scores_dir / 'scores.csv'}: a file; give the folder that holds it" in the_file
    too_many = _error(["discover", "--scores", str(scores_dir), "--out", str(tmp_path / "o"), "--k", "40"])
    assert "number of images" in too_many and "only 6 of 10 images are flagged: --all" in too_many
    with_all = _error(["discover", "--scores", str(scores_dir), "--out", str(tmp_path / "o"), "--k", "40", "--all"])
    assert "number of images" in with_all and "--all" not in with_all
    assert not (tmp_path / "o").exists()  # nothing half-written
    assert "exactly one of" in _error(["evaluate", "--root", str(tmp_path)])


def test_discover_describes_with_a_patch_14_vit(scores_dir: Path, tmp_path: Path) -> None:
    """A patch-14 ViT (DINOv2: `--config musc_dinov2`) runs at 252 px, its whole patches; crops were cut at 256 px
    and the extractor refused them with a traceback (exit 1)."""
    vit = ["--set", "backbone.name=vit_small_patch14_dinov2", "--set", "backbone.pretrained=false"]
    result = runner.invoke(
        app, ["discover", "--scores", str(scores_dir), "--out", str(tmp_path / "o"), "--k", "3", *vit]
    )
    assert result.exit_code == 0, result.output
    assert len(list(csv.DictReader((tmp_path / "o" / "clusters.csv").open()))) == 6


def test_discover_takes_set_as_fit_does(scores_dir: Path, tmp_path: Path) -> None:
    """Offline, a backbone without weights was refused with the advice '--set backbone.weights=FILE', which
    `anomaly discover` did not take."""
    base = ["discover", "--scores", str(scores_dir), "--out", str(tmp_path / "o"), "--k", "3"]
    missing = tmp_path / "w.safetensors"
    error = _error([*base, "--set", f"backbone.weights={missing}"])
    assert error == f"error: backbone.weights: file not found: {missing}"
    assert "did you mean 'name'" in _error([*base, "--config", "padim", "--set", "backbone.nme=x"])
    assert _error([*base, "--set", "device=cpu"]) == (
        "error: --set device=cpu: discover takes backbone.* keys only (the regions' describer)"
    )
    assert not (tmp_path / "o").exists()


def test_discover_refuses_backbone_keys_its_describer_ignores(scores_dir: Path, tmp_path: Path) -> None:
    """lite0 has the describer's own layers and is described with them at ImageNet statistics, and every crop is
    seen at the describer's square input: `--set backbone.mean/std/layers/image_size` were accepted and changed
    nothing (the same clusters.csv to the byte)."""
    base = ["discover", "--scores", str(scores_dir), "--out", str(tmp_path / "o"), "--k", "3"]
    for given in ("backbone.mean=[0.1,0.1,0.1]", "backbone.std=[0.5,0.5,0.5]", "backbone.layers=[blocks.1]"):
        error = _error([*base, "--set", given])
        assert error.startswith(f"error: --set {given}: tf_efficientnet_lite0 has the describer's own layers"), error
    error = _error([*base, "--set", "backbone.image_size=[512,512]"])
    assert "its own square input" in error, error
    error = _error([*base, "--set", "backbone.layer_scales=[1,0.8]"])
    assert "its own square input, whatever the backbone's layer_scales" in error, error
    assert not (tmp_path / "o").exists()


def _copy_with_rows(scores_dir: Path, out: Path, rows: list[dict[str, str]]) -> Path:
    """A copy of ``scores_dir`` (maps included) at ``out`` whose scores.csv holds ``rows``."""
    shutil.copytree(scores_dir, out)
    with (out / "scores.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


def test_discover_reads_relative_image_paths_from_the_scores_folder_too(
    scores_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Paths relative to SCORES_DIR were read from the current folder only ('image not found'); `anomaly report`
    reads them from both."""
    rows = list(csv.DictReader((scores_dir / "scores.csv").open()))
    sources = [Path(r["path"]) for r in rows]
    for row, source in zip(rows, sources):
        row["path"] = f"images/{source.parent.name}/{source.name}"
    scores = _copy_with_rows(scores_dir, tmp_path / "scores", rows)
    for row, source in zip(rows, sources):
        (scores / row["path"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, scores / row["path"])
    monkeypatch.chdir(tmp_path)  # no images/ here: only the scores folder has them
    result = runner.invoke(app, ["discover", "--scores", "scores", "--out", "types", "--k", "3"])
    assert result.exit_code == 0, result.output
    clustered = [r["path"] for r in csv.DictReader((tmp_path / "types" / "clusters.csv").open())]
    assert clustered == [r["path"] for r in rows if r["is_anomalous"] == "true"]  # as written in scores.csv
    assert len(list((tmp_path / "types" / "sheets").glob("cluster_*.png"))) == 3
    (scores / clustered[0]).unlink()
    error = _error(["discover", "--scores", "scores", "--out", "gone", "--k", "3"])
    assert f"image {clustered[0]} not found" in error and "from the current folder and from scores" in error
    assert not (tmp_path / "gone").exists()


def test_contact_sheet_labels_stay_under_their_thumbnails(scores_dir: Path, tmp_path: Path) -> None:
    """A 24-character label is about 200 px wide under a 160 px thumbnail: the labels ran into each other."""
    from anomaly.discovery.outputs import THUMB

    rows = list(csv.DictReader((scores_dir / "scores.csv").open()))
    for row in rows:
        source = Path(row["path"])
        row["path"] = str(tmp_path / "images" / source.parent.name / f"exp1_num_{source.stem}_long_name.png")
        Path(row["path"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, row["path"])
    scores = _copy_with_rows(scores_dir, tmp_path / "scores", rows)
    result = runner.invoke(app, ["discover", "--scores", str(scores), "--out", str(tmp_path / "t"), "--k", "1"])
    assert result.exit_code == 0, result.output
    sheet = cv2.imread(str(tmp_path / "t" / "sheets" / "cluster_0.png"), cv2.IMREAD_GRAYSCALE)
    assert sheet.shape[1] >= 2 * THUMB
    labels = sheet[THUMB : THUMB + 18]
    for edge in range(THUMB, sheet.shape[1], THUMB):
        assert (labels[:, edge - 2 : edge + 1] == 255).all(), f"a label crosses x = {edge}"


def test_discover_refuses_a_nan_score_as_report_does(scores_dir: Path, tmp_path: Path) -> None:
    """A nan score or pixel threshold was used or skipped by `anomaly discover` and refused by `anomaly report`."""
    rows = list(csv.DictReader((scores_dir / "scores.csv").open()))
    rows[0]["score"] = "nan"
    scores = _copy_with_rows(scores_dir, tmp_path / "scores", rows)
    for command in ("discover", "report"):
        error = _error([command, "--scores", str(scores), "--out", str(tmp_path / command)])
        assert error == f"error: {scores / 'scores.csv'}: {rows[0]['path']}: score is nan"
        assert not (tmp_path / command).exists()
    rows[0]["score"] = rows[1]["score"]
    flagged = next(r for r in rows if r["is_anomalous"] == "true")
    flagged["pixel_threshold"] = "nan"  # was skipped silently for the image threshold
    scores = _copy_with_rows(scores_dir, tmp_path / "pixel", rows)
    for command in ("discover", "report"):
        error = _error([command, "--scores", str(scores), "--out", str(tmp_path / f"{command}2")])
        assert error == f"error: {scores / 'scores.csv'}: {flagged['path']}: pixel_threshold is nan"


def test_discover_api_takes_detection_results(scores_dir: Path) -> None:
    from anomaly import DetectionResult
    from anomaly.discovery import discover

    rows = [r for r in csv.DictReader((scores_dir / "scores.csv").open()) if r["is_anomalous"] == "true"]
    results = [DetectionResult(1.0, True, 0.3, np.load(scores_dir / r["map_path"]), r["path"]) for r in rows]
    found = discover(results, k=3)
    truth = [Path(r["path"]).parent.name for r in rows]
    assert clustering_metrics(truth, found.labels).f1 == 1.0
    assert list(found.n_regions) == [1] * 6 and found.summary()["images_per_cluster"] == {"0": 2, "1": 2, "2": 2}
    with pytest.raises(DataError, match="no anomaly map"):
        discover([DetectionResult(1.0, True, 0.3, None, "x.png")])


def test_discover_reads_every_16_bit_image_at_one_depth(tmp_path: Path) -> None:
    """Images are decoded a chunk at a time; a 12-bit frame in the first chunk must not make the same 10-bit
    content read 4x darker there than in the next chunk."""
    from anomaly.discovery import pipeline
    from anomaly.discovery.regions import Region

    paths = []
    for i in range(pipeline._CHUNK + 4):
        image = np.full((32, 32), 1000, np.uint16)
        image[0, 0] = 4000 if i == 0 else 1000  # the first image needs 12 bits, the others 10
        paths.append(tmp_path / f"{i:02d}.png")
        cv2.imwrite(str(paths[-1]), image)
    seen: list[int] = []

    class Recorder:
        def crop(self, image: np.ndarray, region: Region) -> tuple[np.ndarray, np.ndarray]:
            seen.append(int(image[16, 16, 0]))
            return image[:8, :8], np.ones((8, 8), np.float32)

        def describe(self, crops: np.ndarray, masks: np.ndarray) -> np.ndarray:
            return np.arange(len(crops) * 2, dtype=np.float32).reshape(-1, 2)

    amap = np.zeros((32, 32), np.float32)
    amap[8:24, 8:24] = 1
    pipeline.discover(paths, k=2, maps=[amap] * len(paths), describer=Recorder())  # type: ignore[arg-type]
    assert seen == [1000 >> 4] * len(paths)


def test_contact_sheet_decodes_one_frame_at_a_time(tmp_path: Path) -> None:
    """The sheet decoded all its (up to 64) images before shrinking any: gigabytes for camera frames. 16-bit
    frames still share one depth: a dark 12-bit frame stays darker than a bright one."""
    import tracemalloc
    from types import SimpleNamespace

    from anomaly.discovery.outputs import THUMB, _contact_sheet

    ramp = np.linspace(0, 255, 1200, dtype=np.float32)
    frame = np.dstack([np.add.outer(ramp, ramp) / 2] * 3).astype(np.uint8)  # 4.3 MB decoded
    files = []
    for i in range(12):
        files.append(tmp_path / f"f{i}.png")
        cv2.imwrite(str(files[-1]), frame)
    result = SimpleNamespace(regions=[], confidence=np.ones(12))
    tracemalloc.start()
    try:
        _contact_sheet(result, np.arange(12), [str(f) for f in files], files)  # type: ignore[arg-type]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 6 * frame.nbytes, peak  # a decode takes about 3.4 frames; all 12 at once took 13
    bright, dark = tmp_path / "bright.png", tmp_path / "dark.png"
    cv2.imwrite(str(bright), np.full((40, 40), 3000, np.uint16))
    cv2.imwrite(str(dark), np.full((40, 40), 1000, np.uint16))
    sheet = _contact_sheet(
        SimpleNamespace(regions=[], confidence=np.ones(2)),
        np.arange(2),
        ["b.png", "d.png"],
        [bright, dark],  # type: ignore[arg-type]
    )
    assert sheet[5, 5].tolist() == [187] * 3 and sheet[5, THUMB + 5].tolist() == [62] * 3  # 3000 and 1000 >> 4


def test_estimating_k_needs_k_max_of_two() -> None:
    """``k_max=1`` raised "max() arg is an empty sequence"."""
    from anomaly.discovery.cluster import cluster_descriptors

    x = np.random.default_rng(0).normal(size=(12, 4))
    with pytest.raises(ValueError, match="k_max must be 2 or more to estimate K, got 1"):
        cluster_descriptors(x, k_max=1)
    assert cluster_descriptors(x, k=3, k_max=1).k == 3  # a given K needs no estimate
