"""Scored inputs checked against the images the model was fitted on: aspect, size, bit depth and colour.

An input unlike every training image still gets a score, but a score that means less: a part fed rotated is
stretched, a thumbnail is upscaled to blur, a 12-bit frame read by a 16-bit model is near-black, a gray frame
scored by a model of colour images is a defect everywhere (a camera switched to mono). Each call of
``predict`` names such inputs in one warning per kind (Detector, StreamingDetector, ExportedDetector and the
HTTP service alike).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from anomaly.data.views import ASPECT_TOLERANCE

if TYPE_CHECKING:
    from anomaly.data.loader import DecodedImage

__all__ = [
    "POOL_ASPECTS_MIN",
    "SMALL_FACTOR",
    "InputCheck",
    "InputProfile",
    "aspect_range",
    "colour_of",
    "middle_aspects",
    "median_side",
    "smallest_side",
    "small_images",
]

log = logging.getLogger(__name__)

# An image whose longer side is this many times shorter than the median training image's (at fit) or than the
# smallest training image's (at predict) is named: upscaled to the model input, its detail is blur.
SMALL_FACTOR = 3
# Chroma (mean |R - G|, |G - B| of the model input in percent of its level; anomaly.data.views.chroma) under which an
# image is gray and from which it is coloured: gray images saved as RGB give 0; MVTec AD bottle, the least coloured
# real colour set, 2.9-3.0, and about 2 at a tenth of its exposure.
GRAY_CHROMA = 0.5
COLOUR_CHROMA = 1.0
POOL_ASPECTS_MIN = 8  # pool images from which the middle half of their aspects tells the product's spread


def aspect_range(sizes: list[tuple[int, int]]) -> tuple[float, float] | None:
    """Smallest and largest aspect (width / height) of images of ``sizes`` (H, W); None without any."""
    aspects = [w / h for h, w in sizes if h > 0]
    return (min(aspects), max(aspects)) if aspects else None


def middle_aspects(sizes: list[tuple[int, int]]) -> tuple[float, float]:
    """The aspect (width / height) range of the middle half of images of ``sizes`` (H, W): what a zero-shot pool
    shows as normal for its product. A homogeneous pool gives its median; parts cut at many sizes (magnetic tiles)
    a range that four references alone would not span (half of such a pool was named against them)."""
    low, high = np.quantile([w / h for h, w in sizes], [0.25, 0.75])
    return float(low), float(high)


def smallest_side(sizes: list[tuple[int, int]]) -> int | None:
    """The longer side of the smallest of images of ``sizes`` (H, W); None without any."""
    return min((max(h, w) for h, w in sizes if h > 0 and w > 0), default=None)


def colour_of(chromas: Sequence[float | None]) -> str | None:
    """``"gray"`` when every image of ``chromas`` (:func:`anomaly.data.views.chroma`) is gray, ``"colour"`` when
    every one is coloured, else None (a mix, or none known): what a scored image's colour is checked against."""
    known = [c for c in chromas if c is not None]
    if not known or len(known) < len(chromas):
        return None
    return "gray" if max(known) < GRAY_CHROMA else "colour" if min(known) >= COLOUR_CHROMA else None


def median_side(sizes: list[tuple[int, int]]) -> float | None:
    """The median longer side of images of ``sizes`` (H, W), the scale a set of 3 or more shows as usual; None
    for fewer."""
    return float(np.median([max(h, w) for h, w in sizes])) if len(sizes) >= 3 else None


def small_images(sizes: list[tuple[int, int]], sources: list[str | None]) -> list[str]:
    """Names of the training images of ``sizes`` (H, W) whose longer side is under a third of the median's:
    thumbnails or crops of another scale among full frames, whose upscaled views teach the model blur as normal."""
    median = median_side(sizes)
    if median is None:
        return []
    return [_name(source, h, w) for (h, w), source in zip(sizes, sources) if max(h, w) * SMALL_FACTOR < median]


@dataclass(frozen=True)
class InputProfile:
    """What the training images were: None for an aspect not checked (inputs that keep their aspect) and for a
    size or depth not known (models saved before it was recorded, a depth not decided yet)."""

    aspects: tuple[float, float] | None = None  # width / height range of the stretched training images
    aspects_of: str = "the training images'"  # whose aspects those are, for the warning
    smallest: int | None = None  # longer side of the smallest training image, in pixels
    smallest_of: str = "the smallest training image's"  # whose size that is, for the warning
    bit_depth: int | None = None  # significant bits of the 16-bit data the model reads
    colour: str | None = None  # "gray" or "colour" when every training image was (colour_of), else None
    images: str = "training image"  # what the model saw, for the warnings: "reference" for a few-shot pool


@dataclass
class InputCheck:
    """The inputs of one call unlike the ``profile``, gathered batch by batch; :meth:`warn` logs them."""

    profile: InputProfile
    aspects: list[str] = field(default_factory=list)
    small: list[str] = field(default_factory=list)
    depths: list[str] = field(default_factory=list)
    colours: list[str] = field(default_factory=list)

    def add(
        self,
        sizes: list[tuple[int, int]],
        sources: list[str | None],
        bits: list[int | None],
        chromas: Sequence[float | None] | None = None,
    ) -> None:
        """Check inputs of original ``sizes`` (H, W), named by ``sources`` (None: in memory), whose 16-bit values
        need ``bits`` (None: 8-bit data) and whose views are as coloured as ``chromas`` (None: not checked)."""
        aspects, smallest, depth = self.profile.aspects, self.profile.smallest, self.profile.bit_depth
        colour = self.profile.colour
        for (h, w), source, b, c in zip(sizes, sources, bits, chromas or [None] * len(sizes)):
            if c is not None and (
                (colour == "colour" and c < GRAY_CHROMA) or (colour == "gray" and c >= COLOUR_CHROMA)
            ):
                self.colours.append(_name(source, h, w))
            if aspects is not None and not aspects[0] / ASPECT_TOLERANCE <= w / h <= aspects[1] * ASPECT_TOLERANCE:
                self.aspects.append(_name(source, h, w))
            if smallest is not None and max(h, w) * SMALL_FACTOR < smallest:
                self.small.append(_name(source, h, w))
            # more bits saturate to white; 4 or more fewer read near-black (at most 15 of 255)
            if depth is not None and b is not None and (b > depth or b <= depth - 4):
                self.depths.append(f"{source or 'an image'} ({b} bits: {'saturated' if b > depth else 'near-black'})")

    def add_decoded(self, images: Sequence[DecodedImage]) -> None:
        """:meth:`add` for decoded images."""
        self.add([d.size for d in images], [d.source for d in images], [d.bits for d in images],
                 [d.chroma for d in images])  # fmt: skip

    def warn(self, total: int) -> None:
        """One warning per kind of odd input among the ``total`` inputs of the call."""
        for line in self.warnings(total):
            log.warning("%s", line)

    def warnings(self, total: int) -> list[str]:
        """The lines :meth:`warn` logs."""
        lines = []
        if self.aspects and self.profile.aspects is not None:
            low, high = self.profile.aspects
            seen = f"{low:.2f}" if round(low, 2) == round(high, 2) else f"{low:.2f}-{high:.2f}"
            # A good KolektorSDD part fed sideways was flagged by ``patchcore`` and scored below the good frames on
            # a ``musc`` line: stretched, it is scored squashed.
            lines.append(
                f"{len(self.aspects)} of {total} image(s) have an aspect (width / height) outside "
                f"{self.profile.aspects_of} ({seen}) and are stretched to the model input more than those: a rotated "
                f"part or another product? Check their scores. First: {_first(self.aspects)}"
            )
        if self.small:
            lines.append(
                f"{len(self.small)} of {total} image(s) are under a third of {self.profile.smallest_of} size "
                f"({self.profile.smallest} px on its longer side) and are upscaled to the model input: their detail "
                f"is blur and their scores mean little. First: {_first(self.small)}"
            )
        if self.colours:
            now, then = ("gray", "in colour") if self.profile.colour == "colour" else ("in colour", "gray")
            lines.append(
                f"{len(self.colours)} of {total} image(s) are {now} where every {self.profile.images} was {then}: "
                f"another camera setting? Their features differ from every {self.profile.images}'s, so their scores "
                "mean little. "
                f"First: {_first(self.colours)}"
            )
        if self.depths:
            lines.append(
                f"{len(self.depths)} of {total} image(s) are 16-bit data of another depth than the model's bit_depth "
                f"{self.profile.bit_depth} and read saturated or near-black: another camera setting? "
                f"(preprocess.bit_depth: a fit, or a zero-shot pool, decides it). First: {_first(self.depths)}"
            )
        return lines


def _name(source: str | None, h: int, w: int) -> str:
    return source if source is not None else f"an image of {w}x{h} px"


def _first(names: list[str]) -> str:
    return ", ".join(names[:3])
