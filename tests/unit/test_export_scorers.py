"""Export parity for every exportable scorer variant, and for OpenVINO when it is installed."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from anomaly import Detector
from anomaly.config import apply_overrides, load_config
from anomaly.errors import DataError
from anomaly.model_dir import signed

pytest.importorskip("onnxruntime")
from anomaly.export import export_model  # noqa: E402
from anomaly.runtime import ExportedDetector  # noqa: E402


@pytest.mark.parametrize(
    ("config", "extra"),
    [
        ("padim", []),
        ("gaussian", []),
        (
            "patchcore",
            [
                "scorer.params.reweight=true",
                "scorer.params.k=3",
                "backbone.layers=[blocks.1,blocks.2,blocks.4]",  # a stride-4 layer averaged onto the stride-8 grid
                "scorer.params.grid_layer=1",
            ],
        ),
        ("patchcore", ["scorer.params.coreset_ratio=0.5", "scorer.params.index=IVF4,Flat"]),  # image peaks exact
        ("patchcore", ["scorer.params.patch_kernel=binomial"]),
        ("patchcore", ["backbone.layers=[blocks.2,blocks.3]"]),  # a block inside a stride (extra_blocks)
    ],
    ids=["padim", "gaussian", "patchcore-reweight-k3-grid1", "patchcore-ivf", "patchcore-binomial", "patchcore-b3"],
)
def test_exported_scorers_match_the_torch_detector(
    config: str, extra: list[str], synthetic_root: Path, tmp_path: Path, assert_parity: Callable[..., None]
) -> None:
    cfg = apply_overrides(load_config(config), ["backbone.image_size=[64,64]", "batch_size=4", *extra])
    det = Detector(cfg).fit(sorted((synthetic_root / "train" / "good").glob("*.png")))
    model = det.save(tmp_path / "model")
    paths = sorted((synthetic_root / "test").glob("*/*.png"))
    expected = det.predict(paths)
    assert_parity(expected, ExportedDetector(export_model(model, tmp_path / "export")).predict(paths))


def test_openvino_export_matches_the_torch_detector(
    patchcore_model: Path, synthetic_root: Path, tmp_path: Path, assert_parity: Callable[..., None]
) -> None:
    pytest.importorskip("openvino")
    export = export_model(patchcore_model, tmp_path / "export", "openvino")
    files = sorted(p.name for p in export.iterdir() if not p.name.startswith("."))
    assert files == ["index.faiss", "manifest.json", "model.bin", "model.xml"]
    paths = sorted((synthetic_root / "test").glob("*/*.png"))
    assert_parity(Detector.load(patchcore_model).predict(paths), ExportedDetector(export).predict(paths))

    manifest = json.loads((export / "manifest.json").read_text())  # OpenVINO reads model.bin from beside model.xml:
    del manifest["files"]["model.bin"]  # unlisted, it was loaded unchecked
    (export / "manifest.json").write_text(json.dumps(signed(manifest)))
    with pytest.raises(DataError, match="network file 'model.bin' is not one of its checksummed files"):
        ExportedDetector(export)


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_exports_may_be_called_from_several_threads(
    fmt: str, patchcore_model: Path, synthetic_root: Path, tmp_path: Path
) -> None:
    """As README says of predict: an OpenVINO export called from two threads at once failed with "Infer Request is
    busy" (the compiled model's own request is shared)."""
    from concurrent.futures import ThreadPoolExecutor

    if fmt == "openvino":
        pytest.importorskip("openvino")
    detector = ExportedDetector(export_model(patchcore_model, tmp_path / "export", fmt))
    paths = sorted((synthetic_root / "test").glob("*/*.png")) * 6
    serial = [detector.predict(path).image_score for path in paths]
    with ThreadPoolExecutor(6) as threads:
        assert [result.image_score for result in threads.map(detector.predict, paths)] == serial


def test_exported_state_is_readable_like_every_other_file(synthetic_root: Path, tmp_path: Path) -> None:
    """safetensors creates its files 0600: an export's state.safetensors was unreadable to another user (a service
    account) while its graph and manifest were not."""
    import os

    cfg = apply_overrides(load_config("gaussian"), ["backbone.image_size=[64,64]", "batch_size=4"])
    model = Detector(cfg).fit(sorted((synthetic_root / "train" / "good").glob("*.png"))).save(tmp_path / "model")
    mask = os.umask(0o022)
    try:
        export = export_model(model, tmp_path / "export")
    finally:
        os.umask(mask)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in export.iterdir()}
    assert "state.safetensors" in modes and set(modes.values()) == {"0o644"}, modes


def test_padim_refuses_a_grid_of_as_many_positions_in_another_shape(synthetic_root: Path, tmp_path: Path) -> None:
    """PaDiM's Gaussians belong to the positions of its fit's grid: a model (or export) whose input size was edited to
    one of as many feature positions (64 x 64 -> 32 x 128: 16 x 16 -> 8 x 32) read every Gaussian at another place
    without a word (a training image scored 100x its threshold); the position count alone was checked."""
    from typer.testing import CliRunner

    from anomaly._fs import file_sha256
    from anomaly.cli import app

    cfg = apply_overrides(load_config("padim"), ["backbone.image_size=[64,64]", "batch_size=4", "threshold.folds=3"])
    model = Detector(cfg).fit(sorted((synthetic_root / "train" / "good").glob("*.png"))).save(tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    config["backbone"]["image_size"] = [32, 128]
    (model / "config.json").write_text(json.dumps(config))
    meta = json.loads((model / "meta.json").read_text())
    meta["files"]["config.json"] = file_sha256(model / "config.json")
    (model / "meta.json").write_text(json.dumps(signed(meta)))
    image = str(next((synthetic_root / "test").glob("*/*.png")))
    for target in (model, export_model(model, tmp_path / "export")):  # the export: a graph of the edited size
        result = CliRunner().invoke(app, ["score", "--model", str(target), "--out", str(tmp_path / "out"), image])
        assert result.exit_code == 2, result.output
        assert "Gaussians of 256 positions (16 x 16)" in result.output and "8 x 32 = 256" in result.output
        assert "Traceback" not in result.output and not (tmp_path / "out").exists()
