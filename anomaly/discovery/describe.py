"""Region descriptors from a frozen backbone: a context crop around each region, mask-weighted pooling.

Each region is cropped as a square around its bounding box with some context (as AnomalyNCD crops
its sub-images), resized to the backbone input, and the backbone's feature maps of several layers are
averaged under the region's mask (resized to each layer's grid). Each layer's vector is
L2-normalised so that every layer weighs the same, whatever its channel count. A defect's type does
not depend on its orientation while CNN features do, so the pooled vectors are averaged over the
crop and its 90-degree rotation (with its mask). On bottle one view lost 0.1-0.2 NMI; all four
rotations scored the same as two, at twice the cost (benchmarks/README.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import torch
from numpy.typing import NDArray

from anomaly.config import BackboneConfig
from anomaly.discovery.regions import Region
from anomaly.errors import ConfigError
from anomaly.features import FeatureExtractor, model_skeleton, returns_tokens, takes_layers

__all__ = ["DEFAULT_BACKBONE", "DEFAULT_LAYERS", "RegionDescriber", "crop_box"]

DEFAULT_BACKBONE = "tf_efficientnet_lite0"
DEFAULT_LAYERS = ("blocks.4", "blocks.6")  # strides 16 and 32: local structure and part-level semantics
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def crop_box(
    box: tuple[float, float, float, float],
    size: tuple[int, int],
    padding: float = 0.25,
    min_side: float = 0.2,
    min_pixels: int = 0,
) -> tuple[int, int, int, int]:
    """Square crop (x0, y0, x1, y1) around ``box`` in an image of ``size`` (H, W), shifted to fit inside.

    The side is the box's longest side plus ``padding`` of it on each side, at least ``min_side`` of the
    image's longest side and ``min_pixels`` pixels, and at most its shortest side.

    Example:
        >>> crop_box((40, 40, 60, 50), (100, 200), padding=0.5, min_side=0.1)
        (30, 25, 70, 65)
    """
    h, w = size
    x0, y0, x1, y1 = box
    side = max(max(x1 - x0, y1 - y0) * (1 + 2 * padding), min_side * max(h, w), min_pixels)
    side = int(round(min(side, h, w)))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left = int(round(min(max(cx - side / 2, 0), w - side)))
    top = int(round(min(max(cy - side / 2, 0), h - side)))
    return left, top, left + side, top + side


class RegionDescriber:
    """Describes regions with a frozen timm backbone (default: the offline EfficientNet-Lite0 weights).

    Args:
        backbone: timm model name.
        layers: feature layers to pool (names from ``feature_info``).
        weights, pretrained: where the backbone's weights come from (as ``backbone.weights`` /
            ``backbone.pretrained`` of a detector config).
        mean, std: input statistics (None: the model's own).
        input_size: side of the square crop fed to the backbone (a ViT's is rounded to whole patches).
        padding: context around a region's box, as a fraction of its longest side (per side).
        min_side: smallest crop side as a fraction of the image's longest side.
        min_pixels: smallest crop side in image pixels (small images: a crop of a few dozen pixels,
            enlarged to ``input_size``, is too blurred to tell defect types apart).
        rotations: how many 90-degree rotations of each crop to average over (1 to 4).
        batch_size: crops per forward pass.
        device: ``auto``, ``cpu`` or ``cuda``.
        final_norm: a ViT's tokens after the model's final norm (``backbone.final_norm``).
    """

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        layers: Sequence[str] = DEFAULT_LAYERS,
        *,
        weights: str = "auto",
        pretrained: bool = True,
        mean: tuple[float, float, float] | None = _IMAGENET_MEAN,
        std: tuple[float, float, float] | None = _IMAGENET_STD,
        input_size: int = 256,
        padding: float = 0.25,
        min_side: float = 0.2,
        min_pixels: int = 64,
        rotations: int = 2,
        batch_size: int = 32,
        device: str = "auto",
        final_norm: bool = False,
    ) -> None:
        if not 1 <= rotations <= 4:
            raise ValueError(f"rotations must be 1..4, got {rotations}")
        self.extractor = FeatureExtractor(
            backbone,
            list(layers),
            weights=weights,
            pretrained=pretrained,
            image_size=(input_size, input_size),
            mean=mean,
            std=std,
            device=device,
            final_norm=final_norm,
        )
        # a ViT snaps the size to whole patches (256 -> 252 for patch 14): crops are cut at the size it runs at
        self.input_size = self.extractor.image_size[0]
        self.padding = padding
        self.min_side = min_side
        self.min_pixels = min_pixels
        self.rotations = rotations
        self.batch_size = batch_size

    @classmethod
    def from_backbone(cls, config: BackboneConfig, **kwargs: Any) -> RegionDescriber:
        """A describer on a detector config's backbone: its model and weights.

        When a CNN has the describer's own layers (``DEFAULT_LAYERS``: every EfficientNet), regions are
        described with the describer's measured settings, those layers and ImageNet statistics (chosen for
        discovery, which is not detection: benchmarks/README.md section 8). Other models use the config's
        layers, input statistics and ``final_norm``; so does a ViT, whose ``blocks.4`` and ``blocks.6`` are early
        transformer blocks, not a CNN's stride-16 and stride-32 stages.
        """
        skeleton = model_skeleton(config.name)  # the structure alone (no weights): the backbone is built once
        if skeleton is None:  # a constructor the meta device cannot run: tried with the describer's layers
            try:
                own = cls(
                    config.name,
                    DEFAULT_LAYERS,
                    weights=config.weights,
                    pretrained=config.pretrained,
                    final_norm=config.final_norm,
                    **kwargs,
                )
                if not own.extractor.is_vit:
                    return own
            except ConfigError as exc:
                if not str(exc).startswith("backbone.layers: unknown layer"):  # the model lacks blocks.4 / blocks.6
                    raise
        elif not returns_tokens(skeleton) and takes_layers(skeleton, DEFAULT_LAYERS):
            return cls(  # final_norm: refused for a CNN, not ignored
                config.name,
                DEFAULT_LAYERS,
                weights=config.weights,
                pretrained=config.pretrained,
                final_norm=config.final_norm,
                **kwargs,
            )
        return cls(
            config.name,
            config.layers,
            weights=config.weights,
            pretrained=config.pretrained,
            mean=config.mean,
            std=config.std,
            final_norm=config.final_norm,
            **kwargs,
        )

    def crop(self, image: NDArray[np.uint8], region: Region) -> tuple[NDArray[np.uint8], NDArray[np.float32]]:
        """The region's context crop (S, S, 3) and its mask over the crop (S, S) in [0, 1]; S = ``input_size``."""
        h, w = image.shape[:2]
        mh, mw = region.mask.shape
        sx, sy = w / mw, h / mh
        x0, y0, x1, y1 = region.box
        left, top, right, bottom = crop_box(
            (x0 * sx, y0 * sy, x1 * sx, y1 * sy), (h, w), self.padding, self.min_side, self.min_pixels
        )
        side = self.input_size
        crop = cv2.resize(image[top:bottom, left:right], (side, side), interpolation=cv2.INTER_AREA)
        # The same window in mask pixels (the mask may be coarser than the image), resized bilinearly.
        window = region.mask[
            int(top / sy) : max(int(np.ceil(bottom / sy)), int(top / sy) + 1),
            int(left / sx) : max(int(np.ceil(right / sx)), int(left / sx) + 1),
        ]
        mask = cv2.resize(window.view(np.uint8).astype(np.float32), (side, side), interpolation=cv2.INTER_LINEAR)
        return np.ascontiguousarray(crop), mask  # type: ignore[return-value]  # cv2's stubs drop the dtype

    def describe(self, crops: NDArray[np.uint8], masks: NDArray[np.float32]) -> NDArray[np.float32]:
        """(N, D) descriptors of crops (N, S, S, 3) under masks (N, S, S), as :meth:`crop` returns them."""
        out = []
        for start in range(0, len(crops), self.batch_size):
            batch, weights = crops[start : start + self.batch_size], masks[start : start + self.batch_size]
            total: float | NDArray[np.float32] = 0.0
            for turn in range(self.rotations):
                views = np.ascontiguousarray(np.rot90(batch, turn, axes=(1, 2)))
                view_masks = np.ascontiguousarray(np.rot90(weights, turn, axes=(1, 2)))
                total = total + _pool(self.extractor(views).layers, view_masks)
            out.append(np.asarray(total, dtype=np.float32) / self.rotations)
        if not out:
            return np.zeros((0, 0), dtype=np.float32)
        return np.concatenate(out)

    def __call__(self, images: Sequence[NDArray[np.uint8]], regions: Sequence[Region]) -> NDArray[np.float32]:
        """(R, D) descriptors of ``regions`` of ``images`` (indexed by ``Region.image``)."""
        if not regions:
            return np.zeros((0, 0), dtype=np.float32)
        crops, masks = zip(*(self.crop(images[r.image], r) for r in regions))
        return self.describe(np.stack(crops), np.stack(masks))


def _pool(layers: list[torch.Tensor], masks: NDArray[np.float32]) -> NDArray[np.float32]:
    """Mask-weighted mean of each layer (N, C, g, g) under ``masks`` (N, S, S), L2-normalised per layer."""
    weights = torch.from_numpy(masks).unsqueeze(1)
    parts = []
    for feats in layers:
        size = feats.shape[-2:]  # (h, w): torch's stubs take no Size for it
        grid = torch.nn.functional.adaptive_avg_pool2d(weights, size).to(feats.device)  # type: ignore[arg-type]
        grid = grid + 1e-6  # a region smaller than one cell still gets its cell's mean
        pooled = (feats * grid).sum((2, 3)) / grid.sum((2, 3))
        parts.append(torch.nn.functional.normalize(pooled, dim=1))
    return (torch.cat(parts, dim=1) / np.sqrt(len(layers))).cpu().numpy()
