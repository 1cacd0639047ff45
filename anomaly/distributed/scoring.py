"""``anomaly score --ray``: Ray Data over the input paths, one loaded model per actor, resumable.

Layout while a run is under way: ``.<OUT>.ray-<key>/`` beside OUT_DIR, ``key`` a digest of the model's
file checksums and the output options. Actors write each image's map and overlay there (every file
renamed into place, so a killed worker leaves no half file); the driver appends each finished batch's
rows to ``.journal.csv`` in it. A re-run with the same model and options finds that folder and scores
only the inputs without a journal row (or whose files are missing); rows are deduplicated by path,
so a batch that Ray retried after a worker died is counted once. At the end the driver writes
``scores.csv`` in input order and renames the folder into place (:func:`anomaly._fs.finish_dir`).
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from anomaly._fs import check_output_dir, finish_dir, restore_interrupted
from anomaly.data.inputs import image_paths
from anomaly.distributed._cluster import cluster, require_ray, use_driver_cwd, use_reserved_cpus, workers
from anomaly.errors import AnomalyError, DataError
from anomaly.outputs import WriteOptions, relative_names, write_result
from anomaly.results import StageProgress
from anomaly.tables import CSV_COLUMNS, CSV_ENCODING, read_scores, write_scores

__all__ = ["FAULT_ENV", "load_model", "model_checksum", "model_info", "score"]

log = logging.getLogger(__name__)

JOURNAL = ".journal.csv"
FAULT_ENV = "ANOMALY_RAY_FAULT_FILE"
"""Fault injection for tests: the first worker that removes the file this names dies mid-batch."""


def load_model(model: Path, device: str | None = None, weights: str | None = None) -> Any:
    """A :class:`~anomaly.Detector` for a model directory, an ExportedDetector for an export directory; ``device``
    and ``weights`` as ``anomaly score --device`` and ``--set backbone.weights=`` (an export has no weights to move)."""
    from anomaly.runtime import ExportedDetector, is_export_dir

    if is_export_dir(model):
        return ExportedDetector(model, device=device or "auto")
    from anomaly.detector import Detector

    return Detector.load(model, device=device, weights=weights)


def model_info(model: Path) -> tuple[bool, bool]:
    """(has maps, zero-shot) of a model or export directory, checked against its manifest; the driver
    loads no model (an export, which is small and torch-free, excepted)."""
    from anomaly.model_dir import read_meta, verified_files
    from anomaly.runtime import ExportedDetector, is_export_dir
    from anomaly.scorers import scorer_class

    restore_interrupted(model)
    if is_export_dir(model):
        return ExportedDetector(model).scorer.has_maps, False
    if not model.is_dir():
        raise DataError(f"{model}: model directory not found")
    config = verified_files(model, read_meta(model))["config.json"]
    try:
        scorer = scorer_class(json.loads(config.read_text(encoding="utf-8"))["scorer"]["name"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{config}: unreadable ({exc})") from None
    return scorer.has_maps, not scorer.requires_fit


def model_checksum(model: Path) -> str:
    """SHA-256 over the model's file manifest (which lists each file's SHA-256)."""
    from anomaly.model_dir import read_meta
    from anomaly.runtime import is_export_dir, read_manifest

    files = read_manifest(model)["files"] if is_export_dir(model) else read_meta(model)["files"]
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def score(
    model: str | os.PathLike[str],
    inputs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    address: str | None = None,
    maps: bool = False,
    overlays: bool = True,
    overlay_size: int = 512,
    batch_size: int = 32,
    device: str | None = None,
    weights: str | None = None,
    progress: StageProgress | None = None,
) -> list[dict[str, str]]:
    """Score ``inputs`` with the model or export at ``model`` on Ray; write OUT_DIR as ``anomaly score`` does.

    Returns the scores.csv rows in input order. ``address`` is a Ray cluster address; None starts a
    local instance (or uses the session the caller initialised). ``device`` and ``weights`` replace the
    model's device and moved weights file on every worker, as :meth:`Detector.load` does. Zero-shot models
    are refused: MuSc scores all inputs as one pool, which does not split over workers.
    """
    require_ray()
    model, out = Path(model), Path(out)
    has_maps, zero_shot = model_info(model)
    if zero_shot:
        raise DataError("--ray needs a fitted model: zero-shot scoring compares all inputs as one pool in one process")
    paths = image_paths(inputs, exclude=[out])
    names = relative_names(paths)
    if maps and not has_maps:  # asked for: a warning, which --quiet keeps (as without --ray)
        log.warning("this model's scorer gives image scores only: no maps are written")
    overlays = overlays and has_maps
    check_output_dir(out, "scores.csv")  # refuses an OUT_DIR that is not ours before any work
    with _only_run(out):
        loading = {"device": device, "weights": weights}
        return _score(
            model, paths, names, out, address, maps and has_maps, overlays, overlay_size, batch_size, loading, progress
        )


@contextlib.contextmanager
def _only_run(out: Path) -> Iterator[None]:
    """DataError when another ``--ray`` run is writing OUT_DIR: both would append to one journal and rename one
    staging folder into place. The lock (``flock``) goes with its process, also when that one is killed."""
    lock = out.parent / f".{out.name}.ray.lock"
    while True:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            handle = open(lock, "a")  # noqa: SIM115 - closed below, after the run
        except OSError as exc:
            raise DataError(f"{out}: cannot write beside it ({exc.strerror or exc})") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise DataError(f"{out}: another `anomaly score --ray` run is writing it; wait for it or stop it") from None
        if _same_file(handle, lock):
            break
        # opened just before the run holding it ended and removed the file: a run started since locks a new one
        handle.close()
    with handle:
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)


def _same_file(handle: Any, path: Path) -> bool:
    """Whether ``path`` still names the file ``handle`` has open (not removed, nor replaced by another)."""
    try:
        named = path.stat()
    except FileNotFoundError:
        return False
    opened = os.fstat(handle.fileno())
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def _score(
    model: Path,
    paths: list[Path],
    names: list[Path],
    out: Path,
    address: str | None,
    maps: bool,
    overlays: bool,
    overlay_size: int,
    batch_size: int,
    loading: dict[str, str | None],
    progress: StageProgress | None,
) -> list[dict[str, str]]:
    options = {"maps": maps, "overlays": overlays, "overlay_size": overlay_size}
    key = hashlib.sha256(f"{model_checksum(model)} {sorted(options.items())}".encode()).hexdigest()[:16]
    staging = out.parent / f".{out.name}.ray-{key}"
    others = sorted(p for p in out.parent.glob(f".{out.name}.ray-*") if p != staging)
    if others:  # an interrupted run with another model or other output options: only that command resumes it
        log.warning(
            "%s: an interrupted run with another model or options (delete it, or rerun that command)", others[0]
        )
    staging.mkdir(parents=True, exist_ok=True)
    expected = {str(p): _file_names(n, maps, overlays) for p, n in zip(paths, names)}
    done = _resume(staging, expected)
    resumed = bool(done)
    todo = [i for i, p in enumerate(paths) if str(p) not in done]
    if done:
        log.info("resuming: %d of %d images already scored with this model", len(paths) - len(todo), len(paths))
    if todo:
        items = [{"path": os.fsencode(paths[i]), "name": os.fsencode(names[i].as_posix())} for i in todo]
        # relative paths are read in the driver's folder; the staging folder is named absolutely, so that a node
        # without that folder fails to read (loudly) rather than writes maps where no one looks for them
        worker = {"model": str(model), "staging": str(staging.absolute()), "cwd": os.getcwd(), **options, **loading}
        try:
            for row in _run(items, worker, address, batch_size):
                if row["path"] in expected:
                    done[row["path"]] = row
                if progress is not None:
                    progress("score", len(done), len(paths))
        except AnomalyError:  # an unreadable input or model: as without --ray, nothing is left behind
            if not resumed:  # but an earlier interrupted run's journal stays, to resume from once the input is fixed
                shutil.rmtree(staging, ignore_errors=True)
            raise
        except BaseException:  # Ctrl-C, SIGTERM: the journalled rows stay
            if not done and not _journalled(staging):  # stopped before a row (connecting): nothing to resume from
                shutil.rmtree(staging, ignore_errors=True)
            else:
                log.warning("%s keeps %d of %d images scored: the same command resumes", staging, len(done), len(paths))
            raise
    rows = [done[str(p)] for p in paths]
    _finish(staging, out, rows)
    return rows


class ScoreWorker:
    """Ray Data actor: one loaded model; scores a batch of paths and writes their maps and overlays."""

    def __init__(
        self,
        model: str,
        staging: str,
        cwd: str,
        maps: bool,
        overlays: bool,
        overlay_size: int,
        device: str | None = None,
        weights: str | None = None,
    ) -> None:
        use_reserved_cpus()
        use_driver_cwd(cwd)
        self.error = ""
        try:
            self.detector = load_model(Path(model), device, weights)
        except AnomalyError as exc:  # reported with the first batch: an actor that fails to start is retried
            self.error = str(exc)
            if (device or "").startswith("cuda:") and device not in ("cuda:0", "cuda:"):  # "torch sees 1 GPU" on a
                # node of several: Ray hands each GPU actor its own GPU alone, which it knows as cuda:0
                self.error += f" (on Ray each GPU actor sees only its own GPU, as cuda:0: --device cuda, not {device})"
        self.staging = Path(staging)
        self.options: WriteOptions = {"maps": maps, "overlays": overlays, "overlay_size": overlay_size}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Rows of the batch's images (bytes columns); a user error comes back as one row with ``error`` set. The
        warnings the batch logged (inputs unlike the training images: gray, tiny, rotated) come back as data in the
        first row's ``warnings`` (a JSON list): a worker's log lines reach the driver late, prefixed, or not at all
        (a local instance shut down at the end of the run drops them)."""
        paths = [os.fsdecode(p) for p in batch["path"]]
        names = [Path(os.fsdecode(n)) for n in batch["name"]]
        wanted = self.options["maps"] or self.options["overlays"]
        rows = []
        with _CapturedWarnings() as said:
            try:
                if self.error:
                    raise DataError(self.error)
                stream = self.detector.predict_stream(paths, maps=wanted, keep_images=self.options["overlays"])
                for (result, image), name in zip(stream, names, strict=True):
                    rows.append({**write_result(self.staging, result, name, image, **self.options), "error": ""})
                    _inject_fault()
            except AnomalyError as exc:  # data, not an exception: Ray passes the message on but not the type
                rows = [{**dict.fromkeys(CSV_COLUMNS, ""), "error": str(exc)}]
        for i, row in enumerate(rows):
            row["warnings"] = json.dumps(said.messages) if i == 0 and said.messages else ""
        columns = [*CSV_COLUMNS, "error", "warnings"]
        return {col: np.array([os.fsencode(row[col]) for row in rows], dtype=object) for col in columns}


class _CapturedWarnings(logging.Handler):
    """The messages of the ``anomaly`` loggers' warnings while it is entered, kept from the worker's own log."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> _CapturedWarnings:
        logger = logging.getLogger("anomaly")
        self._saved = logger.level, logger.propagate
        if logger.getEffectiveLevel() > logging.WARNING:
            logger.setLevel(logging.WARNING)
        logger.propagate = False  # said once, by the driver
        logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logger = logging.getLogger("anomaly")
        logger.removeHandler(self)
        logger.setLevel(self._saved[0])
        logger.propagate = self._saved[1]


def _inject_fault() -> None:
    path = os.environ.get(FAULT_ENV)
    if path:
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        os._exit(1)


def _run(items: list[dict[str, bytes]], worker: dict[str, Any], address: str | None, batch_size: int):  # type: ignore[no-untyped-def]
    """Yield rows as the actors finish batches, appending each batch to the journal first."""
    with cluster(address) as ray:
        plan = workers(ray, device=worker["device"])
        size = max(1, min(plan.count, math.ceil(len(items) / batch_size)))
        dataset = ray.data.from_items(items).map_batches(
            ScoreWorker,
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=size),
            num_cpus=plan.num_cpus,
            num_gpus=plan.num_gpus or None,
            fn_constructor_kwargs=worker,
        )  # Ray Data restarts an actor that dies and retries its batch (max_restarts/max_task_retries = -1)
        log.info("scoring %d images on %d Ray actors", len(items), size)
        journal = Path(worker["staging"]) / JOURNAL
        said: set[str] = set()  # the workers' warnings, each said once
        try:
            with journal.open("a", newline="", **CSV_ENCODING) as fh:
                writer = csv.writer(fh)
                for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                    for message in (m for w in batch["warnings"] if w for m in json.loads(os.fsdecode(w))):
                        if message not in said:
                            said.add(message)
                            log.warning("%s", message)
                    errors = [os.fsdecode(e) for e in batch["error"] if e]
                    if errors:
                        raise DataError(errors[0])
                    rows = [
                        dict(zip(CSV_COLUMNS, (os.fsdecode(v) for v in values)))
                        for values in zip(*(batch[col] for col in CSV_COLUMNS))
                    ]
                    writer.writerows([*(row[col] for col in CSV_COLUMNS), _stamp(row["path"])] for row in rows)
                    fh.flush()
                    yield from rows
        except (OSError, csv.Error) as exc:
            raise DataError(f"{journal}: cannot write ({exc})") from None


def _file_names(name: Path, maps: bool, overlays: bool) -> tuple[str, str]:
    """The map_path and overlay_path a row for output name ``name`` must have."""
    return (f"maps/{name.as_posix()}.npy" if maps else "", f"overlays/{name.as_posix()}.png" if overlays else "")


def _stamp(path: str) -> str:
    """Size and modification time of input ``path``, journalled with its row: an image replaced at the same path
    before a resume is scored again, not given the old image's row."""
    try:
        stat = os.stat(path)
    except OSError:
        return ""
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def _resume(staging: Path, expected: dict[str, tuple[str, str]]) -> dict[str, dict[str, str]]:
    """Rows an earlier run finished for these inputs: same output names, files present, input unchanged (last row
    wins)."""
    rows: list[dict[str, str]] = []
    journal = staging / JOURNAL
    columns = [*CSV_COLUMNS, "stamp"]
    if journal.is_file():
        with journal.open(newline="", **CSV_ENCODING) as fh:
            rows += [dict(zip(columns, values)) for values in csv.reader(fh) if len(values) == len(columns)]
    if (staging / "scores.csv").is_file():  # killed while finishing (moments after the last row was journalled)
        rows += read_scores(staging)
    done: dict[str, dict[str, str]] = {}
    changed: set[str] = set()
    for row in rows:
        files = expected.get(row["path"])
        if files is None or (row["map_path"], row["overlay_path"]) != files:
            continue
        stamp = row.pop("stamp", None)  # journal rows only
        if stamp is not None and stamp != _stamp(row["path"]):  # the input changed since: its rows are dropped
            changed.add(row["path"])
            done.pop(row["path"], None)
            continue
        if stamp is not None:  # rescored since it changed
            changed.discard(row["path"])
        elif row["path"] in changed:  # scores.csv's row (a run killed while finishing) of a changed input
            continue
        if all((staging / f).is_file() for f in files if f) and _is_number(row["score"]):
            done[row["path"]] = row
    return done


def _journalled(staging: Path) -> bool:
    """Whether the staging folder's journal holds a row."""
    try:
        return (staging / JOURNAL).stat().st_size > 0
    except OSError:
        return False


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _finish(staging: Path, out: Path, rows: list[dict[str, str]]) -> None:
    """Drop files no row refers to (earlier inputs, temp files of killed workers), write scores.csv, rename."""
    keep = {f for row in rows for f in (row["map_path"], row["overlay_path"]) if f}
    for folder in ("maps", "overlays"):
        for path in sorted((staging / folder).rglob("*"), reverse=True):
            if path.is_file() and path.relative_to(staging).as_posix() not in keep:
                path.unlink()
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()
    try:
        write_scores(staging / "scores.csv", rows)
        (staging / JOURNAL).unlink(missing_ok=True)
    except OSError as exc:
        raise DataError(f"{out}: could not write the output ({exc.strerror or exc})") from None
    finish_dir(staging, out)
