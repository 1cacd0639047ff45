"""ExportedDetector: scores images with an export directory, without torch or timm."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, overload

import numpy as np
from numpy.typing import NDArray

from anomaly._fs import restore_interrupted
from anomaly.config import DetectorConfig, TileConfig, from_dict
from anomaly.data.input_checks import InputCheck, InputProfile
from anomaly.data.inputs import OnError, check_on_error, many, one_or_many
from anomaly.data.loader import ImageInput, iter_batches
from anomaly.data.views import ViewSpec
from anomaly.errors import BackendError, ConfigError, DataError
from anomaly.results import DetectionResult, StageProgress
from anomaly.runtime.manifest import read_manifest
from anomaly.runtime.network import load_network
from anomaly.runtime.scoring import Decision, decide, load_scorer

__all__ = ["ExportedDetector", "RuntimeInput", "ScorerInfo"]

RuntimeInput = ImageInput  # paths, bytes, file objects, arrays of any depth (uint8, uint16, float), PIL, tensors
# Images per network call. On CPU larger batches are no faster, but ONNX Runtime's memory arena
# grows with them: bottle at 256 px peaked at 755 MiB with batch 16, 339 MiB with batch 4.
MAX_BATCH = 4


@dataclass(frozen=True)
class ScorerInfo:
    """What callers of a Detector read from ``detector.scorer``: its name and whether it has maps."""

    name: str
    has_maps: bool


class ExportedDetector:
    """An export directory loaded for scoring: the Detector's predict API on ONNX Runtime / OpenVINO.

    As on a Detector: ``threshold_``, ``pixel_threshold_``, ``decision_``, ``config`` (the fitted model's, with this
    ``device``; None for exports written before the manifest held it) and :meth:`input_check`.

    Example:
        >>> det = ExportedDetector("bottle-export")  # doctest: +SKIP
        >>> det.predict("test/000.png").is_anomalous  # doctest: +SKIP
    """

    zero_shot = False

    def __init__(self, directory: str | os.PathLike[str], device: str | None = "auto") -> None:
        self.directory = Path(directory)
        restore_interrupted(self.directory)
        self.manifest = read_manifest(self.directory)
        device = device or "auto"  # None as the CLI takes it: wherever the runtime can (the fit's device may be one
        # the export's runtime has no provider for: OpenVINO on a model fitted on CUDA)
        try:
            self.postprocess = Decision.from_manifest(self.manifest)
            self.batch_size = min(int(self.manifest.get("batch_size", MAX_BATCH)), MAX_BATCH)
            self._network = _loaded(self.directory, self.manifest["network"], device)
            self._scorer = load_scorer(
                self.directory, self.manifest["scorer"], self.manifest["files"], self._network.gpu
            )
            model_input = self.manifest["input"]
            bit_depth = int(model_input.get("bit_depth", 16))
            if not 1 <= bit_depth <= 16:
                raise ValueError(f"input.bit_depth must be 1-16, got {bit_depth}")
            self.view_spec = _view_spec(model_input, bit_depth)
            aspects, smallest = model_input.get("training_aspects"), model_input.get("training_smallest")  # or absent
            colour = model_input.get("training_colour")
            self.input_profile = InputProfile(
                aspects=None if aspects is None else (float(aspects[0]), float(aspects[1])),
                smallest=None if smallest is None else int(smallest),
                bit_depth=self.view_spec.bit_depth,
                colour=colour if colour in ("gray", "colour") else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{self.directory}: incomplete export ({type(exc).__name__}: {exc})") from None
        self.scorer = ScorerInfo(self.manifest["scorer"]["name"], self._scorer.has_maps)
        self.decision_ = self.postprocess.threshold
        self.threshold_ = self.decision_.image
        self.pixel_threshold_ = self.decision_.pixel if self.scorer.has_maps else None  # no map, no mask
        self.image_size = self.postprocess.input_size
        self.config = _saved_config(self.manifest, device)
        self._check_runs()

    def _check_runs(self) -> None:
        """Score one blank image at load: an export whose files were replaced and whose manifest was written to match
        (a damaged graph, another input size, renamed outputs, bad parameters) fails here in one line, not on the first
        image with the runtime's traceback; the call also warms the network up for that image."""
        try:
            patch_maps, scores = self._scorer(self._network(np.zeros((1, *self.image_size, 3), dtype=np.uint8)))
            usable = np.isfinite(scores).all() and (patch_maps is None or np.isfinite(patch_maps).all())
        except Exception as exc:  # whatever ONNX Runtime, OpenVINO or FAISS raise on a graph or state not their own
            raise DataError(
                f"{self.directory}: damaged export, it fails on a blank image ({_reason(exc)}); export the model again"
            ) from None
        if not usable:
            raise DataError(f"{self.directory}: damaged export, a blank image scores NaN; export the model again")

    def input_check(self) -> InputCheck:
        """An empty :class:`InputCheck` against ``input_profile`` (the training images'), for one call's inputs, as
        :meth:`Detector.input_check` (an export is never a zero-shot pool: there is no pool to pass)."""
        return InputCheck(self.input_profile)

    # A binary file object is also an Iterator[bytes], so it matches both overloads: it is one image, as the first
    # (checked first) says and predict does.
    @overload
    def predict(  # type: ignore[overload-overlap]
        self, images: RuntimeInput, *, maps: bool = ..., on_error: OnError = ...
    ) -> DetectionResult: ...

    @overload
    def predict(
        self,
        images: list[RuntimeInput] | tuple[RuntimeInput, ...] | Iterator[RuntimeInput],
        *,
        maps: bool = ...,
        on_error: OnError = ...,
    ) -> list[DetectionResult]: ...

    def predict(
        self,
        images: RuntimeInput | Sequence[RuntimeInput] | Iterator[RuntimeInput],
        *,
        maps: bool = True,
        on_error: OnError = "raise",
    ) -> Any:
        """Score one image (path, encoded bytes, RGB array or PIL image; returns a DetectionResult) or a list of
        them. ``on_error="skip"``: an unreadable input gets a result with ``error`` set (NaN score), as
        ``Detector.predict`` (whose note on 4-D stacks and type checkers holds here too)."""
        check_on_error(on_error)  # an empty batch too, as StreamingDetector.predict
        items, single = one_or_many(images)
        if not items:  # an empty batch has no results
            return []
        results = [result for result, _ in self.predict_stream(items, maps=maps, on_error=on_error)]
        return results[0] if single else results

    def predict_stream(
        self,
        images: Sequence[RuntimeInput],
        *,
        maps: bool = True,
        keep_images: bool = False,
        progress: StageProgress | None = None,
        on_error: OnError = "raise",
    ) -> Iterator[tuple[DetectionResult, NDArray[np.uint8] | None]]:
        """Yield (result, decoded RGB image or None) per input, as ``Detector.predict_stream``."""
        items = many(images)
        if not items:
            raise DataError("predict: no images")
        check_on_error(on_error)

        done, check = 0, self.input_check()
        batches = iter_batches(
            items, self.image_size, self.batch_size, keep_images=keep_images, skip_errors=on_error == "skip",
            spec=self.view_spec,
        )  # fmt: skip
        for batch in batches:
            ok = batch.ok
            results: Iterator[DetectionResult] = iter([])
            if ok:
                patch_maps, scores = self._score_views(batch.images)
                sizes, sources, layouts = [d.size for d in ok], [d.source for d in ok], [d.layout for d in ok]
                results = iter(decide(patch_maps, scores, sizes, sources, self.postprocess, maps, layouts))
                check.add_decoded(ok)
            for d in batch.items:
                if d.error is not None:  # unreadable, skipped: NaN score and the reason
                    threshold = self.decision_
                    pixel = threshold.pixel if self.scorer.has_maps else math.nan  # no map, no mask
                    yield DetectionResult.unreadable(d.source, d.error, threshold.image, pixel), None
                else:
                    yield next(results), d.original
            done += len(batch.items)
            if progress is not None:
                progress("score", done, len(items))
        check.warn(len(items))

    def _score_views(self, views: NDArray[np.uint8]) -> tuple[NDArray[np.float32] | None, NDArray[np.float64]]:
        """Patch maps (or None) and scores of every view, ``batch_size`` views per network call: the hundreds of
        tiles of a large frame never pass at once."""
        parts = [
            self._scorer(self._network(views[i : i + self.batch_size])) for i in range(0, len(views), self.batch_size)
        ]
        maps = None if parts[0][0] is None else np.concatenate([m for m, _ in parts])
        return maps, np.concatenate([s for _, s in parts])


def _saved_config(manifest: dict[str, Any], device: str) -> DetectorConfig | None:
    """The fitted model's config with ``device`` in place of its own (as ``Detector.load(device=)``); None for exports
    written before the manifest held it, or by a version whose config keys this one does not know."""
    saved = manifest.get("config")
    if not isinstance(saved, dict):
        return None
    try:
        return replace(from_dict(saved), device=device)
    except ConfigError:
        return None


def _view_spec(model_input: dict[str, Any], bit_depth: int) -> ViewSpec:
    """How the export cuts images into views: the fitted model's ``preprocess`` (exports written before tiles and
    letterboxes could be exported have neither: whole images, stretched)."""
    resize, tile = model_input.get("resize", "stretch"), model_input.get("tile")
    if resize not in ("stretch", "keep_aspect"):
        raise ValueError(f"input.resize must be stretch or keep_aspect, got {resize!r}")
    standardize = bool(model_input.get("standardize", False))
    if tile is None:
        return ViewSpec(resize, standardize=standardize, bit_depth=bit_depth)
    checked = TileConfig(size=tile["size"], overlap=tile["overlap"])  # the config's own limits (ConfigError)
    return ViewSpec(resize, checked.size, checked.overlap, standardize=standardize, bit_depth=bit_depth)


def _loaded(directory: Path, spec: dict[str, Any], device: str) -> Any:
    """:func:`load_network`, with a graph the runtime cannot read (truncated, replaced) as one line."""
    try:
        return load_network(directory, spec, device)
    except (BackendError, KeyError, TypeError):
        raise
    except Exception as exc:  # onnxruntime's InvalidProtobuf / Fail, OpenVINO's RuntimeError
        raise DataError(
            f"{directory / str(spec.get('file'))}: not a readable network ({_reason(exc)}); export the model again"
        ) from None


def _reason(exc: Exception) -> str:
    """The exception's type and the first line of its message (runtimes' messages run to many lines)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__
