"""Anomaly maps -> anomaly regions: binarisation (per image, or MEBin over a shared range) and components.

``scale="per_image"`` (the default) binarises each map half way between its own median and maximum,
so each image's defect is cut at the same relative height whatever its strength, and zero-shot pool
maps, whose levels are relative to their pool, work alike. ``scale="shared"`` is MEBin (AnomalyNCD,
CVPR 2025): a threshold swept from the highest map value down over a range shared by all maps, the
connected components counted after an erosion; the count that stays constant over the longest run of
thresholds is taken as the number of defects, and the lowest threshold of that run binarises the map.
With images clustered on pooled descriptors, ``per_image`` met AnomalyNCD's NMI and F1 on 4 of 6 map
sets against 1 of 6 for ``shared`` (benchmarks/README.md section 8). Maps are processed at a working size
(longest side ``WORK_SIDE``) for speed, and regions keep their masks at that size: a region's mask
always covers its whole image, at any resolution.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
from numpy.typing import NDArray

from anomaly.errors import DataError

__all__ = [
    "SCALES",
    "Binarization",
    "Region",
    "find_regions",
    "mebin_threshold",
    "regions_from_mask",
    "sweep_range",
]

WORK_SIDE = 256  # maps are binarised at this longest side; regions are scaled back afterwards
SCALES = ("per_image", "shared")  # how map values compare across images (see the module docstring)


@dataclass(frozen=True, slots=True)
class Region:
    """One anomaly region of one image.

    Attributes:
        image: index of its image in the input sequence.
        mask: (h, w) bool mask covering the whole image, at any resolution (the map's working size).
        box: (x0, y0, x1, y1) bounding box, exclusive end, in mask pixels.
        area: pixel count of ``mask``.
        peak: highest map value inside the region (0 when the region came from a given mask).
    """

    image: int
    mask: NDArray[np.bool_] = field(repr=False)
    box: tuple[int, int, int, int]
    area: int
    peak: float = 0.0


@dataclass(frozen=True, slots=True)
class Binarization:
    """The threshold chosen for one map and how.

    ``method`` is ``stable`` (MEBin over the shared range), ``pixel_threshold``, ``stable_own`` (MEBin
    over the map's own median..maximum) or ``half_max`` (half way between median and maximum: the
    fallback of the shared scale, and the rule of the per-image scale).
    """

    threshold: float
    method: str


def sweep_range(maps: Sequence[NDArray[np.floating]]) -> tuple[float, float]:
    """The shared sweep range of a set of maps: (lowest image maximum, highest image maximum).

    As in MEBin, every map is swept over the same range, so a threshold means the same for all of them.
    A single map (or maps with equal maxima) sweeps from its median to its maximum instead.
    """
    peaks = np.array([float(np.max(m)) for m in maps])
    lo, hi = float(peaks.min()), float(peaks.max())
    if hi - lo <= 1e-6 * max(abs(hi), 1.0):
        lo = float(min(np.median(m) for m in maps))
    return lo, hi


def mebin_threshold(
    amap: NDArray[np.floating],
    lo: float,
    hi: float,
    *,
    steps: int = 64,
    min_run: int = 4,
    erode: int = 5,
) -> tuple[float, int] | None:
    """MEBin threshold of one map (at working size) over the sweep ``hi`` -> ``lo``.

    Args:
        amap: (h, w) map.
        lo, hi: sweep range (see :func:`sweep_range`).
        steps: number of thresholds in the sweep (MEBin: 255 / sample_rate 4 = 64).
        min_run: shortest run of equal non-zero component counts that counts as stable.
        erode: side of the square erosion kernel applied before counting (removes specks and thin bridges).

    Returns:
        (threshold, component count) at the low end of the longest stable run, or None when no run is stable.
    """
    kernel = np.ones((erode, erode), np.uint8)
    thresholds = hi - (hi - lo) * np.arange(steps) / steps
    counts = []
    for t in thresholds:
        binary = cv2.erode((amap > t).view(np.uint8), kernel)
        counts.append(cv2.connectedComponents(binary, connectivity=8)[0] - 1)
    best: tuple[int, int, int] | None = None  # (run length, count, end index)
    start = 0
    for i in range(1, steps + 1):
        if i == steps or counts[i] != counts[start]:
            length = i - start
            if counts[start] > 0 and length >= min_run and (best is None or length > best[0]):
                best = (length, counts[start], i - 1)
            start = i
    if best is None:
        return None
    return float(thresholds[best[2]]), best[1]


def regions_from_mask(
    mask: NDArray[np.bool_], image: int, amap: NDArray[np.floating] | None = None, min_area: int = 1
) -> list[Region]:
    """Connected components (8-connected) of a mask as regions, largest first."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=8)
    regions = []
    for label in range(1, n):
        x, y, w, h, area = (int(v) for v in stats[label])
        if area < min_area:
            continue
        component = labels == label
        peak = float(amap[component].max()) if amap is not None else 0.0
        regions.append(Region(image, component, (x, y, x + w, y + h), area, peak))
    return sorted(regions, key=lambda r: -r.area)


def find_regions(
    maps: Iterable[NDArray[np.floating]],
    pixel_thresholds: Sequence[float | None] | None = None,
    *,
    steps: int = 64,
    min_run: int = 4,
    erode: int = 5,
    min_area_ratio: float = 0.1,
    scale: str = "per_image",
) -> tuple[list[Region], list[Binarization]]:
    """Binarise each map (MEBin, with fallbacks, or per image) and return its regions.

    Fallbacks, in order, for a map without a stable run over the shared range: its pixel threshold
    when the map reaches it, a stable run over its own median..maximum, else half way between its
    median and its maximum. The chosen mask is opened (erode + dilate with
    the same kernel) so specks go but region shapes stay; every map yields at least one region.
    Components smaller than ``min_area_ratio`` times the image's largest one are dropped as specks.

    Args:
        maps: (H, W) anomaly maps, higher = more anomalous; sizes may differ. Read once, so it may be a
            generator: only a copy at the working size is kept.
        pixel_thresholds: per map, the threshold a pixel must reach to be anomalous (or None).
        steps, min_run, erode: MEBin sweep parameters (``erode`` at the working size).
        scale: ``per_image`` (every map at ``half_max``; the default) or ``shared`` (MEBin over the range
            shared by all maps, with the fallbacks above).

    Returns:
        All regions (``Region.image`` indexes ``maps``) and one :class:`Binarization` per map.

    Raises:
        DataError: a map is not (H, W) or holds a value that is not finite.
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    small = [_working(_checked(np.asarray(m, dtype=np.float32), i)) for i, m in enumerate(maps)]
    if not small:
        return [], []
    lo, hi = sweep_range(small)
    kernel = np.ones((erode, erode), np.uint8)
    regions: list[Region] = []
    choices: list[Binarization] = []
    for i, work in enumerate(small):
        pixel = None if pixel_thresholds is None else pixel_thresholds[i]
        if scale == "per_image":
            choice = _half_max(work)
        else:
            choice = _choose(work, lo, hi, pixel, steps=steps, min_run=min_run, erode=erode)
        raw = (work >= choice.threshold).view(np.uint8)
        opened = cv2.morphologyEx(raw, cv2.MORPH_OPEN, kernel)
        if not opened.any():  # a region thinner than the kernel: keep the raw mask
            opened = raw
        if not opened.any():  # the sweep stopped above this map's maximum: its peak is the region
            opened = (work >= work.max()).view(np.uint8)
        found = regions_from_mask(opened > 0, i, work)
        largest = found[0].area
        regions.extend(r for r in found if r.area >= min_area_ratio * largest)
        choices.append(choice)
    return regions, choices


def _choose(
    work: NDArray[np.float32], lo: float, hi: float, pixel: float | None, *, steps: int, min_run: int, erode: int
) -> Binarization:
    stable = mebin_threshold(work, lo, hi, steps=steps, min_run=min_run, erode=erode)
    if stable is not None:
        return Binarization(stable[0], "stable")
    if pixel is not None and np.isfinite(pixel) and work.max() >= pixel:
        return Binarization(float(pixel), "pixel_threshold")
    # The shared range barely reaches into this map (its maximum is near the lowest one): sweep its own.
    own = mebin_threshold(work, float(np.median(work)), float(work.max()), steps=steps, min_run=min_run, erode=erode)
    if own is not None:
        return Binarization(own[0], "stable_own")
    return _half_max(work)


def _half_max(work: NDArray[np.float32]) -> Binarization:
    return Binarization(float(0.5 * (np.median(work) + work.max())), "half_max")


def _checked(amap: NDArray[np.float32], index: int) -> NDArray[np.float32]:
    """``amap`` if it is an (H, W) map of finite values, else DataError naming its index (a NaN pixel would leave the
    map without a region, a third axis would not unpack)."""
    if amap.ndim != 2 or min(amap.shape) == 0:
        raise DataError(f"discover: map {index} must be (H, W), got shape {amap.shape}")
    if not np.isfinite(amap).all():
        raise DataError(f"discover: map {index} holds NaN or infinite values")
    return amap


def _working(amap: NDArray[np.float32]) -> NDArray[np.float32]:
    h, w = amap.shape
    scale = WORK_SIDE / max(h, w)
    if scale >= 1:
        return amap
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    # cv2's stubs drop the dtype
    return cv2.resize(amap, size, interpolation=cv2.INTER_AREA)  # type: ignore[return-value]
