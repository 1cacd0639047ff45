"""Detector = frozen backbone + scorer + map post-processing + a threshold chosen from normal images.

The single place where the pieces are composed and persisted (JSON + safetensors + FAISS index,
no pickle, written atomically).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from numpy.typing import NDArray

from anomaly import __version__
from anomaly._fs import file_sha256, new_temp_dir, replace_dir
from anomaly.config import DetectorConfig, from_dict, load_config
from anomaly.data.io import read_image
from anomaly.errors import DataError, NotFittedError
from anomaly.features import FeatureExtractor
from anomaly.maps import postprocess_maps
from anomaly.results import DetectionResult
from anomaly.scorers import ScoreOutput, Scorer, get_scorer

__all__ = ["FORMAT_VERSION", "DetectionResult", "Detector", "ImageInput"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ImageInput = str | os.PathLike[str] | NDArray[np.uint8]
Progress = Callable[[str, int, int], None]  # (stage, done, total)
_MAD_SCALE = 1.4826  # median absolute deviation of a normal distribution -> its standard deviation


@dataclass
class _Batch:
    images: NDArray[np.uint8]  # (B, H_in, W_in, 3) resized
    sizes: list[tuple[int, int]]  # original (H, W)
    sources: list[str | None]
    originals: list[NDArray[np.uint8]] | None = None  # decoded full-size images, when kept


@dataclass
class _Decoded:
    resized: NDArray[np.uint8]
    size: tuple[int, int]
    source: str | None
    original: NDArray[np.uint8] | None


class Detector:
    """Anomaly detector with a scikit-learn-like API.

    Example:
        >>> det = Detector("patchcore").fit(["good/000.png", "good/001.png"])  # doctest: +SKIP
        >>> det.predict("test/000.png").is_anomalous  # doctest: +SKIP
    """

    def __init__(self, config: DetectorConfig | str | os.PathLike[str] = "patchcore") -> None:
        self.config = config if isinstance(config, DetectorConfig) else load_config(config)
        self.scorer: Scorer = get_scorer(self.config.scorer.name, self.config.scorer.params)
        self._extractor: FeatureExtractor | None = None
        self.threshold_: float | None = None
        self.holdout_scores_: NDArray[np.float64] | None = None
        self.reference_: tuple[list[torch.Tensor], torch.Tensor] | None = None

    @property
    def extractor(self) -> FeatureExtractor:
        """The frozen backbone, created on first use."""
        if self._extractor is None:
            bb = self.config.backbone
            self._extractor = FeatureExtractor(
                bb.name,
                bb.layers,
                weights=bb.weights,
                pretrained=bb.pretrained,
                image_size=bb.image_size,
                mean=bb.mean,
                std=bb.std,
                device=self.config.device,
            )
        return self._extractor

    @property
    def zero_shot(self) -> bool:
        """True for scorers that need no training (MuSc): each predict() call is one pool."""
        return not self.scorer.requires_fit

    # ------------------------------------------------------------------ fit
    def fit(self, images: Sequence[ImageInput], progress: Progress | None = None) -> Detector:
        """Learn from normal images; for zero-shot scorers, store them as few-shot references.

        A ``threshold.holdout`` share of the images is scored out-of-sample and the threshold set
        so that ``threshold.target_fpr`` of them would be flagged: no defective image is needed.
        """
        items = list(images)
        if not items:
            raise DataError("fit: no training images")
        if self.zero_shot and getattr(self.scorer, "augment_references", False):
            items = [view for item in items for view in _support_views(item)]
        needed = 2 if hasattr(self.scorer, "holdout_score") else 3  # others refit without the held-out image
        if not self.zero_shot and len(items) < needed:
            raise DataError(
                f"fit: the {self.scorer.name} scorer needs at least {needed} normal images "
                f"(some are held out to choose the threshold), got {len(items)}"
            )
        layers, embedding, _ = self._extract_all(items, progress)
        if self.zero_shot:
            self.reference_ = (layers, embedding)
            return self
        fit_progress = None if progress is None else (lambda done, total: progress("coreset", done, total))
        if "progress" in inspect.signature(self.scorer.fit).parameters:
            self.scorer.fit(layers, progress=fit_progress)  # type: ignore[call-arg]
        else:
            self.scorer.fit(layers)
        self.holdout_scores_ = self._holdout_scores(layers)
        self.threshold_ = float(np.quantile(self.holdout_scores_, 1.0 - self.config.threshold.target_fpr))
        return self

    def _holdout_scores(self, layers: list[torch.Tensor]) -> NDArray[np.float64]:
        n = layers[0].shape[0]
        cfg = self.config.threshold
        n_hold = min(n - 1, max(1, round(cfg.holdout * n)))
        held = np.sort(np.random.default_rng(self.config.seed).choice(n, n_hold, replace=False))
        held_layers = [layer[torch.from_numpy(held)] for layer in layers]
        holdout_score = getattr(self.scorer, "holdout_score", None)
        if holdout_score is not None:
            return holdout_score(held_layers, held).image_scores
        rest = torch.from_numpy(np.setdiff1d(np.arange(n), held))
        twin = get_scorer(self.config.scorer.name, self.config.scorer.params).fit([layer[rest] for layer in layers])
        return twin.score(held_layers).image_scores

    # -------------------------------------------------------------- predict
    def predict(self, images: ImageInput | Sequence[ImageInput], *, maps: bool = True) -> Any:
        """Score one image (returns a DetectionResult) or a batch (returns a list)."""
        single = isinstance(images, (str, os.PathLike)) or (isinstance(images, np.ndarray) and images.ndim in (2, 3))
        items = [images] if single else list(images)  # type: ignore[list-item]
        results = [result for result, _ in self.predict_stream(items, maps=maps)]
        return results[0] if single else results

    def predict_stream(
        self,
        images: Sequence[ImageInput],
        *,
        maps: bool = True,
        keep_images: bool = False,
        progress: Progress | None = None,
    ) -> Iterator[tuple[DetectionResult, NDArray[np.uint8] | None]]:
        """Yield (result, decoded RGB image or None) per input, batch by batch.

        Trained scorers stream with bounded memory; a zero-shot scorer scores all inputs as one
        pool. ``keep_images`` hands back each decoded image (e.g. for overlays) so that nothing is
        decoded twice.
        """
        items = list(images)
        if not items:
            raise DataError("predict: no images")
        if self.zero_shot:
            results, _ = self._predict_pool(items, maps, progress)
            for result, item in zip(results, items):  # decoded again only when asked: pools can be large
                original = _decode_resized(item, self.extractor.image_size, True).original if keep_images else None
                yield result, original
            return
        if self.threshold_ is None:
            raise NotFittedError("Detector is not fitted: call fit() or Detector.load() first")
        done = 0
        for batch in self._batches(items, keep_images):
            feats = self.extractor(batch.images)
            out = self.scorer.score([layer.cpu() for layer in feats.layers])
            yield from zip(
                self._results(out, batch, self.threshold_, maps), batch.originals or [None] * len(batch.sizes)
            )
            done += len(batch.sizes)
            if progress is not None:
                progress("score", done, len(items))

    def _predict_pool(
        self, items: list[ImageInput], maps: bool, progress: Progress | None
    ) -> tuple[list[DetectionResult], _Batch]:
        layers, embedding, batch = self._extract_all(items, progress)
        n_ref = 0
        if self.reference_ is not None:
            ref_layers, ref_emb = self.reference_
            n_ref = ref_layers[0].shape[0]
            layers = [torch.cat([r, x]) for r, x in zip(ref_layers, layers)]
            embedding = torch.cat([ref_emb, embedding])
        if layers[0].shape[0] < 2:
            raise DataError("zero-shot scoring needs at least 2 images in the pool (inputs + references)")
        device = self.extractor.device
        # Unit-length global descriptors: RsCIN's similarity is then a cosine, as with CLIP tokens.
        embedding = torch.nn.functional.normalize(embedding, dim=1)
        out = self.scorer.score([layer.to(device) for layer in layers], embeddings=embedding.to(device))  # type: ignore[call-arg]
        scores = out.image_scores
        threshold = _robust_threshold(scores[:n_ref] if n_ref else scores, self.config.threshold.mad_k, bool(n_ref))
        self.threshold_ = threshold
        map_threshold = None
        if out.patch_maps is not None:  # the same rule on raw map maxima, the scale of the maps
            peaks = out.patch_maps.reshape(len(scores), -1).max(1).astype(np.float64)
            map_threshold = _robust_threshold(
                peaks[:n_ref] if n_ref else peaks, self.config.threshold.mad_k, bool(n_ref)
            )
        pool_out = ScoreOutput(
            patch_maps=None if out.patch_maps is None else out.patch_maps[n_ref:], image_scores=scores[n_ref:]
        )
        return self._results(pool_out, batch, threshold, maps, map_threshold), batch

    def _results(
        self, out: ScoreOutput, batch: _Batch, threshold: float, maps: bool, map_threshold: float | None = None
    ) -> list[DetectionResult]:
        full_maps: list[NDArray[np.float32] | None] = [None] * len(batch.sources)
        if maps and out.patch_maps is not None:
            full_maps = postprocess_maps(  # type: ignore[assignment]
                out.patch_maps, self.extractor.image_size, batch.sizes, self.config.postprocess.blur_sigma
            )
        return [
            DetectionResult(float(s), bool(s >= threshold), threshold, m, src, map_threshold)
            for s, m, src in zip(out.image_scores, full_maps, batch.sources)
        ]

    # ------------------------------------------------------------- features
    def _extract_all(
        self, items: list[ImageInput], progress: Progress | None, keep_images: bool = False
    ) -> tuple[list[torch.Tensor], torch.Tensor, _Batch]:
        layers: list[list[torch.Tensor]] = []
        embeddings, sizes, sources, originals = [], [], [], []
        for batch in self._batches(items, keep_images):
            feats = self.extractor(batch.images)
            layers.append([layer.cpu() for layer in feats.layers])
            embeddings.append(feats.embedding.cpu())
            sizes += batch.sizes
            sources += batch.sources
            originals += batch.originals or []
            if progress is not None:
                progress("features", len(sources), len(items))
        merged = [torch.cat(per_layer) for per_layer in zip(*layers)]
        return merged, torch.cat(embeddings), _Batch(np.empty(0, np.uint8), sizes, sources, originals or None)

    def _batches(self, items: list[ImageInput], keep_images: bool = False) -> Iterator[_Batch]:
        """Decode + resize in a thread pool, up to two batches ahead of the backbone."""
        size = self.extractor.image_size
        bs = self.config.batch_size
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            pending = [pool.submit(_decode_resized, item, size, keep_images) for item in items[: 2 * bs]]
            next_item = len(pending)
            while pending:
                chunk, pending = pending[:bs], pending[bs:]
                for item in items[next_item : next_item + bs]:
                    pending.append(pool.submit(_decode_resized, item, size, keep_images))
                next_item += bs
                decoded = [f.result() for f in chunk]
                yield _Batch(
                    np.stack([d.resized for d in decoded]),
                    [d.size for d in decoded],
                    [d.source for d in decoded],
                    [d.original for d in decoded] if keep_images else None,  # type: ignore[misc]
                )

    # ---------------------------------------------------------- persistence
    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the model to ``directory`` atomically: config.json, meta.json, state.safetensors, *.faiss."""
        from safetensors.numpy import save_file

        if self.threshold_ is None and not self.zero_shot:
            raise NotFittedError("Detector is not fitted: nothing to save")
        target = Path(directory)
        tmp = new_temp_dir(target, "meta.json")
        try:
            state = self.scorer.state_dict() if not self.zero_shot else {}
            if self.reference_ is not None:
                state.update({f"reference.layer{i}": t.numpy() for i, t in enumerate(self.reference_[0])})
                state["reference.embedding"] = self.reference_[1].numpy()
            for key in [k for k, v in state.items() if k.endswith("index")]:
                (tmp / f"{key}.faiss").write_bytes(state.pop(key).tobytes())
            save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(tmp / "state.safetensors"))
            (tmp / "config.json").write_text(json.dumps(self._resolved_config(), indent=2))
            meta = self._meta()
            meta["files"] = {p.name: file_sha256(p) for p in sorted(tmp.iterdir())}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
            replace_dir(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> Detector:
        """Load a model written by :meth:`save`; a missing, tampered or incompatible directory raises."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        path = Path(directory)
        if not (path / "meta.json").is_file():
            raise DataError(f"{path}: not a model directory (meta.json missing)")
        try:
            meta = json.loads((path / "meta.json").read_text())
            config = from_dict(json.loads((path / "config.json").read_text()))
            state = load_file(str(path / "state.safetensors"))
        except (OSError, ValueError, SafetensorError) as exc:
            raise DataError(f"{path}: unreadable model directory ({exc})") from None
        version = meta.get("format_version") if isinstance(meta, dict) else None
        if version != FORMAT_VERSION:
            raise DataError(
                f"{path}: model format {version!r} is incompatible with this version "
                f"(expects {FORMAT_VERSION}); refit with `anomaly fit`"
            )
        for name, digest in (meta.get("files") or {}).items():
            if not (path / name).is_file() or file_sha256(path / name) != digest:
                raise DataError(f"{path / name}: missing or modified since the model was saved; refit the model")
        if not isinstance(meta.get("threshold"), (int, float, type(None))):
            raise DataError(f"{path}/meta.json: invalid threshold {meta.get('threshold')!r}")
        for index_file in path.glob("*.faiss"):
            state[index_file.stem] = np.frombuffer(index_file.read_bytes(), dtype=np.uint8)
        det = cls(config)
        refs = sorted(k for k in state if k.startswith("reference.layer"))
        if refs:
            det.reference_ = (
                [torch.from_numpy(state.pop(k)) for k in refs],
                torch.from_numpy(state.pop("reference.embedding")),
            )
        try:
            if not det.zero_shot:
                det.scorer.load_state_dict(state)
        except (KeyError, RuntimeError) as exc:
            raise DataError(f"{path}: model state is incomplete or corrupt ({exc})") from None
        det.threshold_ = meta.get("threshold")
        det._check_weights(meta)
        return det

    def _resolved_config(self) -> dict[str, Any]:
        """The config with ``weights: auto`` pinned to the source actually used, so a load elsewhere
        resolves the same weights (or fails) instead of silently picking others."""
        config = self.config.to_dict()
        source = self.extractor.source
        if config["backbone"]["weights"] == "auto" and source.kind != "random":
            config["backbone"]["weights"] = {"hub-cache": "hub", "file": source.location}.get(source.kind, source.kind)
        return config

    def _meta(self) -> dict[str, Any]:
        import faiss
        import timm

        source = self.extractor.source
        return {
            "format_version": FORMAT_VERSION,
            "anomaly_version": __version__,
            "torch_version": torch.__version__,
            "timm_version": timm.__version__,
            "faiss_version": getattr(faiss, "__version__", "unknown"),
            "weights": {"kind": source.kind, "location": source.location, "sha256": source.sha256},
            "threshold": self.threshold_,
            "holdout_scores": None if self.holdout_scores_ is None else self.holdout_scores_.tolist(),
        }

    def _check_weights(self, meta: dict[str, Any]) -> None:
        saved = (meta.get("weights") or {}).get("sha256")
        if saved and self.config.backbone.pretrained:
            current = self.extractor.source.sha256
            if current and current != saved:
                raise DataError(
                    f"backbone weights {self.extractor.source.location} differ from those the model was fitted "
                    f"with (sha256 {current[:12]} != {saved[:12]}); refit or restore the original weights"
                )


def _decode_resized(item: ImageInput, size: tuple[int, int], keep: bool) -> _Decoded:
    if isinstance(item, np.ndarray):
        image, source = _as_rgb(item), None
    else:
        image, source = read_image(item), str(item)
    h, w = image.shape[:2]
    interp = cv2.INTER_AREA if h > size[0] and w > size[1] else cv2.INTER_LINEAR
    resized = image if (h, w) == size else cv2.resize(image, (size[1], size[0]), interpolation=interp)
    return _Decoded(resized, (h, w), source, image if keep else None)


def _support_views(item: ImageInput) -> list[NDArray[np.uint8]]:
    """The 6 views of a few-shot support image: identity, 3 rotations, vertical and horizontal flip."""
    image = _as_rgb(item) if isinstance(item, np.ndarray) else read_image(item)
    rotations = [np.ascontiguousarray(np.rot90(image, k)) for k in range(4)]
    return [*rotations, np.ascontiguousarray(image[::-1]), np.ascontiguousarray(image[:, ::-1])]


def _as_rgb(array: NDArray[Any]) -> NDArray[np.uint8]:
    if array.dtype != np.uint8:
        raise DataError(f"image arrays must be uint8, got {array.dtype}")
    if array.ndim == 2:
        return cv2.cvtColor(array, cv2.COLOR_GRAY2RGB)
    if array.ndim == 3 and array.shape[2] in (3, 4):
        return np.ascontiguousarray(array[:, :, :3])
    raise DataError(f"image arrays must be (H, W), (H, W, 3) or (H, W, 4), got {array.shape}")


def _robust_threshold(scores: NDArray[np.float64], mad_k: float, from_references: bool) -> float:
    """Zero-shot decision threshold: ``mode + mad_k * scale`` of the lowest cluster of scores.

    Normal images form the low cluster of a MuSc pool whatever their share (MVTec test sets are
    3/4 defective, a production pool is mostly good), so the centre is the leftmost mode of a
    Gaussian kernel density (Silverman bandwidth) holding at least 10 % of the pool, and the scale
    is 1.4826 * the median deviation of the scores below that mode, the side defects never reach.
    With references, the threshold also never falls below the highest reference score.
    """
    ordered = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(ordered)
    q25, q75 = np.quantile(ordered, [0.25, 0.75])
    spread = min(float(ordered.std()), float(q75 - q25) / 1.34) or float(ordered.std())
    mode = float(np.median(ordered))
    if n >= 5 and spread > 0:
        bandwidth = 0.9 * spread * n**-0.2
        grid = np.linspace(ordered[0], ordered[-1], 512)
        density = np.exp(-0.5 * ((grid[:, None] - ordered[None, :]) / bandwidth) ** 2).sum(1)
        peaks = [
            i
            for i in range(len(grid))
            if density[i] >= density[max(i - 1, 0)] and density[i] >= density[min(i + 1, len(grid) - 1)]
        ]
        for i in peaks:
            if np.sum(np.abs(ordered - grid[i]) <= bandwidth) >= max(2, 0.1 * n):
                mode = float(grid[i])
                break
    below = ordered[ordered <= mode]
    scale = float(np.median(mode - below)) * _MAD_SCALE if len(below) else 0.0
    threshold = mode + mad_k * scale
    return max(threshold, float(ordered[-1])) if from_references else threshold
