"""Image inputs -> decoded RGB -> batches of model-input views (the first stage of the data flow).

An input is a path, encoded bytes (a 1-D uint8 array too; the API reads a binary file object into bytes), a PIL
image or an RGB array (``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)``; uint8, uint16 (scaled to 8 bits as 16-bit files
are) or float in [0, 1]); torch tensors in (C, H, W) or (H, W, C) layout are accepted too. Arrays are taken as
**RGB**, not OpenCV's BGR.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol, TypeGuard, Union, cast

import cv2
import numpy as np
from numpy.typing import NDArray

from anomaly.data.io import as_rgb8, pil_pixels, read_image_size, read_pixels, significant_bits, stored_bit_depth
from anomaly.data.views import Layout, ViewSpec, chroma, cut_views, standardize_intensity
from anomaly.errors import DataError

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "DecodedImage",
    "ImageBatch",
    "ImageInput",
    "UnreadableInput",
    "decode_input",
    "fingerprint",
    "image_size",
    "input_error",
    "iter_batches",
    "is_encoded_array",
    "is_stream",
    "raw_pixels",
    "read_streams",
    "support_views",
    "to_rgb",
]

_SQUARE_ENOUGH = 1.1  # a support image whose sides differ by at most this factor is also turned by 90 degrees


class TensorLike(Protocol):
    """A torch tensor, as this module reads one without importing torch (the data layer stays torch-free)."""

    def detach(self) -> Any: ...
    def cpu(self) -> Any: ...


ImageInput = Union[str, "os.PathLike[str]", bytes, BinaryIO, NDArray[Any], "Image.Image", TensorLike]


@dataclass(frozen=True)
class UnreadableInput:
    """A file object whose bytes could not be read: decoding it raises ``reason``, so ``on_error="skip"`` gives
    it an error result like any unreadable image."""

    reason: str


def fingerprint(views: NDArray[np.uint8] | None) -> str:
    """A digest of an image's model-input pixels: equal for a resent frame or a copied file (features of one image
    may differ in their last bits between batches, the decoded pixels do not)."""
    return hashlib.blake2b(b"" if views is None else views.tobytes(), digest_size=16).hexdigest()


def is_stream(item: object) -> bool:
    """A binary or text file object (``open``, ``io.BytesIO``), or an upload or temporary file holding one as
    ``.file`` (Starlette's ``UploadFile``, ``tempfile.NamedTemporaryFile``)."""
    return isinstance(item, io.IOBase) or isinstance(getattr(item, "file", None), io.IOBase)


def read_streams(items: Iterable[Any]) -> list[Any]:
    """``items`` as a list, each file object (:func:`is_stream`) replaced by its remaining bytes, read once (or by
    an :class:`UnreadableInput`); other inputs as they are."""
    return [_read_stream(item) if is_stream(item) else item for item in items]


def _read_stream(stream: Any) -> bytes | UnreadableInput:
    file = stream if isinstance(stream, io.IOBase) else stream.file
    name = getattr(stream, "filename", None) or getattr(file, "name", None)
    label = "image file object" + (f" {name}" if isinstance(name, str) else "")
    if isinstance(file, io.TextIOBase):
        return UnreadableInput(f"{label}: opened in text mode; open it with 'rb'")
    try:
        data = file.read()
    except (OSError, ValueError) as exc:  # closed, or not open for reading
        return UnreadableInput(f"{label}: unreadable ({exc})")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        return UnreadableInput(f"{label}: read() gave {type(data).__name__}, not bytes")
    return bytes(data)


@dataclass
class DecodedImage:
    """One input cut into model-input views, with what the later stages need to know about it."""

    views: NDArray[np.uint8] | None  # (V, H_in, W_in, 3); None when decoding failed
    size: tuple[int, int]  # original (H, W)
    source: str | None
    original: NDArray[np.uint8] | None = None  # the full decoded image, when kept
    error: str | None = None
    layout: Layout | None = None  # where the views sit (None: one stretched view)
    bits: int | None = None  # the bits its 16-bit values need (None: 8-bit data), see ViewSpec.bit_depth
    chroma: float | None = None  # how coloured its views are (anomaly.data.views.chroma); None when not decoded


@dataclass
class ImageBatch:
    """Consecutive inputs decoded together; ``failed`` holds the positions whose decoding failed."""

    images: NDArray[np.uint8]  # (V_ok, H_in, W_in, 3): the views of the decodable inputs, in order
    items: list[DecodedImage]  # every input of the batch, in order

    @property
    def ok(self) -> list[DecodedImage]:
        """The decodable inputs, in the order of ``images``."""
        return [d for d in self.items if d.error is None]


def to_rgb(item: ImageInput, bit_depth: int = 16) -> tuple[NDArray[np.uint8], str | None]:
    """Decode any supported input to an RGB uint8 array and its source path (None for in-memory data).

    16-bit data (files, uint16 arrays, 16-bit PIL images) is taken to use ``bit_depth`` bits (see
    :func:`anomaly.data.io.to_8bit`).
    """
    image, source, _ = decode_rgb(item, bit_depth)
    return image, source


def decode_rgb(
    item: ImageInput, bit_depth: int = 16, pixels: NDArray[Any] | None = None
) -> tuple[NDArray[np.uint8], str | None, int | None]:
    """:func:`to_rgb`, and the bits the input's 16-bit values need (None for 8-bit data): an image of another
    depth than ``bit_depth`` reads near-black or saturated (:class:`anomaly.data.input_checks.InputCheck`).
    ``pixels``: the input's :func:`raw_pixels`, where they were read already."""
    pixels = raw_pixels(item) if pixels is None else pixels
    assert pixels is not None  # not header_first: always decoded
    source = os.fspath(item) if isinstance(item, (str, os.PathLike)) else None
    return as_rgb8(pixels, bit_depth), source, significant_bits(pixels)


def raw_pixels(item: ImageInput, header_first: bool = False) -> NDArray[Any] | None:
    """An input's pixels at its own depth (uint8 or 16-bit integers; gray or RGB), as :func:`to_rgb` reads them.

    With ``header_first``, a file whose header says 8 bits per sample is not decoded and None is returned.
    """
    if isinstance(item, (str, os.PathLike)):
        return None if header_first and stored_bit_depth(item) == 8 else read_pixels(item)
    if isinstance(item, (bytes, bytearray, memoryview)):
        return read_pixels(bytes(item))
    if is_encoded_array(item):
        return read_pixels(item.tobytes())
    if isinstance(item, UnreadableInput):
        raise DataError(item.reason)
    array = _integers_as_16_bit(_in_memory_array(item))
    if (
        array.dtype == np.uint16
        and array.size
        and (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3, 4)))
    ):
        return array if array.ndim == 2 else array[:, :, 0] if array.shape[2] == 1 else array[:, :, :3]
    return _array_rgb(array)  # refuses empty arrays and other shapes


def is_encoded_array(item: object) -> TypeGuard[NDArray[np.uint8]]:
    """A 1-D uint8 array: the bytes of an encoded file (``np.fromfile``, ``cv2.imencode``), never pixels."""
    return isinstance(item, np.ndarray) and item.ndim == 1 and item.dtype == np.uint8


def _in_memory_array(item: ImageInput) -> NDArray[Any]:
    """A tensor, PIL image or array as an (H, W[, C]) array (PIL's 16-bit gray kept at its depth)."""
    if hasattr(item, "detach") and hasattr(item, "cpu"):  # torch tensor, without importing torch here
        tensor = item.detach().cpu()
        try:
            array = tensor.numpy()
        except TypeError:  # a dtype NumPy lacks (bfloat16): its values as float32, then read as float images are
            array = tensor.float().numpy()
        if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[2] not in (1, 3, 4):
            array = np.moveaxis(array, 0, -1)
        return cast("NDArray[Any]", array)
    if hasattr(item, "mode") and hasattr(item, "convert"):  # PIL image
        return pil_pixels(cast("Image.Image", item))
    if isinstance(item, np.ndarray):
        return item
    raise DataError(
        f"unsupported image input of type {type(item).__name__}: give a path, bytes, a PIL image or an RGB array"
    )


def image_size(item: ImageInput) -> tuple[int, int]:
    """``(H, W)`` of an input as :func:`to_rgb` decodes it; files are measured from their header."""
    if isinstance(item, (str, os.PathLike)):
        return read_image_size(item)
    height, width = to_rgb(item)[0].shape[:2]
    return height, width


def decode_input(
    item: ImageInput,
    size: tuple[int, int],
    keep: bool = False,
    spec: ViewSpec | None = None,
    pixels: NDArray[Any] | None = None,
) -> DecodedImage:
    """Decode one input and cut it into views of ``size`` (H, W) as ``spec`` says (default: stretched).

    Resizing uses INTER_AREA when shrinking, else bilinear; see :mod:`anomaly.data.views`. ``pixels``: the input's
    :func:`raw_pixels`, where they were read already (not read again).
    """
    spec = spec or ViewSpec()
    image, source, bits = decode_rgb(item, spec.bit_depth, pixels)
    h, w = image.shape[:2]
    layout = spec.layout((h, w), size)
    views = cut_views(image, layout, size)
    colour = chroma(views)  # before standardisation, which scales it
    if spec.standardize:  # after resizing (an affine map commutes with it), so only the views are transformed
        views = standardize_intensity(views, image)
    return DecodedImage(views, (h, w), source, image if keep else None, layout=layout, bits=bits, chroma=colour)


def iter_batches(
    items: Sequence[ImageInput],
    size: tuple[int, int],
    batch_size: int,
    *,
    keep_images: bool = False,
    skip_errors: bool = False,
    spec: ViewSpec | None = None,
    pixels: dict[int, NDArray[Any]] | None = None,
) -> Iterator[ImageBatch]:
    """Decode + cut into views in a thread pool, ahead of the consumer; batches of ``batch_size`` views or more.

    A batch closes once it holds ``batch_size`` views (at least one input), and at most about twice that many
    views are decoded ahead: ``batch_size`` whole images as before, but one 6000 x 4000 frame in 256 px tiles (651
    views, 128 MB of them) at a time instead of 16 (4 frames took 2.5 GB where one took 1.7). With
    ``skip_errors`` an input that cannot be decoded is reported in its ``DecodedImage.error`` instead of raising,
    so one bad file does not lose the rest of the batch. ``pixels``: the :func:`raw_pixels` of some of the inputs
    by position, already read (the sample that decided the ``auto`` settings), each taken out of it when used.
    """

    def work(index: int) -> DecodedImage:
        item = items[index]
        read = None if pixels is None else pixels.pop(index, None)
        try:
            return decode_input(item, size, keep_images, spec, read)
        except DataError as exc:
            error = input_error(exc, item, index, len(items))
            if not skip_errors:
                raise error from None
            source = os.fspath(item) if isinstance(item, (str, os.PathLike)) else None
            return DecodedImage(None, (0, 0), source, None, str(error))

    def batch_of(decoded: list[DecodedImage]) -> ImageBatch:
        ok = [d.views for d in decoded if d.views is not None]
        return ImageBatch(np.concatenate(ok) if ok else np.empty((0, *size, 3), dtype=np.uint8), decoded)

    workers = os.cpu_count() or 2
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque[Future[DecodedImage]] = deque()
        next_item, most_views = 0, 0  # the most views one input has had so far (0: none decoded yet)
        batch: list[DecodedImage] = []
        views = 0
        while next_item < len(items) or pending:
            ahead = workers if not most_views else max(1, 2 * batch_size // most_views)
            while next_item < len(items) and len(pending) < ahead:
                pending.append(pool.submit(work, next_item))
                next_item += 1
            decoded = pending.popleft().result()
            n = 1 if decoded.views is None else len(decoded.views)
            most_views = max(most_views, n)
            batch.append(decoded)
            views += n
            if views >= batch_size:
                yield batch_of(batch)
                batch, views = [], 0
        if batch:
            yield batch_of(batch)


def input_error(exc: DataError, item: ImageInput, index: int, total: int) -> DataError:
    """``exc`` raised decoding ``items[index]`` of ``total``, naming the input when its message cannot: a file's
    message names the file, an array's says only what is wrong with it."""
    if total == 1 or isinstance(item, (str, os.PathLike)):
        return exc
    return DataError(f"input {index} (of {total}, counted from 0): {exc}")


def support_views(item: ImageInput, bit_depth: int = 16) -> list[NDArray[np.uint8]]:
    """The views of a few-shot support image, identity first: 3 rotations, vertical and horizontal flip. A
    non-square image (sides further apart than 10 %) is not turned by 90 degrees: resized to the model input like
    the pool's images, its turned copies would be squashed parts that look like no image of the pool."""
    image, _ = to_rgb(item, bit_depth)
    h, w = image.shape[:2]
    turns = range(4) if max(h, w) <= _SQUARE_ENOUGH * min(h, w) else (0, 2)
    rotations = [np.ascontiguousarray(np.rot90(image, k)) for k in turns]
    return [*rotations, np.ascontiguousarray(image[::-1]), np.ascontiguousarray(image[:, ::-1])]


def _integers_as_16_bit(array: NDArray[Any]) -> NDArray[Any]:
    """Integer arrays other than uint8 as image files of them are read: values up to 255 as 8-bit data, up to
    65535 as 16-bit data (scaled by ``bit_depth``), anything else refused; booleans (masks) refused."""
    if array.dtype == np.bool_:
        raise DataError("boolean image arrays are masks, not images: pass uint8 (0-255), uint16 or float in [0, 1]")
    if array.dtype.kind not in "iu" or array.dtype in (np.uint8, np.uint16) or not array.size:
        return array
    low, high = int(array.min()), int(array.max())
    if low < 0 or high > 65535:
        raise DataError(f"{array.dtype} image array with values {low}..{high}: pass uint8 (0-255) or uint16 data")
    return array.astype(np.uint8 if high <= 255 else np.uint16)


def _array_rgb(array: NDArray[Any]) -> NDArray[np.uint8]:
    """uint8 or float [0, 1] arrays of a valid shape -> RGB uint8 (integers and 16-bit data come as
    :func:`raw_pixels` reads them)."""
    if array.size == 0 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise DataError(f"image arrays must be (H, W), (H, W, 3) or (H, W, 4) RGB, got shape {array.shape}")
    if array.dtype != np.uint8:
        if array.dtype.kind == "f":
            if not np.isfinite(array).all():
                raise DataError("image array holds NaN or infinite values")
            if array.min() < -1e-3 or array.max() > 1 + 1e-3:  # 0-255 floats would all saturate to white
                raise DataError(
                    f"float image arrays must hold values in [0, 1], got {array.min():g}..{array.max():g}; "
                    "pass uint8 for 0-255 data"
                )
            array = np.clip(np.rint(array * 255), 0, 255).astype(np.uint8)  # floats are taken as [0, 1]
        else:
            raise DataError(f"image arrays must be uint8, uint16 or float in [0, 1], got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        return cv2.cvtColor(array, cv2.COLOR_GRAY2RGB)  # type: ignore[return-value]  # cv2's stubs drop the dtype
    return np.ascontiguousarray(array[:, :, :3])
