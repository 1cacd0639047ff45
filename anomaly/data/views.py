"""How one image becomes model-input views: stretched, letterboxed (aspect kept) or cut into overlapping tiles.

Every image is first rescaled to a *frame* (its working resolution); the backbone then sees one or more
windows of the model input size placed on that frame. A window may reach past the frame (letterbox
borders, tiles of an image smaller than a tile): those pixels are filled by mirroring the frame, and
:func:`anomaly.maps.stitch` ignores them when it puts the views' maps back together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from numpy.typing import NDArray

__all__ = ["RESIZE_MODES", "Layout", "ViewSpec", "cut_views", "plan_layout"]

RESIZE_MODES = ("stretch", "keep_aspect")


@dataclass(frozen=True)
class Layout:
    """Where the views of one image sit: the frame size and each view's top-left corner on it."""

    frame: tuple[int, int]  # (H, W) of the rescaled image
    origins: tuple[tuple[int, int], ...]  # (y, x) per view; negative or past the frame = mirrored padding

    @property
    def n_views(self) -> int:
        return len(self.origins)


@dataclass(frozen=True)
class ViewSpec:
    """The preprocessing choice (``preprocess`` in the config); see :func:`plan_layout`."""

    resize: str = "stretch"
    tile: int | None | bool = False  # False: no tiling; None: tiles of the shorter side; N: N-pixel tiles
    overlap: float = 0.25

    def layout(self, size: tuple[int, int], input_size: tuple[int, int]) -> Layout:
        return plan_layout(size, input_size, self.resize, self.tile, self.overlap)


def plan_layout(
    size: tuple[int, int],
    input_size: tuple[int, int],
    resize: str = "stretch",
    tile: int | None | bool = False,
    overlap: float = 0.25,
) -> Layout:
    """Layout of an image of ``size`` (H, W) for a model input of ``input_size``.

    ``tile=False``: one view; ``stretch`` resizes the image to the input (aspect lost), ``keep_aspect``
    fits its longer side and mirrors the rest. ``tile=N``: the image is scaled so that N original pixels
    span the input height and covered by input-size tiles overlapping by at least ``overlap``;
    ``tile=None``: the shorter side (relative to the input's aspect) spans the input, so an elongated
    image is tiled along its length at the resolution of its short side.
    """
    (h, w), (h_in, w_in) = size, input_size
    if tile is False:
        if resize == "stretch":
            return Layout((h_in, w_in), ((0, 0),))
        scale = min(h_in / h, w_in / w)
        frame = (max(1, min(h_in, round(h * scale))), max(1, min(w_in, round(w * scale))))
        return Layout(frame, ((-((h_in - frame[0]) // 2), -((w_in - frame[1]) // 2)),))
    scale = h_in / tile if tile else max(h_in / h, w_in / w)
    frame = (max(1, round(h * scale)), max(1, round(w * scale)))
    ys, xs = _starts(frame[0], h_in, overlap), _starts(frame[1], w_in, overlap)
    return Layout(frame, tuple((y, x) for y in ys for x in xs))


def cut_views(image: NDArray[np.uint8], layout: Layout, input_size: tuple[int, int]) -> NDArray[np.uint8]:
    """(V, H_in, W_in, 3) views of ``image`` for ``layout`` (INTER_AREA when shrinking, else bilinear)."""
    (h, w), (fh, fw) = image.shape[:2], layout.frame
    interp = cv2.INTER_AREA if h > fh and w > fw else cv2.INTER_LINEAR
    frame = image if (h, w) == (fh, fw) else cv2.resize(image, (fw, fh), interpolation=interp)
    top = max(0, -min(y for y, _ in layout.origins))
    left = max(0, -min(x for _, x in layout.origins))
    bottom = max(0, max(y for y, _ in layout.origins) + input_size[0] - fh)
    right = max(0, max(x for _, x in layout.origins) + input_size[1] - fw)
    if top or left or bottom or right:  # numpy mirrors repeatedly when the padding exceeds the frame
        frame = np.pad(frame, ((top, bottom), (left, right), (0, 0)), mode="symmetric")
    return np.stack(
        [frame[y + top : y + top + input_size[0], x + left : x + left + input_size[1]] for y, x in layout.origins]
    )


def _starts(length: int, window: int, overlap: float) -> list[int]:
    """Window starts covering ``length``, evenly spread, neighbours overlapping by >= ``overlap`` of a window."""
    if length <= window:
        return [-((window - length) // 2)]
    stride = max(1, int(window * (1 - overlap)))
    n = math.ceil((length - window) / stride) + 1
    return [round(i * (length - window) / (n - 1)) for i in range(n)]
