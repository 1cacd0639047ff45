"""Local neighbourhood aggregation and multi-layer fusion of CNN/ViT feature maps."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["patch_embeddings"]


def patch_embeddings(layers: list[torch.Tensor], patch_size: int = 3) -> torch.Tensor:
    """Fuse per-layer maps into patch embeddings (N, h, w, D) on the finest layer's grid.

    Each layer gets a ``patch_size`` x ``patch_size`` zero-padded local mean (PatchCore's
    neighbourhood aggregation, border patches attenuated as in the reference), coarser layers are
    bilinearly upsampled (align_corners=False) to the first layer's grid, channels concatenated.
    """
    h, w = layers[0].shape[-2:]
    fused = []
    for layer in layers:
        if patch_size > 1:
            layer = F.avg_pool2d(layer, patch_size, stride=1, padding=patch_size // 2, count_include_pad=True)
        if layer.shape[-2:] != (h, w):
            layer = F.interpolate(layer, size=(h, w), mode="bilinear", align_corners=False)
        fused.append(layer)
    return torch.cat(fused, dim=1).permute(0, 2, 3, 1).contiguous()
