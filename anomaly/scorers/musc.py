"""MuSc zero-shot scoring: LNAMD, mutual scoring (MSM) and RsCIN (ALGORITHMS.md §3).

Every image of an unlabeled set is scored by comparing its patches with the patches of all the
other images: a normal patch has close neighbours in many images, an anomalous one in few.

Deliberate deviations from the reference implementation (ALGORITHMS.md §3.8):

* MSM averages at least one term (``k = max(1, ⌊0.3·(N−1)⌋)``) instead of returning NaN for N ≤ 4,
  and raises ``ValueError`` when an image has nothing to be compared with.
* Distances are computed in float32 on every device (the reference uses float16 on CUDA, where
  ``d² = 2 − 2·z·zᵀ`` cancels catastrophically for near-duplicate patches: about 1 % of distances were
  off by 100 %); float64 inputs stay float64.
* RsCIN clamps its window sizes to N, clamps negative similarities to 0 and maps constant scores to 0.
* ``norm_exponent`` > 0 (the ``musc`` config's 0.25, for CNN features) lets patch vectors keep part of their
  length, so mutual scoring measures Euclidean distances of vectors of any length (one GEMM on lifted vectors);
  0, the scorer's default, is the reference's unit vectors.
* Coarser layers are scored on their own grid and the *score maps* are upsampled bilinearly
  (align_corners=False) to the finest grid: mutual scoring costs O(L²) per image pair, so upsampling
  features first would multiply the cost by (area ratio)² for no gain in the reference setting,
  where all ViT layers share one grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, cast

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from anomaly.errors import ConfigError
from anomaly.scorers.base import Progress, ScoreOutput, Scorer
from anomaly.scorers.registry import register_scorer

__all__ = ["MuScScorer", "RollingPool", "lnamd", "msm_flops", "mutual_scores", "rscin"]

_MIB = 2**20
# On CPU, similarity tiles are sized to stay in cache while both maxima are read from them: with
# 2 AVX-512 cores (L=1024, C=152) a (1024×152)@(152×P·1024) product written out whole runs at
# ~130 GFLOP/s (memory bound), the same work in 8-16 MiB tiles at ~320 GFLOP/s (~270 with both
# reductions). Tiles scale with the thread count: every thread gets a cache-sized share, and each
# parallel region stays long enough to amortise its barrier (short regions collapse when the cores
# are oversubscribed). On CUDA one tile per block uses the whole budget.
_CPU_TILE_BYTES_PER_THREAD = 8 * _MIB
_CPU_TILE_ROWS = 512
_INDEX_BYTES = 8  # torch.topk returns int64 indices next to the values
_MIN_RESCORE = 10  # images that re-score the pool (``rescore``), at least


def lnamd(layer: torch.Tensor, r: int, norm_exponent: float = 0.0) -> torch.Tensor:
    """Local neighbourhood aggregation (§3.2): (N, C, h, w) -> patch vectors (N, h·w, C).

    Non-affine LayerNorm over the whole (C, h, w) map of each image (eps 1e-5), r×r zero-padded
    mean (count_include_pad, stride 1; r = 1 is the identity), then each patch vector x rescaled to
    length ‖x‖^norm_exponent: 0 is the reference's L2 normalisation (unit vectors, cosine geometry),
    1 keeps the aggregated features as they are (Euclidean), values between compress the lengths.
    """
    if layer.ndim != 4:
        raise ValueError(f"lnamd: expected a (N, C, h, w) tensor, got shape {tuple(layer.shape)}")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1 or r % 2 == 0:
        raise ValueError(f"lnamd: r must be a positive odd integer, got {r!r}")
    x = layer if layer.dtype in (torch.float32, torch.float64) else layer.float()
    x = F.layer_norm(x, x.shape[1:], eps=1e-5)
    if r > 1:
        x = F.avg_pool2d(x, r, stride=1, padding=(r - 1) // 2, count_include_pad=True)
    x = x.flatten(2).transpose(1, 2).contiguous()
    if norm_exponent == 0:
        return F.normalize(x, dim=-1)
    if norm_exponent == 1:
        return x
    length = x.norm(dim=-1, keepdim=True).clamp_(min=1e-12)  # F.normalize's eps
    return x * length.pow_(norm_exponent - 1)


def msm_flops(n: int, length: int, c: int, *, n_reference: int = 0, length_reference: int | None = None) -> int:
    """Useful floating-point operations of one full-mode :func:`mutual_scores` call.

    One (L×C)@(C×L') product, i.e. ``2·L·L'·C`` FLOPs, per unordered pair of scored images plus one
    per (scored image, reference image) pair. Chunked runs (budget smaller than the N×(N−1)×L minima)
    do more work than this; the count is what a benchmark should divide by.
    """
    length_ref = length if length_reference is None else length_reference
    return n * (n - 1) // 2 * 2 * length * length * c + n * n_reference * 2 * length * length_ref * c


def mutual_scores(
    Z: torch.Tensor,
    *,
    reference: torch.Tensor | None = None,
    interval: tuple[float, float] = (0.0, 0.3),
    memory_budget_mb: float = 512,
    aligned_window: int | None = None,
    grid: tuple[int, int] | None = None,
    exclude: Sequence[NDArray[np.int64]] | None = None,
) -> torch.Tensor:
    """Mutual scoring (§3.3) of N images of patch vectors ``Z`` (N, L, C) -> (N, L).

    For patch p of image i and every other image j (the other scored images and all ``reference``
    images (M, L', C), which are compared with but never scored), ``d(i,p;j) = min_q ‖z_ip − z_jq‖``
    (Euclidean: the vectors need not be unit length, see :func:`lnamd`);
    the score is the mean of the values ranked ``interval`` among the sorted ``n_others = N−1+M``
    minima (bounds < 1 are fractions of n_others, truncated; bounds ≥ 1 are counts; at least one term).

    ``aligned_window = w`` compares each patch only with the patches of a (2w+1)×(2w+1) window around
    the same position of the ``grid`` (h, w) in the other images (fixtured products).

    ``exclude[i]``: the images of ``Z`` that image i is not compared with (overlapping tiles of one frame, which
    share its pixels and would vouch for its defects); ``n_others`` is then N−1+M less the longest such list.

    Memory: the minima of a chunk of query images (Q, L, n_others) take at most half of
    ``memory_budget_mb``, similarity tiles or top-k outputs the other half (estimate excludes the
    lifted compute-dtype copy of the inputs, C + 2 columns, and BLAS workspace); the floor is one query patch (aligned
    mode: one grid row) against one image. When all N images fit in one chunk, each unordered pair
    costs one product; pairs across chunks cost one per direction. Results do not depend on the budget.
    """
    n, length, c = _check_tokens(Z, "Z")
    m = 0
    if reference is not None:
        m, length_ref, c_ref = _check_tokens(reference, "reference")
        if c_ref != c:
            raise ValueError(f"mutual_scores: reference has {c_ref} channels, Z has {c}")
        if reference.device != Z.device:
            raise ValueError(f"mutual_scores: reference is on {reference.device}, Z on {Z.device}")
        if aligned_window is not None and length_ref != length:
            raise ValueError("mutual_scores: aligned mode needs references on the same grid as Z")
    n_others = n - 1 + m
    if n < 1 or n_others < 1:
        raise ValueError(f"mutual_scores: needs at least 2 images, or 1 image and reference images (got N={n}, M={m})")
    skipped = _checked_exclude(exclude, n)
    compared = n_others - max((len(x) for x in skipped.values()), default=0)
    if compared < 1:
        raise ValueError("mutual_scores: exclude leaves an image nothing to be compared with")
    lo, hi = _interval_bounds(interval, compared)
    if not memory_budget_mb > 0:
        raise ValueError(f"mutual_scores: memory_budget_mb must be > 0, got {memory_budget_mb}")
    if aligned_window is not None:
        if isinstance(aligned_window, bool) or not isinstance(aligned_window, int) or aligned_window < 0:
            raise ValueError(f"mutual_scores: aligned_window must be an integer >= 0, got {aligned_window!r}")
        if grid is None or len(grid) != 2 or grid[0] * grid[1] != length:
            raise ValueError(f"mutual_scores: aligned mode needs grid=(h, w) with h*w == L={length}, got {grid}")

    dtype = _compute_dtype(Z)
    # the patches carry their squared lengths in two extra columns (swapped for the query), so that one
    # product gives −d²/2 = z·z' − ‖z‖²/2 − ‖z'‖²/2 in both directions (see _lifted)
    z = _lifted(Z, dtype)
    ref = None if reference is None else _lifted(reference, dtype)
    buf_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    plan = _plan(
        n=n,
        length=length,
        length_other=length if ref is None else max(length, ref.shape[1]),
        c=c + 2,
        n_others=n_others,
        top=hi,
        elem=z.element_size(),
        buf_elem=torch.finfo(buf_dtype).bits // 8,
        budget=int(memory_budget_mb * _MIB),
        window=aligned_window,
        width=None if grid is None else grid[1],
        cpu=z.device.type == "cpu",
    )
    out = torch.empty(n, length, dtype=buf_dtype, device=z.device)
    for a0 in range(0, n, plan.chunk):
        a1 = min(n, a0 + plan.chunk)
        for p0 in range(0, length, plan.rows):
            p1 = min(length, p0 + plan.rows)
            # Whole images queried: one product per unordered pair inside the chunk serves both
            # directions (row maxima for i vs j, column maxima for j vs i). Images outside the
            # chunk are compared one way: their own minima rows are not alive to receive the other.
            symmetric = p1 - p0 == length
            # buf[i - a0, p, slot(j)] = max_q −‖z_ip − z_jq‖²/2; every slot is written exactly once.
            buf = torch.empty(a1 - a0, p1 - p0, n_others, dtype=buf_dtype, device=z.device)
            work = z.new_empty(plan.tile_rows * plan.block * plan.length_other) if aligned_window is None else None
            for i in range(a0, a1):
                q = _as_query(z[i, p0:p1])
                ranges = [(i + 1, a1, True)] if symmetric else [(a0, i, False), (i + 1, a1, False)]
                ranges += [(0, a0, False), (a1, n, False)]
                for j0, j1, both in ranges:
                    for b0 in range(j0, j1, plan.block):
                        b1 = min(j1, b0 + plan.block)
                        fwd, rev = _block(q, p0, z[b0:b1], both, plan, work, aligned_window, grid)
                        s0 = b0 if b0 < i else b0 - 1  # slot of image j in row i: j, or j−1 after i
                        buf[i - a0, :, s0 : s0 + b1 - b0] = fwd
                        if rev is not None:  # i < j, so i's slot in row j is i
                            buf[b0 - a0 : b1 - a0, :, i] = rev
                if ref is not None:
                    for b0 in range(0, m, plan.block):
                        b1 = min(m, b0 + plan.block)
                        fwd, _ = _block(q, p0, ref[b0:b1], False, plan, work, aligned_window, grid)
                        buf[i - a0, :, n - 1 + b0 : n - 1 + b1] = fwd
            del work  # the top-k outputs reuse the blocks' share of the budget
            for i in range(a0, a1):  # excluded images rank last: at most n_others − compared per row, past hi
                if i in skipped:
                    slots = skipped[i] - (skipped[i] > i)
                    buf[i - a0, :, torch.from_numpy(slots).to(buf.device)] = -math.inf
            out[a0:a1, p0:p1] = _interval_mean(buf, lo, hi, plan.reduce_rows)
            del buf  # free before the next chunk's buffer is allocated
    return out


@dataclass(frozen=True)
class _Plan:
    """Block sizes of one mutual_scores call (see :func:`_plan`)."""

    chunk: int  # query images whose minima buffers are alive together
    rows: int  # query patches per buffer (L unless one image's buffer exceeds the budget)
    block: int  # other images per kernel call
    tile_rows: int  # query patches per similarity tile (full mode)
    length_other: int  # patches per other image (max of Z's and the references')
    reduce_rows: int  # buffer rows per top-k call (bounds its value + index outputs)
    peak_bytes: int  # estimated extra memory


def _plan(
    *,
    n: int,
    length: int,
    length_other: int,
    c: int,
    n_others: int,
    top: int,
    elem: int,
    buf_elem: int,
    budget: int,
    window: int | None,
    width: int | None,
    cpu: bool,
) -> _Plan:
    """Split the budget: half for the minima buffer, half for the blocks (or the top-k outputs)."""
    half = max(1, budget // 2)
    unit = 1 if window is None else int(width or 1)  # aligned mode slices whole grid rows

    def fit(max_rows: int) -> int:
        return min(length, max(unit, max_rows // unit * unit))

    rows = length
    if rows * n_others * buf_elem > half:
        rows = fit(half // (n_others * buf_elem))
    if window is None:
        # per other image: tile, row maxima, column maxima (running and per tile), and the copy of
        # the image that the GEMM packs; on CPU the tile itself is also capped to stay in cache
        fixed = rows + (2 + c) * length_other
        tile_rows = min(rows, _CPU_TILE_ROWS) if cpu else rows
        block = half // ((tile_rows * length_other + fixed) * elem)
        cache = _CPU_TILE_BYTES_PER_THREAD * torch.get_num_threads()
        if cpu:
            block = min(block, cache // (tile_rows * length_other * elem))
        if block == 0:
            block = 1
            tile_rows = max(1, min(rows, (half // elem - fixed) // length_other))
            if cpu:
                tile_rows = max(1, min(tile_rows, cache // (length_other * elem)))
        work = block * (tile_rows * length_other + fixed) * elem
    else:
        if rows * c * elem > half:
            rows = fit(half // (c * elem))
        tile_rows = rows
        # product temp, similarity map and its maximum, forward and reverse maxima per other image
        per_image = (rows * c + 3 * rows + 2 * length_other) * elem
        block = max(1, half // per_image)
        work = block * per_image
    block = min(block, max(1, n_others))
    chunk = min(n, max(1, half // (rows * n_others * buf_elem))) if rows == length else 1
    buffer = chunk * rows * n_others * buf_elem
    per_row = top * (2 * buf_elem + _INDEX_BYTES)  # top-k values and indices, distances
    reduce_rows = max(1, half // per_row)
    topk = min(chunk * rows, reduce_rows) * per_row
    return _Plan(chunk, rows, block, tile_rows, length_other, reduce_rows, buffer + max(work, topk))


def _checked_exclude(exclude: Sequence[NDArray[np.int64]] | None, n: int) -> dict[int, NDArray[np.int64]]:
    """``exclude`` as {image: sorted unique others} for the images that have any; checked against N."""
    if exclude is None:
        return {}
    if len(exclude) != n:
        raise ValueError(f"mutual_scores: exclude has {len(exclude)} entries for {n} images")
    out = {}
    for i, others in enumerate(exclude):
        others = np.unique(np.asarray(others, dtype=np.int64))
        if len(others) and (others[0] < 0 or others[-1] >= n or i in others):
            raise ValueError(f"mutual_scores: exclude[{i}] must name other images of Z (0..{n - 1})")
        if len(others):
            out[i] = others
    return out


def _block(
    q: torch.Tensor,
    p0: int,
    others: torch.Tensor,
    both: bool,
    plan: _Plan,
    work: torch.Tensor | None,
    window: int | None,
    grid: tuple[int, int] | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Query patches p0.. of one image (Lq, C) vs P images: (Lq, P) and, if ``both``, (P, L') maxima."""
    if window is None:
        assert work is not None
        return _full_block(q, others, both, plan.tile_rows, work)
    assert grid is not None
    return _aligned_block(q, p0 // grid[1], others, both, grid, window)


def _full_block(
    q: torch.Tensor, others: torch.Tensor, both: bool, tile_rows: int, work: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Max similarities of query patches q (Lq, C) against P images (P, L', C).

    Returns (Lq, P) row maxima and, if ``both``, (P, L') column maxima. No library computes
    nearest-patch similarities per image pair under a memory budget (cdist/FAISS return the full
    matrix or a global top-k), hence this kernel: one GEMM against P images at once, reduced tile
    by tile while the tile is still in cache.
    """
    p, length_ref, c = others.shape
    flat = others.reshape(p * length_ref, c).T
    fwd = q.new_empty(q.shape[0], p)
    rev = q.new_full((p, length_ref), -math.inf) if both else None
    for r0 in range(0, q.shape[0], tile_rows):
        part = q[r0 : r0 + tile_rows]
        k = part.shape[0]
        sim = torch.mm(part, flat, out=work[: k * p * length_ref].view(k, p * length_ref)).view(k, p, length_ref)
        torch.amax(sim, dim=2, out=fwd[r0 : r0 + k])
        if rev is not None:
            torch.maximum(rev, sim.amax(dim=0), out=rev)
    return fwd, rev


def _aligned_block(
    q: torch.Tensor, y0: int, others: torch.Tensor, both: bool, grid: tuple[int, int], window: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Windowed max similarities: query grid rows starting at y0 (Lq = rows·w, C) vs (P, h·w, C).

    Each patch-pair product is computed once per window offset and feeds both directions: patch
    p of i meets p+o of j, i.e. patch p+o of j meets p of i.
    """
    h, w = grid
    p, _, c = others.shape
    ry = q.shape[0] // w
    qg = q.view(ry, w, c)
    og = others.view(p, h, w, c)
    fwd = q.new_full((p, ry, w), -math.inf)
    rev = q.new_full((p, h, w), -math.inf) if both else None
    wy, wx = min(window, h - 1), min(window, w - 1)
    for dy in range(-wy, wy + 1):
        ya, yb = max(y0, -dy), min(y0 + ry, h - dy)  # query rows whose partner row is on the grid
        if ya >= yb:
            continue
        for dx in range(-wx, wx + 1):
            xa, xb = max(0, -dx), min(w, w - dx)
            sim = (qg[ya - y0 : yb - y0, xa:xb] * og[:, ya + dy : yb + dy, xa + dx : xb + dx]).sum(-1)
            f = fwd[:, ya - y0 : yb - y0, xa:xb]
            f.copy_(torch.maximum(f, sim))
            if rev is not None:
                r = rev[:, ya + dy : yb + dy, xa + dx : xb + dx]
                r.copy_(torch.maximum(r, sim))
    return fwd.view(p, -1).T, None if rev is None else rev.view(p, -1)


def _lifted(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, L, C) -> (N, L, C + 2): ``[x, 1, −‖x‖²/2]``, the patches as the kernel meets them.

    A query lifted the other way round, ``[x, −‖x‖²/2, 1]`` (:func:`_as_query`), has the product
    −‖x − x'‖²/2 with each of them, the negative half squared distance: the kernel's maxima are the
    nearest patches for vectors of any length, and for unit vectors the cosine similarity minus 1.
    """
    x = x.to(dtype)
    half = x.pow(2).sum(dim=-1, keepdim=True).mul_(-0.5)
    return torch.cat([x, torch.ones_like(half), half], dim=-1).contiguous()


def _as_query(lifted: torch.Tensor) -> torch.Tensor:
    """Query patches (Lq, C + 2) of :func:`_lifted`: a copy with the two extra columns swapped."""
    return torch.cat([lifted[:, :-2], lifted[:, -1:], lifted[:, -2:-1]], dim=1)


def _interval_mean(buf: torch.Tensor, lo: int, hi: int, reduce_rows: int) -> torch.Tensor:
    """Mean distance of ranks lo+1..hi (nearest first) from maxima of −d²/2 (Q, Lq, n_others)."""
    sims = buf.view(-1, buf.shape[-1])
    out = torch.empty(sims.shape[0], dtype=buf.dtype, device=buf.device)
    for r0 in range(0, sims.shape[0], reduce_rows):
        top = torch.topk(sims[r0 : r0 + reduce_rows], hi, dim=-1, largest=True, sorted=True).values[:, lo:hi]
        out[r0 : r0 + reduce_rows] = top.mul(-2.0).clamp_(min=0.0).sqrt_().mean(dim=-1)
    return out.view(buf.shape[:2])


def _interval_bounds(interval: Sequence[float], n_others: int) -> tuple[int, int]:
    """Ranks [lo, hi) of the sorted minima to average; at least one (deviation from NaN, §3.3)."""
    if len(interval) != 2 or not all(math.isfinite(b) and b >= 0 for b in interval):
        raise ValueError(f"interval must be two finite numbers >= 0, got {interval!r}")
    lo, hi = sorted(int(b * n_others) if b < 1 else int(b) for b in interval)
    hi = min(max(hi, lo + 1), n_others)
    return min(lo, hi - 1), hi


def _check_tokens(x: torch.Tensor, what: str) -> tuple[int, int, int]:
    if not isinstance(x, torch.Tensor) or x.ndim != 3 or not x.is_floating_point():
        raise ValueError(f"mutual_scores: {what} must be a floating (N, L, C) tensor")
    n, length, c = x.shape
    if length < 1 or c < 1:
        raise ValueError(f"mutual_scores: {what} has an empty dimension: {tuple(x.shape)}")
    return n, length, c


def _compute_dtype(z: torch.Tensor) -> torch.dtype:
    """float64 stays float64, everything else float32 (float16 loses near-duplicate distances)."""
    return torch.float64 if z.dtype == torch.float64 else torch.float32


def rscin(
    scores: torch.Tensor | NDArray[np.floating],
    embeddings: torch.Tensor | NDArray[np.floating],
    k_list: Sequence[int] = (1, 2, 3),
    *,
    clamp_negative: bool = True,
) -> NDArray[np.float64]:
    """Re-scoring with constrained image-level neighbourhood (§3.4), in float64.

    Min-max normalised scores are averaged over each image's k most similar images (itself
    included), weighted by similarity, and the results are averaged over ``k_list``. Deviations:
    k is clamped to N, constant scores give zeros and negative similarities are clamped to 0
    (``clamp_negative=False`` keeps them, as the reference does).
    """
    s = torch.as_tensor(scores).detach().to("cpu", torch.float64)
    e = torch.as_tensor(embeddings).detach().to("cpu", torch.float64)
    if s.ndim != 1 or s.numel() < 1:
        raise ValueError(f"rscin: scores must be a non-empty (N,) vector, got shape {tuple(s.shape)}")
    if e.ndim != 2 or e.shape[0] != s.shape[0]:
        raise ValueError(f"rscin: embeddings must be (N={s.shape[0]}, D), got shape {tuple(e.shape)}")
    ks = list(k_list)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"rscin: k_list must be non-empty positive integers, got {k_list!r}")
    n = s.shape[0]
    span = s.max() - s.min()
    s_hat = (s - s.min()) / span if span > 0 else torch.zeros_like(s)
    sim = e @ e.T
    if clamp_negative:
        sim = sim.clamp(min=0.0)
    total = torch.zeros_like(s)
    for k in ks:
        top = torch.topk(sim, min(k, n), dim=1)
        w = torch.zeros_like(sim).scatter_(1, top.indices, top.values)
        norm = w.sum(dim=1)
        total += torch.where(norm != 0, (w @ s_hat) / torch.where(norm != 0, norm, 1.0), s_hat)
    return (total / len(ks)).numpy()


@register_scorer
class MuScScorer(Scorer):
    """MuSc zero-shot scorer: every image of the batch is scored against all the others.

    ``score(layers)`` takes per-layer maps (N, C_l, h_l, w_l) of the whole unlabeled set (no fit).
    Per aggregation degree r and layer: :func:`lnamd`, :func:`mutual_scores`, bilinear upsampling
    of the score map to the finest grid; maps are averaged over layers, then over r. Image score =
    max of the map, re-scored by :func:`rscin` when class-token ``embeddings`` are given (on the
    peaks' own scale: RsCIN's 0..1 output is mapped back onto their range). ``map_layers``: the
    indices of the layers whose average is the returned anomaly map (None: all); the image score
    always comes from all layers, so a coarse layer can judge images without blurring the maps.
    ``aligned_window`` is counted in cells of each layer's own grid. ``augment_references`` asks
    the detector to add rotated and flipped views of few-shot references (VisionAD-style);
    ``augment_queries`` to score the pool a second time mirrored left-right and average the maps and
    image scores (query augmentation; twice the time). ``rescore``: the share of the pool (10 images at least)
    with the lowest image scores that scores every image a second time, alone, so that defects recurring in the
    pool cannot vouch for each other; the image score averages both passes (min-max normalised, on the first
    pass's range), the maps stay the first pass's. Few-shot references that join the batch as images (as in the
    Detector's pools) take part in it; images given as ``reference=`` (compared with, never scored) turn it off.
    ``max_pool``: a pool of more images is split into seeded random groups of at most this many, each
    scored as a pool of its own (with every ``reference=`` and ``shared`` image), so the time grows
    linearly with the pool instead of with its square; None scores any pool whole. ``norm_exponent``: patch vectors keep
    ‖x‖^norm_exponent of their length (:func:`lnamd`): 0 compares directions only (the paper's unit
    vectors), 1 the aggregated CNN features as they are, whose length also tells a patch's contrast.
    """

    name: ClassVar[str] = "musc"
    requires_fit: ClassVar[bool] = False
    uses_references: ClassVar[bool] = True
    uses_embeddings: ClassVar[bool] = True

    def __init__(
        self,
        *,
        r_list: Sequence[int] = (1, 3, 5),
        interval: tuple[float, float] = (0.0, 0.3),
        rscin_k: Sequence[int] | None = (1, 2, 3),
        memory_budget_mb: float = 512,
        aligned_window: int | None = None,
        augment_references: bool = False,
        augment_queries: bool = False,
        map_layers: Sequence[int] | None = None,
        rescore: float | None = None,
        max_pool: int | None = None,
        norm_exponent: float = 0.0,
    ) -> None:
        if not r_list or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 or r % 2 == 0 for r in r_list):
            raise ConfigError(f"scorer.params.r_list must be positive odd integers, got {r_list!r}")
        try:
            _interval_bounds(interval, 10)
        except (TypeError, ValueError):
            raise ConfigError(f"scorer.params.interval must be two finite numbers >= 0, got {interval!r}") from None
        if rscin_k and any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in rscin_k):
            raise ConfigError(f"scorer.params.rscin_k must be positive integers, got {rscin_k!r}")
        if not (isinstance(memory_budget_mb, (int, float)) and memory_budget_mb > 0):
            raise ConfigError(f"scorer.params.memory_budget_mb must be > 0, got {memory_budget_mb!r}")
        if aligned_window is not None and (
            isinstance(aligned_window, bool) or not isinstance(aligned_window, int) or aligned_window < 0
        ):
            raise ConfigError(f"scorer.params.aligned_window must be None or an integer >= 0, got {aligned_window!r}")
        if map_layers is not None and (
            not map_layers
            or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in map_layers)
            or len(set(map_layers)) != len(map_layers)
        ):
            raise ConfigError(
                f"scorer.params.map_layers must be None or distinct layer indices >= 0, got {map_layers!r}"
            )
        if rescore is not None and (
            isinstance(rescore, bool) or not isinstance(rescore, (int, float)) or not 0 < rescore < 1
        ):
            raise ConfigError(f"scorer.params.rescore must be None or a share of the pool in (0, 1), got {rescore!r}")
        # groups are split evenly: allowing 3 or more per group leaves none of a single image (nothing to score it by)
        if max_pool is not None and (isinstance(max_pool, bool) or not isinstance(max_pool, int) or max_pool < 3):
            raise ConfigError(f"scorer.params.max_pool must be None or an integer >= 3, got {max_pool!r}")
        exponent_ok = isinstance(norm_exponent, (int, float)) and not isinstance(norm_exponent, bool)
        if not exponent_ok or not 0 <= norm_exponent <= 1:
            raise ConfigError(f"scorer.params.norm_exponent must be a number in [0, 1], got {norm_exponent!r}")
        for key, value in (("augment_references", augment_references), ("augment_queries", augment_queries)):
            if not isinstance(value, bool):
                raise ConfigError(f"scorer.params.{key} must be true or false, got {value!r}")
        self.r_list = tuple(r_list)
        self.interval = cast("tuple[float, float]", tuple(interval))  # two numbers (checked above)
        self.rscin_k = tuple(rscin_k) if rscin_k else None
        self.memory_budget_mb = memory_budget_mb
        self.aligned_window = aligned_window
        self.augment_references = augment_references
        self.augment_queries = augment_queries
        self.map_layers = None if map_layers is None else tuple(map_layers)
        self.rescore = rescore
        self.max_pool = max_pool
        self.norm_exponent = norm_exponent
        self.image_score_from_map = not self.rscin_k and map_layers is None  # RsCIN re-scores images

    def check_layer_count(self, n_layers: int) -> None:
        """``map_layers`` must name layers among the ``n_layers`` given."""
        if self.map_layers is not None and max(self.map_layers) >= n_layers:
            raise ConfigError(
                f"scorer.params.map_layers {list(self.map_layers)} name layers beyond the backbone's {n_layers}"
            )

    def fit(self, layers: list[torch.Tensor], *, progress: Progress | None = None) -> MuScScorer:
        """Nothing to learn (zero-shot); returns self."""
        return self

    def score(
        self,
        layers: list[torch.Tensor],
        *,
        reference: list[torch.Tensor] | None = None,
        embeddings: torch.Tensor | None = None,
        progress: Progress | None = None,
        shared: int = 0,
        exclude: Sequence[NDArray[np.int64]] | None = None,
    ) -> ScoreOutput:
        """Score the N images of ``layers`` against each other and the ``reference`` images.

        ``reference``: per-layer maps (M, C_l, h_l, w_l) compared with but not scored.
        ``embeddings``: (N, D) class tokens for RsCIN. ``progress(done, total)`` after each
        (r, layer) step. ``shared``: the first ``shared`` images (few-shot references scored with the
        pool) join every group of a pool split by ``max_pool`` (see :meth:`_score_in_groups`). ``exclude[i]``: the
        images that image i is not compared with (see :func:`mutual_scores`).
        """
        _check_layers(layers, reference)
        self.check_layer_count(len(layers))
        n = layers[0].shape[0]
        if not 0 <= shared <= n:
            raise ValueError(f"shared must be in [0, {n}], got {shared}")
        if self.max_pool is not None and n > self.max_pool:
            return self._score_in_groups(layers, reference, embeddings, progress, shared, exclude)
        chosen_count = 0 if self.rescore is None or reference is not None else max(_MIN_RESCORE, int(self.rescore * n))
        passes = 2 if 0 < chosen_count < n else 1
        steps = [0, passes * len(self.r_list) * len(layers)]

        def tick() -> None:
            steps[0] += 1
            if progress is not None:
                progress(*steps)

        fused, fused_map = self._fused(layers, reference, None, tick, exclude)
        maps = fused_map.squeeze(1).cpu().numpy()
        image_scores = self._image_scores(fused, embeddings)
        if passes == 2:
            chosen = _bank(np.argsort(image_scores, kind="stable"), chosen_count, exclude)
            second = self._image_scores(self._fused(layers, reference, chosen, tick, exclude)[0], embeddings)
            low, span = float(image_scores.min()), float(np.ptp(image_scores))
            image_scores = low + span * (_unit_range(image_scores) + _unit_range(second)) / 2
        return ScoreOutput(patch_maps=maps, image_scores=image_scores)

    def _score_in_groups(
        self,
        layers: list[torch.Tensor],
        reference: list[torch.Tensor] | None,
        embeddings: torch.Tensor | None,
        progress: Progress | None,
        shared: int = 0,
        exclude: Sequence[NDArray[np.int64]] | None = None,
    ) -> ScoreOutput:
        """:meth:`score` on seeded random groups of at most ``max_pool`` images, reassembled in input order.

        Each group's image scores keep its own peaks' scale (RsCIN and ``rescore`` map back onto it); groups
        drawn at random from one pool share that scale, so one pool threshold serves all of them. The draw
        follows the images' content (:func:`_content_order`), not their input order: a pool passed in another
        order is split into the same groups and gets the same scores. The first ``shared`` images join every
        group, so that each has the same normal anchor (their scores and maps: the mean over the groups); up to
        half of ``max_pool`` of them, beyond which they are drawn into the groups like the others. With ``exclude``, a
        group that leaves an image only images it excludes joins the next one (:func:`_partnered`).
        """
        assert self.max_pool is not None
        n = layers[0].shape[0]
        keep = shared if shared <= self.max_pool // 2 else 0
        rest = _content_order([x[keep:] for x in layers]) + keep
        draw = rest[np.random.default_rng(0).permutation(n - keep)]
        groups = np.array_split(draw, math.ceil((n - keep) / (self.max_pool - keep)))
        if exclude is not None:
            groups = _partnered(groups, keep, exclude)
        whole = MuScScorer(**{**self.get_params(), "max_pool": None})
        maps: NDArray[np.float32] | None = None
        scores = np.zeros(n, dtype=np.float64)
        for g, group in enumerate(groups):
            members = np.r_[np.arange(keep), np.sort(group)]
            picked = torch.from_numpy(members).to(layers[0].device)

            def tick(done: int, total: int, g: int = g) -> None:
                if progress is not None:
                    progress(g * total + done, len(groups) * total)

            out = whole.score(
                [x[picked] for x in layers],
                reference=reference,
                embeddings=None if embeddings is None else embeddings[picked.to(embeddings.device)],
                progress=tick,
                exclude=_restricted(exclude, members),
            )
            assert out.patch_maps is not None
            if maps is None:
                maps = np.zeros((n, *out.patch_maps.shape[1:]), dtype=out.patch_maps.dtype)
            maps[members[keep:]] = out.patch_maps[keep:]
            scores[members[keep:]] = out.image_scores[keep:]
            maps[:keep] += out.patch_maps[:keep] / len(groups)
            scores[:keep] += out.image_scores[:keep] / len(groups)
        return ScoreOutput(patch_maps=maps, image_scores=scores)

    def _fused(
        self,
        layers: list[torch.Tensor],
        reference: list[torch.Tensor] | None,
        chosen: NDArray[np.int64] | None,
        tick: Callable[[], None],
        exclude: Sequence[NDArray[np.int64]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Score maps (N, 1, h, w) on the finest grid averaged over all layers and over ``map_layers``.

        ``chosen`` (pools scored without ``reference``): score every image against those images alone, not the whole
        pool.
        """
        in_map = range(len(layers)) if self.map_layers is None else self.map_layers
        n = layers[0].shape[0]
        finest = max(range(len(layers)), key=lambda i: layers[i].shape[2] * layers[i].shape[3])
        size = tuple(layers[finest].shape[2:])
        fused = torch.zeros(n, 1, *size, dtype=torch.float32, device=layers[0].device)
        fused_map = torch.zeros_like(fused) if self.map_layers is not None else fused
        for r in self.r_list:
            for li, layer in enumerate(layers):
                grid = (layer.shape[2], layer.shape[3])
                ref = None if reference is None else lnamd(reference[li], r, self.norm_exponent)
                tokens = lnamd(layer, r, self.norm_exponent)
                if chosen is None:
                    s = self._mutual(tokens, ref, grid, exclude)
                else:
                    s = self._against_chosen(tokens, grid, chosen, exclude)
                s = s.float().view(n, 1, *grid)
                if grid != size:
                    s = F.interpolate(s, size=size, mode="bilinear", align_corners=False)
                fused += s
                if fused_map is not fused and li in in_map:
                    fused_map += s
                tick()
        total = len(self.r_list) * len(layers)
        return fused / total, fused_map / (len(self.r_list) * len(in_map))

    def _mutual(
        self,
        tokens: torch.Tensor,
        ref: torch.Tensor | None,
        grid: tuple[int, int],
        exclude: Sequence[NDArray[np.int64]] | None = None,
        interval: tuple[float, float] | None = None,
    ) -> torch.Tensor:
        return mutual_scores(
            tokens,
            reference=ref,
            interval=self.interval if interval is None else interval,
            memory_budget_mb=self.memory_budget_mb,
            aligned_window=self.aligned_window,
            grid=grid,
            exclude=exclude,
        )

    def _against_chosen(
        self,
        tokens: torch.Tensor,
        grid: tuple[int, int],
        chosen: NDArray[np.int64],
        exclude: Sequence[NDArray[np.int64]] | None,
    ) -> torch.Tensor:
        """Scores (N, L) of every image against the ``chosen`` images alone (they score each other).

        ``exclude``: an image's excluded images leave its bank, and, as in :func:`mutual_scores`, every other image
        averages the ranks of ``interval`` among as many of the chosen as the one with the most excluded keeps.
        """
        picked = torch.from_numpy(chosen).to(tokens.device)
        out = torch.empty(tokens.shape[:2], dtype=torch.float32, device=tokens.device)
        out[picked] = self._mutual(tokens[picked], None, grid, _restricted(exclude, chosen)).float()
        bank = tokens[picked]
        rest = np.setdiff1d(np.arange(len(tokens)), chosen).tolist()
        kept = {} if exclude is None else {i: np.flatnonzero(~np.isin(chosen, exclude[i])) for i in rest}
        interval = None
        if kept:
            compared = min(len(k) for k in kept.values())
            if compared < 1:
                raise ValueError("musc: exclude leaves an image none of the chosen images to be compared with")
            interval = _interval_bounds(self.interval, compared)  # ranks as counts, the same for every image
        for i in rest:
            mine = bank
            if i in kept and len(kept[i]) < len(chosen):  # its overlapping tiles leave the bank
                mine = bank[torch.from_numpy(kept[i]).to(bank.device)]
            out[i] = self._mutual(tokens[i : i + 1], mine, grid, interval=interval).float()[0]
        return out

    def _image_scores(self, fused: torch.Tensor, embeddings: torch.Tensor | None) -> NDArray[np.float64]:
        """Peak of each fused map, re-scored by RsCIN when ``embeddings`` are given."""
        image_scores = fused.reshape(fused.shape[0], -1).amax(dim=1).cpu().numpy().astype(np.float64)
        if embeddings is not None and self.rscin_k:
            # RsCIN works on min-max normalised scores; mapping them back onto the peaks' range (affine, the
            # ranking is unchanged) keeps the pool's absolute scale, which the pool threshold needs (a pool of
            # normal images alone would otherwise span 0..1 like any other): benchmarks/README.md section 6, round 11.
            low, span = float(image_scores.min()), float(np.ptp(image_scores))
            image_scores = low + span * rscin(image_scores, embeddings, self.rscin_k)
        return image_scores

    def state_dict(self) -> dict[str, np.ndarray]:
        """No learned state."""
        return {}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """No learned state: nothing to restore."""


def _restricted(
    exclude: Sequence[NDArray[np.int64]] | None, members: NDArray[np.int64]
) -> list[NDArray[np.int64]] | None:
    """``exclude`` among ``members`` alone (sorted indices), renumbered as positions in ``members``."""
    if exclude is None:
        return None
    return [np.searchsorted(members, np.intersect1d(exclude[m], members)) for m in members]


def _has_partners(members: NDArray[np.int64], exclude: Sequence[NDArray[np.int64]]) -> bool:
    """Whether each of ``members`` has another member that it does not exclude."""
    return all(len(members) - 1 > np.isin(members, exclude[m]).sum() for m in members.tolist())


def _bank(order: NDArray[np.int64], count: int, exclude: Sequence[NDArray[np.int64]] | None) -> NDArray[np.int64]:
    """The images that re-score the pool (sorted): the first ``count`` of ``order`` (lowest first-pass scores first),
    and the next ones of ``order`` while an image (chosen or not) has none of them but the images it excludes (a
    frame's overlapping tiles among the lowest): it would be left nothing to be compared with."""
    if exclude is not None:
        unique = [np.unique(np.asarray(e, dtype=np.int64)) for e in exclude]
        lists = [(i, e) for i, e in enumerate(unique) if len(e)]
        inside = np.zeros(len(order), dtype=bool)
        inside[order[:count]] = True
        while count < len(order) and any(count - inside[i] - inside[e].sum() < 1 for i, e in lists):
            inside[order[count]] = True
            count += 1
    return np.sort(order[:count])


def _partnered(
    groups: list[NDArray[np.int64]], keep: int, exclude: Sequence[NDArray[np.int64]]
) -> list[NDArray[np.int64]]:
    """``groups`` of a split pool (each scored with the first ``keep`` images), where a group that leaves an image
    nothing but the images it excludes (a frame's overlapping tiles drawn together) joins the next (the last the one
    before it): mutual scoring would have nothing to compare that image with."""
    out = list(groups)
    g = 0
    while g < len(out):
        if len(out) > 1 and not _has_partners(np.r_[np.arange(keep), np.sort(out[g])], exclude):
            a, b = (g, g + 1) if g + 1 < len(out) else (g - 1, g)
            out[a] = np.concatenate([out[a], out[b]])
            del out[b]
            g = a
            continue
        g += 1
    return out


def _content_order(layers: list[torch.Tensor]) -> NDArray[np.int64]:
    """The images of ``layers`` sorted by the mean of their features in the first layer (then the next ones): an
    order of the pool that does not depend on the order it was passed in (copies of one image may trade places)."""
    means = [x.detach().flatten(1).double().mean(dim=1).cpu().numpy() for x in layers]
    return np.lexsort(means[::-1]).astype(np.int64)


def _unit_range(x: NDArray[np.float64]) -> NDArray[np.float64]:
    span = float(np.ptp(x))
    return (x - x.min()) / span if span > 0 else np.zeros_like(x)


def _check_layers(layers: list[torch.Tensor], reference: list[torch.Tensor] | None) -> None:
    if not layers or any(x.ndim != 4 for x in layers):
        raise ValueError("musc: layers must be a non-empty list of (N, C, h, w) tensors")
    if len({x.shape[0] for x in layers}) != 1:
        raise ValueError(f"musc: layers disagree on N: {[x.shape[0] for x in layers]}")
    if reference is None:
        return
    if len(reference) != len(layers):
        raise ValueError(f"musc: {len(reference)} reference layers for {len(layers)} layers")
    for x, ref in zip(layers, reference):
        if ref.ndim != 4 or ref.shape[1:] != x.shape[1:]:
            raise ValueError(f"musc: reference layer {tuple(ref.shape)} does not match layer {tuple(x.shape)}")
    if len({x.shape[0] for x in reference}) != 1:
        raise ValueError("musc: reference layers disagree on the number of images")


class RollingPool:
    """Streaming MuSc: score each new image (or batch) against the most recent ``size`` images added.

    The pool holds raw per-layer features of the last ``size`` images passed to :meth:`add`; fixed
    ``reference`` images are always part of it. :meth:`score` scores a batch mutually and against the
    pool without changing it, so the caller decides which images join (``StreamingDetector`` keeps
    flagged ones out). RsCIN and ``rescore`` are not applied (they need the whole set). Scoring needs
    two images in all: batch, pool and references together.
    """

    def __init__(self, scorer: MuScScorer, size: int, *, reference: list[torch.Tensor] | None = None) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"RollingPool: size must be an integer >= 0, got {size!r}")
        self.scorer = scorer if scorer.rescore is None else MuScScorer(**{**scorer.get_params(), "rescore": None})
        self.size = size
        self.reference = reference
        self._pool: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return 0 if self._pool is None else self._pool[0].shape[0]

    def score(self, layers: list[torch.Tensor], *, progress: Progress | None = None) -> ScoreOutput:
        """Score ``layers`` (per-layer (B, C_l, h_l, w_l)) against each other, the pool and the references."""
        parts = [p for p in (self._pool, self.reference) if p is not None]
        reference = [torch.cat(per_layer) for per_layer in zip(*parts)] if parts else None
        return self.scorer.score(layers, reference=reference, progress=progress)

    def add(self, layers: list[torch.Tensor]) -> None:
        """Append images (per-layer (B, C_l, h_l, w_l)) to the pool, dropping the oldest beyond ``size``."""
        if self.size == 0 or layers[0].shape[0] == 0:
            return
        new = [x.detach() for x in layers]
        if self._pool is not None:
            new = [torch.cat([p, x]) for p, x in zip(self._pool, new)]
        self._pool = [x[-self.size :].clone() for x in new]
