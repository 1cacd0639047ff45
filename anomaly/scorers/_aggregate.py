"""Local neighbourhood aggregation and multi-layer fusion of CNN/ViT feature maps."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["PATCH_KERNELS", "fuse_layers", "neighbourhood_mean", "patch_embeddings"]

PATCH_KERNELS = ("mean", "binomial")

_CHUNK = 32  # images per step: temporaries stay small, the output is the only full-size tensor


def neighbourhood_mean(layer: torch.Tensor, patch_size: int, kernel: str = "mean") -> torch.Tensor:
    """Each cell of ``layer`` (N, C, h, w) averaged over its ``patch_size`` x ``patch_size`` neighbourhood.

    ``mean`` weighs the neighbourhood evenly (PatchCore); ``binomial`` by the outer product of a row of
    Pascal's triangle ([1, 2, 1] for 3 x 3), so the cell itself counts most and a defect that fills one
    cell is diluted less. Both pad with zeros and divide by the full kernel, attenuating border patches
    as the reference does.
    """
    pad = patch_size // 2
    if kernel == "mean":
        return F.avg_pool2d(layer, patch_size, stride=1, padding=pad, count_include_pad=True)
    row = torch.tensor([math.comb(patch_size - 1, i) for i in range(patch_size)], dtype=layer.dtype)
    weights = torch.outer(row, row) / row.sum() ** 2
    weights = weights.to(layer.device).repeat(layer.shape[1], 1, 1, 1)  # one depthwise filter per channel
    return F.conv2d(layer, weights, padding=pad, groups=layer.shape[1])


def fuse_layers(
    layers: list[torch.Tensor], patch_size: int = 3, grid_layer: int = 0, kernel: str = "mean"
) -> torch.Tensor:
    """Patch embeddings (N, h, w, D) of per-layer maps (finest first) on layer ``grid_layer``'s grid.

    Each layer gets a ``patch_size`` x ``patch_size`` local mean (PatchCore's neighbourhood aggregation),
    the grid layer's weighted by ``kernel`` (:func:`neighbourhood_mean`): that is where a defect filling one
    patch is averaged with its neighbours, while a coarser cell already spans several patches. Coarser layers
    are bilinearly upsampled (align_corners=False) to the grid; a finer layer (a stride-4 layer on a
    stride-8 grid) is averaged over the cells each grid patch covers. Channels are concatenated.
    Plain tensor operations only, so that an export traces it as one graph.
    """
    h, w = layers[grid_layer].shape[-2:]
    parts = []
    for i, layer in enumerate(layers):
        if patch_size > 1:
            layer = neighbourhood_mean(layer, patch_size, kernel if i == grid_layer else "mean")
        lh, lw = layer.shape[-2:]
        if (lh, lw) != (h, w):
            if lh >= h and lw >= w and lh % h == 0 and lw % w == 0:
                layer = F.avg_pool2d(layer, (lh // h, lw // w))
            else:
                layer = F.interpolate(layer, size=(h, w), mode="bilinear", align_corners=False)
        parts.append(layer)
    return torch.cat(parts, 1).permute(0, 2, 3, 1)


def patch_embeddings(
    layers: list[torch.Tensor], patch_size: int = 3, grid_layer: int = 0, kernel: str = "mean"
) -> torch.Tensor:
    """:func:`fuse_layers` chunk by chunk into one preallocated output, so peak memory is about one copy."""
    n = layers[0].shape[0]
    h, w = layers[grid_layer].shape[-2:]
    width = sum(layer.shape[1] for layer in layers)
    out = torch.empty(n, h, w, width, dtype=layers[0].dtype, device=layers[0].device)
    for start in range(0, n, _CHUNK):
        out[start : start + _CHUNK] = fuse_layers(
            [layer[start : start + _CHUNK] for layer in layers], patch_size, grid_layer, kernel
        )
    return out
