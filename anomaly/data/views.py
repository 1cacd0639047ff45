"""How one image becomes model-input views: stretched, letterboxed (aspect kept) or cut into overlapping tiles.

Every image is first rescaled to a *frame* (its working resolution); the backbone then sees one or more
windows of the model input size placed on that frame. A window may reach past the frame (letterbox
borders, tiles of an image smaller than a tile): those pixels are filled by mirroring the frame, and
:func:`anomaly.maps.stitch` ignores them when it puts the views' maps back together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

__all__ = [
    "DRIFT_THRESHOLD",
    "Layout",
    "ViewSpec",
    "bright_level",
    "copied_views",
    "cut_views",
    "fitted_input_size",
    "gray_stats",
    "lighting_drift",
    "overlapping_views",
    "plan_layout",
    "standardize_intensity",
]

# ``resize: auto`` keeps the configured input when the images' aspect is within this factor of it (bottle, MVTec's
# squares, the magnetic tiles' 0.86-0.89 keep 256x256); beyond it the input takes their aspect (benchmarks/README.md
# section 6, round 9: KolektorSDD's 1:2.5 parts 0.885 / 0.860 stretched square -> 0.912 / 0.954 image / pixel AUROC).
ASPECT_TOLERANCE = 1.25
_AGREEING_SHARE = 0.75  # images whose aspect must be within ASPECT_TOLERANCE of the median for it to be taken
_MAX_ASPECT = 8.0  # a line-scan strip of 20:1 gets an 8:1 input (still 90 px on its short side at 256x256)
TARGET_MEAN, TARGET_STD = 128.0, 48.0  # gray levels; std 48 chosen on mtd_dev (benchmarks/README.md section 6)
_MIN_STD = 6.0  # a flat image is amplified at most 8x (48 / 6): its noise must not become texture
_STATS_PIXELS = 250_000  # enough pixels for the two statistics; larger images are sampled on a grid
# Lighting drift above which ``standardize: auto`` turns standardisation on: the spread (std of the log) of the
# training images' bright level (:func:`bright_level`). Dev suite, 32 images each: constant set-ups 0.000-0.057
# (bottle, bsdata, glass, transistor, KolektorSDD, MPDD and its strips, screw, DeepPCB, synthetic), ELPV's
# electroluminescence exposures 0.134-0.138, the magnetic tiles' six lighting runs 0.30 (benchmarks/README.md
# section 6, round 16).
DRIFT_THRESHOLD = 0.10


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
    standardize: bool = False  # views photometrically standardised with their image's statistics
    bit_depth: int = 16  # significant bits of 16-bit images (anomaly.data.io.to_8bit)

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


def overlapping_views(layouts: list[Layout | None], input_size: tuple[int, int]) -> list[NDArray[np.int64]]:
    """Per view of the images laid out by ``layouts`` (their views in order; None: one view), the other views of
    the same image that share pixels with it: overlapping tiles, which must not vouch for each other's content."""
    h_in, w_in = input_size
    out: list[NDArray[np.int64]] = []
    start = 0
    for layout in layouts:
        origins = np.array(layout.origins if layout is not None else [(0, 0)]).reshape(-1, 2)
        dy, dx = (np.abs(origins[:, None, k] - origins[None, :, k]) for k in (0, 1))
        shared = (dy < h_in) & (dx < w_in)
        np.fill_diagonal(shared, False)
        out += [start + np.flatnonzero(row) for row in shared]
        start += len(origins)
    return out


def copied_views(prints: list[str | None], layouts: list[Layout | None]) -> list[NDArray[np.int64]]:
    """Per view of the images laid out by ``layouts`` (see :func:`overlapping_views`), the views of the other images
    whose pixels are the same (equal ``prints``, their fingerprints; None: an image with no copy): a copy would
    vouch for its twin's defects."""
    counts = [len(layout.origins) if layout is not None else 1 for layout in layouts]
    starts = np.cumsum([0, *counts])
    rows_of: dict[str, list[int]] = {}
    for i, key in enumerate(prints):
        if key is not None:
            rows_of.setdefault(key, []).extend(range(starts[i], starts[i + 1]))
    out: list[NDArray[np.int64]] = []
    for i, (key, count) in enumerate(zip(prints, counts)):
        same = np.asarray(rows_of.get(key, []) if key is not None else [], dtype=np.int64)
        out += [same[(same < starts[i]) | (same >= starts[i + 1])]] * count
    return out


def fitted_input_size(sizes: list[tuple[int, int]], input_size: tuple[int, int], step: int = 32) -> tuple[int, int]:
    """Model input (H, W) for images of ``sizes`` (H, W): about the pixel count of ``input_size``, their aspect.

    The median aspect (width / height) of ``sizes`` is compared with the input's: within
    :data:`ASPECT_TOLERANCE` the input is kept as it is, and so it is when fewer than 3 in 4 images lie within
    that tolerance of the median (mixed portrait and landscape shots: one shape would squash the others more
    than the configured input does). Otherwise each side becomes a multiple of ``step`` (the backbone's largest
    stride, so that every feature grid divides evenly) with the images' aspect, clipped to 1:8 - 8:1, and the
    same number of pixels, so the backbone's cost stays as configured.
    """
    h_in, w_in = input_size
    if not sizes:
        return input_size
    log_aspects = np.array([math.log(w / h) for h, w in sizes])
    median = float(np.median(log_aspects))
    if abs(median - math.log(w_in / h_in)) < math.log(ASPECT_TOLERANCE):
        return input_size
    if np.mean(np.abs(log_aspects - median) < math.log(ASPECT_TOLERANCE)) < _AGREEING_SHARE:
        return input_size
    aspect = min(max(math.exp(median), 1 / _MAX_ASPECT), _MAX_ASPECT)
    area = h_in * w_in
    height, width = math.sqrt(area / aspect), math.sqrt(area * aspect)
    return max(step, round(height / step) * step), max(step, round(width / step) * step)


def cut_views(image: NDArray[np.uint8], layout: Layout, input_size: tuple[int, int]) -> NDArray[np.uint8]:
    """(V, H_in, W_in, 3) views of ``image`` for ``layout`` (INTER_AREA when shrinking, else bilinear; see
    :func:`_resized`)."""
    fh, fw = layout.frame
    frame = _resized(image, fh, fw)
    top = max(0, -min(y for y, _ in layout.origins))
    left = max(0, -min(x for _, x in layout.origins))
    bottom = max(0, max(y for y, _ in layout.origins) + input_size[0] - fh)
    right = max(0, max(x for _, x in layout.origins) + input_size[1] - fw)
    if top or left or bottom or right:  # numpy mirrors repeatedly when the padding exceeds the frame
        frame = np.pad(frame, ((top, bottom), (left, right), (0, 0)), mode="symmetric")
    return np.stack(
        [frame[y + top : y + top + input_size[0], x + left : x + left + input_size[1]] for y, x in layout.origins]
    )


def _resized(image: NDArray[np.uint8], fh: int, fw: int) -> NDArray[np.uint8]:
    """``image`` at (``fh``, ``fw``): INTER_AREA when neither side grows, else bilinear, with a side that shrinks more
    than 2x area-averaged first. Bilinear reads only the two source pixels nearest each output pixel, so beyond 2x it
    skips pixels: a 40 x 3000 px strip stretched to 96 x 736 lost a 3 px scratch at most positions (found or missed as
    it moved by a pixel). Up to 2x it skips none and stays as chosen (benchmarks/README.md section 6, round 6: area
    averaging of every side that shrinks cost the magnetic tiles image AUROC)."""
    h, w = image.shape[:2]
    if (h, w) == (fh, fw):
        return image
    if h > fh and w > fw:
        return cv2.resize(image, (fw, fh), interpolation=cv2.INTER_AREA)  # type: ignore[return-value]
    if h > 2 * fh:
        image = cv2.resize(image, (w, fh), interpolation=cv2.INTER_AREA)  # type: ignore[assignment]
    elif w > 2 * fw:
        image = cv2.resize(image, (fw, h), interpolation=cv2.INTER_AREA)  # type: ignore[assignment]
    return cv2.resize(image, (fw, fh), interpolation=cv2.INTER_LINEAR)  # type: ignore[return-value]


def chroma(views: NDArray[np.uint8]) -> float:
    """How coloured model-input views are: the mean of |R - G| and |G - B| in percent of their mean level (+ 8, so
    that noise in near-black frames stays small): 0 for a gray image, MVTec AD bottle about 3, transistor about 23,
    and an underexposed frame keeps its colour's share. Every 4th pixel each way is enough for that."""
    sample = views[:, ::4, ::4].astype(np.int16)
    return float(100 * np.abs(np.diff(sample, axis=-1)).mean() / (sample.mean() + 8))


def standardize_intensity(views: NDArray[np.uint8], image: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """``views`` with one gain and offset that map ``image``'s gray-level mean and std to 128 and 48.

    Statistics come from the whole image, so all tiles of an image get the same transform; one gain
    for all channels keeps hues. Removes brightness and contrast drift between acquisitions (lighting
    runs, exposure) at the price of defects that are themselves a global brightness change.
    """
    mean, std = gray_stats(image)
    gain = TARGET_STD / max(std, _MIN_STD)
    offset = TARGET_MEAN - gain * mean
    return np.clip(np.rint(views * np.float32(gain) + np.float32(offset)), 0, 255).astype(np.uint8)


def gray_stats(image: NDArray[np.uint8]) -> tuple[float, float]:
    """Mean and std of an RGB image's gray levels (channel mean), from a grid sample of large images."""
    gray = _gray_sample(image)
    return float(gray.mean()), float(gray.std())


def bright_level(image: NDArray[Any]) -> float:
    """The gray level that 2 % of an RGB (or gray) image's pixels exceed (from a grid sample of large images).

    Exposure and lamp changes move it; what the frame shows hardly does, unless nearly all of it changes
    (a binarised board with more or less copper keeps 255, where its mean and std swing with the copper).
    """
    return float(np.percentile(_gray_sample(image), 98))


def _gray_sample(image: NDArray[Any]) -> NDArray[np.float32]:
    """Gray levels (channel mean) of an RGB or gray image, on a grid of about ``_STATS_PIXELS`` pixels for large
    images."""
    step = max(1, math.isqrt(image.shape[0] * image.shape[1] // _STATS_PIXELS))
    sample = image[::step, ::step]
    return sample.mean(axis=2, dtype=np.float32) if sample.ndim == 3 else sample.astype(np.float32)


def lighting_drift(levels: list[float]) -> float:
    """How much the lighting varies over images: the std of the log of their :func:`bright_level`.

    About the coefficient of variation of the exposure: 0.00-0.06 for a constant set-up, 0.3 for parts lit
    in several runs. (The spread of the gray mean and std, used before, also grows with content: the share
    of dark copper on PCB crops or of dark background in line-scan strips, which standardising then
    wrongly equalised.)
    """
    return float(np.log(np.maximum(np.asarray(levels, dtype=np.float64), 1.0)).std())


def _starts(length: int, window: int, overlap: float) -> list[int]:
    """Window starts covering ``length``, evenly spread, neighbours overlapping by >= ``overlap`` of a window."""
    if length <= window:
        return [-((window - length) // 2)]
    stride = max(1, int(window * (1 - overlap)))
    n = math.ceil((length - window) / stride) + 1
    return [round(i * (length - window) / (n - 1)) for i in range(n)]
