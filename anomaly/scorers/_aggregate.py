"""Local neighbourhood aggregation and multi-layer fusion of CNN/ViT feature maps."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["patch_embeddings"]

_CHUNK = 32  # images per step: temporaries stay small, the output is the only full-size tensor


def patch_embeddings(layers: list[torch.Tensor], patch_size: int = 3) -> torch.Tensor:
    """Fuse per-layer maps into patch embeddings (N, h, w, D) on the finest layer's grid.

    Each layer gets a ``patch_size`` x ``patch_size`` zero-padded local mean (PatchCore's
    neighbourhood aggregation, border patches attenuated as in the reference), coarser layers are
    bilinearly upsampled (align_corners=False) to the first layer's grid, channels concatenated.
    Written chunk by chunk into one preallocated output, so peak memory is about one copy.
    """
    n, _, h, w = layers[0].shape
    widths = [layer.shape[1] for layer in layers]
    out = torch.empty(n, h, w, sum(widths), dtype=layers[0].dtype, device=layers[0].device)
    for start in range(0, n, _CHUNK):
        offset = 0
        for layer, width in zip(layers, widths):
            part = layer[start : start + _CHUNK]
            if patch_size > 1:
                part = F.avg_pool2d(part, patch_size, stride=1, padding=patch_size // 2, count_include_pad=True)
            if part.shape[-2:] != (h, w):
                part = F.interpolate(part, size=(h, w), mode="bilinear", align_corners=False)
            out[start : start + _CHUNK, :, :, offset : offset + width] = part.permute(0, 2, 3, 1)
            offset += width
    return out
