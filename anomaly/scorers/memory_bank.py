"""PatchCore-style memory bank: coreset of normal patch embeddings + FAISS k-NN distance."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from numpy.typing import NDArray
from threadpoolctl import threadpool_limits

from anomaly._fs import load_tensors
from anomaly._runtime import cpu_threads
from anomaly.distances import knn_scores
from anomaly.errors import ConfigError, DataError
from anomaly.index import NNIndex, one_faiss_thread
from anomaly.scorers._aggregate import PATCH_KERNELS, patch_embeddings
from anomaly.scorers._coreset import greedy_coreset
from anomaly.scorers.base import (
    STATE_FILE,
    Progress,
    ScoreOutput,
    Scorer,
    check_int,
    check_is_fitted,
    check_number,
)
from anomaly.scorers.registry import register_scorer

__all__ = ["Candidates", "FoldPlan", "MemoryBankScorer"]

_OVERSAMPLE = 2  # fold coresets hold twice their share of the bank; the final pick is made from their union
_REFILL = 0.25  # share of a held-out bank picked anew after the full bank's rows (see held_out_bank)
# A fold's coreset is picked chunk by chunk of at most this many patches (about 32 images at 256 px), each
# chunk giving its share: with a capped bank the first stage then costs the same however many images there
# are, and a chunk's projected rows (4 MB) stay in cache. Sets of up to 320 images have one-chunk folds.
_CHUNK_ROWS = 32_768
_FINITE_CHUNK = 32  # images whose embeddings are checked for NaN and inf at once
T = TypeVar("T")


@dataclass(frozen=True)
class FoldPlan:
    """Sizes of a cross-fit: the bank, each fold's coreset, each fold's held-out bank."""

    total: int
    shares: list[int]
    held_out: list[int]


@dataclass(frozen=True)
class Candidates:
    """A fold's coreset: patch embeddings (m, D) and the training image each came from."""

    vectors: torch.Tensor
    images: NDArray[np.int64]


@register_scorer
class MemoryBankScorer(Scorer):
    """Nearest-neighbour distance of each test patch to a coreset of normal patches.

    Args:
        coreset_ratio: fraction of training patches kept (1.0 keeps all).
        max_bank: optional cap on the bank size; with a cap, fit time grows linearly with N.
        projection_dim: random-projection size used only for coreset distances.
        k: neighbours averaged for a patch score.
        distance: ``l2`` (true Euclidean) or ``sql2`` (squared, the official repo's choice).
        reweight: PatchCore Eq. 7 image-score re-weighting with ``num_neighbors`` bank neighbours.
        index: FAISS factory string (``Flat`` exact, ``HNSW32,Flat``, ``IVF256,Flat``) or ``auto``.
        patch_size: local aggregation neighbourhood.
        patch_kernel: ``mean`` (PatchCore's even mean) or ``binomial`` (the patch itself weighs most, so
            defects of a few pixels are diluted less) for the grid layer; other layers keep the mean.
        grid_layer: the layer (finest first) whose grid the patches take; finer layers are averaged
            onto it, so a stride-4 layer adds detail without quadrupling the patches.
        use_gpu: ``auto`` (FAISS searches on the GPU the features come from, when FAISS has CUDA) | true | false.
        random_state: seed of the coreset.

    ``cross_fit`` builds a hierarchical coreset (per fold, then from their union) and scores every
    training image against a bank built the same way without its fold (see :meth:`cross_fit`).
    """

    name = "memory_bank"
    INDEX_FILE = "index.faiss"

    def __init__(
        self,
        *,
        coreset_ratio: float = 0.1,
        max_bank: int | None = None,
        projection_dim: int = 32,
        k: int = 1,
        distance: str = "l2",
        reweight: bool = False,
        num_neighbors: int = 9,
        index: str = "Flat",
        patch_size: int = 3,
        patch_kernel: str = "mean",
        grid_layer: int = 0,
        use_gpu: bool | str = "auto",
        random_state: int = 0,
    ) -> None:
        self.coreset_ratio = coreset_ratio
        self.max_bank = max_bank
        self.projection_dim = projection_dim
        self.k = k
        self.distance = distance
        self.reweight = reweight
        self.num_neighbors = num_neighbors
        self.index = index
        self.patch_size = patch_size
        self.patch_kernel = patch_kernel
        self.grid_layer = grid_layer
        self.use_gpu = use_gpu
        self.random_state = random_state
        self._validate_params()
        self.image_score_from_map = not reweight  # Eq. 7 re-scores images itself
        self.bank_: np.ndarray | None = None
        self.bank_image_: np.ndarray | None = None
        self.index_: NNIndex | None = None
        self._query_gpu: int | None = None  # the GPU FAISS may search on for the last features embedded
        self._candidates: list[Candidates] | None = None  # a cross-fit's fold coresets, until forget()

    def _validate_params(self) -> None:
        check_number("coreset_ratio", self.coreset_ratio, 0, 1, low_open=True)
        if self.max_bank is not None:
            check_int("max_bank", self.max_bank, 1)
        check_int("projection_dim", self.projection_dim, 0)
        check_int("k", self.k, 1, 1024)
        check_int("num_neighbors", self.num_neighbors, 1, 1024)
        check_int("patch_size", self.patch_size, 1, 15)
        check_int("grid_layer", self.grid_layer, 0, 15)
        check_int("random_state", self.random_state, 0, 2**64 - 1)  # torch's generators take at most 64 bits
        if self.patch_size % 2 == 0:
            raise ConfigError(f"scorer.params.patch_size must be odd, got {self.patch_size}")
        if self.patch_kernel not in PATCH_KERNELS:
            names = " or ".join(repr(k) for k in PATCH_KERNELS)
            raise ConfigError(f"scorer.params.patch_kernel must be {names}, got {self.patch_kernel!r}")
        if self.distance not in ("l2", "sql2"):
            raise ConfigError(f"scorer.params.distance must be 'l2' or 'sql2', got '{self.distance}'")
        if not isinstance(self.index, str) or not isinstance(self.reweight, bool):
            raise ConfigError("scorer.params.index must be a FAISS factory string and reweight true/false")
        if self.use_gpu not in (True, False, "auto"):
            raise ConfigError(f"scorer.params.use_gpu must be auto, true or false, got {self.use_gpu!r}")

    def check_layer_count(self, n_layers: int) -> None:
        """``grid_layer`` must be one of the ``n_layers`` given."""
        if self.grid_layer >= n_layers:
            raise ConfigError(f"scorer.params.grid_layer {self.grid_layer} is beyond the backbone's {n_layers} layers")

    def channel_mismatch(self, channels: list[int]) -> str | None:
        """The bank's rows are the layers' channels side by side."""
        if self.bank_ is not None and self.bank_.shape[1] != sum(channels):
            return f"the saved bank has {self.bank_.shape[1]}"
        return None

    def fit(self, layers: list[torch.Tensor], *, progress: Progress | None = None) -> MemoryBankScorer:
        """Build the bank (one global coreset) from features of normal images."""
        self._validate_params()
        self._candidates = None  # an earlier cross-fit's: not this bank's
        emb = self.embed(layers)
        n_img, h, w, d = emb.shape
        _check_finite(emb, np.arange(n_img))
        flat = emb.reshape(-1, d)
        n_select = self._bank_size(len(flat))
        if n_select >= len(flat):
            picks = np.arange(len(flat))
        else:
            picks = greedy_coreset(
                flat, n_select, projection_dim=self.projection_dim, seed=self.random_state, progress=progress
            )
        self._set_bank(flat, picks, picks // (h * w))
        return self

    def cross_fit(
        self, layers: list[torch.Tensor], folds: NDArray[np.int64], *, progress: Progress | None = None
    ) -> ScoreOutput:
        """Hierarchical coreset; each image scored against a bank built without its fold.

        Every fold gets its own coreset, ``_OVERSAMPLE`` times its share of the bank; the bank is a
        greedy k-center pick from the union of all of them, and the out-of-sample bank of fold f the
        same pick from the union of the other folds' coresets, continued from the first bank rows that
        fold f did not contribute (:meth:`held_out_bank`): one procedure for both, so the held-out
        scores are those a new image gets, at about the cost of one global coreset.
        The steps (:meth:`fold_plan`, :meth:`fold_candidates`, :meth:`merge_candidates`,
        :meth:`score_held_out`) are public so that ``anomaly.distributed`` runs them on other workers.
        """
        self._candidates = None
        fold_ids = np.unique(folds)
        members = [np.flatnonzero(folds == fold) for fold in fold_ids]

        def embedded(images: NDArray[np.int64]) -> torch.Tensor:
            # one fold's patch embeddings per thread at a time, made again for its scoring: the embeddings are
            # 2.2x the layers they come from (lite0: 152 channels on the stride-8 grid), and all of them at once were
            # the fit's peak (about 0.6 GB per 1,000 training images or tiles)
            rows = torch.from_numpy(images).to(layers[0].device)
            return self.embed([layer[rows] for layer in layers])

        self._validate_params()
        self.check_layer_count(len(layers))
        n_img = len(layers[0])
        h, w = layers[self.grid_layer].shape[-2:]
        plan = self.fold_plan(n_img, h * w, [len(m) for m in members])
        steps = [0, len(fold_ids) * 2 + 1]

        def tick() -> None:
            steps[0] += 1
            if progress is not None:
                progress(steps[0], steps[1])

        candidates = _on_cpu_threads(
            lambda images, share: self.fold_candidates(embedded(images), images, share),
            list(zip(members, plan.shares)),
            layers[0].device,
            tick,
        )
        bank_picks = self.merge_candidates(candidates, plan.total)
        tick()

        def held_out(fold: int, size: int) -> ScoreOutput:
            # pick and search in one task, on as many threads as there are cores: the bank dies with the task (as
            # many alive as threads), and no core waits for the slower pick of a pair or while the searches ran one
            # after another between the pairs (bottle on two cores: the held-out stage 4.4 -> 3.5 s)
            bank = self.held_out_bank(candidates, fold, bank_picks, size)
            return self.score_against(bank, embedded(members[fold]).cpu().numpy(), self.index_)

        outs = _on_cpu_threads(held_out, list(enumerate(plan.held_out)), layers[0].device, tick)
        maps = np.empty((n_img, h, w), dtype=np.float32)
        scores = np.empty(n_img, dtype=np.float64)
        for fold, out in enumerate(outs):
            maps[members[fold]] = out.patch_maps
            scores[members[fold]] = out.image_scores
        return ScoreOutput(maps, scores)

    def embed(self, layers: list[torch.Tensor]) -> torch.Tensor:
        """Patch embeddings (N, h, w, D) of per-layer features, as the bank stores them."""
        self._validate_params()
        self.check_layer_count(len(layers))
        self._query_gpu = _faiss_gpu_for(layers[0].device)
        return patch_embeddings(layers, self.patch_size, self.grid_layer, self.patch_kernel)

    def fold_plan(self, n_images: int, patches_per_image: int, fold_sizes: list[int]) -> FoldPlan:
        """Bank size, each fold's coreset size and each fold's held-out bank size."""
        if len(fold_sizes) < 2:
            raise DataError("cross-fitting needs at least 2 folds of training images")
        total = self._bank_size(n_images * patches_per_image)
        shares = [math.ceil(_OVERSAMPLE * total * size / n_images) for size in fold_sizes]
        held_out = [max(1, round(total * (n_images - size) / n_images)) for size in fold_sizes]
        return FoldPlan(total, shares, held_out)

    def fold_candidates(self, emb: torch.Tensor, images: NDArray[np.int64], share: int) -> Candidates:
        """A fold's coreset of ``share`` patches; ``emb`` (n, h, w, D) are the patches of ``images``."""
        n, h, w, d = emb.shape
        _check_finite(emb, images)
        flat = emb.reshape(-1, d)
        picks = self._chunked_coreset(flat, share)
        return Candidates(flat[torch.from_numpy(picks).to(flat.device)], np.asarray(images)[picks // (h * w)])

    def merge_candidates(self, candidates: list[Candidates], total: int) -> NDArray[np.int64]:
        """The bank: a greedy k-center pick of ``total`` patches from the union of the folds' coresets.

        Returns the picks' positions in that union, in selection order (for :meth:`score_held_out`).
        """
        union = torch.cat([c.vectors for c in candidates])
        images = np.concatenate([c.images for c in candidates])
        picks = self._coreset(union, total)
        self._set_bank(union, picks, images[picks])
        self._candidates = candidates  # until forget(): a bank picked again without some images (no copy kept)
        return picks

    def score_held_out(
        self,
        candidates: list[Candidates],
        fold: int,
        bank_picks: NDArray[np.int64],
        size: int,
        queries: np.ndarray,
        lists: NNIndex | None = None,
    ) -> ScoreOutput:
        """Scores of fold ``fold``'s patch embeddings ``queries`` against its held-out bank of ``size`` rows
        (:meth:`held_out_bank`); with an IVF index, that bank reuses the lists of ``lists`` (the full bank's index)."""
        return self.score_against(self.held_out_bank(candidates, fold, bank_picks, size), queries, lists)

    def held_out_bank(
        self, candidates: list[Candidates], fold: int, bank_picks: NDArray[np.int64], size: int
    ) -> np.ndarray:
        """The bank of ``size`` rows built without fold ``fold``, against which its images are scored.

        A greedy k-center pick from the other folds' coresets that starts from the full bank's own picks outside
        the fold (``bank_picks``, from :meth:`merge_candidates`, in selection order), the first ``1 - _REFILL`` of
        ``size`` of them: their farthest-point order approximates how a pick without the fold begins, and the
        rest is picked anew to fill the gaps the fold leaves. This costs ``_REFILL`` of a pick from scratch, with
        the same thresholds (benchmarks/README.md section 6).
        """
        bounds = np.cumsum([0] + [len(c.vectors) for c in candidates])
        lo, hi = bounds[fold], bounds[fold + 1]
        rest = torch.cat([c.vectors for j, c in enumerate(candidates) if j != fold])
        kept = bank_picks[(bank_picks < lo) | (bank_picks >= hi)]
        kept = np.where(kept >= hi, kept - (hi - lo), kept)[: int(size * (1 - _REFILL))]
        picks = self._coreset(rest, size, initial=kept)
        return rest[torch.from_numpy(picks).to(rest.device)].cpu().numpy()

    def score_against(self, bank: np.ndarray, queries: np.ndarray, lists: NNIndex | None = None) -> ScoreOutput:
        """Scores of patch embeddings ``queries`` (N, h, w, D) against ``bank`` (not the fitted one: a fold's)."""
        index = NNIndex(self.index, use_gpu=self.use_gpu, gpu=self._query_gpu).build(
            bank, seed=self.random_state, lists_of=lists
        )
        return self._score_queries(index, bank, queries)

    def _bank_size(self, n_rows: int) -> int:
        n_select = max(1, math.floor(self.coreset_ratio * n_rows))
        return n_select if self.max_bank is None else min(n_select, self.max_bank)

    def _chunked_coreset(self, rows: torch.Tensor, n_select: int) -> np.ndarray:
        """A greedy pick of about ``n_select`` rows made in equal chunks of at most ``_CHUNK_ROWS`` rows.

        Each chunk picks its share (rounded up) on its own, a composable coreset: the union covers the
        rows about as well as one pick over all of them, and the final pick from the folds' union
        (:meth:`merge_candidates`) is global again.
        """
        n_chunks = math.ceil(len(rows) / _CHUNK_ROWS)
        if n_chunks <= 1:
            return self._coreset(rows, n_select)
        bounds = np.linspace(0, len(rows), n_chunks + 1).astype(np.int64)
        picks = [
            lo + self._coreset(rows[lo:hi], math.ceil(n_select * (hi - lo) / len(rows)))
            for lo, hi in zip(bounds[:-1], bounds[1:])
        ]
        return np.concatenate(picks)

    def _coreset(self, rows: torch.Tensor, n_select: int, initial: np.ndarray | None = None) -> np.ndarray:
        """Positions of a greedy k-center pick of ``n_select`` of ``rows`` (all of them if fewer)."""
        if n_select >= len(rows):
            return np.arange(len(rows))
        return greedy_coreset(
            rows, n_select, projection_dim=self.projection_dim, seed=self.random_state, initial=initial
        )

    def _set_bank(self, flat: torch.Tensor, picks: np.ndarray, images: np.ndarray) -> None:
        # float32 as FAISS holds it and the load requires it, whatever the features' dtype (float64 was saved as is)
        self._set_rows(flat[torch.from_numpy(picks).to(flat.device)].float().cpu().numpy(), images.astype(np.int32))

    def _set_rows(self, bank: np.ndarray, bank_image: np.ndarray) -> None:
        """Bank, row images and an index built on them, set together: an index that cannot be built (an IVF of more
        lists than the rows train) raises before anything changes, not after the bank did (index and bank then
        disagreed: a forget() left 2,432 rows in the bank and 2,560 in the index)."""
        index = NNIndex(self.index, use_gpu=self.use_gpu, gpu=self._query_gpu).build(bank, seed=self.random_state)
        self.bank_, self.bank_image_, self.index_ = bank, bank_image, index

    def forget(self, rows: NDArray[np.int64]) -> int:
        """Take the bank rows of training rows ``rows`` out of the bank; returns how many there were.

        The k-center pick takes a defect's patches first (they lie far from everything else), so a defective
        image in the training folder would otherwise vouch for the same kind of defect at test time. After a
        cross-fit the bank is picked again, at its size, from the folds' candidates of the other images: those
        rows also covered normal regions, and dropping them alone left a bank of 24 images 28 % thinner, whose
        normal scores then passed the threshold calibrated before (18 of 20 good bottles flagged). Without the
        candidates (a plain ``fit``) the rows are dropped. A bank made of those rows only is kept. Ends the fit:
        the candidates are released.
        """
        check_is_fitted(self, "index_")
        assert self.bank_ is not None and self.bank_image_ is not None
        candidates, self._candidates = self._candidates, None
        drop = np.isin(self.bank_image_, rows)
        if not drop.any() or drop.all():
            return 0
        if candidates is None:
            self._set_rows(self.bank_[~drop], self.bank_image_[~drop])
            return int(drop.sum())
        union = torch.cat([c.vectors for c in candidates])
        images = np.concatenate([c.images for c in candidates])
        keep = np.flatnonzero(~np.isin(images, rows))
        kept = union[torch.from_numpy(keep).to(union.device)]
        picks = self._coreset(kept, min(len(self.bank_), len(keep)))
        self._set_bank(kept, picks, images[keep][picks])
        return int(drop.sum())

    def score(
        self,
        layers: list[torch.Tensor],
        *,
        reference: list[torch.Tensor] | None = None,
        embeddings: torch.Tensor | None = None,
        progress: Progress | None = None,
    ) -> ScoreOutput:
        """Patch maps = mean distance to the k nearest bank rows; image score = max (or Eq. 7)."""
        check_is_fitted(self, "index_")
        assert self.index_ is not None and self.bank_ is not None
        queries = self.embed(layers).cpu().numpy()
        return self._score_queries(self.index_.place(self._query_gpu), self.bank_, queries)

    def _score_queries(self, index: NNIndex, bank: np.ndarray, queries: np.ndarray) -> ScoreOutput:
        maps, image_scores = knn_scores(
            index,
            bank,
            queries,
            k=self.k,
            distance=self.distance,
            reweight=self.reweight,
            num_neighbors=self.num_neighbors,
        )
        return ScoreOutput(patch_maps=maps, image_scores=image_scores)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Bank and the source image of every bank row (the FAISS index is saved beside them)."""
        check_is_fitted(self, "index_")
        assert self.bank_ is not None and self.bank_image_ is not None
        return {"bank": self.bank_, "bank_image": self.bank_image_}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore bank rows; the index is rebuilt from them."""
        self._check_bank(state["bank"], state["bank_image"])
        self._set_rows(state["bank"], state["bank_image"])

    def save(self, directory: Path) -> list[str]:
        """Arrays as safetensors plus the FAISS index (built once, so loading skips the training)."""
        names = super().save(directory)
        assert self.index_ is not None
        (directory / self.INDEX_FILE).write_bytes(self.index_.serialize().tobytes())
        return [*names, self.INDEX_FILE]

    def load(self, files: Mapping[str, Path]) -> None:
        """Restore bank and index, refusing an index that does not match the bank and the config."""
        state = load_tensors(files[STATE_FILE])
        bank, bank_image = state["bank"], state["bank_image"]
        self._check_bank(bank, bank_image)
        data = np.frombuffer(files[self.INDEX_FILE].read_bytes(), dtype=np.uint8)
        index = NNIndex(self.index, use_gpu=self.use_gpu, gpu=self._query_gpu).deserialize(data)
        index.check_matches(bank, self.index)
        self.bank_, self.bank_image_, self.index_ = bank, bank_image, index

    @staticmethod
    def _check_bank(bank: np.ndarray, bank_image: np.ndarray) -> None:
        if bank.ndim != 2 or bank.dtype != np.float32 or not len(bank) or not np.isfinite(bank).all():
            raise ValueError(f"bank must be a finite (N, D) float32 array, got {bank.dtype} {bank.shape}")
        if bank_image.shape != (len(bank),):
            raise ValueError(f"bank_image must have {len(bank)} entries, got {bank_image.shape}")


def _check_finite(emb: torch.Tensor, images: NDArray[np.int64]) -> None:
    """DataError naming the training rows ``images`` whose patch embeddings ``emb`` (n, h, w, D) are not all finite.

    One NaN wins every argmax of the greedy pick and turns every distance into NaN: the whole bank became copies
    of one row (15x the normal scores), saved without complaint and refused at load ("bank must be finite").
    """
    for start in range(0, len(emb), _FINITE_CHUNK):  # a bool per value of a chunk, not of every embedding
        bad = ~torch.isfinite(emb[start : start + _FINITE_CHUNK]).flatten(1).all(1)
        if bool(bad.any()):
            rows = np.asarray(images)[start : start + _FINITE_CHUNK][bad.cpu().numpy()]
            raise DataError(
                f"training row(s) {rows[:5].tolist()} have NaN or infinite features; check backbone.mean/std and "
                "the input"
            )


def _on_cpu_threads(
    task: Callable[..., T], args: list[tuple[Any, ...]], device: torch.device, done: Callable[[], None] | None = None
) -> list[T]:
    """``task(*a)`` for each ``a`` of ``args``, in order, on as many threads as the process may use.

    Each greedy pick runs on one thread (:mod:`anomaly.scorers._coreset`), so the folds' independent picks left the
    other cores idle: on two cores bottle's cross-fit takes 5.7 s instead of 7.3 s (``anomaly fit`` 15.1 s, was
    17.4 s). torch and OpenBLAS are held to one thread each meanwhile (restored after), and FAISS to one thread
    inside each task (:func:`anomaly.index.one_faiss_thread`), so that the threads never oversubscribe the cores.
    ``done`` is called after each task, in order, on the calling thread. Features on a GPU are picked there, one
    fold after another. Every thread holds its task's inputs and result at once (a fold's patch embeddings, a
    held-out bank): callers that keep the results hand over at most :func:`_cpu_workers` tasks at a time.
    """
    workers = _cpu_workers(device, len(args))
    if workers <= 1:
        out = []
        for a in args:
            out.append(task(*a))
            if done is not None:
                done()
        return out
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # worker threads take torch's setting when they first run an op
    try:
        with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(workers) as pool:
            out = []
            for result in pool.map(lambda a: _one_core(task, a), args):
                out.append(result)
                if done is not None:
                    done()
            return out
    finally:
        torch.set_num_threads(threads)


def _one_core(task: Callable[..., T], args: tuple[Any, ...]) -> T:
    """``task(*args)`` with FAISS on one thread: the tasks beside it have the other cores."""
    with one_faiss_thread():
        return task(*args)


def _cpu_workers(device: torch.device, tasks: int) -> int:
    """Threads :func:`_on_cpu_threads` runs ``tasks`` tasks on for features on ``device``."""
    return max(1, min(cpu_threads(), tasks)) if device.type == "cpu" else 1


def _faiss_gpu_for(device: torch.device) -> int | None:
    """The GPU number FAISS may search on for features on ``device`` (None: keep the search on the CPU).

    Features on a CUDA device search on that device. Features on the CPU search there too when torch
    could have used a GPU (the model was asked to run on the CPU); with a CPU-only torch, a CUDA build
    of FAISS still searches on GPU 0.
    """
    if device.type == "cuda":
        return device.index if device.index is not None else torch.cuda.current_device()
    return None if torch.cuda.is_available() else 0
