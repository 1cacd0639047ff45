"""discover(): anomaly maps -> regions -> region descriptors -> one descriptor per image -> clusters of images."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from anomaly.data.io import read_images, read_pixels, significant_bits, stored_bit_depth
from anomaly.discovery.cluster import Clusters, check_k, cluster_descriptors, pool_by_image
from anomaly.discovery.describe import RegionDescriber
from anomaly.discovery.regions import Binarization, Region, find_regions
from anomaly.errors import DataError
from anomaly.results import StageProgress

__all__ = ["DiscoveryResult", "MapResult", "discover"]

ImageLike = str | os.PathLike[str] | NDArray[np.uint8]
_CHUNK = 16  # images decoded at a time


class MapResult(Protocol):
    """What discover needs of a detection result (``anomaly.DetectionResult`` has it)."""

    @property
    def anomaly_map(self) -> NDArray[np.float32] | None: ...
    @property
    def source(self) -> str | None: ...
    @property
    def pixel_threshold(self) -> float: ...


@dataclass(frozen=True)
class DiscoveryResult:
    """Defect types found among images.

    Attributes:
        labels: (N,) defect type (cluster) of each image, 0..k-1 by decreasing cluster size.
        confidence: (N,) the image's soft membership of its cluster (1/k .. 1).
        n_regions: (N,) regions found in each image.
        regions: every region; ``Region.image`` indexes the inputs.
        clusters: the images' clusters (labels, memberships, K and how it was chosen).
        binarizations: per image, the map threshold used and how it was chosen.
    """

    labels: NDArray[np.intp]
    confidence: NDArray[np.float64]
    n_regions: NDArray[np.intp]
    regions: list[Region] = field(repr=False)
    clusters: Clusters = field(repr=False)
    binarizations: list[Binarization] = field(repr=False)

    @property
    def k(self) -> int:
        """Number of defect types."""
        return self.clusters.k

    def summary(self) -> dict[str, Any]:
        """JSON-safe summary: K, how it was chosen and with what confidence, image and region counts."""
        c = self.clusters
        return {
            "k": c.k,
            "k_method": c.k_method,
            "k_confidence": c.k_confidence,
            "k_eigengaps": {str(k): v for k, v in c.k_scores.items()},
            "n_images": int(len(self.labels)),
            "n_regions": len(self.regions),
            "images_per_cluster": {str(i): int((self.labels == i).sum()) for i in range(c.k)},
            "regions_per_cluster": {str(i): int(self.n_regions[self.labels == i].sum()) for i in range(c.k)},
            "binarization": {
                m: sum(b.method == m for b in self.binarizations)
                for m in ("stable", "pixel_threshold", "stable_own", "half_max")
            },
        }


def discover(
    items: Sequence[MapResult] | Sequence[tuple[ImageLike, NDArray[np.floating]]] | Sequence[ImageLike],
    k: int | None = None,
    *,
    maps: Iterable[NDArray[np.floating]] | None = None,
    pixel_thresholds: Sequence[float | None] | None = None,
    describer: RegionDescriber | None = None,
    k_max: int = 10,
    scale: str = "per_image",
    progress: StageProgress | None = None,
) -> DiscoveryResult:
    """Group anomalous images into defect types, without labels.

    Args:
        items: detection results with maps and source paths (any scorer, zero-shot included), or
            (image or image path, anomaly map) pairs. With ``maps`` given, items may be image paths
            or arrays alone and ``maps`` yields their maps in order (lazily: only a small copy of
            each map is kept).
        k: number of defect types; None estimates it (eigengap over 2..``k_max``).
        pixel_thresholds: per image, the map value a pixel must reach to be anomalous, used by the
            ``shared`` scale when a map has no stable binarisation (defaults to each result's
            ``pixel_threshold``).
        describer: region describer (default: EfficientNet-Lite0, see :class:`RegionDescriber`).
        scale: ``per_image`` (each map cut half way between its median and maximum; the default) or
            ``shared`` (MEBin over the range all maps share); see :func:`anomaly.discovery.regions.find_regions`.
        progress: called with (stage, done, total).

    Returns:
        A :class:`DiscoveryResult` with one label and confidence per item.

    Raises:
        DataError: an item has no map, or ``k`` does not fit the number of images.
    """
    images, map_iter, thresholds = _unpack(items, maps, pixel_thresholds)
    if not images:
        raise DataError("discover: no image given")
    check_k(k, len(images))  # before the costly binarisation and description
    regions, binarizations = find_regions(map_iter, thresholds, scale=scale)
    if len(binarizations) != len(images):
        raise DataError(f"discover: {len(images)} images but {len(binarizations)} maps")
    describer = describer or RegionDescriber()
    descriptors = _describe(describer, images, regions, progress)
    owner = np.array([r.image for r in regions])
    fraction = np.array([r.area / r.mask.size for r in regions])
    clusters = cluster_descriptors(pool_by_image(descriptors, owner, fraction, len(images)), k, k_max=k_max)
    confidence = clusters.memberships.max(1)
    n_regions = np.bincount(owner, minlength=len(images))
    return DiscoveryResult(clusters.labels, confidence, n_regions, regions, clusters, binarizations)


def _unpack(
    items: Sequence[Any], maps: Iterable[NDArray[np.floating]] | None, thresholds: Sequence[float | None] | None
) -> tuple[list[ImageLike], Iterable[NDArray[np.floating]], Sequence[float | None] | None]:
    if maps is not None:
        return list(items), maps, thresholds
    images: list[ImageLike] = []
    arrays: list[NDArray[np.floating]] = []
    found: list[float | None] = []
    for i, item in enumerate(items):
        if isinstance(item, tuple):
            image, amap, threshold = item[0], item[1], None
        else:
            image, amap, threshold = item.source, item.anomaly_map, item.pixel_threshold
        if amap is None or image is None:
            raise DataError(f"discover: item {i} has no {'anomaly map' if amap is None else 'image source'}")
        images.append(image)
        arrays.append(amap)
        found.append(threshold)
    return images, arrays, thresholds if thresholds is not None else found


def _describe(
    describer: RegionDescriber, images: list[ImageLike], regions: list[Region], progress: StageProgress | None
) -> NDArray[np.float32]:
    """Descriptors of all regions, decoding the images a chunk at a time (each image decoded once)."""
    by_image: dict[int, list[int]] = {}
    for index, region in enumerate(regions):
        by_image.setdefault(region.image, []).append(index)
    order = [i for i in range(len(images)) if i in by_image]
    depth = _bit_depth([images[i] for i in order])
    out: list[NDArray[np.float32]] = []
    for start in range(0, len(order), _CHUNK):
        chunk = order[start : start + _CHUNK]
        decoded = _load([images[i] for i in chunk], depth)
        crops, masks = [], []
        for i, image in zip(chunk, decoded):
            for index in by_image[i]:
                crop, mask = describer.crop(image, regions[index])
                crops.append(crop)
                masks.append(mask)
        out.append(describer.describe(np.stack(crops), np.stack(masks)))
        if progress is not None:
            progress("describe", min(start + _CHUNK, len(order)), len(order))
    descriptors = np.concatenate(out)
    position = [index for i in order for index in by_image[i]]
    result = np.empty_like(descriptors)
    result[position] = descriptors
    return result


def _bit_depth(images: list[ImageLike]) -> int:
    """One depth for every 16-bit image file, the bits the largest value among them needs (16 without any): the same
    for all chunks, so an image's brightness does not depend on the chunk it is decoded with."""
    deep = [i for i in images if not isinstance(i, np.ndarray) and stored_bit_depth(i) == 16]  # 8-bit: header only
    return max((significant_bits(read_pixels(path)) or 16 for path in deep), default=16)


def _load(images: list[ImageLike], bit_depth: int) -> list[NDArray[np.uint8]]:
    paths = [i for i in images if not isinstance(i, np.ndarray)]
    decoded = iter(read_images(paths, bit_depth=bit_depth) if paths else [])  # 16-bit images at one depth
    return [i if isinstance(i, np.ndarray) else next(decoded) for i in images]
