"""Gaussian / Mahalanobis scorers: global per-layer (Rippel et al.) and per-position (PaDiM)."""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from anomaly.distances import mahalanobis
from anomaly.errors import ConfigError, DataError
from anomaly.scorers.base import Progress, ScoreOutput, Scorer, check_int, check_is_fitted, check_number
from anomaly.scorers.registry import register_scorer

__all__ = ["GlobalGaussianScorer", "PadimScorer"]

log = logging.getLogger(__name__)


@register_scorer
class GlobalGaussianScorer(Scorer):
    """One multivariate Gaussian per layer on globally average-pooled features; image score only.

    Covariances use Ledoit-Wolf shrinkage (scikit-learn), so they are well conditioned even with
    fewer images than channels. Image score = mean over layers of the Mahalanobis distance.
    """

    # From two images Ledoit-Wolf estimates no shrinkage (both centred images give the same outer product): the
    # covariance stays singular and a fold model fitted on two scored its held-out image 30x lower than the full
    # model scores new normal images (3 bottles: a threshold of 0.76 against good scores of 25, all flagged).
    min_fold_images = 3

    name = "gaussian"
    has_maps = False
    image_score_from_map = False

    def __init__(self, *, assume_centered: bool = False) -> None:
        if not isinstance(assume_centered, bool):  # scikit-learn refused it after the backbone ran: a traceback
            raise ConfigError(f"scorer.params.assume_centered must be true or false, got {assume_centered!r}")
        self.assume_centered = assume_centered
        self.means_: list[np.ndarray] | None = None
        self.precisions_: list[np.ndarray] | None = None

    def channel_mismatch(self, channels: list[int]) -> str | None:
        """One Gaussian per layer, of that layer's channels."""
        saved = None if self.means_ is None else [len(mean) for mean in self.means_]
        if saved is None or saved == channels:
            return None
        return f"the saved per-layer Gaussians have {' + '.join(map(str, saved))}"

    def kept_features(self, layers: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each layer's global average (N, C, 1, 1): a fit holds 5 vectors per image, not its maps (1.7 MB)."""
        return [layer.mean((2, 3), keepdim=True) for layer in layers]

    def fit(self, layers: list[torch.Tensor], *, progress: Progress | None = None) -> GlobalGaussianScorer:
        """Fit one Ledoit-Wolf Gaussian per layer."""
        from sklearn.covariance import LedoitWolf

        if layers[0].shape[0] < 2:
            raise ConfigError("the gaussian scorer needs at least 2 training images")
        self.means_, self.precisions_ = [], []
        for layer in layers:
            pooled = layer.mean((2, 3)).double().cpu().numpy()
            lw = LedoitWolf(assume_centered=self.assume_centered).fit(pooled)
            self.means_.append(lw.location_)
            if np.trace(lw.covariance_) > 0:
                self.precisions_.append(lw.get_precision())
            else:  # copies of one image: the precision would be all zero and every image, a defect too, score 0;
                self.precisions_.append(np.eye(pooled.shape[1]))  # any change scores its Euclidean distance instead
        return self

    def score(
        self,
        layers: list[torch.Tensor],
        *,
        reference: list[torch.Tensor] | None = None,
        embeddings: torch.Tensor | None = None,
        progress: Progress | None = None,
    ) -> ScoreOutput:
        """Mean over layers of sqrt((g - mu)^T P (g - mu))."""
        check_is_fitted(self, "precisions_")
        assert self.means_ is not None and self.precisions_ is not None
        dists = []
        for layer, mean, prec in zip(layers, self.means_, self.precisions_):
            dists.append(mahalanobis(layer.mean((2, 3)).double().cpu().numpy() - mean, prec))
        return ScoreOutput(patch_maps=None, image_scores=np.mean(dists, axis=0))

    def state_dict(self) -> dict[str, np.ndarray]:
        """Per-layer means and precisions."""
        check_is_fitted(self, "precisions_")
        assert self.means_ is not None and self.precisions_ is not None
        state = {f"mean.{i}": m for i, m in enumerate(self.means_)}
        state.update({f"precision.{i}": p for i, p in enumerate(self.precisions_)})
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore what :meth:`state_dict` wrote."""
        n = sum(1 for key in state if key.startswith("mean."))
        self.means_ = [state[f"mean.{i}"] for i in range(n)]
        self.precisions_ = [state[f"precision.{i}"] for i in range(n)]


@register_scorer
class PadimScorer(Scorer):
    """Per-position Gaussian (PaDiM): Mahalanobis distance of each patch to its position's model.

    Layers are nearest-upsampled to the finest grid and concatenated; a fixed random subset of
    ``n_features`` channels is kept. Covariances get a ``ridge`` * I term and are stored as
    Cholesky factors; fit and score run over chunks of positions so memory stays bounded.
    """

    name = "padim"

    def __init__(self, *, n_features: int = 100, ridge: float = 0.01, chunk: int = 512, random_state: int = 0) -> None:
        check_int("n_features", n_features, 1)
        check_number("ridge", ridge, 0, 1e6, low_open=True)
        check_int("chunk", chunk, 1)
        check_int("random_state", random_state, 0)
        self.n_features = n_features
        self.ridge = ridge
        self.chunk = chunk
        self.random_state = random_state
        self.channels_: np.ndarray | None = None
        self.mean_: torch.Tensor | None = None
        self.chol_: torch.Tensor | None = None
        self.grid_: tuple[int, int] | None = None  # (h, w) of the fit; None: a model saved before it was kept

    def channel_mismatch(self, channels: list[int]) -> str | None:
        """The saved channel subset indexes the layers' channels side by side."""
        if self.channels_ is not None and len(self.channels_) and self.channels_.max() >= sum(channels):
            return f"the saved channel subset needs at least {int(self.channels_.max()) + 1}"
        return None

    def _positions(self, layers: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer: the subset's channels in it and, for every position of the finest grid, the layer's position
        that nearest-neighbour upsampling reads (F.interpolate's own rule, taken from an index map)."""
        assert self.channels_ is not None
        h, w = layers[0].shape[-2:]
        channels = torch.from_numpy(self.channels_)
        parts, offset = [], 0
        for layer in layers:
            c, lh, lw = layer.shape[1:]
            mine = channels[(channels >= offset) & (channels < offset + c)] - offset
            grid = torch.arange(lh * lw, dtype=torch.float64).reshape(1, 1, lh, lw)
            source = F.interpolate(grid, size=(h, w), mode="nearest").flatten().long()
            parts.append((mine.to(layer.device), source.to(layer.device)))
            offset += c
        return parts

    def _embed_chunk(
        self, layers: list[torch.Tensor], parts: list[tuple[torch.Tensor, torch.Tensor]], positions: slice
    ) -> torch.Tensor:
        """(p, N, d) embeddings of the finest grid's ``positions`` (row-major): the subset's channels of the layers
        nearest-upsampled to that grid and concatenated, built a chunk at a time so that no (positions, N, d)
        tensor of every image is ever held (ALGORITHMS.md 2.4: memory must not grow with N that way)."""
        chunk = [
            layer.flatten(2).index_select(2, source[positions]).index_select(1, mine)
            for layer, (mine, source) in zip(layers, parts)
        ]
        return torch.cat(chunk, dim=1).permute(2, 0, 1).cpu()  # (p, N, d), float32

    def _chunks(self, layers: list[torch.Tensor]) -> list[slice]:
        n_pos = layers[0].shape[-2] * layers[0].shape[-1]
        return [slice(start, min(start + self.chunk, n_pos)) for start in range(0, n_pos, self.chunk)]

    def fit(self, layers: list[torch.Tensor], *, progress: Progress | None = None) -> PadimScorer:
        """Per-position mean and Cholesky factor of (unbiased covariance + ridge * I)."""
        if self.n_features < 1 or self.ridge <= 0:
            raise ConfigError("scorer.params: n_features must be >= 1 and ridge > 0")
        total = sum(layer.shape[1] for layer in layers)
        if self.n_features > total:
            log.warning(
                "scorer.params.n_features=%d: the layers give %d channels, all of them are used", self.n_features, total
            )
        rng = np.random.default_rng(self.random_state)
        self.channels_ = np.sort(rng.choice(total, size=min(self.n_features, total), replace=False))
        parts = self._positions(layers)
        n = layers[0].shape[0]
        eye = torch.eye(len(self.channels_), dtype=torch.float64)
        d, n_pos = len(self.channels_), layers[0].shape[-2] * layers[0].shape[-1]
        self.grid_ = (int(layers[0].shape[-2]), int(layers[0].shape[-1]))
        # filled in place: chunks joined by torch.cat held the factors twice (a 1024 px fit: 2.6 GB more at its peak)
        self.mean_ = torch.empty(n_pos, d, dtype=torch.float32)
        self.chol_ = torch.empty(n_pos, d, d, dtype=torch.float32)
        for positions in self._chunks(layers):
            x = self._embed_chunk(layers, parts, positions).double()
            mean = x.mean(1)
            centred = x - mean[:, None]
            cov = centred.transpose(1, 2) @ centred / max(n - 1, 1) + self.ridge * eye
            self.mean_[positions] = mean
            self.chol_[positions] = torch.linalg.cholesky(cov)
        return self

    def cross_fit(
        self, layers: list[torch.Tensor], folds: np.ndarray, *, progress: Progress | None = None
    ) -> ScoreOutput:
        """Exact leave-fold-out Gaussians from sufficient statistics (sums and outer products).

        The same per-position models as refitting without each fold, for the cost of about two fits.
        """
        self.fit(layers)
        assert self.channels_ is not None  # set by fit
        parts = self._positions(layers)
        n, _, h, w = layers[0].shape
        n_pos = h * w
        eye = torch.eye(len(self.channels_), dtype=torch.float64)
        dist = torch.empty(n_pos, n, dtype=torch.float64)
        fold_ids = np.unique(folds)
        for positions in self._chunks(layers):
            part = self._embed_chunk(layers, parts, positions).double()
            total, outer = part.sum(1), part.transpose(1, 2) @ part
            for fold in fold_ids:
                held = torch.from_numpy(np.flatnonzero(folds == fold))
                xf = part[:, held]
                m = n - len(held)
                mean = (total - xf.sum(1)) / m
                cov = (outer - xf.transpose(1, 2) @ xf - m * mean[:, :, None] * mean[:, None, :]) / max(m - 1, 1)
                chol = torch.linalg.cholesky(cov + self.ridge * eye)
                y = torch.linalg.solve_triangular(chol, (xf - mean[:, None]).transpose(1, 2), upper=False)
                dist[positions, held] = y.square().sum(1).sqrt()
            if progress is not None:
                progress(positions.stop, n_pos)
        patch = dist.T.reshape(n, h, w).float().numpy()
        return ScoreOutput(patch_maps=patch, image_scores=patch.reshape(n, -1).max(1).astype(np.float64))

    def score(
        self,
        layers: list[torch.Tensor],
        *,
        reference: list[torch.Tensor] | None = None,
        embeddings: torch.Tensor | None = None,
        progress: Progress | None = None,
    ) -> ScoreOutput:
        """Mahalanobis distance per position (the detector takes the image score from the blurred map)."""
        check_is_fitted(self, "chol_")
        assert self.mean_ is not None and self.chol_ is not None
        n, _, h, w = layers[0].shape
        # a model directory whose input size was edited: wrong positions, or a traceback; a grid of as many positions
        # in another shape (64 x 16 for 32 x 32) read every row's Gaussians at other places without a word
        if h * w != len(self.mean_) or (self.grid_ is not None and (h, w) != self.grid_):
            raise DataError(_grid_mismatch(len(self.mean_), self.grid_, h, w))
        parts = self._positions(layers)
        out = torch.empty(h * w, n)
        for sl in self._chunks(layers):
            centred = (self._embed_chunk(layers, parts, sl).float() - self.mean_[sl, None]).transpose(1, 2)  # (p, d, N)
            y = torch.linalg.solve_triangular(self.chol_[sl], centred, upper=False)
            out[sl] = y.square().sum(1).sqrt()
        patch = out.T.reshape(n, h, w).numpy()
        return ScoreOutput(patch_maps=patch, image_scores=patch.reshape(n, -1).max(1).astype(np.float64))

    def state_dict(self) -> dict[str, np.ndarray]:
        """Channel subset, per-position means and Cholesky factors."""
        check_is_fitted(self, "chol_")
        assert self.mean_ is not None and self.chol_ is not None and self.channels_ is not None
        state = {"channels": self.channels_, "mean": self.mean_.numpy(), "chol": self.chol_.numpy()}
        if self.grid_ is not None:
            state["grid"] = np.array(self.grid_, dtype=np.int64)
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore what :meth:`state_dict` wrote."""
        self.channels_ = state["channels"]
        self.mean_ = torch.from_numpy(state["mean"])
        self.chol_ = torch.from_numpy(state["chol"])
        grid = state.get("grid")  # absent in models saved before it was kept: their grid is checked by its size alone
        self.grid_ = None if grid is None else (int(grid[0]), int(grid[1]))


def _grid_mismatch(positions: int, grid: tuple[int, int] | None, h: int, w: int) -> str:
    """The error for features of an ``h`` x ``w`` grid scored by PaDiM Gaussians of ``positions`` (``grid``) positions
    (the export runtime words it alike)."""
    fitted = f"{positions} positions" + ("" if grid is None else f" ({grid[0]} x {grid[1]})")
    return (
        f"the padim model holds Gaussians of {fitted}, the feature grid of its fit, but these features give "
        f"{h} x {w} = {h * w}: the model input size differs from the fit's; refit the model"
    )
