"""Torch-free scorers on the exported network's outputs, and the one decision step after them.

Each scorer mirrors the torch scorer of the same name from the network output onwards (the part
the network does not contain); the parity tests compare both end to end through ``Detector.predict``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from anomaly._fs import load_tensors
from anomaly.decisions import make_results
from anomaly.distances import knn_scores, mahalanobis
from anomaly.errors import DataError
from anomaly.index import NNIndex
from anomaly.maps import ViewLayout
from anomaly.results import DetectionResult
from anomaly.thresholds import Threshold

__all__ = ["Decision", "RuntimeScorer", "decide", "load_scorer"]

Maps = NDArray[np.float32] | None


class RuntimeScorer(Protocol):
    """Network outputs of a batch -> (patch maps (N, h, w) or None, image scores (N,))."""

    has_maps: bool

    def __call__(self, outputs: list[NDArray[np.float32]]) -> tuple[Maps, NDArray[np.float64]]: ...


def load_scorer(root: Path, spec: dict[str, Any], listed: dict[str, Any], gpu: int | None = None) -> RuntimeScorer:
    """The scorer described by the manifest's ``scorer`` entry, from the files the manifest lists; ``gpu``: the CUDA
    device the network's outputs come from (None: the CPU), as a Detector's features come from its device."""
    name, params = spec["name"], spec.get("params", {})
    state = load_tensors(root / "state.safetensors") if "state.safetensors" in listed else {}
    if name == "memory_bank":
        if "index.faiss" not in listed:
            raise DataError(f"{root}: incomplete export (manifest.json lists no index.faiss)")
        return _MemoryBank(params, root / "index.faiss", state.get("bank"), gpu)
    if name == "padim":
        grid = state.get("grid")  # absent in exports written before it was kept: the grid's size alone is checked
        return _Padim(state["mean"], state["chol_inv"], None if grid is None else (int(grid[0]), int(grid[1])))
    if name == "gaussian":
        n = sum(1 for key in state if key.startswith("mean."))
        return _Gaussian([state[f"mean.{i}"] for i in range(n)], [state[f"precision.{i}"] for i in range(n)])
    raise DataError(f"{root}: scorer {name!r} has no runtime implementation")


class _MemoryBank:
    """k-NN distance to the memory bank, as ``MemoryBankScorer.score``."""

    has_maps = True

    def __init__(
        self, params: dict[str, Any], index_file: Path, bank: NDArray[np.float32] | None, gpu: int | None
    ) -> None:
        self.options = {key: params[key] for key in ("k", "distance", "reweight", "num_neighbors")}
        # ``auto`` follows the network's outputs: a CPU run keeps FAISS off the GPU, one on cuda:1 searches on GPU 1
        self.index = NNIndex(params["index"], use_gpu=params["use_gpu"], gpu=gpu).deserialize(
            np.fromfile(index_file, dtype=np.uint8)
        )
        self.bank = bank

    def __call__(self, outputs: list[NDArray[np.float32]]) -> tuple[Maps, NDArray[np.float64]]:
        return knn_scores(self.index, self.bank, outputs[0], **self.options)  # outputs[0]: (N, h, w, D) embeddings


class _Padim:
    """Per-position Mahalanobis distance with precomputed inverse Cholesky factors (``PadimScorer.score``)."""

    has_maps = True

    def __init__(
        self, mean: NDArray[np.float32], chol_inv: NDArray[np.float32], grid: tuple[int, int] | None = None
    ) -> None:
        self.mean = mean  # (P, d)
        self.chol_inv = chol_inv  # (P, d, d): L^-1, so that y = L^-1 (x - mu) and distance = |y|
        self.grid = grid  # (h, w) of the fit: P Gaussians in another shape of grid would be read at other places

    def __call__(self, outputs: list[NDArray[np.float32]]) -> tuple[Maps, NDArray[np.float64]]:
        emb = outputs[0]  # (N, d, h, w) selected channels
        n, d, h, w = emb.shape
        if h * w != len(self.mean) or (self.grid is not None and (h, w) != self.grid):
            shape = "" if self.grid is None else f" ({self.grid[0]} x {self.grid[1]})"
            fitted = f"{len(self.mean)} positions{shape}"
            raise DataError(
                f"the padim model holds Gaussians of {fitted}, the feature grid of its fit, but the network gives "
                f"{h} x {w} = {h * w}: the input size differs from the fit's"
            )
        centred = emb.reshape(n, d, h * w).transpose(2, 1, 0) - self.mean[:, :, None]  # (P, d, N)
        patch = np.sqrt(np.square(np.matmul(self.chol_inv, centred)).sum(1)).T.reshape(n, h, w)
        return patch.astype(np.float32), patch.reshape(n, -1).max(1).astype(np.float64)


class _Gaussian:
    """Mean over layers of the Mahalanobis distance of pooled features (``GlobalGaussianScorer.score``)."""

    has_maps = False

    def __init__(self, means: list[NDArray[np.float64]], precisions: list[NDArray[np.float64]]) -> None:
        self.means = means
        self.precisions = precisions

    def __call__(self, outputs: list[NDArray[np.float32]]) -> tuple[Maps, NDArray[np.float64]]:
        dists = []
        for pooled, mean, prec in zip(outputs, self.means, self.precisions):
            dists.append(mahalanobis(pooled.astype(np.float64) - mean, prec))
        return None, np.mean(dists, axis=0)


@dataclass(frozen=True)
class Decision:
    """Post-processing and thresholds from the manifest: everything between scores and verdicts."""

    input_size: tuple[int, int]
    blur_sigma: float
    score_from_map: bool
    threshold: Threshold

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> Decision:
        post = manifest["postprocess"]
        size, sigma = manifest["input"]["size"], float(post["blur_sigma"])
        if len(size) != 2 or not all(isinstance(x, int) and x > 0 for x in size):
            raise ValueError(f"input.size must be two positive integers, got {size!r}")
        if not np.isfinite(sigma) or sigma < 0:
            raise ValueError(f"postprocess.blur_sigma must be a finite number >= 0, got {sigma!r}")
        return cls(
            tuple(size),  # type: ignore[arg-type]
            sigma,
            bool(post["image_score_from_map"]),
            Threshold.from_dict(manifest["threshold"], "manifest.json threshold"),
        )


def decide(
    patch_maps: Maps,
    image_scores: NDArray[np.float64],
    sizes: list[tuple[int, int]],
    sources: list[str | None],
    decision: Decision,
    maps: bool,
    layouts: Sequence[ViewLayout | None] | None = None,
) -> list[DetectionResult]:
    """Maps at original size, image scores and verdicts, by the same code as the Detector (``layouts``: where each
    image's views sit; None: one stretched view per image)."""
    return make_results(
        patch_maps,
        image_scores,
        sizes,
        sources,
        decision.threshold,
        input_size=decision.input_size,
        sigma=decision.blur_sigma,
        score_from_map=decision.score_from_map,
        maps=maps,
        layouts=layouts,
    )
