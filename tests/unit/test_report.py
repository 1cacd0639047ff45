"""`anomaly report`: the folder it writes, and the page in a real headless Chromium (skipped without one)."""

from __future__ import annotations

import csv
import json
import re
import time
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from anomaly.cli import app
from anomaly.data.synthetic import make_synthetic_category
from anomaly.report import build_report
from anomaly.report.build import DATA_FILE

SMALL = ["--set", "backbone.image_size=[128,128]", "--set", "batch_size=4"]
runner = CliRunner()


def _run(*args: object) -> Any:
    return runner.invoke(app, [str(a) for a in args])


def _rows(scores_dir: Path) -> list[dict[str, str]]:
    with (scores_dir / "scores.csv").open() as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A synthetic category fitted, scored with maps, evaluated (with AUPIMO) and clustered."""
    base = tmp_path_factory.mktemp("report")
    root = make_synthetic_category(base, "widget", n_train=12, n_test_good=8, n_test_defect=9, size=128, seed=3)
    for args in (
        ("fit", "--config", "patchcore", "--out", base / "model", *SMALL, root),
        ("score", "--model", base / "model", "--out", base / "scores", "--maps", root / "test"),
        ("evaluate", "--scores", base / "scores", "--root", root, "--out", base / "eval"),
    ):
        result = _run(*args)
        assert result.exit_code == 0, result.output
    assert (base / "eval" / "aupimo.json").is_file() and (base / "eval" / "pimo.json").is_file()
    rows = _rows(base / "scores")
    (base / "discovery").mkdir()
    with (base / "discovery" / "clusters.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "cluster", "confidence"])
        for i, row in enumerate(rows):
            writer.writerow([row["path"], Path(row["path"]).parent.name, f"{0.5 + (i % 5) / 10:.2f}"])
    return SimpleNamespace(
        root=root, scores=base / "scores", eval=base / "eval", discovery=base / "discovery", rows=rows
    )


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def _tags(html: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = _Tags()
    parser.feed(html)
    return parser.tags


def _data(report: Path) -> dict[str, Any]:
    text = (report / DATA_FILE).read_text(encoding="utf-8")
    return json.loads(text.removeprefix("window.ANOMALY_REPORT = ").rstrip().removesuffix(";"))


def _expected(rows: list[dict[str, str]], t: float) -> dict[str, int]:
    """Counts at threshold t computed here: flagged iff score >= t; anomalous unless in a `good` folder."""
    scores = np.array([float(r["score"]) for r in rows])
    anomalous = np.array([Path(r["path"]).parent.name != "good" for r in rows])
    flagged = scores >= t
    return {
        "n-flagged": int(flagged.sum()),
        "cm-tp": int((flagged & anomalous).sum()),
        "cm-fp": int((flagged & ~anomalous).sum()),
        "cm-fn": int((~flagged & anomalous).sum()),
        "cm-tn": int((~flagged & ~anomalous).sum()),
    }


def _slide(page: Any, t: float) -> None:
    """Move the slider as a user does: set its value and dispatch the input event."""
    page.eval_on_selector(
        "#thr-range", "(el, t) => { el.value = String(t); el.dispatchEvent(new Event('input', {bubbles: true})); }", t
    )


def _shown(page: Any, ids: list[str]) -> dict[str, int]:
    return {i: int(page.text_content(f"#{i}")) for i in ids}


def test_report_folder_is_self_contained(scored: SimpleNamespace, tmp_path: Path) -> None:
    out = build_report(scored.scores, tmp_path / "report", scored.eval, scored.discovery)
    html = (out / "index.html").read_text()
    tags = _tags(html)
    for tag, attrs in tags:  # every referenced file is inside the folder and exists
        for key in ("src", "href"):
            ref = attrs.get(key)
            if ref and not ref.startswith("#"):
                assert not re.match(r"^[a-z]+:", ref) and not ref.startswith("/"), f"<{tag} {key}={ref}>"
                assert (out / ref).is_file(), ref
    cards = [a for t, a in tags if t == "img" and a.get("src", "").startswith("thumbs/") and "(cluster" not in a["alt"]]
    assert len(cards) == len(scored.rows)
    assert all(a["loading"] == "lazy" and int(a["width"]) > 0 and int(a["height"]) > 0 and a["alt"] for a in cards)
    data = _data(out)
    scores = [it["score"] for it in data["items"]]
    assert scores == sorted(scores, reverse=True) and data["hasLabels"] is True
    assert data["threshold"] == float(scored.rows[0]["threshold"])
    assert {it["label"] for it in data["items"] if it["folder"] == "good"} == {0}
    for it in data["items"]:  # every view the page may open exists
        assert all((out / v).is_file() for v in it["views"].values())
        assert set(it["views"]) == {"image", "overlay", "map", "mask"}
    aupimo = json.loads((scored.eval / "aupimo.json").read_text())
    by_path = {it["path"]: it["aupimo"] for it in data["items"]}
    assert [by_path[p] for p in aupimo["paths"]] == aupimo["per_image"]
    n_anomalous = sum(Path(r["path"]).parent.name != "good" for r in scored.rows)
    assert html.count("<polyline ") == n_anomalous  # one PIMO curve per anomalous image
    assert 'id="clusters"' in html and html.count('data-cluster-filter="') == 4  # good + 3 defect folders


def test_cli_report_replaces_its_own_output_and_refuses_others(scored: SimpleNamespace, tmp_path: Path) -> None:
    out = tmp_path / "report"
    for _ in range(2):  # a second run replaces the first report
        result = _run("report", "--scores", scored.scores, "--out", out)
        assert result.exit_code == 0, result.output
        assert "index.html" in result.output
    assert 'id="evaluation"' not in (out / "index.html").read_text()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    result = _run("report", "--scores", scored.scores, "--out", foreign)
    assert result.exit_code == 2 and "not an anomaly output" in result.output
    assert (foreign / "notes.txt").read_text() == "keep"
    result = _run("report", "--scores", tmp_path / "nothing", "--out", tmp_path / "r2")
    assert result.exit_code == 2 and "scores.csv" in result.output
    result = _run("report", "--scores", scored.scores, "--evaluation", scored.discovery, "--out", tmp_path / "r3")
    assert result.exit_code == 2 and "metrics.json" in result.output
    bad = tmp_path / "bad_discovery"
    bad.mkdir()
    (bad / "clusters.csv").write_text("path,cluster,confidence\n/elsewhere/x.png,0,1.0\n")
    result = _run("report", "--scores", scored.scores, "--discovery", bad, "--out", tmp_path / "r4")
    assert result.exit_code == 2 and "not in the scores.csv" in result.output
    assert not (tmp_path / "r2").exists() and not (tmp_path / "r4").exists()


def _fabricate(folder: Path, n: int, *, labelled: bool = True, seed: int = 0) -> Path:
    """A scores.csv of ``n`` tiny images (no model): defect folders score higher on average."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        anomalous = labelled and i % 3 == 0
        sub = folder / "data" / "test" / (("crack" if anomalous else "good") if labelled else "batch")
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"{i:04d}.png"
        cv2.imwrite(str(path), rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))
        score = float(rng.normal(2.0 if anomalous else 1.0, 0.4))
        rows.append({"path": str(path), "score": repr(score), "is_anomalous": "true" if score >= 1.5 else "false",
                     "threshold": "1.5", "map_path": "", "overlay_path": ""})  # fmt: skip
    scores = folder / "scores"
    scores.mkdir()
    with (scores / "scores.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return scores


def test_an_evaluation_of_other_scores_is_refused_or_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An evaluation folder of another scores run was drawn as this run's (its AUROC, its PIMO curves)."""
    from anomaly.errors import DataError

    scores = _fabricate(tmp_path, 12)
    evaluation = tmp_path / "eval"
    evaluation.mkdir()
    (evaluation / "metrics.json").write_text(json.dumps({"image_auroc": 0.97, "n_images": 20}))
    caplog.set_level("WARNING", logger="anomaly")
    build_report(scores, tmp_path / "report", evaluation_dir=evaluation)
    assert "evaluated 20 images and the scores.csv holds 12" in caplog.text
    curves = {"shared_fpr": [0.0, 1.0], "per_image_tpr": [[0.0, 1.0]], "paths": ["elsewhere/0001.png"]}
    (evaluation / "pimo.json").write_text(json.dumps(curves))
    with pytest.raises(DataError, match=r"pimo.json: elsewhere/0001.png is not in the scores.csv"):
        build_report(scores, tmp_path / "report2", evaluation_dir=evaluation)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("metrics.json", b"\xff\xfe\x00", "metrics.json: not valid JSON"),
        ("metrics.json", b'"hello"', "metrics.json: expected a JSON object"),
        ("ground_truth.json", b"\xff\xfe", "ground_truth.json: not valid JSON"),
        ("aupimo.json", b"[1, 2]", "aupimo.json: expected a JSON object"),
        ("pimo.json", b"[1, 2]", "pimo.json: expected a JSON object"),
        ("aupimo.json", json.dumps({"per_image": ["x"], "mean": 0.5, "fpr_bounds": [1e-5, 1e-4]}).encode(),
         r"aupimo.json: malformed \(per_image: 'x' is not a number"),
        ("pimo.json", json.dumps({"shared_fpr": "x", "per_image_tpr": [], "paths": []}).encode(),
         r"pimo.json: malformed \(shared_fpr: expected a list"),
    ],
)  # fmt: skip
def test_a_damaged_evaluation_file_is_one_error_line_naming_it(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    """An evaluation folder edited by hand or cut short: JSON that is not UTF-8, or not the object `evaluate` wrote,
    or curves of text, ended `anomaly report` in a traceback (UnicodeDecodeError, AttributeError, TypeError)."""
    scores = _fabricate(tmp_path, 6)
    evaluation = tmp_path / "eval"
    evaluation.mkdir()
    (evaluation / "metrics.json").write_text(json.dumps({"image_auroc": 0.97, "n_images": 6}))
    (evaluation / name).write_bytes(content)
    result = _run("report", "--scores", scores, "--evaluation", evaluation, "--out", tmp_path / "report")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.search(message, errors[0]), result.output
    assert str(evaluation) in errors[0]


def test_an_evaluation_of_the_same_images_scored_by_another_model_is_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`report --scores zs/ --evaluation ev/` where ev/ evaluated another model's scores of the same images drew that
    model's AUROC, AUPIMO and PIMO curves beside these scores without a word (same paths, same count)."""
    from anomaly.evaluation import evaluate_scores

    scores = _fabricate(tmp_path, 12)
    caplog.set_level("WARNING", logger="anomaly")
    evaluate_scores(scores, tmp_path / "data", tmp_path / "eval")  # (no masks: image metrics, with a warning)
    caplog.clear()
    build_report(scores, tmp_path / "report", evaluation_dir=tmp_path / "eval")
    assert "evaluation of another scores.csv" not in caplog.text
    rows = _rows(scores)
    other = tmp_path / "other"
    other.mkdir()
    _write_rows(other, [{**r, "score": repr(5.0 - float(r["score"]))} for r in rows])  # another model's scores
    build_report(other, tmp_path / "report2", evaluation_dir=tmp_path / "eval")
    assert f"eval is the evaluation of another scores.csv than {other / 'scores.csv'}" in caplog.text


def test_a_hand_edited_score_without_a_threshold_column_is_named(tmp_path: Path) -> None:
    from anomaly.errors import DataError

    scores = _fabricate(tmp_path, 6)
    with (scores / "scores.csv").open() as fh:
        rows = [{k: v for k, v in r.items() if k not in ("threshold", "is_anomalous")} for r in csv.DictReader(fh)]
    rows[2]["score"] = "n/a"
    with (scores / "scores.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(DataError, match=r"scores.csv: .*0002.png: score 'n/a' is not a number"):
        build_report(scores, tmp_path / "report")


def test_folder_name_labels_read_test_good_in_capitals_as_the_loaders_do() -> None:
    """load_mvtec reads test/Good/ as normal images; the report's labels from folder names counted them defective."""
    from anomaly.report.content import true_label

    assert [true_label(f"w/test/{d}/000.png") for d in ("good", "Good", "crack")] == [0, 0, 1]


def test_without_ground_truth_there_is_no_confusion_matrix(tmp_path: Path) -> None:
    scores = _fabricate(tmp_path, 12, labelled=False)
    out = build_report(scores, tmp_path / "report")
    html = (out / "index.html").read_text()
    assert 'id="cm-tp"' not in html and 'id="rate-flagged"' in html
    data = _data(out)
    assert data["hasLabels"] is False and all(it["label"] is None for it in data["items"])
    assert all(set(it["views"]) == {"image"} for it in data["items"])  # no map: the image alone


def test_the_page_is_utf8_whatever_the_locale(tmp_path: Path) -> None:
    """The page declares UTF-8 but was written in the locale's encoding: a report built under an ASCII or Latin-1
    locale (or on Windows) crashed on the template's own '·', or wrote bytes the browser shows as U+FFFD."""
    import os
    import subprocess
    import sys

    scores = _fabricate(tmp_path, 3)
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}  # an ASCII locale
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    code = "import sys; from anomaly.report import build_report; build_report(sys.argv[1], sys.argv[2])"
    built = subprocess.run(
        [sys.executable, "-c", code, str(scores), str(tmp_path / "report")], env=env, capture_output=True
    )
    assert built.returncode == 0, built.stderr.decode()[-500:]
    assert "model threshold" in (tmp_path / "report" / "index.html").read_text(encoding="utf-8")


def test_a_folder_name_that_is_not_utf8_is_the_same_in_the_filter_and_the_data(tmp_path: Path) -> None:
    """The page showed such a name as U+FFFD and its data kept the surrogate escape: filtering the gallery by that
    folder showed no image."""
    import os

    scores = _fabricate(tmp_path, 6)
    crack = tmp_path / "data" / "test" / "crack"
    renamed = crack.parent / os.fsdecode(b"Pr\xfcfung")
    crack.rename(renamed)
    rows = [{**r, "path": r["path"].replace(str(crack), str(renamed))} for r in _rows(scores)]
    with (scores / "scores.csv").open("w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out = build_report(scores, tmp_path / "report")
    options = {a["value"] for t, a in _tags((out / "index.html").read_text(encoding="utf-8")) if t == "option"}
    folders = {it["folder"] for it in _data(out)["items"]}
    assert folders == {"Pr\ufffdfung", "good"} and folders <= options


def test_the_viewer_shows_an_image_at_its_own_size_up_to_the_cap(tmp_path: Path) -> None:
    """A KolektorSDD frame (1270 px tall) showed at 302 x 768: "click for the full-size image"."""
    from anomaly.report.images import VIEW_SIZE

    scores = _fabricate(tmp_path, 3, labelled=False)
    rows = _rows(scores)
    cv2.imwrite(rows[0]["path"], np.full((1270, 500, 3), 90, np.uint8))
    cv2.imwrite(rows[1]["path"], np.full((VIEW_SIZE * 2, 30, 3), 90, np.uint8))
    out = build_report(scores, tmp_path / "report")
    by_path = {it["path"]: it for it in _data(out)["items"]}
    sizes = [cv2.imread(str(out / by_path[r["path"]]["views"]["image"])).shape[:2] for r in rows[:2]]
    assert sizes == [(1270, 500), (VIEW_SIZE, 15)]


def test_missing_images_and_maps_are_named_and_a_good_only_set_says_what_flags_are(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    scores = _fabricate(tmp_path, 6)
    rows = _rows(scores)
    rows[0]["path"] = "relative/elsewhere/0000.png"  # relative to a folder `anomaly score` ran in, not this one
    rows[1]["map_path"] = "maps/gone.npy"
    with (scores / "scores.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with caplog.at_level("WARNING"):
        out = build_report(scores, tmp_path / "report")
    messages = [r.getMessage() for r in caplog.records]
    lost = "1 of the 6 scored images are not found here (first: relative/elsewhere/0000.png)"
    assert any(lost in m for m in messages)
    assert any("1 map file(s) listed in scores.csv are missing" in m and "gone.npy" in m for m in messages)
    assert "each flagged image is a false positive" not in (out / "index.html").read_text()

    good_only = tmp_path / "good_only"
    good_only.mkdir()
    scores = _fabricate(good_only, 6, labelled=False)
    for row in (rows := _rows(scores)):
        row["path"] = row["path"].replace("/batch/", "/good/")
    with (scores / "scores.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    html = (build_report(scores, good_only / "report") / "index.html").read_text()
    assert "each flagged image is a false positive" in html and 'id="cm-tp"' not in html
    assert "missed defect" not in html

    defects_only = tmp_path / "defects_only"  # an imported test-only set (NEU-Seg): test/<type>/ folders alone
    defects_only.mkdir()
    scores = _fabricate(defects_only, 6, labelled=False)
    for row in (rows := _rows(scores)):
        row["path"] = row["path"].replace("/batch/", "/test/crack/")
    _write_rows(scores, rows)
    html = (build_report(scores, defects_only / "report") / "index.html").read_text()
    assert (
        "if these are defect folders (a defect-only set), each passed image is a missed defect" in html
        and "No ground truth" not in html
    )


def _write_rows(scores: Path, rows: list[dict[str, str]]) -> None:
    with (scores / "scores.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _with_maps(scores: Path) -> list[dict[str, str]]:
    """The rows of a :func:`_fabricate` scores.csv, each given a flat map (at its score) under maps/."""
    rows = _rows(scores)
    (scores / "maps").mkdir()
    for i, row in enumerate(rows):
        row["map_path"] = f"maps/{i:04d}.npy"
        np.save(scores / row["map_path"], np.full((48, 48), float(row["score"]), np.float32))
    return rows


def test_a_damaged_map_is_one_error_line_naming_it(tmp_path: Path) -> None:
    """Any file that is not a .npy array gave numpy's advice about allow_pickle as the error."""
    scores = _fabricate(tmp_path, 3)
    rows = _with_maps(scores)
    _write_rows(scores, rows)
    map_file = scores / rows[1]["map_path"]
    good = map_file.read_bytes()
    for damaged in (b"garbage", good[:-16]):  # not a .npy file; a truncated one
        map_file.write_bytes(damaged)
        result = _run("report", "--scores", scores, "--out", tmp_path / "report")
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert result.exit_code == 2, result.output
        assert errors == [f"error: {map_file}: not a readable anomaly map (.npy float array)"], result.output
        assert "allow_pickle" not in result.output and not (tmp_path / "report").exists()


@pytest.mark.parametrize("stop", ["damaged map", "Ctrl-C"])
def test_an_error_or_interrupt_stops_the_rendering_at_once(
    stop: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A damaged map of the first image (or Ctrl-C, SIGTERM) came only once every other picture was rendered: the
    pool's exit waited for all queued renders (a report of 5,000 images took minutes to fail or to stop)."""
    import anomaly.report.build as build
    from anomaly.errors import DataError

    scores = _fabricate(tmp_path, 60)
    rendered: list[str] = []

    def render(item: Any, out: Path, key: str) -> Any:
        if stop == "damaged map" and key == "00":
            raise DataError(f"{item.path}: not a readable anomaly map")
        time.sleep(0.02)
        rendered.append(key)
        return build.Rendered(f"thumbs/{key}.jpg", (1, 1))

    def progress(stage: str, done: int, total: int) -> None:
        if stop == "Ctrl-C" and done == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(build, "_WORKERS", 2)
    monkeypatch.setattr(build, "render_item", render)
    with pytest.raises(DataError if stop == "damaged map" else KeyboardInterrupt):
        build_report(scores, tmp_path / "report", progress=progress)
    assert len(rendered) <= 6, f"{len(rendered)} of 60 pictures rendered after the {stop}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "scores"]  # no report, no temp folder


def test_maps_without_a_map_path_column_are_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A renamed map_path column read as 'scored without maps', silently, beside a maps/ folder."""
    scores = _fabricate(tmp_path, 3)
    rows = _with_maps(scores)
    for row in rows:
        row["maps"] = row.pop("map_path")
    _write_rows(scores, rows)
    with caplog.at_level("WARNING"):
        out = build_report(scores, tmp_path / "report")
    expected = f"{scores / 'scores.csv'}: no map_path column, though {scores / 'maps'} exists"
    assert any(expected in r.getMessage() for r in caplog.records), caplog.text
    assert all("map" not in it["views"] for it in _data(out)["items"])


def test_regenerated_overlays_are_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Overlays drawn from the maps, where scores.csv lists none, were drawn silently."""
    scores = _fabricate(tmp_path, 3)
    rows = _with_maps(scores)
    rows[0]["overlay_path"] = "overlays/0000.png"  # this one was written by `anomaly score`
    (scores / "overlays").mkdir()
    cv2.imwrite(str(scores / rows[0]["overlay_path"]), np.zeros((48, 48, 3), np.uint8))
    _write_rows(scores, rows)
    with caplog.at_level("INFO"):
        out = build_report(scores, tmp_path / "report")
    messages = [r.getMessage() for r in caplog.records if "overlay" in r.getMessage()]
    assert messages == ["2 overlay(s) regenerated from the maps (none in the scores folder)"]
    assert all("overlay" in it["views"] for it in _data(out)["items"])


def test_an_image_that_cannot_be_decoded_is_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A damaged image file (changed since it was scored) was left out of the viewer silently."""
    scores = _fabricate(tmp_path, 3)
    rows = _with_maps(scores)
    _write_rows(scores, rows)
    damaged = Path(rows[1]["path"])
    damaged.write_bytes(damaged.read_bytes()[:100])
    with caplog.at_level("WARNING"):
        out = build_report(scores, tmp_path / "report")
    expected = f"1 image file(s) could not be decoded (first: {damaged})"
    assert any(expected in r.getMessage() for r in caplog.records), caplog.text
    assert sum("image" in it["views"] for it in _data(out)["items"]) == 2


def test_report_in_chromium(scored: SimpleNamespace, open_report: Any, tmp_path: Path) -> None:
    out = build_report(scored.scores, tmp_path / "report", scored.eval, scored.discovery)
    opened = open_report(out)
    page, rows = opened.page, scored.rows
    assert page.locator("#grid > li img").count() == len(rows)
    assert page.eval_on_selector_all("#grid img", "els => els.every(e => e.alt && e.loading === 'lazy')")
    ids = ["n-flagged", "cm-tp", "cm-fp", "cm-fn", "cm-tn"]
    model_t = float(rows[0]["threshold"])
    assert _shown(page, ids) == _expected(rows, model_t)
    assert _shown(page, ["n-flagged"])["n-flagged"] == sum(r["is_anomalous"] == "true" for r in rows)
    scores = sorted(float(r["score"]) for r in rows)
    for t in (scores[len(scores) // 2], scores[2], (scores[-1] + scores[-2]) / 2):  # ties count as flagged
        _slide(page, t)
        assert _shown(page, ids) == _expected(rows, t), t
    assert page.locator("#changes-list li").count() > 0  # images that changed side are listed
    page.select_option("#filter-verdict", "passed")
    assert page.locator("#grid > li:not([hidden])").count() == len(rows) - _expected(rows, t)["n-flagged"]
    page.select_option("#filter-verdict", "")
    page.click("#thr-reset")
    assert _shown(page, ids) == _expected(rows, model_t)
    page.focus("#grid > li:nth-child(1) button.thumb")  # keyboard: next image, open, close
    page.keyboard.press("ArrowRight")
    page.keyboard.press("Enter")
    assert page.eval_on_selector("#viewer", "d => d.open")
    assert page.text_content("#viewer-title").startswith("#2 ")
    assert page.locator("#viewer-views img").count() == 4
    # the mask is not redrawn by the slider, and says at which threshold it was drawn
    assert page.locator("#viewer-views figcaption").last.text_content() == "Mask at the model's threshold"
    page.keyboard.press("Escape")
    assert not page.eval_on_selector("#viewer", "d => d.open")
    page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    assert (tmp_path / "report.png").stat().st_size > 10_000
    assert opened.errors == [] and opened.outside == []


def test_a_cleared_threshold_field_keeps_the_threshold(open_report: Any, tmp_path: Path) -> None:
    """Clearing the field to type another threshold (or typing "-" first) read as 0: every image flagged."""
    scores = _fabricate(tmp_path, 12)
    page = open_report(build_report(scores, tmp_path / "report")).page
    at_model = _shown(page, ["n-flagged"])
    assert 0 < at_model["n-flagged"] < 12
    for text in ("", "-"):
        page.fill("#thr-value", "")
        if text:
            page.type("#thr-value", text)
        assert _shown(page, ["n-flagged"]) == at_model, repr(text)
    page.fill("#thr-value", "1e9")
    assert _shown(page, ["n-flagged"]) == {"n-flagged": 0}


def test_thousand_images_load_fast_without_layout_shift(open_report: Any, tmp_path: Path) -> None:
    scores = _fabricate(tmp_path, 1000)
    start = time.perf_counter()
    out = build_report(scores, tmp_path / "report")
    build_s = time.perf_counter() - start
    opened = open_report(out)
    page = opened.page
    # the thumbnails' shift as they load, read before the slider: on a loaded machine the slider's re-render comes
    # more than 500 ms after its input, no longer counted as the user's own (CLS 0.57 in a CI run beside other jobs;
    # under three busy loops 0.15 after the slider, 0.0004 before it)
    page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
    page.wait_for_timeout(300)
    cls = page.evaluate("window.__cls")
    start = time.perf_counter()
    _slide(page, 1.8)
    assert _shown(page, ["n-flagged"]) == {"n-flagged": _expected(_rows(scores), 1.8)["n-flagged"]}
    slide_s = time.perf_counter() - start
    print(f"1000 images: build {build_s:.2f} s, interactive {opened.seconds:.3f} s, slider {slide_s:.3f} s, CLS {cls}")
    assert page.locator("#grid > li img").count() == 1000
    assert opened.seconds < 10  # 2 s on an idle machine; lenient for shared CI cores
    assert cls < 0.1  # "good" cumulative layout shift: thumbnails reserve their space
    assert opened.errors == [] and opened.outside == []


@pytest.mark.parametrize("flagged", [True, False])
def test_mask_view_is_empty_for_an_image_that_passes(flagged: bool) -> None:
    """A pool's pixel threshold can lie under the map of an image that passes: the verdict decides, as in
    ``DetectionResult.mask``."""
    from anomaly.report.content import Item
    from anomaly.report.images import _mask_view

    amap = np.zeros((32, 32), np.float32)
    amap[8:16, 8:16] = 2.0
    item = Item(
        path="a/x.png",
        score=1.0,
        pixel_threshold=1.5,
        flagged=flagged,
        label=None,
        image=None,
        map=None,
        overlay=None,
        ground_truth=None,
    )
    view = _mask_view(amap, item, (32, 32))
    assert view is not None
    assert int((view[..., 0] == 255).sum()) == (64 if flagged else 0)
