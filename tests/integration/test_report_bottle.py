"""The HTML report of real bottle scores (with evaluation), checked in headless Chromium."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from anomaly.cli import app

pytestmark = pytest.mark.integration


def _cli(*args: object) -> None:
    result = CliRunner().invoke(app, ["-q", *map(str, args)])
    assert result.exit_code == 0, result.output


def test_bottle_report_in_chromium(bottle_root: Path, open_report: Any, tmp_path: Path) -> None:
    # a model fitted on 30 training images keeps this test short; the report is what is under test
    _cli("fit", "--out", tmp_path / "model", str(bottle_root / "train" / "good" / "0[0-2]?.png"))
    _cli("score", "--model", tmp_path / "model", "--out", tmp_path / "scores", "--maps", bottle_root / "test")
    _cli("evaluate", "--scores", tmp_path / "scores", "--root", bottle_root, "--out", tmp_path / "eval")
    _cli("report", "--scores", tmp_path / "scores", "--evaluation", tmp_path / "eval", "--out", tmp_path / "report")
    with (tmp_path / "scores" / "scores.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    scores = np.array([float(r["score"]) for r in rows])
    anomalous = np.array([Path(r["path"]).parent.name != "good" for r in rows])
    opened = open_report(tmp_path / "report")
    page = opened.page
    assert page.locator("#grid > li img").count() == 83
    for t in (float(rows[0]["threshold"]), float(np.median(scores)), float(np.sort(scores)[10])):
        page.eval_on_selector(
            "#thr-range", "(el, t) => { el.value = String(t); el.dispatchEvent(new Event('input')); }", t
        )
        flagged = scores >= t
        expected = [flagged.sum(), (flagged & anomalous).sum(), (flagged & ~anomalous).sum()]
        assert [int(page.text_content(f"#{i}")) for i in ("n-flagged", "cm-tp", "cm-fp")] == expected, t
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert f"{metrics['aupro']:.4f}" in page.text_content("#evaluation")
    assert page.locator("#evaluation polyline").count() == int(anomalous.sum())  # one PIMO curve per defect image
    page.screenshot(path=str(tmp_path / "bottle_report.png"))
    assert opened.errors == [] and opened.outside == []
