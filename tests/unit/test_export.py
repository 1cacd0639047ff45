"""Export + torch-free runtime: score parity with the torch Detector, no torch import, tamper checks."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from anomaly import DataError, Detector
from anomaly._fs import file_sha256
from anomaly.cli import app
from anomaly.model_dir import signed

pytest.importorskip("onnxruntime")
from anomaly.runtime import ExportedDetector  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _test_images(root: Path) -> list[Path]:
    return sorted((root / "test").glob("*/*.png"))


def test_runtime_matches_the_torch_detector(
    patchcore_model: Path, patchcore_export: Path, synthetic_root: Path, assert_parity: Callable[..., None]
) -> None:
    paths = _test_images(synthetic_root)
    expected = Detector.load(patchcore_model).predict(paths)
    runtime = ExportedDetector(patchcore_export)
    got = runtime.predict(paths)
    assert_parity(expected, got)
    assert [r.source for r in got] == [str(p) for p in paths]
    assert {r.is_anomalous for r in got} == {True, False}  # a real test of the verdicts, not all one way
    # encoded bytes and decoded arrays (grayscale too) give the same results as paths
    from_bytes = runtime.predict([p.read_bytes() for p in paths[:3]])
    assert [r.image_score for r in from_bytes] == pytest.approx([r.image_score for r in got[:3]], rel=1e-5)
    from anomaly.data.io import read_image

    gray = read_image(paths[0]).mean(2).astype(np.uint8)
    assert runtime.predict(gray).image_score == pytest.approx(
        Detector.load(patchcore_model).predict(gray).image_score, rel=1e-4
    )


def test_runtime_predict_stream_takes_one_image_given_alone_as_one_input(
    patchcore_export: Path, synthetic_root: Path
) -> None:
    """As ``Detector.predict_stream``: an RGB frame given alone was iterated, one result per row."""
    from anomaly.data.io import read_image

    rgb = read_image(_test_images(synthetic_root)[0])
    runtime = ExportedDetector(patchcore_export)
    streamed = [result for result, _ in runtime.predict_stream(rgb)]
    assert len(streamed) == 1 and streamed[0].anomaly_map is not None
    assert streamed[0].anomaly_map.shape == rgb.shape[:2]
    assert streamed[0].image_score == pytest.approx(runtime.predict(rgb).image_score, rel=1e-6)


def test_runtime_takes_what_the_detector_takes(patchcore_model: Path, patchcore_export: Path, tmp_path: Path) -> None:
    """A line swapping the Detector for its export keeps PIL images, ``on_error="skip"`` and clear errors."""
    from PIL import Image

    runtime, detector = ExportedDetector(patchcore_export), Detector.load(patchcore_model)
    rng = np.random.default_rng(1)
    pil = Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8))
    assert runtime.predict(pil).image_score == pytest.approx(detector.predict(pil).image_score, rel=1e-4)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    got = runtime.predict([pil, broken, pil], on_error="skip")
    expected = detector.predict([pil, broken, pil], on_error="skip")
    assert [r.error is None for r in got] == [True, False, True]
    assert got[1].source == expected[1].source == str(broken) and np.isnan(got[1].image_score)
    assert got[1].threshold == expected[1].threshold and not got[1].is_anomalous
    assert got[2].image_score == pytest.approx(expected[2].image_score, rel=1e-4)
    with pytest.raises(DataError, match="broken.png"):
        runtime.predict([pil, broken])
    mask = np.zeros((96, 96), bool)  # an array's own error cannot name it: its position in the list does
    for predictor in (runtime, detector):
        with pytest.raises(DataError, match=r"^input 1 \(of 3, counted from 0\): boolean image arrays are masks"):
            predictor.predict([pil, mask, pil])
        skipped = predictor.predict([pil, mask], on_error="skip")[1]
        assert skipped.error is not None and skipped.error.startswith("input 1 (of 2, counted from 0): boolean")
        with pytest.raises(DataError, match="^boolean image arrays are masks"):
            predictor.predict(mask)
    frames = rng.integers(0, 255, (3, 96, 96, 3), dtype=np.uint8)
    for predictor in (runtime, detector):  # a stack, a generator, nothing: as many results
        stacked = predictor.predict(frames)
        assert len(stacked) == 3 and stacked[1].image_score == pytest.approx(predictor.predict(frames[1]).image_score)
        assert [r.image_score for r in predictor.predict(f for f in frames)] == [r.image_score for r in stacked]
        assert predictor.predict([]) == []
        with pytest.raises(DataError, match="on_error must be"):  # an empty batch too, as StreamingDetector
            predictor.predict([], on_error="ignore")  # type: ignore[arg-type]
    with pytest.raises(DataError):
        runtime.predict(None)  # type: ignore[arg-type]
    with pytest.raises(DataError, match="export directory not found"):
        ExportedDetector(tmp_path / "nowhere")
    model = Path(shutil.copytree(patchcore_model, tmp_path / "model"))
    into_model = CliRunner().invoke(app, ["export", "--model", str(model), "--out", str(model)])
    assert into_model.exit_code == 2 and "is another kind of anomaly output" in into_model.output


def test_runtime_names_images_far_from_the_training_aspect(
    patchcore_model: Path, patchcore_export: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The export keeps the training images' aspect range; the runtime warns of stretched odd inputs as the
    Detector does (one line per call, naming them)."""
    detector = Detector.load(patchcore_model)
    fitted = detector.training_aspects_
    assert fitted == (1.0, 1.0)  # the synthetic training images are square
    runtime = ExportedDetector(patchcore_export)
    assert runtime.input_profile == detector.input_profile() and runtime.input_profile.aspects == fitted
    assert (runtime.threshold_, runtime.pixel_threshold_) == (detector.threshold_, detector.pixel_threshold_)
    caplog.set_level("WARNING", logger="anomaly")
    runtime.predict([np.full((96, 96), 4000, np.uint16)])  # 12-bit data for a model that reads 16-bit as 16
    assert "(12 bits: near-black)" in caplog.text
    caplog.clear()
    rng = np.random.default_rng(0)
    square, wide = (rng.integers(0, 255, shape, dtype=np.uint8) for shape in [(96, 96, 3), (60, 150, 3)])
    caplog.set_level("WARNING", logger="anomaly")
    runtime.predict([square, square])
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    runtime.predict([square, wide])
    (record,) = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "1 of 2 image(s)" in record.message and "(1.00)" in record.message and "150x60" in record.message


def test_runtime_offers_the_detectors_config_and_input_check(
    patchcore_model: Path, patchcore_export: Path, tmp_path: Path
) -> None:
    """ExportedDetector lacked ``config`` and ``input_check()``, which Detector offers: code written for one
    predictor (``load_predictor``) failed with AttributeError on the other."""
    detector = Detector.load(patchcore_model, device="cpu")
    runtime = ExportedDetector(patchcore_export, device="cpu")
    assert runtime.config == detector.config and ExportedDetector(patchcore_export).config.device == "auto"
    assert ExportedDetector(patchcore_export, device=None).config.device == "auto"  # raised AttributeError
    check = runtime.input_check()
    assert check.profile == detector.input_check().profile
    check.add([(60, 150)], ["wide.png"], [None])
    assert "wide.png" in check.warnings(1)[0]
    copy = _copy(patchcore_export, tmp_path)  # an export written before the manifest held the config
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["config"]
    (copy / "manifest.json").write_text(json.dumps(signed(manifest)))
    assert ExportedDetector(copy).config is None


def test_runtime_and_score_cli_never_import_torch_or_timm(
    patchcore_export: Path, synthetic_root: Path, tmp_path: Path
) -> None:
    image = _test_images(synthetic_root)[0]
    code = (
        "import sys, json\n"
        "from anomaly.runtime import ExportedDetector\n"
        "from anomaly.cli import app\n"
        f"r = ExportedDetector({str(patchcore_export)!r}).predict({str(image)!r})\n"
        f"app(['-q', 'score', '--model', {str(patchcore_export)!r}, '--out', {str(tmp_path / 'out')!r}, '--maps',"
        f" {str(image)!r}], standalone_mode=False)\n"
        "heavy = [m for m in ('torch', 'timm') if m in sys.modules]\n"
        "print(json.dumps([r.image_score, r.anomaly_map.shape[0], heavy]))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=True)
    score, height, imported = json.loads(out.stdout.strip().splitlines()[-1])
    assert np.isfinite(score) and height == 128
    assert (tmp_path / "out" / "scores.csv").is_file()
    assert imported == []


def test_score_cli_accepts_an_export_and_writes_the_same_outputs(
    patchcore_model: Path, patchcore_export: Path, synthetic_root: Path, tmp_path: Path
) -> None:
    runner = CliRunner()
    rows = {}
    for name, model in (("torch", patchcore_model), ("export", patchcore_export)):
        out = tmp_path / name
        result = runner.invoke(
            app, ["score", "--model", str(model), "--out", str(out), "--maps", str(synthetic_root / "test")]
        )
        assert result.exit_code == 0, result.output
        with (out / "scores.csv").open() as fh:
            rows[name] = list(csv.DictReader(fh))
    assert len(rows["export"]) == 10
    for a, b in zip(rows["torch"], rows["export"], strict=True):
        assert (a["path"], a["is_anomalous"], a["threshold"], a["map_path"]) == (
            b["path"],
            b["is_anomalous"],
            b["threshold"],
            b["map_path"],
        )
        assert float(b["score"]) == pytest.approx(float(a["score"]), rel=1e-4)
        diff = np.abs(np.load(tmp_path / "torch" / a["map_path"]) - np.load(tmp_path / "export" / b["map_path"]))
        assert diff.max() <= 1e-3
        assert (tmp_path / "export" / b["overlay_path"]).is_file()
    cpu = runner.invoke(
        app, ["score", "--model", str(patchcore_export), "--device", "cpu", "--out", str(tmp_path / "cpu"),
              str(synthetic_root / "test")]
    )  # fmt: skip
    assert cpu.exit_code == 0, cpu.output  # a script that says --device cpu for every model works for exports too
    with (tmp_path / "cpu" / "scores.csv").open() as fh:
        assert [r["score"] for r in csv.DictReader(fh)] == [r["score"] for r in rows["export"]]
    import onnxruntime

    refusals = [("mps", "error: device: 'mps' is not one this onnx export runs on (auto, cpu, cuda or cuda:N)")]
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        refusals.append(("cuda", "error: device: 'cuda' requested but this onnxruntime has no CUDA provider (pip "
                                 "install onnxruntime-gpu, or use auto or cpu)"))  # fmt: skip
    for device, refusal in refusals:
        args = ["score", "--model", str(patchcore_export), "--device", device, "--out", str(tmp_path / device)]
        refused = runner.invoke(app, [*args, str(synthetic_root / "test")])
        assert refused.exit_code == 2 and not (tmp_path / device).exists()
        assert [line for line in refused.output.splitlines() if line.startswith("error:")] == [refusal]


def _copy(export: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(export, target)
    return target


def test_tampered_unlisted_or_escaping_exports_are_refused(patchcore_export: Path, tmp_path: Path) -> None:
    copy = _copy(patchcore_export, tmp_path)
    with (copy / "index.faiss").open("r+b") as fh:  # one flipped byte
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 1]))
    with pytest.raises(DataError, match="index.faiss: missing or modified"):
        ExportedDetector(copy)

    shutil.rmtree(copy)
    copy = _copy(patchcore_export, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["files"]["index.faiss"]  # an index present but not listed is never loaded
    (copy / "manifest.json").write_text(json.dumps(signed(manifest)))
    with pytest.raises(DataError, match="incomplete export"):
        ExportedDetector(copy)

    shutil.rmtree(copy)
    copy = _copy(patchcore_export, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    outside = tmp_path / "outside.faiss"
    shutil.copy(copy / "index.faiss", outside)
    manifest["files"]["../outside.faiss"] = manifest["files"]["index.faiss"]
    (copy / "manifest.json").write_text(json.dumps(signed(manifest)))
    with pytest.raises(DataError, match="outside the export directory"):
        ExportedDetector(copy)

    manifest["files"].pop("../outside.faiss")
    manifest["format_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(signed(manifest)))
    with pytest.raises(DataError, match="written by a newer anomaly \\(export format 99"):
        ExportedDetector(copy)

    shutil.rmtree(copy)
    copy = _copy(patchcore_export, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["threshold"]["image"] = 1.0  # edited by hand: every image would be flagged
    (copy / "manifest.json").write_text(json.dumps(manifest, indent=2))
    with pytest.raises(DataError, match="manifest.json: modified since the export"):
        ExportedDetector(copy)

    shutil.rmtree(copy)
    copy = _copy(patchcore_export, tmp_path)
    (copy / "state.safetensors").write_bytes(b"\x08" + bytes(7) + b"not json")  # damaged, checksum updated to match
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["state.safetensors"] = file_sha256(copy / "state.safetensors")
    (copy / "manifest.json").write_text(json.dumps(signed(manifest)))
    with pytest.raises(DataError, match="incomplete export .*state.safetensors"):
        ExportedDetector(copy)


def test_a_network_file_outside_the_checksummed_list_is_refused(patchcore_export: Path, tmp_path: Path) -> None:
    """The manifest's file list is checked, but the network was loaded from whatever ``network.file`` named: a graph
    not listed, or outside the export directory (``../model.onnx``), was run unchecked."""
    copy = _copy(patchcore_export, tmp_path)
    (copy / "model.onnx").rename(tmp_path / "model.onnx")
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["files"]["model.onnx"]
    manifest["network"]["file"] = "../model.onnx"
    (copy / "manifest.json").write_text(json.dumps(signed(manifest)))
    with pytest.raises(DataError, match=r"manifest.json: network file '\.\./model\.onnx' is not one of its checksum"):
        ExportedDetector(copy)

    (tmp_path / "model.onnx").rename(copy / "unlisted.onnx")  # beside the listed files, but not one of them
    manifest["network"]["file"] = "unlisted.onnx"
    (copy / "manifest.json").write_text(json.dumps(signed(manifest)))
    with pytest.raises(DataError, match="network file 'unlisted.onnx' is not one of its checksummed files"):
        ExportedDetector(copy)


def test_state_files_are_read_exactly_without_holding_them_twice(tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    from anomaly._fs import load_tensors

    rng = np.random.default_rng(0)
    arrays = {
        "chol_inv": rng.normal(size=(64, 10, 10)).astype(np.float32),
        "mean": rng.normal(size=(3, 4)),
        "ids": np.arange(-5, 5, dtype=np.int64),
        "flags": np.array([True, False, True]),
        "half": rng.normal(size=7).astype(np.float16),
        "empty": np.zeros((0, 3), np.float32),
    }
    save_file(arrays, str(tmp_path / "state.safetensors"))
    got = load_tensors(tmp_path / "state.safetensors")
    reference = load_file(str(tmp_path / "state.safetensors"))
    assert got.keys() == arrays.keys()
    for key, array in arrays.items():
        assert got[key].dtype == array.dtype == reference[key].dtype and got[key].shape == array.shape
        assert np.array_equal(got[key], array) and got[key].flags.writeable
    if not Path("/proc/self/status").exists():
        pytest.skip("peak memory is read from /proc (Linux)")
    save_file({"big": np.ones((2048, 2048, 8), np.float32)}, str(tmp_path / "big.safetensors"))  # 128 MiB
    probe = (  # the process's peak memory (VmHWM: ru_maxrss keeps the forking parent's) grows by the arrays once
        "import re, sys; from pathlib import Path; from anomaly._fs import load_tensors\n"
        "peak = lambda: int(re.search(r'VmHWM:\\s+(\\d+)', Path('/proc/self/status').read_text()).group(1))\n"
        "before = peak()\n"
        "big = load_tensors(Path(sys.argv[1]))['big']\n"
        "print((peak() - before) * 1024 / big.nbytes)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path / "big.safetensors")], capture_output=True, text=True
    )
    assert 0.9 < float(out.stdout) < 1.3, out.stderr
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "state.safetensors").read_bytes()[:-9])  # truncated
    with pytest.raises(ValueError, match="cut.safetensors"):
        load_tensors(tmp_path / "cut.safetensors")


def test_zero_shot_models_cannot_be_exported(synthetic_root: Path, tmp_path: Path) -> None:
    from anomaly.config import apply_overrides, load_config

    config = apply_overrides(load_config("musc"), ["backbone.image_size=[64,64]"])
    model = Detector(config).fit(sorted((synthetic_root / "train" / "good").glob("*.png"))[:2]).save(tmp_path / "musc")
    result = CliRunner().invoke(app, ["export", "--model", str(model), "--out", str(tmp_path / "export")])
    assert result.exit_code == 2
    assert "zero-shot" in result.output and "cannot be exported" in result.output
    assert not (tmp_path / "export").exists()


def test_exports_and_the_service_keep_the_bit_depth_of_12_bit_training_images(
    synthetic_root: Path, tmp_path: Path, assert_parity: Callable[..., None]
) -> None:
    import cv2

    pytest.importorskip("fastapi")  # the serve extra
    from fastapi.testclient import TestClient

    from anomaly.config import apply_overrides, load_config
    from anomaly.data.io import read_image
    from anomaly.serve import create_app

    def as_12_bit(paths: list[Path], folder: Path) -> list[Path]:  # value x 16: 0..4080 in 16-bit PNGs
        folder.mkdir()
        copies = [folder / f"{i:03d}.png" for i in range(len(paths))]
        for path, copy in zip(paths, copies):
            cv2.imwrite(str(copy), read_image(path)[..., ::-1].astype(np.uint16) * 16)
        return copies

    config = apply_overrides(load_config("patchcore"), ["backbone.image_size=[64,64]", "threshold.folds=3"])
    train = as_12_bit(sorted((synthetic_root / "train" / "good").glob("*.png"))[:6], tmp_path / "train")
    model = Detector(config).fit(train).save(tmp_path / "model")
    from anomaly.export import export_model

    runtime = ExportedDetector(export_model(model, tmp_path / "export"))
    assert json.loads((tmp_path / "export" / "manifest.json").read_text())["input"]["bit_depth"] == 12
    paths = as_12_bit(_test_images(synthetic_root), tmp_path / "test")
    expected = Detector.load(model).predict(paths)
    assert_parity(expected, runtime.predict(paths))
    served = TestClient(create_app(runtime)).post("/predict", files={"file": ("a.png", paths[-1].read_bytes())})
    assert served.json()["score"] == pytest.approx(expected[-1].image_score, rel=1e-4)


@pytest.mark.parametrize(
    "change, message",
    [
        ("graph", "model.onnx: not a readable network"),
        ("outputs", "damaged export, it fails on a blank image"),
        ("size", "damaged export, it fails on a blank image"),
        ("k", "damaged export, it fails on a blank image"),
        ("bit_depth", "input.bit_depth must be 1-16"),
        ("resize", "input.resize must be stretch or keep_aspect"),
        ("tile", "preprocess.tile.overlap: must be in"),
        ("sigma", "blur_sigma must be a finite number >= 0"),
    ],
)
def test_exports_changed_with_a_matching_manifest_are_refused_in_one_line(
    patchcore_export: Path, tmp_path: Path, change: str, message: str
) -> None:
    """The manifest's digest is a plain checksum that anyone can recompute: files and fields changed with it must
    still give one line at load, not the runtime's traceback on the first image."""
    copy = _copy(patchcore_export, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    if change == "graph":
        (copy / "model.onnx").write_bytes((copy / "model.onnx").read_bytes()[:5000])
        manifest["files"]["model.onnx"] = file_sha256(copy / "model.onnx")
    elif change == "outputs":
        manifest["network"]["outputs"] = ["nope"]
    elif change == "size":
        manifest["input"]["size"] = [manifest["input"]["size"][0] + 32, manifest["input"]["size"][1]]
    elif change == "k":
        manifest["scorer"]["params"]["k"] = 0
    elif change == "bit_depth":
        manifest["input"]["bit_depth"] = 0
    elif change == "resize":
        manifest["input"]["resize"] = "crop"
    elif change == "tile":
        manifest["input"]["tile"] = {"size": 64, "overlap": 1.5}
    else:
        manifest["postprocess"]["blur_sigma"] = -1
    (copy / "manifest.json").write_text(json.dumps(signed(manifest)))
    with pytest.raises(DataError, match=message):
        ExportedDetector(copy)


def test_an_export_written_before_views_were_exported_scores_whole_stretched_images(
    patchcore_export: Path, synthetic_root: Path, tmp_path: Path
) -> None:
    copy = _copy(patchcore_export, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    assert (manifest["input"].pop("resize"), manifest["input"].pop("tile")) == ("stretch", None)
    assert manifest["format_version"] == 1  # stretched exports keep the format every release reads
    (copy / "manifest.json").write_text(json.dumps(signed(manifest)))
    paths = _test_images(synthetic_root)[:3]
    got = [r.image_score for r in ExportedDetector(copy).predict(paths)]
    assert got == pytest.approx([r.image_score for r in ExportedDetector(patchcore_export).predict(paths)], rel=1e-6)


def test_an_export_that_runs_out_of_disk_is_one_line_and_leaves_nothing(
    patchcore_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import anomaly.export as export

    def full(*args: object, **kwargs: object) -> str:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "_write_network", full)
    result = CliRunner().invoke(app, ["export", "--model", str(patchcore_model), "--out", str(tmp_path / "e")])
    assert result.exit_code == 2 and "could not write the export (No space left on device)" in result.output
    assert list(tmp_path.iterdir()) == []


def test_state_files_that_run_out_of_disk_are_one_line_and_leave_nothing(
    synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """safetensors reports a full disk as its own error type, not OSError: PaDiM / Gaussian state of a fit or an
    export, and a zero-shot model's references, were a traceback and exit 1."""
    import safetensors.numpy
    from safetensors import SafetensorError

    small = ["--set", "backbone.image_size=[64,64]", "--set", "batch_size=4"]
    model, out = tmp_path / "model", tmp_path / "out"
    fit = CliRunner().invoke(app, ["fit", "--config", "gaussian", "--out", str(model), *small, str(synthetic_root)])
    assert fit.exit_code == 0, fit.output

    def full(*args: object, **kwargs: object) -> None:
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.numpy, "save_file", full)
    for command in (
        ["export", "--model", str(model), "--out", str(out)],
        ["fit", "--config", "gaussian", "--out", str(out), *small, str(synthetic_root)],
        ["fit", "--config", "musc", "--out", str(out), *small, str(synthetic_root)],
    ):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2, result.output
        assert f"{out}: could not write the " in result.output and "(No space left on device)" in result.output
        assert sorted(tmp_path.iterdir()) == [model]


def test_cpu_threads_follow_omp_num_threads_or_the_cpus_this_process_may_use(
    patchcore_export: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """ONNX Runtime's own default counts the host's cores: a Ray actor reserving 1 CPU (which sets OMP_NUM_THREADS)
    or a container with --cpus 2 (`import anomaly` sets it) would start one thread per host core, oversubscribing the
    node. Without OMP_NUM_THREADS its default (physical cores) stands: all logical CPUs are slower on SMT hosts."""
    from anomaly import _runtime

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(_runtime, "_CGROUP_CPU_MAX", tmp_path / "cpu.max")
    (tmp_path / "cpu.max").write_text("200000 100000\n")  # --cpus 2
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert _runtime.cpu_threads() == 2
    unset = ExportedDetector(patchcore_export)._network.session  # type: ignore[attr-defined]
    assert unset.get_session_options().intra_op_num_threads == 0  # ONNX Runtime's default: its physical cores
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # a Ray actor's reservation, or the quota `import anomaly` wrote
    assert _runtime.cpu_threads() == 1
    session = ExportedDetector(patchcore_export)._network.session  # type: ignore[attr-defined]
    assert session.get_session_options().intra_op_num_threads == 1


def test_a_cuda_device_onnx_runtime_cannot_start_is_refused_not_run_on_the_cpu(
    patchcore_export: Path, synthetic_root: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """onnxruntime-gpu lists its CUDA provider on a machine without CUDA / cuDNN libraries (or without GPU N), and a
    session asked for it falls back to the CPU with a logged warning: `--device cuda:3` scored on the CPU, exit 0."""
    import onnxruntime

    listed = onnxruntime.get_available_providers()
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", *listed])
    if "CUDAExecutionProvider" in listed:
        pytest.skip("this onnxruntime has a CUDA provider; the fallback is shown on a CPU-only build")
    from anomaly.errors import BackendError

    with pytest.raises(BackendError, match="could not start its CUDA provider"):
        ExportedDetector(patchcore_export, device="cuda:3")
    args = ["score", "--model", str(patchcore_export), "--device", "cuda", "--out", str(tmp_path / "out")]
    refused = CliRunner().invoke(app, [*args, str(synthetic_root / "test")])
    assert refused.exit_code == 2 and not (tmp_path / "out").exists()
    assert "error: device: 'cuda' requested but ONNX Runtime could not start its CUDA provider" in refused.output
    auto = ExportedDetector(patchcore_export, device="auto")._network.session  # type: ignore[attr-defined]
    assert auto.get_providers() == ["CPUExecutionProvider"]  # auto: the CPU when CUDA cannot start, as before


@pytest.mark.parametrize(
    "views",
    [["preprocess.resize=keep_aspect"], ["preprocess.tile.size=64", "preprocess.tile.overlap=0.25"]],
    ids=["letterboxed", "tiled"],
)
def test_letterboxed_and_tiled_models_export_with_the_detectors_results(
    views: list[str], synthetic_root: Path, tmp_path: Path, assert_parity: Callable[..., None]
) -> None:
    """The export cuts images into the views the Detector cuts (mirrored letterbox borders, overlapping tiles) and
    stitches their maps the same way, images of several shapes in one batch."""
    from anomaly.config import apply_overrides, load_config
    from anomaly.data.io import read_image
    from anomaly.export import export_model

    config = apply_overrides(load_config("patchcore"), ["backbone.image_size=[64,64]", "batch_size=4", *views])
    train = [read_image(p)[:, :88] for p in sorted((synthetic_root / "train" / "good").glob("*.png"))]
    model = Detector(config).fit(train).save(tmp_path / "model")
    export = export_model(model, tmp_path / "export")
    written = json.loads((export / "manifest.json").read_text())
    manifest = written["input"]
    letterboxed = views[0].startswith("preprocess.resize")
    expected_views = ("keep_aspect", None) if letterboxed else ("stretch", {"size": 64, "overlap": 0.25})
    assert (manifest["resize"], manifest["tile"]) == expected_views
    # format 2: a runtime from before views were exported refuses it ("written by a newer anomaly"), where it
    # read format 1 and scored whole stretched images against the tiled model's threshold
    assert written["format_version"] == 2
    tests = [read_image(p) for p in _test_images(synthetic_root)]
    images = [t[:, :88] for t in tests[:6]] + tests[6:]  # two shapes, both in the second batch of four
    expected = Detector.load(model).predict(images)
    got = ExportedDetector(export).predict(images)
    assert_parity(expected, got)
    assert [r.anomaly_map.shape for r in got] == [i.shape[:2] for i in images]
    assert {r.is_anomalous for r in got} == {True, False}


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_faiss_searches_where_the_exported_network_runs(
    device: str, patchcore_export: Path, synthetic_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a Detector's ``use_gpu: auto`` (the index follows the features): an export scored on the CPU (``--device
    cpu``, or ``auto`` with a CPU-only onnxruntime) moved its FAISS index to GPU 0 whenever FAISS had a GPU."""
    import faiss
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has a CUDA provider: auto runs the network on the GPU")
    placed: list[int] = []

    def to_gpu(resources: object, gpu: int, index: object) -> object:
        placed.append(gpu)
        return index  # searched on the CPU still: only where it was sent matters here

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1, raising=False)
    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", to_gpu, raising=False)
    detector = ExportedDetector(patchcore_export, device=device)
    assert np.isfinite(detector.predict(_test_images(synthetic_root)[0]).image_score)
    assert placed == []


def test_a_model_whose_weights_file_moved_exports_with_the_same_set_as_score(
    synthetic_root: Path, tmp_path: Path
) -> None:
    """`anomaly score --model M --set backbone.weights=NEW` scores a model whose weights file moved, but `anomaly
    export` had no such option: the error pointed at `--set`, which export refused, so the model could not be
    exported at all."""
    from anomaly.features import _packaged_file

    packaged = _packaged_file("tf_efficientnet_lite0")
    assert packaged is not None
    weights = tmp_path / "lite0.pth"
    shutil.copy(packaged, weights)
    small = ["--set", "backbone.image_size=[64,64]", "--set", "batch_size=4"]
    model, runner = tmp_path / "model", CliRunner()
    fitted = runner.invoke(app, ["fit", "--out", str(model), *small, "--set", f"backbone.weights={weights}",
                                 str(synthetic_root)])  # fmt: skip
    assert fitted.exit_code == 0, fitted.output
    moved = weights.rename(tmp_path / "moved.pth")
    for extra, refusal in ((["--set", "seed=3"], "keeps its fitted config"), ([], "--set backbone.weights=PATH")):
        refused = runner.invoke(app, ["export", "--model", str(model), "--out", str(tmp_path / "no"), *extra])
        assert refused.exit_code == 2 and not (tmp_path / "no").exists()
        errors = [line for line in refused.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and refusal in errors[0], refused.output
    export = tmp_path / "export"
    done = runner.invoke(app, ["export", "--model", str(model), "--out", str(export), "--set",
                               f"backbone.weights={moved}"])  # fmt: skip
    assert done.exit_code == 0, done.output
    image = _test_images(synthetic_root)[0]
    expected = Detector.load(model, weights=str(moved)).predict(image).image_score
    assert ExportedDetector(export).predict(image).image_score == pytest.approx(expected, rel=1e-4)


def test_onnx_runtime_cuda_runs_in_full_float32(patchcore_export: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ONNX Runtime's CUDA provider runs convolutions and matmuls in TF32 unless told not to (``use_tf32``): the same
    10-bit mantissa that moved the torch Detector's maps 0.024 apart on an H200 before its backbone ran in float32."""
    import onnxruntime

    from anomaly.errors import BackendError

    listed = onnxruntime.get_available_providers()
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", *listed])
    asked: list[object] = []
    session = onnxruntime.InferenceSession

    def spy(path: str, options: object, providers: list[object]) -> object:
        first = providers[0]  # a name, or (name, provider options)
        asked.append(first if isinstance(first, str) else (first[0], first[1].get("use_tf32")))  # type: ignore[index]
        return session(path, options, providers=providers)

    monkeypatch.setattr(onnxruntime, "InferenceSession", spy)
    for device in ("auto", "cuda:1"):
        try:
            ExportedDetector(patchcore_export, device=device)
        except BackendError:  # cuda:1 where the CUDA provider cannot start (a CPU-only onnxruntime)
            pass
    assert asked == [("CUDAExecutionProvider", 0)] * 2
