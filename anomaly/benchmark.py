"""`anomaly benchmark`: fit + score + evaluate per category, resumable, with tables and plots."""

from __future__ import annotations

import csv
import functools
import hashlib
import importlib
import io
import json
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anomaly._fs import BENCHMARK_MARKER, OUTPUT_MARKER, atomic_write_text, file_sha256, staged_dir
from anomaly._runtime import peak_rss_mb, reset_peak_rss
from anomaly.config import DetectorConfig
from anomaly.data.datasets import (
    CategoryData,
    find_categories,
    has_training_images,
    has_visa_split,
    is_category_root,
    labelled_split_dirs,
    load_folder,
    load_ground_truth,
    load_mvtec,
    load_visa,
    visa_trained_categories,
)
from anomaly.data.io import is_image_file, read_image_size, read_mask_levels
from anomaly.detector import Detector
from anomaly.errors import AnomalyError, DataError
from anomaly.evaluation import Evaluation, evaluate_samples, threshold_counts, write_evaluation
from anomaly.metrics import pimo_curves
from anomaly.outputs import ScoreWriter, relative_names
from anomaly.report import build_report
from anomaly.scorers import get_scorer

__all__ = ["COLUMNS", "format_table", "run_benchmark"]

log = logging.getLogger(__name__)
# What the pipeline imports on first use (so that the CLI starts fast): imported before a category's clock starts,
# the process's one-time import cost (about 2.5 s on a 2-core machine) is not counted in its first category's fit_s.
_IMPORTED_ON_FIRST_USE = (
    "faiss",
    "timm",
    "safetensors.torch",
    "scipy.optimize",
    "scipy.special",
    "scipy.stats",
    "sklearn.cluster",
    "sklearn.covariance",
)

COLUMNS = [
    "category",
    "image_auroc",
    "pixel_auroc",
    "aupro",
    "aupimo",
    "image_ap",
    "pixel_ap",
    "image_f1max",
    "pixel_f1max",
    "realised_fpr",
    "fit_s",
    "ms_per_image",
    "peak_mem_mb",
    "peak_gpu_mb",
]
_COSTS = {"fit_s", "ms_per_image", "peak_mem_mb", "peak_gpu_mb"}  # one decimal; metrics take four
_ALWAYS = {"category", "image_auroc", "pixel_auroc", "aupro", "aupimo", "fit_s", "ms_per_image", "peak_mem_mb"}
_TABLES_MARKER = BENCHMARK_MARKER
_CATEGORY_ENTRIES = {"scores", "evaluation", "report", "pimo.png", "result.json"}  # what a category's folder holds


def run_benchmark(
    dataset: str,
    root: str | os.PathLike[str],
    categories: list[str],
    config: DetectorConfig,
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
    run_all: Callable[[list[Callable[[], dict[str, Any]]]], list[dict[str, Any]]] | None = None,
    eval_size: tuple[int, int] | None = None,
) -> list[dict[str, Any]]:
    """Run every category, skipping those with results unless ``force``; returns rows incl. ``mean``.

    ``eval_size`` (H, W) computes the pixel metrics there instead of at each mask's own size.

    ``run_all`` runs the pending categories (zero-argument jobs, each returning its row) elsewhere,
    e.g. as Ray tasks (``anomaly.distributed.run_jobs``); by default they run here, one after another.
    """
    root, out_dir = Path(root), Path(out)
    if not root.is_dir():
        raise DataError(f"--root {root}: folder not found")
    if dataset == "folder" and categories:
        raise DataError("--category: --dataset folder reads one category, the --root folder itself; leave it out")
    test_only = not get_scorer(config.scorer.name, config.scorer.params).requires_fit  # zero-shot: no train/good
    if dataset == "visa" and not has_visa_split(root) and not has_visa_split(root.parent):  # converted to MVTec's
        log.info("%s: no split_csv/1cls.csv, read as VisA converted to the MVTec layout", root)
        dataset = "mvtec"
    is_category = labelled_split_dirs(root)[0].is_dir()
    if dataset != "folder" and not categories and is_category:  # a category, not a dataset root
        raise DataError(f"--root {root}: a category folder; give its dataset root: --root {root.parent} --category "
                        f"{root.name} (or --dataset folder)")  # fmt: skip
    names = _category_names(categories) or (_find(root, dataset, test_only) if dataset != "folder" else [_name(root)])
    if not names:
        raise DataError(f"--root {root}: no {dataset} category found")
    if not categories and dataset == "mvtec":
        _say_left_out(root, names, test_only)
        untested = [name for name in names if not _has_test_images(root / name)]
        if untested and len(untested) < len(names):  # found, not named: a category still being collected
            log.warning("left out %s: no test images in test/<type>/", ", ".join(untested))
            names = [name for name in names if name not in untested]
    if not categories and dataset == "visa" and not test_only:  # objects listed with test rows alone
        trained = visa_trained_categories(root)
        left = [n for n in names if n not in trained]
        if left:
            log.warning("left out %s: no training rows in %s (a zero-shot config, e.g. --config musc, runs them)",
                        ", ".join(left), root / "split_csv" / "1cls.csv")  # fmt: skip
            names = [n for n in names if n in trained]
            if not names:
                raise DataError(f"--root {root}: no VisA object has training rows (a zero-shot config runs them)")
    loaded = {name: _load(dataset, root, name, test_only) for name in names}
    if not categories and len(loaded) > 1:  # found, not named: one without a usable test split is left out
        unusable = {name: why for name, data in loaded.items() if (why := _test_split_gap(data))}
        if unusable:
            log.warning("left out %s", "; ".join(f"{name}: the test split has no {why} image" for name, why in
                                                 unusable.items()))  # fmt: skip
            names = [name for name in names if name not in unusable]
            loaded = {name: loaded[name] for name in names}
            if not names:
                raise DataError(f"--root {root}: no category has both normal and defective test images")
    for name, data in loaded.items():  # every category checked before the first (long) one runs
        _check_category(data, dataset, root, name)
    _check_out(out_dir)
    source = _source(dataset, root)
    inputs = {name: _inputs(data) for name, data in loaded.items()}
    rows: dict[str, dict[str, Any]] = {}
    jobs: dict[str, Callable[[], dict[str, Any]]] = {}
    for name in names:
        done = _read_result(out_dir / name / "result.json") if not force else None
        # a record of an earlier version has no source or inputs: taken as this one's, as that version did
        if (
            done is not None
            and _same_run(done, config, eval_size)
            and done.get("source", source) == source
            and done.get("inputs", inputs[name]) == inputs[name]
        ):
            log.info("%s: already done, skipped (use --force to re-run)", name)
            rows[name] = done["row"]
        else:
            if done is not None:
                log.warning("%s: results of another config, --eval-size, --dataset, --root or set of images in %s are "
                            "replaced", name, out_dir / name)  # fmt: skip
            jobs[name] = functools.partial(
                _run_job, loaded[name], source, name, config, out_dir / name, progress, eval_size, len(names) > 1
            )
    if jobs:
        log.info("running %s", ", ".join(jobs))
        if run_all:
            rows.update(zip(jobs, run_all(list(jobs.values()))))
        else:
            for name, job in jobs.items():
                try:
                    rows[name] = job()
                except BaseException:  # the categories finished so far keep their rows in the tables
                    _finish_tables(rows, names, out_dir, config, eval_size)
                    raise
    return _finish_tables(rows, names, out_dir, config, eval_size)


def _same_run(done: dict[str, Any], config: DetectorConfig, eval_size: tuple[int, int] | None) -> bool:
    """Whether a finished category's record was run with this config and pixel-metric size."""
    size = done.get("eval_size")
    return done.get("config") == config.to_dict() and (None if size is None else tuple(size)) == eval_size


def _finish_tables(
    done: dict[str, dict[str, Any]],
    names: list[str],
    out_dir: Path,
    config: DetectorConfig,
    eval_size: tuple[int, int] | None,
) -> list[dict[str, Any]]:
    """Write and return the table: the rows of ``names`` that are done and those run before into the same folder
    (same config and --eval-size), by category name (a re-run of one category keeps its place), and their mean."""
    rows = [done[name] for name in names if name in done]
    rows = sorted(rows + _earlier_rows(out_dir, names, config, eval_size), key=lambda row: str(row["category"]))
    if rows:
        rows.append(_mean_row(rows))
        _write_tables(rows, out_dir)
    return rows


def _category_names(categories: list[str]) -> list[str]:
    """``--category`` values as folder names, each once in the order given (tab completion's trailing slash dropped);
    a path is refused: its outputs would land outside --out."""
    names = []
    for given in categories:
        name = given.rstrip("/\\")
        if name in ("", ".", "..") or "/" in name or "\\" in name:
            raise DataError(f"--category {given}: give a category's folder name under --root (e.g. bottle), not a path")
        if name not in names:
            names.append(name)
    return names


def _name(root: Path) -> str:
    """The category name of a ``--dataset folder`` root (``.`` and ``..`` resolved, links kept as named)."""
    name = Path(os.path.abspath(root)).name
    if not name:
        raise DataError(f"--root {root}: the file system root is not a category folder")
    return name


def _say_left_out(root: Path, names: list[str], test_only: bool) -> None:
    """Log the folders of ``root`` with a test split that are not categories here (no training images)."""
    left = [
        d.name
        for d in sorted(root.iterdir())
        if d.is_dir() and d.name not in names and labelled_split_dirs(d)[0].is_dir() and not d.name.startswith(".")
    ]
    if left and not test_only:
        log.warning(
            "left out %s: no training images in train/good (a zero-shot config, e.g. --config musc, runs them)",
            ", ".join(left),
        )


def _has_test_images(category: Path) -> bool:
    """Whether an MVTec-layout category holds an image in one of its ``test/<type>/`` folders."""
    test_dir = labelled_split_dirs(category)[0]
    return test_dir.is_dir() and any(
        is_image_file(p) for d in test_dir.iterdir() if d.is_dir() and not d.name.startswith(".") for p in d.iterdir()
    )


def _test_split_gap(data: CategoryData) -> str:
    """The kind of test image a category lacks ("defective" or "normal (good)"), or "" when it has both."""
    labels = {s.label for s in data.test}
    return "" if labels == {0, 1} else "defective" if 1 not in labels else "normal (good)"


def _check_category(data: CategoryData, dataset: str, root: Path, name: str) -> None:
    """Before any run: the metrics compare normal and defective test images, so a split with one kind is refused,
    every image's header is read (a file that is not an image would end the run in this category, after the ones
    before it were run and written) and every ground-truth mask is decoded (a damaged one would end the run after
    the category's fit)."""
    missing = _test_split_gap(data)
    if missing:
        where = root if dataset == "folder" else root / name if dataset == "mvtec" else f"{root} category {name}"
        raise DataError(
            f"{where}: the test split has no {missing} image; the metrics need both (choose others with --category)"
        )
    for sample in [*data.train, *data.test]:
        read_image_size(sample.image_path)  # DataError naming an empty or non-image file
        if sample.mask_path is not None:
            read_mask_levels(sample.mask_path)  # DataError naming the file


def _run_job(
    data: CategoryData,
    source: dict[str, str],
    name: str,
    config: DetectorConfig,
    out: Path,
    progress: Any,
    eval_size: tuple[int, int] | None,
    named: bool,
) -> dict[str, Any]:
    """One category's row, its folder written whole or not at all (an error or a kill leaves the previous one);
    with ``named`` (one of several categories), a user error says which (with --ray too)."""
    try:
        _remove_unfinished(out)
        with staged_dir(out, "result.json", output=False, owned=_CATEGORY_ENTRIES) as staged:
            return _run_category(data, config, staged, progress, eval_size, source)
    except AnomalyError as exc:
        if named and not str(exc).startswith(f"{name}:"):
            raise type(exc)(f"{name}: {exc}") from None
        raise


def _source(dataset: str, root: Path) -> dict[str, str]:
    """What a category's results were computed from, recorded to tell a resumed run from one on other data."""
    return {"dataset": dataset, "root": str(root.resolve())}


def _inputs(data: CategoryData) -> str:
    """SHA-256 of a category's images and masks (path, split, label, size, modified): a finished category whose
    images were added, removed, relabelled or replaced since is re-run, not skipped with stale results."""
    digest = hashlib.sha256()
    for sample in [*data.train, *data.test]:
        for path in (sample.image_path, sample.mask_path):
            if path is None:
                continue
            try:
                stat = os.stat(path)
                state = f"{stat.st_size}\t{stat.st_mtime_ns}"
            except OSError:  # removed since the category was listed: its run names the file
                state = "missing"
            digest.update(f"{os.path.abspath(path)}\t{sample.split}\t{sample.label}\t{state}\n".encode())
    return digest.hexdigest()


def _remove_unfinished(out: Path) -> None:
    """Remove a category folder that an interrupted run of an earlier version left without result.json (only its
    own entries in it, and its hidden temp folders): there is no result to keep, and such a folder is not replaced."""
    if out.is_dir() and not (out / "result.json").exists():
        if {p.name for p in out.iterdir() if not p.name.startswith(".")} <= _CATEGORY_ENTRIES:
            shutil.rmtree(out)


def _find(root: Path, dataset: str, test_only: bool) -> list[str]:
    """The categories under ``root``; for a zero-shot config also MVTec-layout folders without ``train/good``."""
    if dataset == "mvtec" and test_only:
        return sorted(
            d.name for d in root.iterdir() if not d.name.startswith(".") and labelled_split_dirs(d)[0].is_dir()
        )
    found = find_categories(root, dataset)  # type: ignore[arg-type]
    if dataset == "mvtec":  # an imported test-only set has an empty train/good: nothing to fit on
        found = [n for n in found if has_training_images(root / n)]  # at any depth, as load_mvtec reads them
    return found


def _check_out(out_dir: Path) -> None:
    """Refuse a folder whose results tables were not written by a benchmark (a user's own files)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"--out {out_dir}: exists and is not a folder")
    ours = (out_dir / _TABLES_MARKER).is_file()
    for name in ("results.csv", "results.md", "results.json"):
        if (out_dir / name).exists() and not ours:
            raise DataError(
                f"--out {out_dir}: {name} exists and was not written by `anomaly benchmark`; choose another"
            )
    if out_dir.is_dir() and not ours and not _only_category_folders(out_dir):  # as `score --out` decides
        what = "another kind of anomaly output" if (out_dir / OUTPUT_MARKER).exists() else "not an anomaly output"
        raise DataError(f"--out {out_dir}: folder exists and is {what} (no {_TABLES_MARKER}); choose another")
    try:  # before the first category's fit, not after it
        out_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()
        # ours from now on: a run that stops before its first table would leave an unmarked folder, which a folder
        # dataset's re-run with --out inside its --root read as a defect type
        (out_dir / _TABLES_MARKER).touch()
    except OSError as exc:
        raise DataError(f"--out {out_dir}: cannot write here ({exc.strerror or exc})") from None


def _only_category_folders(out_dir: Path) -> bool:
    """Whether an unmarked folder is empty or holds only category folders of a benchmark (an earlier version's run
    killed before its first table): anything else is the user's, and a benchmark does not write among it."""
    for entry in out_dir.iterdir():
        if entry.is_symlink() or not entry.is_dir():
            return False
        if not {p.name for p in entry.iterdir() if not p.name.startswith(".")} <= _CATEGORY_ENTRIES:
            return False
    return True


def _read_result(path: Path) -> dict[str, Any] | None:
    """A finished category's record; its row's undefined metrics (JSON null) read back as NaN, as they were
    computed, so a re-run's table and mean match the first run's."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("row"), dict):
        return None
    data["row"] = {k: math.nan if v is None and k in COLUMNS[1:] else v for k, v in data["row"].items()}
    return data


def _earlier_rows(
    out_dir: Path, names: list[str], config: DetectorConfig, eval_size: tuple[int, int] | None
) -> list[dict[str, Any]]:
    if not out_dir.is_dir():
        return []
    rows, other = [], []
    for folder in sorted(p for p in out_dir.iterdir() if p.is_dir() and p.name not in names and p.name[0] != "."):
        done = _read_result(folder / "result.json")
        if done is not None and _same_run(done, config, eval_size):
            rows.append(done["row"])
        elif done is not None:
            other.append(folder.name)
    if other:
        log.warning("%s: results of another config or --eval-size, left out of the table (re-run them or use another"
                    " --out)",
                    ", ".join(other))  # fmt: skip
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the main columns."""
    cols = [c for c in COLUMNS if any(c in r for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c), c in _COSTS) for c in cols) + " |")
    return "\n".join(lines)


def _load(dataset: str, root: Path, name: str, test_only: bool = False) -> CategoryData:
    if dataset == "mvtec":
        folder = root / name
        if not folder.is_dir():
            try:
                found = ", ".join(_find(root, dataset, test_only)) or "none"
            except DataError:
                found = "none"
            raise DataError(f"--category {name}: not found under {root} (categories there: {found})")
        return load_ground_truth(folder) if test_only else load_mvtec(folder)  # zero-shot: train/good unused
    if dataset == "visa":
        return load_visa(root, name, require_train=not test_only)
    if is_category_root(root):  # a folder that is laid out like an MVTec category: read it as one
        return load_mvtec(root)
    if not (root / "good").is_dir():
        raise DataError(f"--root {root}: a folder dataset holds good/ (its normal images, by that name) beside one "
                        "folder per defect type [+ masks/<type>/]; no good/ here")  # fmt: skip
    defects = [
        d
        for d in sorted(root.iterdir())
        if d.is_dir()
        and d.name not in ("good", "masks", "ground_truth", "__MACOSX")
        and not d.name.startswith(".")  # .ipynb_checkpoints and the like: copies, not a defect type
        and not any((d / m).exists() for m in (_TABLES_MARKER, OUTPUT_MARKER))  # an --out inside the root
    ]
    mask_root = next((root / m for m in ("masks", "ground_truth") if (root / m).is_dir()), None)
    mask_dirs = [mask_root / d.name for d in defects] if mask_root is not None else None
    for defect, masks in zip(defects, mask_dirs or []):
        if not masks.is_dir():
            raise DataError(
                f"{defect}: read as a defect type (every folder beside good/ is one), but {masks} does not exist"
            )
    return load_folder(root / "good", defects, mask_dirs)  # type: ignore[arg-type]


class _CategoryPeak:
    """The peak resident memory of one category's run: the process's high-water mark restarted at its start (Linux's
    ``clear_refs``). Where the system cannot restart it (no ``clear_refs``: macOS, gVisor), the mark is still this
    category's peak when it rose during the run; otherwise it is an earlier category's, and the column is NaN with a
    warning saying why (it was NaN without a word: e.g. every category after the first)."""

    def __init__(self) -> None:
        self.apart = reset_peak_rss()
        self.before = peak_rss_mb()

    def mb(self, category: str) -> float:
        peak = peak_rss_mb()
        if self.apart or peak > self.before:
            return peak
        log.warning(
            "%s: peak_mem_mb not measured (nan): this system keeps one memory peak per process (no "
            "/proc/self/clear_refs to restart it) and this category stayed under the %.0f MiB reached before it; "
            "a run of it alone measures it",
            category, self.before,
        )  # fmt: skip
        return math.nan


def _run_category(
    data: CategoryData,
    config: DetectorConfig,
    out: Path,
    progress: Any,
    eval_size: tuple[int, int] | None,
    source: dict[str, str],
) -> dict[str, Any]:
    inputs = _inputs(data)  # before the run: a file changed during it is seen by the next one
    for module in _IMPORTED_ON_FIRST_USE:  # no-ops after the first category (of this process: Ray tasks too)
        importlib.import_module(module)
    memory = _CategoryPeak()  # else the column holds the process's peak over the categories run so far
    start = time.perf_counter()  # fit_s includes building the backbone (README)
    detector = Detector(config)
    cuda = detector.extractor.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if not detector.zero_shot:
        detector.fit([s.image_path for s in data.train], progress=progress)
    fit_s = time.perf_counter() - start
    test = data.test
    paths = [s.image_path for s in test]
    writer = ScoreWriter(out / "scores", maps=False, overlays=detector.scorer.has_maps)
    results = []
    start = time.perf_counter()
    try:
        stream = detector.predict_stream(paths, maps=True, keep_images=writer.overlays, progress=progress)
        for (result, image), name in zip(stream, relative_names(paths), strict=True):
            writer.add(result, name, image)  # the same output code as `anomaly score`
            results.append(result)
        ms_per_image = (time.perf_counter() - start) / len(test) * 1000
        writer.close()
    except BaseException:
        writer.abort()
        raise
    scores = [r.image_score for r in results]
    maps = [r.anomaly_map for r in results] if results[0].anomaly_map is not None else None
    with warnings.catch_warnings(record=True) as caught:  # the metrics' warnings, named by their category
        warnings.simplefilter("always")
        evaluation = evaluate_samples(scores, test, maps, eval_size, paths=[str(p) for p in paths])  # type: ignore[arg-type]
    evaluation.category = data.name
    for warning in caught:
        log.warning("%s: %s", data.name, warning.message)
    metrics = evaluation.metrics
    if metrics.get("aupimo_error"):
        log.warning("%s: AUPIMO is nan: %s", data.name, metrics["aupimo_error"])
    counts = threshold_counts([r.is_anomalous for r in results], evaluation.labels)
    row = {
        "category": data.name,
        **{k: v for k, v in metrics.items() if not isinstance(v, str)},
        "realised_fpr": counts["realised_fpr"],
        "fit_s": fit_s,
        "ms_per_image": ms_per_image,
        "peak_mem_mb": memory.mb(data.name),
    }
    if cuda:
        row["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    metrics.update(n_images=len(results), **counts)  # as `anomaly evaluate` writes them, for the report's table
    if (out / "scores" / "scores.csv").is_file():  # the report of the category checks it evaluated these scores
        evaluation.scores_sha256 = file_sha256(out / "scores" / "scores.csv")
    write_evaluation(evaluation, out / "evaluation")
    per_image = None if evaluation.aupimo is None else evaluation.aupimo.per_image
    if evaluation.aupimo is not None and evaluation.maps is not None and evaluation.masks is not None:
        _pimo_plot(evaluation, out / "pimo.png", data.name)
    build_report(out / "scores", out / "report", evaluation_dir=out / "evaluation")
    record = {
        "source": source,
        "inputs": inputs,
        "config": config.to_dict(),
        "eval_size": None if eval_size is None else list(eval_size),
        "row": row,
        "threshold": None if detector.decision_ is None else detector.decision_.to_dict(),
        "aupimo_error": metrics.get("aupimo_error"),
        "per_image": [
            {
                "path": str(s.image_path),
                "label": s.label,
                "score": r.image_score,
                "is_anomalous": r.is_anomalous,
                "aupimo": None if per_image is None or math.isnan(per_image[i]) else float(per_image[i]),
            }
            for i, (s, r) in enumerate(zip(test, results))
        ],
    }
    atomic_write_text(out / "result.json", json.dumps(_nan_to_none(record), indent=2))
    return row


def _pimo_plot(evaluation: Evaluation, path: Path, title: str) -> None:
    """Plot PIMO curves (per-image TPR vs shared FPR, log x) with the AUPIMO range."""
    assert evaluation.aupimo is not None and evaluation.maps is not None and evaluation.masks is not None
    try:
        curves = pimo_curves(evaluation.maps, evaluation.masks, num_thresholds=10_000)  # enough points for a plot
    except (ValueError, RuntimeError) as exc:
        log.warning("%s: no PIMO plot (%s)", title, exc)
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    for i in np.flatnonzero(curves.is_anomalous):
        ax.plot(curves.shared_fpr, curves.per_image_tpr[i], lw=0.7, alpha=0.6)
    lo, hi = evaluation.aupimo.fpr_bounds
    ax.axvspan(lo, hi, color="grey", alpha=0.15, label=f"AUPIMO range, mean {evaluation.aupimo.mean:.3f}")
    ax.set(
        xscale="log",
        xlim=(lo / 10, 1),
        ylim=(0, 1.02),
        xlabel="shared FPR (normal images)",
        ylabel="per-image TPR",
        title=f"PIMO: {title}",
    )
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _mean_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    mean: dict[str, Any] = {"category": "mean"}
    for col in COLUMNS[1:]:
        values = [r[col] for r in rows if isinstance(r.get(col), (int, float))]
        if values:
            mean[col] = float(np.max(values)) if col.startswith("peak_") else float(np.mean(values))
    return mean


def _write_tables(rows: list[dict[str, Any]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / _TABLES_MARKER).touch()
    cols = [c for c in COLUMNS if c in _ALWAYS or any(c in r for r in rows)]  # pixel columns empty without maps
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=cols, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "results.csv", table.getvalue())
    atomic_write_text(out / "results.json", json.dumps(_nan_to_none(rows), indent=2))
    atomic_write_text(out / "results.md", format_table(rows) + "\n")


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def _fmt(value: Any, cost: bool) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.1f}" if cost else f"{value:.4f}"
    return "" if value is None else str(value)
