"""Issue 13: no crash, no data loss, no silent wrong result under bad names, values, models and faults.

Each test is named after the numbered item it reproduces. Every CLI failure must be exit code 2 with
one ``error: ...`` line that names the file or key.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from anomaly import DataError, Detector
from anomaly._fs import OUTPUT_MARKER
from anomaly.cli import app
from anomaly.config import ConfigError, apply_overrides, load_config
from anomaly.model_dir import signed

runner = CliRunner()
SMALL = ["--set", "backbone.image_size=[64,64]", "--set", "batch_size=4"]


def _run(*args: object):
    return runner.invoke(app, [os.fsdecode(a) if isinstance(a, (bytes, Path)) else str(a) for a in args])


def _one_error_line(result, *needles: str) -> None:  # type: ignore[no-untyped-def]
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip() and "%|" not in line]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in errors[0], errors[0]


def _png(path: Path, value: int = 120, size: tuple[int, int] = (64, 64)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size, 3), value, np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def model(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hard") / "model"
    result = _run("fit", "--out", out, *SMALL, "--set", "scorer.params.coreset_ratio=0.1", synthetic_root)
    assert result.exit_code == 0, result.output
    return out


def test_1_non_utf8_file_names_are_scored_and_written(model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    raw = os.fsencode(folder) + b"/cam1_\xe9.png"
    with open(raw, "wb") as fh:
        Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(fh, format="PNG")
    out = tmp_path / "out"
    result = _run("score", "--model", model, "--out", out, "--maps", folder)
    assert result.exit_code == 0, result.output
    with (out / "scores.csv").open(newline="", encoding="utf-8", errors="surrogateescape") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1 and os.fsencode(rows[0]["path"]) == raw  # the exact bytes, round-tripped
    assert (out / rows[0]["overlay_path"]).is_file() and (out / rows[0]["map_path"]).is_file()
    report = _run("report", "--scores", out, "--out", tmp_path / "report")  # crashed writing the page
    assert report.exit_code == 0, report.output
    discovered = _run("discover", "--scores", out, "--out", tmp_path / "types", "--all", "--k", "1")
    assert discovered.exit_code == 0, discovered.output  # cv2.putText crashed the process on the name's label
    assert (tmp_path / "types" / "clusters.csv").is_file()
    assert "cam1_\ufffd.png" in (tmp_path / "report" / "index.html").read_text(encoding="utf-8")


def test_2_user_files_in_earlier_outputs_survive_a_rerun(model: Path, synthetic_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "scores"
    images = synthetic_root / "test" / "good"
    assert _run("score", "--model", model, "--out", out, images).exit_code == 0
    (out / "notes.txt").write_text("mine")
    (out / "photos").mkdir()
    (out / "photos" / "a.jpg").write_bytes(b"x")
    assert _run("score", "--model", model, "--out", out, images).exit_code == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "photos" / "a.jpg").is_file()
    assert (out / "scores.csv").is_file()
    model_copy = tmp_path / "model"
    shutil.copytree(model, model_copy)
    (model_copy / "README.txt").write_text("line 3")
    refit = _run("fit", "--out", model_copy, *SMALL, synthetic_root)
    assert refit.exit_code == 0, refit.output
    assert f"{model_copy} holds a model: this fit replaces it" in refit.output
    assert (model_copy / "README.txt").read_text() == "line 3"
    assert Detector.load(model_copy).threshold_ is not None  # the user's file is not loaded, nor refused
    unknown = _run("fit", "--out", model_copy, "--backbone", "resnet_nonexistent", synthetic_root)
    assert unknown.exit_code == 2 and "unknown timm model 'resnet_nonexistent'" in unknown.output
    assert "holds a model" not in unknown.output  # no announcement of a replacement that is not going to happen


def test_2_a_folder_that_only_looks_like_an_output_is_refused_not_wiped(
    model: Path, synthetic_root: Path, tmp_path: Path
) -> None:
    """A user's folder holding a scores.csv (or model files copied without the hidden marker) cannot tell which
    files are anomaly's: replacing it deleted the user's documents. It is refused, as are a read-only output
    folder (replaced through its parent, its own mode never applied) and a symbolic link (the link was replaced)."""
    images = synthetic_root / "test" / "good"
    project = tmp_path / "project"
    (project / "photos").mkdir(parents=True)
    (project / "scores.csv").write_text("path,score\n")
    (project / "thesis.docx").write_text("mine")
    _one_error_line(_run("score", "--model", model, "--out", project, images), "no readable .anomaly-output.json")
    assert (project / "thesis.docx").read_text() == "mine" and (project / "photos").is_dir()
    archive = tmp_path / "archive"
    archive.mkdir()
    for file in model.iterdir():  # `cp model/* archive/` leaves the hidden marker behind
        if not file.name.startswith("."):
            shutil.copy(file, archive)
    (archive / "README.txt").write_text("v3")
    _one_error_line(_run("fit", "--out", archive, *SMALL, synthetic_root), "no readable .anomaly-output.json")
    assert (archive / "README.txt").read_text() == "v3"
    link = tmp_path / "current"
    link.symlink_to(model)
    _one_error_line(_run("score", "--model", model, "--out", link, images), "a symbolic link")
    out = tmp_path / "scores"
    assert _run("score", "--model", model, "--out", out, images).exit_code == 0
    with pytest.MonkeyPatch.context() as patch:  # a read-only folder (root may write anywhere: the check is faked)
        patch.setattr("anomaly._fs._writable", lambda folder: Path(folder) != out)
        _one_error_line(_run("score", "--model", model, "--out", out, images), "not writable")


def test_model_files_kept_as_symbolic_links_load_and_a_file_in_the_out_path_is_named(
    model: Path, tmp_path: Path
) -> None:
    """DVC and git-annex keep files as links into a store: read, since their digest is checked; a link to other
    content is refused like an edited file."""
    store, linked = tmp_path / "store", tmp_path / "linked"
    shutil.copytree(model, store)
    linked.mkdir()
    for file in store.iterdir():
        (linked / file.name).symlink_to(file)
    assert Detector.load(linked).threshold_ == Detector.load(model).threshold_
    (store / "config.json").write_text((store / "config.json").read_text() + " ")
    with pytest.raises(DataError, match="config.json: modified since the model was saved"):
        Detector.load(linked)
    (tmp_path / "afile.txt").write_text("x")
    image = _png(tmp_path / "i.png")
    _one_error_line(_run("score", "--model", model, "--out", tmp_path / "afile.txt" / "sub", image),
                    "afile.txt is a file, not a folder")  # fmt: skip


def test_a_model_whose_weights_file_moved_is_pointed_at_the_same_weights(synthetic_root: Path, tmp_path: Path) -> None:
    """The weights path is saved with the model: once the file moved, `score --set backbone.weights=NEW` points
    there (its SHA-256 must match the fitted weights'); other `--set` keys stay refused for a --model."""
    from anomaly.features import _packaged_file

    packaged = _packaged_file("tf_efficientnet_lite0")
    assert packaged is not None
    weights = tmp_path / "w" / "lite0.pth"
    weights.parent.mkdir()
    shutil.copy(packaged, weights)
    model = tmp_path / "model"
    fitted = _run("fit", "--out", model, *SMALL, "--set", f"backbone.weights={weights}", synthetic_root)
    assert fitted.exit_code == 0, fitted.output
    moved = tmp_path / "moved.pth"
    weights.rename(moved)
    image = sorted((synthetic_root / "test" / "good").glob("*.png"))[0]
    _one_error_line(_run("score", "--model", model, "--out", tmp_path / "a", image), "--set backbone.weights=PATH")
    again = _run("score", "--model", model, "--out", tmp_path / "b", "--set", f"backbone.weights={moved}", image)
    assert again.exit_code == 0, again.output
    other = tmp_path / "other.pth"
    other.write_bytes(moved.read_bytes()[:-1] + b"x")
    _one_error_line(
        _run("score", "--model", model, "--out", tmp_path / "c", "--set", f"backbone.weights={other}", image),
        "differ from those the model was fitted with",
    )
    _one_error_line(
        _run("score", "--model", model, "--out", tmp_path / "d", "--set", "seed=3", image), "keeps its fitted config"
    )


def test_2_benchmark_keeps_other_categories_and_refuses_foreign_tables(synthetic_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    out.mkdir()
    (out / "results.md").write_text("my own table")
    args = ["benchmark", "--dataset", "mvtec", "--root", synthetic_root.parent, "--out", out, *SMALL]
    _one_error_line(_run(*args, "--category", "widget"), "results.md")
    assert (out / "results.md").read_text() == "my own table"


def test_2_benchmark_refuses_an_out_folder_of_someone_elses_files(synthetic_root: Path, tmp_path: Path) -> None:
    """As `score --out` does: a folder holding the user's files (photos, notes) or another kind of output is refused
    in one line, before any fit, and left as it was (the benchmark wrote its tables and categories among them)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(sorted((synthetic_root / "test" / "good").iterdir())[0], photos / "000.png")
    (photos / "notes.txt").write_text("mine")
    args = ["benchmark", "--dataset", "mvtec", "--root", synthetic_root.parent, "--category", "widget", *SMALL]
    _one_error_line(_run(*args, "--out", photos), "not an anomaly output")
    assert sorted(p.name for p in photos.iterdir()) == ["000.png", "notes.txt"]
    scores = tmp_path / "scores"
    scores.mkdir()
    (scores / "scores.csv").write_text("path,score,is_anomalous\n")
    (scores / OUTPUT_MARKER).write_text('{"owned": ["scores.csv"]}')
    _one_error_line(_run(*args, "--out", scores), "another kind of anomaly output")
    assert sorted(p.name for p in scores.iterdir()) == sorted([OUTPUT_MARKER, "scores.csv"])


def test_3_outputs_inside_the_input_folder_never_become_inputs(model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "line"
    for i in range(2):
        _png(folder / f"{i}.png", 100 + i)
    counts = []
    for _ in range(3):
        result = _run("score", "--model", model, "--out", folder / "out", folder)
        assert result.exit_code == 0, result.output
        with (folder / "out" / "scores.csv").open() as fh:
            counts.append(len(list(csv.DictReader(fh))))
    assert counts == [2, 2, 2]


def test_4_a_pool_of_identical_images_flags_nothing(tmp_path: Path) -> None:
    image = _png(tmp_path / "a.png")
    shutil.copy(image, tmp_path / "b.png")
    out = tmp_path / "zs"
    result = _run("score", "--zero-shot", "--out", out, *SMALL, tmp_path / "a.png", tmp_path / "b.png")
    assert result.exit_code == 0, result.output
    with (out / "scores.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["is_anomalous"] for r in rows] == ["false", "false"]
    for row in rows:  # not a threshold that flags nothing: it lies just above the shared score, a higher one is flagged
        assert float(row["score"]) < float(row["threshold"]) <= float(row["score"]) * (1 + 1e-9), row


@pytest.mark.parametrize(
    "override, key",
    [
        ("backbone.std=[0,0,0]", "backbone.std"),
        ("backbone.mean=[.nan,0,0]", "backbone.mean"),
        ("batch_size=0", "batch_size"),
        ("batch_size=-1", "batch_size"),
        ("threshold.target_fpr=2", "threshold.target_fpr"),
        ("threshold.target_fpr=.nan", "threshold.target_fpr"),
        ("scorer.params.k=1.5", "scorer.params.k"),
        ("scorer.params.k=abc", "scorer.params.k"),
        ("backbone.image_size=[0,0]", "backbone.image_size"),
        ("backbone.image_size=[30000,30000]", "backbone.image_size"),
        ("postprocess.blur_sigma=1e12", "postprocess.blur_sigma"),
        ("threshold.folds=1", "threshold.folds"),
        ("backbone.weights=/etc/passwd", "backbone.weights"),
        ("device=tpu", "device"),
    ],
)
def test_5_every_config_value_is_range_checked(override: str, key: str, synthetic_root: Path, tmp_path: Path) -> None:
    result = _run("fit", "--out", tmp_path / "m", "--set", override, synthetic_root)
    _one_error_line(result, key)
    assert not (tmp_path / "m").exists()


def test_5_an_edited_threshold_is_refused_as_an_edited_file_is(model: Path, tmp_path: Path) -> None:
    """meta.json holds the threshold: edited by hand (to 1.0, flagging every image) it was used without a word."""
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    assert Detector.load(copy).threshold_ is not None  # the copy itself loads
    meta = json.loads((copy / "meta.json").read_text())
    meta["threshold"]["image"] = meta["threshold"]["pixel"] = 1.0
    (copy / "meta.json").write_text(json.dumps(meta, indent=2))
    _one_error_line(_run("score", "--model", copy, "--out", tmp_path / "s", _png(tmp_path / "x.png")), "meta.json")
    _one_error_line(_run("export", "--model", copy, "--out", tmp_path / "e"), "modified since")
    assert not (tmp_path / "s").exists() and not (tmp_path / "e").exists()


def test_5_a_tampered_model_config_is_refused_not_truncated(model: Path, tmp_path: Path) -> None:
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    config = json.loads((copy / "config.json").read_text())
    config["batch_size"] = 0
    (copy / "config.json").write_text(json.dumps(config))
    meta = json.loads((copy / "meta.json").read_text())
    from anomaly._fs import file_sha256

    meta["files"]["config.json"] = file_sha256(copy / "config.json")  # a consistent, but invalid, model
    (copy / "meta.json").write_text(json.dumps(signed(meta)))
    _one_error_line(_run("score", "--model", copy, "--out", tmp_path / "s", _png(tmp_path / "x.png")), "batch_size")


def test_6_read_only_output_is_a_clear_error(
    synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root writes into read-only folders: the refusal the kernel gives anyone else is faked
        import tempfile

        real = tempfile.mkdtemp

        def refused(*args, **kwargs):  # type: ignore[no-untyped-def]
            if Path(kwargs.get("dir") or args[2]) == ro:
                raise PermissionError(13, "Permission denied")
            return real(*args, **kwargs)

        monkeypatch.setattr(tempfile, "mkdtemp", refused)
    _one_error_line(_run("fit", "--out", ro / "m", *SMALL, synthetic_root), "cannot write here (Permission denied)")
    assert [p.name for p in ro.iterdir()] == []  # nothing half-written


@pytest.mark.parametrize("where", ["file/sub", "/proc/anomaly-x", "."])
def test_6_impossible_output_paths_fail_before_the_fit(
    where: str, synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reached: list[bool] = []  # ("features" not in the output checked nothing: a CLI fit never prints that word)

    def fit_reached(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        reached.append(True)
        raise DataError("the fit was reached")

    monkeypatch.setattr(Detector, "fit", fit_reached)
    (tmp_path / "file").write_text("x")
    out = where if where.startswith("/") else str(tmp_path / where) if where != "." else "."
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        result = _run("fit", "--out", out, *SMALL, synthetic_root)
    finally:
        os.chdir(cwd)
    _one_error_line(result)
    assert not reached  # refused before any image was read
    control = _run("fit", "--out", tmp_path / "writable", *SMALL, synthetic_root)  # the spy does see a fit
    assert reached and "the fit was reached" in control.output, control.output


@pytest.mark.parametrize("where", ["file", "file/sub", "/proc/anomaly-x"])
def test_6_evaluate_discovery_out_that_cannot_be_a_folder_is_one_error_line(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import anomaly.discovery.evaluate as discovery_evaluate
    from anomaly.tables import write_clusters

    root = tmp_path / "cat"
    _png(root / "test" / "good" / "000.png")
    _png(root / "test" / "crack" / "000.png")
    _png(root / "ground_truth" / "crack" / "000_mask.png", value=255)
    (tmp_path / "types").mkdir()
    rows = [{"path": str(root / "test" / "crack" / "000.png"), "cluster": "0", "confidence": "1", "n_regions": "1"}]
    write_clusters(tmp_path / "types" / "clusters.csv", rows)
    (tmp_path / "file").write_text("x")
    out = where if where.startswith("/") else tmp_path / where
    computed: list[bool] = []  # ("nmi=" not in the output checked nothing: it is printed only once the run succeeds)

    def metrics(*args, **kwargs):  # type: ignore[no-untyped-def]
        computed.append(True)
        return clustering_metrics(*args, **kwargs)

    clustering_metrics = discovery_evaluate.clustering_metrics
    monkeypatch.setattr(discovery_evaluate, "clustering_metrics", metrics)
    result = _run("evaluate", "--discovery", tmp_path / "types", "--root", root, "--out", out)
    _one_error_line(result, str(out))
    assert (tmp_path / "file").read_text() == "x"
    if not where.startswith("/"):  # refused before the metrics are computed (a path below a file at least)
        assert not computed
    computed.clear()
    control = _run("evaluate", "--discovery", tmp_path / "types", "--root", root, "--out", tmp_path / "writable")
    assert control.exit_code == 0 and "nmi=" in control.output and computed, control.output  # the spy sees them


def test_evaluate_discovery_refuses_eval_size_rather_than_ignoring_it(tmp_path: Path) -> None:
    _one_error_line(_run("evaluate", "--discovery", tmp_path, "--root", tmp_path, "--eval-size", "256"), "--eval-size")


def test_6_non_utf8_yaml_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"backbone:\n  name: \xff\xfe\n")
    _one_error_line(_run("fit", "--config", bad, "--out", tmp_path / "m", tmp_path), "not UTF-8")


def test_7_untrusted_model_directories_are_refused(model: Path, tmp_path: Path) -> None:
    def variant(name: str, change) -> Path:  # type: ignore[no-untyped-def]
        copy = tmp_path / name
        shutil.copytree(model, copy)
        meta = json.loads((copy / "meta.json").read_text())
        change(copy, meta)
        (copy / "meta.json").write_text(json.dumps(signed(meta)))
        return copy

    cases = {
        "no_files": (lambda d, m: m.pop("files"), "manifest"),
        "outside": (lambda d, m: m["files"].update({"../../etc/passwd": "0" * 64}), "invalid manifest entry"),
        "proc": (lambda d, m: m["files"].update({"/proc/self/mem": "0" * 64}), "invalid manifest entry"),
        "lists": (lambda d, m: m.update({"files": ["config.json"]}), "manifest"),
        "threshold": (lambda d, m: m.update({"threshold": [1, 2]}), "threshold"),
    }
    for name, (change, needle) in cases.items():
        with pytest.raises(DataError, match=needle):
            Detector.load(variant(name, change))


def test_7_unlisted_or_mismatched_indexes_are_never_used(model: Path, tmp_path: Path) -> None:
    import faiss

    from anomaly._fs import file_sha256

    copy = tmp_path / "swapped"
    shutil.copytree(model, copy)
    (copy / "other.faiss").write_bytes(b"junk")  # unlisted: ignored
    assert Detector.load(copy).threshold_ is not None
    det = Detector.load(copy)
    bank = det.scorer.bank_  # type: ignore[attr-defined]
    hnsw = faiss.IndexHNSWFlat(bank.shape[1], 32)
    hnsw.add(bank)
    (copy / "index.faiss").write_bytes(faiss.serialize_index(hnsw).tobytes())
    meta = json.loads((copy / "meta.json").read_text())
    meta["files"]["index.faiss"] = file_sha256(copy / "index.faiss")  # re-signed, but the wrong type
    (copy / "meta.json").write_text(json.dumps(signed(meta)))
    with pytest.raises(DataError, match="does not match"):
        Detector.load(copy)
    wrong = faiss.IndexFlatL2(bank.shape[1] + 1)
    (copy / "index.faiss").write_bytes(faiss.serialize_index(wrong).tobytes())
    meta["files"]["index.faiss"] = file_sha256(copy / "index.faiss")
    (copy / "meta.json").write_text(json.dumps(signed(meta)))
    with pytest.raises(DataError, match="rows of dimension"):
        Detector.load(copy)
    crafted = bytearray(faiss.serialize_index(faiss.IndexFlatL2(bank.shape[1])).tobytes())
    crafted[-8:] = (2**40).to_bytes(8, "little")  # a size field asking for a TiB
    (copy / "index.faiss").write_bytes(bytes(crafted))
    meta["files"]["index.faiss"] = file_sha256(copy / "index.faiss")
    (copy / "meta.json").write_text(json.dumps(signed(meta)))
    with pytest.raises(DataError):
        Detector.load(copy)


def test_8_a_kill_between_the_two_renames_is_recovered_and_dead_temp_folders_removed(tmp_path: Path) -> None:
    from anomaly._fs import new_temp_dir

    target = tmp_path / "m"
    old = tmp_path / ".m.old"
    old.mkdir()
    (old / "meta.json").write_text("{}")
    (old / ".anomaly-output.json").write_text('{"owned": ["meta.json"]}')  # as every output holds
    dead = tmp_path / ".m.abc123"
    dead.mkdir()
    (dead / ".anomaly-owner").write_text(f"{os.uname().nodename} 999999")  # no such process
    alive = tmp_path / ".m.live"
    alive.mkdir()
    (alive / ".anomaly-owner").write_text(f"{os.uname().nodename} {os.getpid()}")
    # no owner file: killed before writing it, a run about to, _swap's with the user's files, a user's own folder
    ownerless, fresh, users, own = (tmp_path / f".m.{name}" for name in ("kill_ed1", "starting", "users123", "cache"))
    for folder in (ownerless, fresh, users, own):
        folder.mkdir()
    (users / "notes.txt").write_text("mine")
    for folder in (ownerless, users, own):
        os.utime(folder, (time.time() - 3600, time.time() - 3600))
    tmp = new_temp_dir(target, "meta.json")
    assert (target / "meta.json").is_file() and not old.exists()  # the previous model is back
    assert not dead.exists() and alive.exists() and tmp.exists()
    assert not ownerless.exists() and fresh.exists() and own.exists() and (users / "notes.txt").read_text() == "mine"


def test_8_a_users_files_a_killed_swap_left_in_its_temp_folder_go_back(tmp_path: Path) -> None:
    """A run killed while it moved the user's files into its new output folder left them in a hidden temp folder
    that no later run touched (not lost, not found either): its owner file lists them, the next run puts them back."""
    from anomaly._fs import new_temp_dir

    target = tmp_path / "scores"
    target.mkdir()
    (target / "scores.csv").write_text("old")
    (target / ".anomaly-output.json").write_text('{"owned": ["scores.csv"]}')
    killed = tmp_path / ".scores.ab12cd34"
    killed.mkdir()
    (killed / "scores.csv").write_text("new")
    (killed / "notes.txt").write_text("mine")  # moved there; photos/ not yet
    (target / "photos").mkdir()
    (killed / ".anomaly-owner").write_text(f"{os.uname().nodename} 999999\n" + json.dumps(["notes.txt", "photos"]))
    new_temp_dir(target, "scores.csv")
    assert (target / "notes.txt").read_text() == "mine" and (target / "photos").is_dir()
    assert not killed.exists() and (target / "scores.csv").read_text() == "old"


@pytest.mark.parametrize("stop_at", ["moving", "renaming"])
def test_8_ctrl_c_while_the_users_files_move_puts_them_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop_at: str
) -> None:
    """Ctrl-C between moving the user's files into the new folder and renaming it into place: the clean-up removed
    the temp folder with the user's files in it."""
    import pathlib

    from anomaly._fs import staged_dir

    target = tmp_path / "scores"
    target.mkdir()
    (target / "scores.csv").write_text("old")
    (target / ".anomaly-output.json").write_text('{"owned": ["scores.csv"]}')
    for name in ("a.txt", "b.txt"):
        (target / name).write_text(name)
    rename, moves = pathlib.Path.rename, []

    def interrupted(self: Path, dest: Path) -> Path:  # type: ignore[no-untyped-def]
        moves.append(self.parent == target and self.name.endswith(".txt"))
        if (stop_at == "moving" and moves[-1] and sum(moves) == 2) or (
            stop_at == "renaming" and str(dest).endswith(".old")
        ):
            raise KeyboardInterrupt  # once: after the first of the two files moved, or after both
        return rename(self, dest)

    with pytest.raises(KeyboardInterrupt), staged_dir(target, "scores.csv") as tmp:
        (tmp / "scores.csv").write_text("new")
        monkeypatch.setattr(pathlib.Path, "rename", interrupted)
    monkeypatch.undo()
    assert sorted(p.name for p in target.iterdir()) == [".anomaly-output.json", "a.txt", "b.txt", "scores.csv"]
    assert (target / "a.txt").read_text() == "a.txt" and (target / "scores.csv").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["scores"]  # no temp folder, no .old left


def test_8_a_killed_fit_leaves_the_previous_model_usable(model: Path, synthetic_root: Path, tmp_path: Path) -> None:
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    code = (
        "import os, sys, anomaly._fs as fs\n"
        "def killed(tmp, target):\n"
        "    os._exit(9)\n"
        "fs.finish_dir = killed\n"
        "from anomaly.cli import main\n"
        f"sys.argv = ['anomaly', 'fit', '--out', {str(copy)!r}, '--set', 'backbone.image_size=[64,64]', "
        f"{str(synthetic_root)!r}]\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300)
    assert proc.returncode == 9
    assert Detector.load(copy).threshold_ is not None
    rerun = _run("fit", "--out", copy, *SMALL, synthetic_root)
    assert rerun.exit_code == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".model.")]  # the dead temp folder is gone


def test_8_a_fit_killed_between_its_two_renames_is_read_and_cleaned_up(
    model: Path, synthetic_root: Path, tmp_path: Path
) -> None:
    """The model moved to .model.old, the new one not yet in place: reading brings the old one back, and the
    next run removes the dead run's complete temp folder (it keeps its owner file until it is in place)."""
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    code = (
        "import os, sys, anomaly._fs as fs\n"
        "def killed(tmp, target, owned=None):\n"
        "    target.rename(target.with_name(f'.{target.name}.old'))\n"
        "    os._exit(9)\n"
        "fs._swap = killed\n"
        "from anomaly.cli import main\n"
        f"sys.argv = ['anomaly', 'fit', '--out', {str(copy)!r}, '--set', 'backbone.image_size=[64,64]', "
        f"{str(synthetic_root)!r}]\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300)
    assert proc.returncode == 9 and not copy.exists()
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".model.") and p.name != ".model.old"]
    assert len(left) == 1 and (left[0] / "meta.json").is_file()  # complete, never put in place
    assert Detector.load(copy).threshold_ is not None  # the previous model, read back
    assert _run("fit", "--out", copy, *SMALL, synthetic_root).exit_code == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".model.")]
    assert not (copy / ".anomaly-owner").exists()
    from anomaly._fs import restore_interrupted

    restore_interrupted(Path("."))  # a model in the current folder: nothing to restore, no error


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm", "sighup"])
def test_8_ctrl_c_is_one_line_and_leaves_the_earlier_output(
    how: str, model: Path, synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C, SIGTERM (timeout, kill, docker stop: it left a temp folder of maps behind) and SIGHUP (the terminal
    or SSH session closed: the process died of the signal, exit -1, its temp folder left) clean up alike."""
    import os
    import signal

    from anomaly import cli

    out = tmp_path / "scores"
    images = synthetic_root / "test" / "good"
    assert _run("score", "--model", model, "--out", out, images).exit_code == 0
    before = (out / "scores.csv").read_bytes()
    signum = {"sigterm": signal.SIGTERM, "sighup": getattr(signal, "SIGHUP", None)}.get(how)
    if how == "sighup" and signum is None:
        pytest.skip("no SIGHUP on this system")

    def interrupted(*args: object, **kwargs: object) -> None:
        if signum is None:
            raise KeyboardInterrupt
        os.kill(os.getpid(), signum)  # the handler `anomaly` installs raises in the main thread

    monkeypatch.setattr(Detector, "finish", interrupted)
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, getattr(signal, "SIGHUP", signal.SIGTERM))}
    try:
        if signum is not None:
            signal.signal(signum, signal.SIG_DFL)  # under nohup (a CI runner) SIGHUP is ignored, and stays so
        cli._install_signal_handlers()
        result = _run("score", "--model", model, "--out", out, synthetic_root / "test")
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    code, word = {"ctrl-c": (130, "interrupted"), "sigterm": (143, "terminated"), "sighup": (129, "hung up")}[how]
    assert result.exit_code == code and "Traceback" not in result.output
    assert [line for line in result.output.splitlines() if line.startswith(f"{word}: ")]
    assert (out / "scores.csv").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".scores.")]


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_signal_while_the_interpreter_shuts_down_after_a_command_changes_nothing(signame: str) -> None:
    """The command is done and its exit code set; the interpreter's shutdown takes a second after a fit (torch's
    exit hooks). Ctrl-C or SIGTERM there printed a traceback from an exit hook, or killed the process by the signal
    (-2, -15) once Python had restored the default handlers. An exit hook registered before the CLI runs runs after
    its own ones: the signal is sent from there, and that hook then hangs (as ``ray.shutdown`` may on a dead
    cluster): the process ends at once with the command's code, not after the hang (ignoring the signal waited)."""
    code = (
        "import atexit, os, signal, sys, time\n"
        f"atexit.register(lambda: (os.kill(os.getpid(), signal.{signame}), time.sleep(60)))\n"
        "from anomaly.cli import main\n"
        "sys.argv = ['anomaly', 'score', '--help']\n"
        "main()\n"
    )
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, (proc.returncode, proc.stderr)
    assert time.perf_counter() - start < 30
    assert "--model" in proc.stdout


def test_an_empty_scores_or_clusters_csv_is_one_error_line(tmp_path: Path) -> None:
    """A scores.csv or clusters.csv emptied by hand (or cut short by a full disk) has no header: reading its column
    names after the file was closed raised "I/O operation on closed file", a traceback with exit 1 from `evaluate`,
    `discover` and `report`."""
    scores, clusters = tmp_path / "scores", tmp_path / "clusters"
    scores.mkdir()
    clusters.mkdir()
    (scores / "scores.csv").write_text("")
    expected = r"expected columns path,score and at least one row \(found columns: none; 0 row\(s\)\)"
    for args in (
        ["evaluate", "--scores", scores, "--root", tmp_path],
        ["discover", "--scores", scores, "--out", tmp_path / "d"],
        ["report", "--scores", scores, "--out", tmp_path / "r"],
    ):
        _one_error_line(_run(*args), f"{scores / 'scores.csv'}: expected columns path,score")
    from anomaly.tables import read_clusters, read_scores

    with pytest.raises(DataError, match=expected):
        read_scores(scores)
    (clusters / "clusters.csv").write_text("")
    with pytest.raises(DataError, match=r"clusters.csv: expected columns path,cluster .*found columns: none"):
        read_clusters(clusters)


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGHUP"), reason="no SIGHUP on this system")
def test_8_a_hangup_that_nohup_ignores_stays_ignored() -> None:
    import signal

    from anomaly import cli

    previous = signal.getsignal(signal.SIGHUP), signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # `nohup anomaly fit ...`: meant to outlive its terminal
        cli._install_signal_handlers()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        cli._install_signal_handlers()
        assert signal.getsignal(signal.SIGHUP) == cli._on_sigterm
    finally:
        signal.signal(signal.SIGHUP, previous[0])
        signal.signal(signal.SIGTERM, previous[1])


def test_9_decompression_bombs_are_refused_by_name(model: Path, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import anomaly.data.io as io_module

    bomb = tmp_path / "bomb.png"
    Image.new("L", (5000, 4000)).save(bomb)  # 20 MP of zeros: a few KB on disk
    monkeypatch.setattr(io_module, "MAX_PIXELS", 10_000_000)
    result = _run("score", "--model", model, "--out", tmp_path / "o", bomb)
    _one_error_line(result, "bomb.png", "MP limit")


def test_9_the_pixel_limit_is_the_only_one_in_force(tmp_path: Path) -> None:
    """PIL's own bomb check warned from 89 MP and refused from 179 MP whatever ANOMALY_MAX_PIXELS said; set to that
    limit, it still warned before the refusal here, or refused (from 2x the limit) without saying the size."""
    image = tmp_path / "wide.png"
    Image.new("L", (3000, 1000)).save(image)  # 3 MP: over PIL's check when it is set from a 1 MP limit
    code = (
        "from PIL import Image\n"
        "import anomaly.data.io as io\n"
        "assert Image.MAX_IMAGE_PIXELS == max(io.MAX_PIXELS, 89478485)\n"  # PIL's own check stays on for others
        f"print(io.read_image({str(image)!r}).shape)\n"
    )
    env = {**os.environ, "ANOMALY_MAX_PIXELS": "4000000"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and "(1000, 3000, 3)" in proc.stdout and "Warning" not in proc.stderr, proc.stderr
    for limit, said in (("2000000", "2 MP"), ("100000", "0.1 MP")):  # under PIL's 2x, and far over it
        env["ANOMALY_MAX_PIXELS"] = limit
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode != 0 and f"wide.png (3000x1000 = 3 MP exceeds the {said} limit" in proc.stderr
        assert "DecompressionBomb" not in proc.stderr.replace("DataError", "")


def test_10_formula_cells_are_escaped_and_read_back_exactly(model: Path, tmp_path: Path) -> None:
    from anomaly.tables import read_scores

    folder = tmp_path / "in"
    names = ["=HYPERLINK(1).png", "+1.png", "-2.png", "@x.png"]
    for name in names:
        _png(folder / name)
    out = tmp_path / "out"
    cwd = os.getcwd()
    os.chdir(folder)  # relative inputs: the path cells start with the formula characters
    try:
        result = _run("score", "--model", model, "--out", out, "--", *names)
        assert result.exit_code == 0, result.output
    finally:
        os.chdir(cwd)
    raw = (out / "scores.csv").read_text().splitlines()[1:]
    assert all(line.startswith("'") or line.startswith("\"'") for line in raw), raw
    assert [r["path"] for r in read_scores(out)] == names


def test_11_python_api_inputs_and_per_item_errors(model: Path, tmp_path: Path) -> None:
    import torch

    det = Detector.load(model)
    rgb = np.full((40, 50, 3), 100, np.uint8)
    png = io.BytesIO()
    Image.fromarray(rgb).save(png, format="PNG")
    inputs = [Image.fromarray(rgb), torch.from_numpy(rgb).permute(2, 0, 1), png.getvalue(), rgb / 255.0]
    scores = [r.image_score for r in det.predict(inputs)]
    assert np.allclose(scores, scores[0], rtol=1e-5)
    bf16 = (torch.from_numpy(rgb).permute(2, 0, 1) / 255).bfloat16()  # a dtype NumPy lacks: read as float32
    assert det.predict(bf16).image_score == pytest.approx(scores[0], rel=1e-5)
    saved = tmp_path / "rgb.png"
    saved.write_bytes(png.getvalue())
    with saved.open("rb") as opened:  # a file object is one image (it also iterates, line by line)
        assert det.predict(opened).image_score == pytest.approx(scores[0], rel=1e-5)
    from_streams = det.predict([io.BytesIO(png.getvalue()), rgb, io.BytesIO(png.getvalue())])
    assert [r.image_score for r in from_streams] == pytest.approx([scores[0]] * 3, rel=1e-5)
    with saved.open() as text, pytest.raises(DataError, match="rgb.png: opened in text mode; open it with 'rb'"):
        det.predict(text)

    class Upload:  # as Starlette's UploadFile: an async read() and the file itself as .file
        filename = "part.png"
        file = io.BytesIO(png.getvalue())

        async def read(self) -> bytes:
            return b""

    class Camera:  # a read() that is not a file's (cv2.VideoCapture): not taken for one
        def read(self) -> tuple[bool, None]:
            return False, None

    closed = io.BytesIO(png.getvalue())
    closed.close()
    mixed = det.predict([Upload(), closed, rgb], on_error="skip")  # a file that cannot be read is one bad input
    assert mixed[0].image_score == pytest.approx(scores[0], rel=1e-5) and mixed[2].error is None
    assert "image file object: unreadable (I/O operation on closed file" in (mixed[1].error or "")
    with pytest.raises(DataError, match="unsupported image input of type Camera"):
        det.predict(Camera())
    with saved.open("rb") as opened, pytest.raises(DataError, match="needs at least .* got 1$"):
        Detector(load_config("patchcore")).fit(opened)  # one image, as predict reads it, not its lines
    with pytest.raises(DataError, match="shape"):
        det.predict(np.empty((0, 0, 3), np.uint8))
    with pytest.raises(DataError, match="unsupported image input"):
        det.predict([object()])
    with pytest.raises(DataError, match=r"in \[0, 1\], got 0..255"):  # floats of 0-255 data, not saturated
        det.predict([np.tile(np.linspace(0, 255, 50, dtype=np.float32), (40, 1))])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    results = det.predict([rgb, broken, rgb], on_error="skip")
    assert [r.error is None for r in results] == [True, False, True]
    assert "broken.png" in (results[1].error or "") and np.isnan(results[1].image_score)
    with pytest.raises(DataError, match="broken.png"):
        det.predict([rgb, broken])
    with pytest.raises(DataError, match="at least 2 images in the pool .*; 1 unreadable skipped, first: .*broken.png"):
        Detector(load_config("musc")).predict([rgb, broken], on_error="skip")  # named, not only counted out


def test_13_corrupt_png_is_one_line_and_gif_is_named_unsupported(model: Path, tmp_path: Path) -> None:
    def score_in_a_process(image: Path) -> tuple[list[str], str]:  # what the decoders print reaches stderr
        out = tmp_path / f"out_{image.stem}"
        proc = subprocess.run(
            [sys.executable, "-m", "anomaly", "score", "--model", str(model), "--out", str(out), str(image)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 2, proc.stderr
        return [line for line in proc.stderr.splitlines() if line.startswith("error: ")], proc.stderr

    good = _png(tmp_path / "ok.png")
    data = bytearray(good.read_bytes())
    data[60] ^= 0xFF  # inside IDAT: a CRC error libpng would print about
    bad = tmp_path / "bad.png"
    bad.write_bytes(bytes(data))
    errors, stderr = score_in_a_process(bad)
    assert len(errors) == 1 and "bad.png" in errors[0], stderr
    assert "libpng" not in stderr and "Traceback" not in stderr
    bmp = tmp_path / "cut.bmp"  # Pillow reads its header, OpenCV tries the pixels first and complains
    Image.new("RGB", (64, 64), (90, 30, 200)).save(bmp)
    bmp.write_bytes(bmp.read_bytes()[:3000])
    errors, stderr = score_in_a_process(bmp)
    assert len(errors) == 1 and "(corrupt or truncated BMP" in errors[0], stderr
    assert "[ERROR" not in stderr and "OpenCV" not in stderr, stderr
    gif = tmp_path / "a.gif"
    Image.new("RGB", (8, 8)).save(gif)
    _one_error_line(_run("score", "--model", model, "--out", tmp_path / "g", gif), "a.gif", "unsupported")
    beside = _run("score", "--model", model, "--out", tmp_path / "g2", gif, good)  # among images: named, left out
    assert beside.exit_code == 0 and "left out: " in beside.output and "a.gif" in beside.output
    assert len((tmp_path / "g2" / "scores.csv").read_text().splitlines()) == 2


def test_13_model_files_share_one_permission(model: Path) -> None:
    modes = {p.name: p.stat().st_mode & 0o777 for p in model.iterdir() if p.is_file()}
    assert len(set(modes.values())) == 1, modes


def test_every_input_gets_exactly_one_row(model: Path, synthetic_root: Path, tmp_path: Path) -> None:
    images = sorted((synthetic_root / "test").rglob("*.png"))
    out = tmp_path / "o"
    assert _run("score", "--model", model, "--out", out, *images).exit_code == 0
    with (out / "scores.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in images)
    assert all(np.isfinite(float(r["score"])) for r in rows)


def test_config_errors_are_raised_by_the_api_too() -> None:
    with pytest.raises(ConfigError, match="backbone.std"):
        apply_overrides(load_config("patchcore"), ["backbone.std=[0,1,1]"])


def test_6_a_full_disk_while_saving_is_a_clear_error_and_leaves_nothing(
    model: Path, tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    import errno

    from safetensors import numpy as st_numpy

    def full(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device")

    det = Detector.load(model)
    monkeypatch.setattr(st_numpy, "save_file", full)
    with pytest.raises(DataError, match="No space left"):
        det.save(tmp_path / "m")
    assert not list(tmp_path.iterdir())


def test_6_a_full_disk_while_scoring_names_the_output_folder(
    model: Path, synthetic_root: Path, tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """A map that could not be written was named in the hidden temp folder it was to go to, not in --out."""
    import errno

    from anomaly import _fs

    def full(path: Path, data: bytes) -> None:
        raise DataError(f"{path}: cannot write ({os.strerror(errno.ENOSPC)})")

    monkeypatch.setattr(_fs, "atomic_write_bytes", full)
    monkeypatch.setattr("anomaly.outputs.atomic_write_bytes", full)
    out = tmp_path / "scores"
    result = runner.invoke(app, ["score", "--model", str(model), "--out", str(out), str(synthetic_root / "test")])
    assert result.exit_code == 2 and result.output.startswith(f"error: {out}{os.sep}overlays{os.sep}"), result.output
    assert "No space left on device" in result.output and sorted(tmp_path.iterdir()) == []


def test_6_two_writers_of_one_output_leave_one_complete_folder(
    model: Path, synthetic_root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "o"
    images = str(synthetic_root / "test" / "good")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "anomaly", "-q", "score", "--model", str(model), "--out", str(out), images],
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    codes = [p.wait(timeout=300) for p in procs]
    assert all(code in (0, 2) for code in codes) and 0 in codes
    with (out / "scores.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.") and p.is_dir()]


def test_12_mutual_scoring_never_computes_distances_in_half_precision() -> None:
    import torch

    from anomaly.scorers.musc import _compute_dtype

    assert _compute_dtype(torch.zeros(2, dtype=torch.float16)) == torch.float32
    assert _compute_dtype(torch.zeros(2, dtype=torch.float64)) == torch.float64


def test_11_damaged_score_folders_are_one_error_line_in_report_and_discover(
    model: Path, synthetic_root: Path, tmp_path: Path
) -> None:
    """A damaged map or cell was a traceback (exit 1) in report / discover, and a row listed twice was counted twice."""
    scores = tmp_path / "scores"
    assert _run("score", "--model", model, "--out", scores, "--maps", synthetic_root / "test").exit_code == 0
    rows = (scores / "scores.csv").read_text().splitlines()
    flagged = next(line for line in rows[1:] if ",true," in line)
    map_file = scores / next(cell for cell in flagged.split(",") if cell.endswith(".npy"))
    good_map = map_file.read_bytes()
    report = ["report", "--scores", scores, "--out", tmp_path / "report"]
    discover = ["discover", "--scores", scores, "--out", tmp_path / "types", "--k", "2"]
    for damage, needle in (
        (lambda: map_file.write_bytes(b"garbage"), "not a readable anomaly map (.npy float array)"),
        (lambda: np.save(map_file, np.full((8, 8), np.nan, np.float32)), "NaN or infinite"),
        (lambda: np.save(map_file, np.full((8, 8), 1e39)), "beyond float32's range"),  # float64: inf once cast
        (lambda: np.save(map_file, np.zeros((1, 8, 8))), "expected an (H, W) map"),
    ):
        damage()
        for args in (report, discover):
            _one_error_line(_run(*args), map_file.name, needle)
        map_file.write_bytes(good_map)
    (scores / "scores.csv").write_text("\n".join([*rows, rows[1]]) + "\n")
    for args in (report, discover):
        _one_error_line(_run(*args), "is listed twice")
    (scores / "scores.csv").write_text("\n".join([rows[0], flagged.replace(",true,", ",maybe,"), *rows[1:]]) + "\n")
    for args in (report, discover):  # read as "not flagged" it had changed verdicts without a word
        _one_error_line(_run(*args), "is_anomalous 'maybe' is not true or false")
    (scores / "scores.csv").write_text("\n".join([rows[0], *(r.replace(",true,", ",TRUE,") for r in rows[1:])]) + "\n")
    spreadsheet = _run(*discover)  # saved by a spreadsheet: TRUE / FALSE
    assert spreadsheet.exit_code == 0, spreadsheet.output
    clusters = tmp_path / "types" / "clusters.csv"
    text = clusters.read_text().splitlines()
    clusters.write_text(
        "\n".join([text[0], *(",".join([*r.split(",")[:2], "high", *r.split(",")[3:]]) for r in text[1:])])
    )
    _one_error_line(_run(*report, "--discovery", tmp_path / "types"), "clusters.csv", "confidence 'high'")
    assert not (tmp_path / "report").exists()


def test_the_python_api_lets_idle_openmp_threads_sleep_unless_torch_came_first() -> None:
    """Spinning OpenMP threads stalled single-image predict 20x on shared cores; the CLI set the policy, a program
    importing `anomaly` did not. Once torch is loaded the setting would not apply, so it is not claimed."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = "import os, anomaly; print(os.environ.get('OMP_WAIT_POLICY'))"
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert first.stdout.strip() == "PASSIVE", first.stderr
    late = subprocess.run([sys.executable, "-c", "import torch; " + code], capture_output=True, text=True, env=env,
                          timeout=120)  # fmt: skip
    assert late.stdout.strip() == "None", late.stderr
    own = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**env, "OMP_WAIT_POLICY": "ACTIVE"}, timeout=120)  # fmt: skip
    assert own.stdout.strip() == "ACTIVE"


def test_every_image_gets_its_own_map_name_when_a_kept_suffix_meets_another_stem() -> None:
    """``a.png`` and ``a.tif`` keep their suffixes; ``a.png.png`` was then named ``a.png`` too, and one image's map
    overwrote the other's while both rows pointed to it."""
    from anomaly.outputs import relative_names

    paths = [Path("/d/coll/a.png"), Path("/d/coll/a.tif"), Path("/d/coll/a.png.png"), Path("/d/coll/b.png")]
    names = relative_names(paths)
    assert [n.as_posix() for n in names] == ["coll/a.png", "coll/a.tif", "coll/a.png.png", "coll/b"]
    chain = [Path("/d/x/a.png"), Path("/d/x/a.jpg"), Path("/d/x/a.png.png"), Path("/d/x/a.png.png.png")]
    assert len(set(relative_names(chain))) == len(chain)


def test_a_swap_interrupted_after_moving_the_users_files_puts_them_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The user's files move into the new folder before the two renames; a run killed in between left them in a
    temp folder that the next run deleted as a dead run's. An interruption there now puts them back at once."""
    from anomaly import _fs

    target = tmp_path / "out"
    target.mkdir()
    (target / "result.json").write_text("{}")
    (target / "notes.txt").write_text("mine")
    tmp = _fs.new_temp_dir(target, "result.json", output=False)
    (tmp / "result.json").write_text("{}")
    rename = Path.rename

    def killed(self: Path, dest: Path) -> Path:
        if self == target:  # the first of the two renames
            raise KeyboardInterrupt
        return rename(self, dest)

    monkeypatch.setattr(Path, "rename", killed)
    with pytest.raises(KeyboardInterrupt):
        _fs.replace_dir(tmp, target, owned={"result.json"})
    monkeypatch.undo()
    with monkeypatch.context() as m:
        m.setattr(_fs, "_alive", lambda pid: False)  # the run is gone
        _fs.new_temp_dir(target, "result.json", output=False)  # the next run cleans up beside the target
    assert (target / "notes.txt").read_text() == "mine" and not tmp.exists()


def test_a_device_the_machine_lacks_is_one_error_line_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`--device mps` on a machine without MPS ended in torch's RuntimeError traceback (exit 1) when the model moved
    there, then in an error that blamed the input size ("backbone.image_size: 'tf_efficientnet_lite0' cannot run at
    [256, 256] (PyTorch is not linked with support for mps devices)"); `cuda:N` past the GPUs torch sees was not
    checked either."""
    import torch

    from anomaly import BackendError
    from anomaly._runtime import resolve_device

    if not torch.backends.mps.is_available():  # (torch's own is_available cannot be patched: it is looked through)
        images = [_png(tmp_path / "good" / f"{i}.png", 100 + i) for i in range(4)]
        fitted = _run("fit", "--device", "mps", "--out", tmp_path / "m", *SMALL, images[0].parent)
        _one_error_line(fitted, "device: 'mps' requested but this torch has no usable MPS device")
        assert not (tmp_path / "m").exists()
        with pytest.raises(BackendError, match="'mps' requested"):
            resolve_device("mps")
    with monkeypatch.context() as one_gpu:
        one_gpu.setattr(torch.cuda, "is_available", lambda: True)
        one_gpu.setattr(torch.cuda, "device_count", lambda: 1)
        assert resolve_device("cuda:0") == torch.device("cuda:0")
        with pytest.raises(BackendError, match=r"'cuda:1' requested but torch sees 1 CUDA GPU\(s\) \(cuda:0 to"):
            resolve_device("cuda:1")


def test_a_scores_csv_saved_by_a_spreadsheet_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    """A scores.csv saved as "CSV UTF-8" by a spreadsheet starts with a byte-order mark, which stuck to the first
    column's name: `evaluate`, `report` and `discover` refused it as "expected columns path,score", columns it had."""
    from anomaly.tables import read_scores

    scores = tmp_path / "scores"
    scores.mkdir()
    text = "path,score,is_anomalous\r\n'=a.png,1.5,TRUE\r\nb\u00fc.png,0.5,FALSE\r\n"
    (scores / "scores.csv").write_text(text, encoding="utf-8-sig", newline="")
    rows = read_scores(scores)
    assert [(r["path"], r["score"], r["is_anomalous"]) for r in rows] == [
        ("=a.png", "1.5", "TRUE"),
        ("bü.png", "0.5", "FALSE"),
    ]
    (scores / "scores.csv").write_text(text.replace(",", ";"), encoding="utf-8", newline="")  # another separator
    with pytest.raises(DataError, match=r"expected columns path,score and at least one row \(found columns: "
                       r"path;score;is_anomalous; 2 row\(s\)\)"):  # fmt: skip
        read_scores(scores)


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGHUP"), reason="no SIGHUP on this system")
def test_8_a_second_hangup_during_the_clean_up_does_not_cut_it_short() -> None:
    """A closed terminal sends SIGHUP twice (the kernel, then the shell to its jobs): the second one, raised inside
    the clean-up that the first started, interrupted it and left a temp folder behind."""
    import os
    import signal

    from anomaly import cli

    previous = signal.getsignal(signal.SIGHUP), signal.getsignal(signal.SIGTERM)
    cleaned = False
    try:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)  # under nohup (a CI runner) SIGHUP is ignored, and stays so
        cli._install_signal_handlers()
        with pytest.raises(cli._Terminated) as caught:
            try:
                os.kill(os.getpid(), signal.SIGHUP)
            finally:
                os.kill(os.getpid(), signal.SIGHUP)  # the shell's SIGHUP, while the first unwinds
                os.kill(os.getpid(), signal.SIGTERM)
                cleaned = True
        assert caught.value.signum == signal.SIGHUP and cleaned
    finally:
        signal.signal(signal.SIGHUP, previous[0])
        signal.signal(signal.SIGTERM, previous[1])


def test_a_scores_folder_left_between_the_two_renames_is_read_back(tmp_path: Path) -> None:
    """A score run killed between replace_dir's two renames leaves the previous scores as .<name>.old; `evaluate`,
    `report` and `discover` answered "scores.csv: not found (run `anomaly score` first)" instead of restoring it."""
    from anomaly._fs import staged_dir
    from anomaly.tables import read_scores, write_scores

    out = tmp_path / "scores"
    with staged_dir(out, "scores.csv") as tmp:
        write_scores(tmp / "scores.csv", [{"path": "a.png", "score": "1.0", "is_anomalous": "true"}])
    out.rename(tmp_path / ".scores.old")  # killed after the first rename
    assert [row["path"] for row in read_scores(out)] == ["a.png"]
    assert (out / "scores.csv").is_file() and not (tmp_path / ".scores.old").exists()


def test_a_file_name_near_the_length_limit_is_written_atomically(tmp_path: Path) -> None:
    """The temp file beside a map or overlay added a dot, the pid and the thread id to its name: an image named
    with 230 or more bytes (the limit is 255) failed `score --maps` with "File name too long"."""
    from anomaly._fs import atomic_write_bytes

    path = tmp_path / ("\u00e9" * 125 + ".npy")  # 254 bytes in UTF-8
    atomic_write_bytes(path, b"map")
    assert path.read_bytes() == b"map" and os.listdir(tmp_path) == [path.name]


def test_a_user_file_that_cannot_move_leaves_the_others_in_the_old_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A re-run moves the user's files of the old output into the new one; when one of them could not move (a
    read-only sub-folder: Linux needs write permission on a folder to move it elsewhere), the run failed and its
    clean-up deleted the temp folder with the user's files that had moved before."""
    from anomaly import _fs

    target = tmp_path / "out"
    with _fs.staged_dir(target, "scores.csv") as tmp:
        (tmp / "scores.csv").write_text("path,score\na.png,1\n")
    (target / "a_notes.txt").write_text("mine")
    (target / "b_locked").mkdir()
    rename = Path.rename

    def refused(self: Path, dest: Path) -> Path:
        if self.name == "b_locked":
            raise PermissionError(13, "Permission denied")
        return rename(self, dest)

    monkeypatch.setattr(Path, "rename", refused)
    listing = Path.iterdir
    monkeypatch.setattr(Path, "iterdir", lambda self: iter(sorted(listing(self))))  # the notes move first
    with pytest.raises(DataError, match="Permission denied"), _fs.staged_dir(target, "scores.csv") as tmp:
        (tmp / "scores.csv").write_text("path,score\na.png,2\n")
    assert (target / "a_notes.txt").read_text() == "mine" and (target / "b_locked").is_dir()
    assert (target / "scores.csv").read_text() == "path,score\na.png,1\n"
