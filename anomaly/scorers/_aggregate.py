"""Local neighbourhood aggregation and multi-layer fusion of CNN/ViT feature maps."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["fuse_layers", "patch_embeddings"]

_CHUNK = 32  # images per step: temporaries stay small, the output is the only full-size tensor


def fuse_layers(layers: list[torch.Tensor], patch_size: int = 3, grid_layer: int = 0) -> torch.Tensor:
    """Patch embeddings (N, h, w, D) of per-layer maps (finest first) on layer ``grid_layer``'s grid.

    Each layer gets a ``patch_size`` x ``patch_size`` zero-padded local mean (PatchCore's
    neighbourhood aggregation, border patches attenuated as in the reference). Coarser layers are
    bilinearly upsampled (align_corners=False) to the grid; a finer layer (a stride-4 layer on a
    stride-8 grid) is averaged over the cells each grid patch covers. Channels are concatenated.
    Plain tensor operations only, so that an export traces it as one graph.
    """
    h, w = layers[grid_layer].shape[-2:]
    parts = []
    for layer in layers:
        if patch_size > 1:
            layer = F.avg_pool2d(layer, patch_size, stride=1, padding=patch_size // 2, count_include_pad=True)
        lh, lw = layer.shape[-2:]
        if (lh, lw) != (h, w):
            if lh >= h and lw >= w and lh % h == 0 and lw % w == 0:
                layer = F.avg_pool2d(layer, (lh // h, lw // w))
            else:
                layer = F.interpolate(layer, size=(h, w), mode="bilinear", align_corners=False)
        parts.append(layer)
    return torch.cat(parts, 1).permute(0, 2, 3, 1)


def patch_embeddings(layers: list[torch.Tensor], patch_size: int = 3, grid_layer: int = 0) -> torch.Tensor:
    """:func:`fuse_layers` chunk by chunk into one preallocated output, so peak memory is about one copy."""
    n = layers[0].shape[0]
    h, w = layers[grid_layer].shape[-2:]
    width = sum(layer.shape[1] for layer in layers)
    out = torch.empty(n, h, w, width, dtype=layers[0].dtype, device=layers[0].device)
    for start in range(0, n, _CHUNK):
        out[start : start + _CHUNK] = fuse_layers(
            [layer[start : start + _CHUNK] for layer in layers], patch_size, grid_layer
        )
    return out
