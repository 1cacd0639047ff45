"""Image and mask decoding, and discovery of image files.

This is the only module of ``anomaly`` that imports PIL. JPEGs in RGB or gray go through simplejpeg (libjpeg-turbo,
which reports lost data instead of printing it), everything else through OpenCV first (fast, releases the GIL), with
PIL as the fallback for what OpenCV cannot read.
"""

from __future__ import annotations

import glob
import io
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, cast

import cv2
import numpy as np
import simplejpeg
from numpy.typing import NDArray
from PIL import Image, ImageOps, UnidentifiedImageError

from anomaly._fs import BENCHMARK_MARKER, IMPORT_MARKER, OUTPUT_MARKER
from anomaly.errors import DataError

log = logging.getLogger(__name__)

__all__ = [
    "GLOB_CHARS",
    "IMAGE_SUFFIXES",
    "MAX_PIXELS",
    "SOFT_MASK_LEVELS",
    "as_rgb8",
    "border_all_set",
    "decode_bytes",
    "drawn_levels",
    "glob_paths",
    "is_image_file",
    "list_images",
    "load_map",
    "mask_level_count",
    "pil_pixels",
    "read_image",
    "read_image_size",
    "read_images",
    "read_mask",
    "read_mask_levels",
    "read_pixels",
    "resize_mask",
    "significant_bits",
    "stored_bit_depth",
    "to_8bit",
]

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
"""Suffixes recognised as images, compared case-insensitively."""

# ANYDEPTH keeps 16-bit data, ANYCOLOR keeps grayscale as one channel and drops alpha. Unlike IMREAD_UNCHANGED,
# these flags make OpenCV apply the EXIF orientation of JPEG, PNG and TIFF files; OpenCV 4.8 ignores it in WebP
# files, so for WebP it is switched off and applied here, identically for every OpenCV version.
_CV2_FLAGS = cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR
_EXIF_ORIENTATION = 0x0112
GLOB_CHARS = frozenset("*?[")
SOFT_MASK_LEVELS = 8  # a mask of more levels is soft or lossy (NEU-Seg's class masks hold 3), binarised at > 0


def _max_pixels(text: str | None, default: int = 150_000_000) -> int:
    """``ANOMALY_MAX_PIXELS`` as a pixel count: a whole number (``200000000``, ``200_000_000``) or one in float
    notation (``2e8``, as the limit is usually thought of); unset or empty: ``default``. Anything else is a one-line
    DataError naming the variable (it was a ValueError traceback when the package was imported)."""
    if text is None or not text.strip():
        return default
    try:
        value = float(text.strip())
    except ValueError:
        value = float("nan")
    if not np.isfinite(value) or value < 1:
        raise DataError(f"ANOMALY_MAX_PIXELS={text!r}: expected a positive number of pixels, e.g. 2e8")
    return int(value)


MAX_PIXELS = _max_pixels(os.environ.get("ANOMALY_MAX_PIXELS"))
"""Largest image (width x height) decoded; bigger ones (decompression bombs) are refused. Env: ANOMALY_MAX_PIXELS."""
# PIL's own bomb check warns above 89 MP and refuses above twice that whatever ANOMALY_MAX_PIXELS says. The check here
# (_check_header, from the header, with the size) is the one in force; PIL's is raised to it where it is higher, never
# lowered or turned off (process-wide: a program importing anomaly keeps PIL's protection). Its warning between the
# two is silenced by the CLI, whose refusal names the size; far over the limit PIL refuses first (_check_header).
Image.MAX_IMAGE_PIXELS = max(MAX_PIXELS, Image.MAX_IMAGE_PIXELS or 0)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic TIFF and BigTIFF
_PIL_NATIVE_MODES = frozenset({"L", "RGB", "I", "F"})
# Leading bytes of the formats Pillow or OpenCV decode (TGA, PCX and SGI have none: Pillow recognises them itself).
# A file that Pillow cannot open and that starts with none of these is refused without calling OpenCV, which would
# print its own error to stderr.
_FORMAT_SIGNATURES = {
    _PNG_SIGNATURE: "PNG",
    b"\xff\xd8\xff": "JPEG",
    **dict.fromkeys(_TIFF_SIGNATURES, "TIFF"),
    b"BM": "BMP",
    b"GIF8": "GIF",
    b"RIFF": "WebP",
    b"\x00\x00\x00\x0cjP  ": "JPEG 2000",
    b"\xff\x4f\xff\x51": "JPEG 2000",
    **dict.fromkeys((b"P1", b"P2", b"P3", b"P4", b"P5", b"P6", b"P7", b"PF", b"Pf"), "PNM"),
    b"#?RADIANCE": "Radiance HDR",
    b"#?RGBE": "Radiance HDR",
    b"\x59\xa6\x6a\x95": "Sun raster",
    b"\x76\x2f\x31\x01": "OpenEXR",
    b"\x00\x00\x01\x00": "ICO",
    b"8BPS": "PSD",
    b"qoif": "QOI",
    b"DDS ": "DDS",
}
# libjpeg's warnings that mean pixels were lost (a damaged byte mid-file, a cut-off file): OpenCV and Pillow print them
# and return the image with the rest grey or smeared. Its other warnings (extraneous bytes between segments, an
# unknown JFIF revision) leave the image whole, as every viewer shows it.
_JPEG_DATA_LOST = ("premature end", "bad huffman code", "bad arithmetic code", "instead of rst")
# Formats that OpenCV may decode where Pillow cannot open them: TIFF (libtiff's compressions and sample layouts),
# WebP and AVIF / HEIF (a Pillow built without them), and those Pillow does not read at all.
_OPENCV_TRIES = frozenset({"TIFF", "WebP", "AVIF / HEIF", "JPEG 2000", "PNM", "Radiance HDR", "Sun raster", "OpenEXR"})


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """Tell whether ``path`` has an image suffix (see :data:`IMAGE_SUFFIXES`); the file is not opened."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def read_image(path: str | os.PathLike[str], bit_depth: int | None = 16) -> NDArray[np.uint8]:
    """Decode an image file to RGB.

    EXIF orientation is applied; grayscale, palette, RGBA (alpha dropped) and 16-bit images are all converted.
    A 16-bit image's values are taken to use ``bit_depth`` bits (12 for a 12-bit camera's 0..4095) and scaled to
    8 bits by :func:`to_8bit`; the default, 16, is the full range (``>> 8``).

    Args:
        path: Image file.
        bit_depth: Significant bits of 16-bit data, 8 to 16; None: the image's own (:func:`significant_bits`),
            for display, where images need not be comparable.

    Returns:
        ``(H, W, 3)`` uint8 RGB array, C-contiguous.

    Raises:
        DataError: The file is missing, cannot be decoded or has more than :data:`MAX_PIXELS` pixels.
    """
    return decode_bytes(_read_bytes(Path(path)), _printable(Path(path)), bit_depth)


def pil_pixels(image: Image.Image) -> NDArray[Any]:
    """An in-memory PIL image's pixels as :func:`read_pixels` reads a file of it: 16-bit gray and 32-bit integers at
    their depth, any other mode as RGB; EXIF-oriented where the image is as its decoder gave it (``Image.open``
    leaves a photo's orientation to the caller: a file was read upright and its PIL image on its side). An image
    the caller derived (``rotate``, ``crop``, ``convert``: ``format`` None) is taken as its pixels stand, though it
    keeps the tag: a photo turned upright by hand is not turned again."""
    orientation = 1
    if image.format is not None:
        try:
            orientation = int(image.getexif().get(_EXIF_ORIENTATION, 1))
        except Exception:  # metadata is best effort: malformed EXIF leaves the pixels as stored
            orientation = 1
    if image.mode.startswith("I;16"):  # I;16, I;16B, I;16L: native-endian uint16
        pixels = np.asarray(image).astype(np.uint16)
    elif image.mode == "I":  # 32-bit integers (camera SDKs): read as files of them are
        pixels = np.asarray(image)
    else:
        pixels = np.asarray(image.convert("RGB"))
    return _orient(pixels, orientation)


def read_pixels(source: str | os.PathLike[str] | bytes) -> NDArray[Any]:
    """Decode an image file (or encoded bytes) at its own depth (uint8, or uint16 for 16-bit files): gray ``(H, W)``
    or RGB ``(H, W, 3)``, EXIF-oriented, no alpha. :func:`to_8bit` converts it as :func:`read_image` would."""
    if isinstance(source, (bytes, bytearray)):
        return _integer_pixels(_decode(np.frombuffer(source, dtype=np.uint8), "image bytes"), "image bytes")
    name = _printable(Path(source))
    return _integer_pixels(_decode(_read_bytes(Path(source)), name), name)


def stored_bit_depth(path: str | os.PathLike[str]) -> int:
    """Bits per sample the file stores (8 or 16), read from its header: PNG's IHDR, TIFF's BitsPerSample.

    Other formats (JPEG, BMP, WebP) decode to 8 bits. A file whose header cannot be read counts as 8 bits: the
    decoder reports it when the image is read.
    """
    try:
        with open(path, "rb") as file:
            head = file.read(26)
        if head.startswith(_PNG_SIGNATURE) and len(head) == 26:
            return 16 if head[24] == 16 else 8
        if head[:4] in _TIFF_SIGNATURES:
            with open(path, "rb") as stream:  # the tags alone, wherever in the file they are
                return 16 if _tiff_bits(stream) > 8 else 8
    except Exception:  # unreadable or malformed headers: reported by the decoder, not here
        return 8
    return 8


def significant_bits(pixels: NDArray[Any]) -> int | None:
    """Bits that 16-bit pixel values need, rounded up to an even count as camera depths are (values up to 4095:
    12; up to 1000: 10; never below 8). None for 8-bit data."""
    if pixels.dtype == np.uint8:
        return None
    top = int(np.clip(pixels.max(initial=0), 0, 65535))
    bits = max(8, top.bit_length())
    return min(16, bits + bits % 2)


def to_8bit(pixels: NDArray[Any], bit_depth: int = 16) -> NDArray[np.uint8]:
    """Integer pixels -> uint8: 16-bit values using ``bit_depth`` bits are shifted right by ``bit_depth - 8``
    (values above that range saturate at 255); uint8 is returned as it is."""
    if pixels.dtype == np.uint8:
        return pixels
    if not 8 <= bit_depth <= 16:
        raise ValueError(f"bit_depth must be in [8, 16], got {bit_depth}")
    return np.minimum(np.clip(pixels, 0, 65535).astype(np.uint32) >> (bit_depth - 8), 255).astype(np.uint8)


def read_image_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """``(H, W)`` of the image :func:`read_image` returns, read from the file header.

    The pixels are decoded only for files PIL cannot open and for EXIF orientations that rotate by 90 degrees
    (how PIL reports their size differs between its format plugins).
    """
    try:
        with Image.open(path) as opened:
            width, height = opened.size
            rotated = int(opened.getexif().get(_EXIF_ORIENTATION, 1)) in (5, 6, 7, 8)
    except Exception:  # PIL raises many exception types; decoding gives the size or the proper error
        rotated = True
    if rotated:
        height, width = read_image(path).shape[:2]
    return height, width


def decode_bytes(
    data: bytes | NDArray[np.uint8], name: str = "image bytes", bit_depth: int | None = 16
) -> NDArray[np.uint8]:
    """Decode an encoded image (PNG, JPEG, ...) held in memory to RGB, as :func:`read_image` does."""
    buffer = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray)) else data
    pixels = _integer_pixels(_decode(buffer, name), name)
    return as_rgb8(pixels, (significant_bits(pixels) or 16) if bit_depth is None else bit_depth)


def read_images(
    paths: Sequence[str | os.PathLike[str]], num_threads: int | None = None, bit_depth: int | None = 16
) -> list[NDArray[np.uint8]]:
    """Decode many images in parallel with :func:`read_image`, preserving order.

    Args:
        paths: Image files.
        num_threads: Worker threads; ``None`` uses ``min(8, os.cpu_count())``.
        bit_depth: As for :func:`read_image`; None: one depth for all of them, the bits that the largest value of
            their 16-bit images needs, so that their brightness stays comparable.

    Returns:
        One ``(H, W, 3)`` uint8 RGB array per path, in the order of ``paths``.

    Raises:
        DataError: For the first path (in order) that cannot be read.
        ValueError: ``num_threads`` is smaller than 1.
    """
    if num_threads is None:
        num_threads = min(8, os.cpu_count() or 1)
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    if bit_depth is not None:
        return _in_threads(lambda path: read_image(path, bit_depth), paths, num_threads)
    pixels = _in_threads(read_pixels, paths, num_threads)
    shared = max((bits for bits in map(significant_bits, pixels) if bits is not None), default=16)
    return [as_rgb8(p, shared) for p in pixels]


def _in_threads(read: Callable[[Any], Any], paths: Sequence[Any], num_threads: int) -> list[Any]:
    """``[read(p) for p in paths]`` on up to ``num_threads`` threads (decoders release the GIL); the first
    error in order is raised."""
    if num_threads == 1 or len(paths) < 2:
        return [read(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(num_threads, len(paths))) as pool:
        futures = [pool.submit(read, p) for p in paths]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def as_rgb8(pixels: NDArray[Any], bit_depth: int) -> NDArray[np.uint8]:
    """Decoded integer pixels (gray or RGB, any depth) -> C-contiguous (H, W, 3) uint8 RGB."""
    pixels = to_8bit(pixels, bit_depth)
    if pixels.ndim == 2:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_GRAY2RGB)
    return cast("NDArray[np.uint8]", np.ascontiguousarray(pixels))


def read_mask(path: str | os.PathLike[str], size: tuple[int, int] | None = None) -> NDArray[np.bool_]:
    """Read a ground-truth mask as a boolean array.

    A pixel is positive when its :func:`read_mask_levels` value is ``> 0`` (so 0/1 and 0/255 masks both work).

    Args:
        path: Mask image file.
        size: Optional ``(H, W)`` to resize to, with nearest-neighbour interpolation.

    Returns:
        ``(H, W)`` bool array.

    Raises:
        DataError: The file is missing or cannot be decoded.
        ValueError: ``size`` is not two positive integers.
    """
    mask = cast("NDArray[np.bool_]", read_mask_levels(path) > 0)
    return mask if size is None else resize_mask(mask, size)


def read_mask_levels(path: str | os.PathLike[str]) -> NDArray[Any]:
    """The (H, W) levels a ground-truth mask is binarised from: the largest colour channel, or the alpha channel
    where it varies (a mask drawn as transparency, black or any colour beneath it); for a folder of masks (MVTec
    LOCO, one per defect region), their pixel-wise maximum. DataError naming the file when it is missing or cannot
    be decoded, or naming the folder when its masks differ in size."""
    if Path(path).is_dir():
        parts = [read_mask_levels(file) for file in list_images([path])[0]]
        if len({part.shape for part in parts}) > 1:
            raise DataError(f"{_printable(Path(path))}: its masks differ in size ({sorted({p.shape for p in parts})})")
        return np.maximum.reduce(parts)
    data = _read_bytes(Path(path))
    pixels = _decode(data, _printable(Path(path)))
    levels = pixels.max(axis=2) if pixels.ndim == 3 else pixels
    alpha = _alpha(data)
    return levels if alpha is None or alpha.shape != levels.shape else drawn_levels(levels, alpha)


def drawn_levels(levels: NDArray[Any], alpha: NDArray[Any]) -> NDArray[Any]:
    """A mask's levels given its alpha channel: the levels alone where the alpha is constant (opaque), else the
    levels where drawn (alpha > 0) and 0 where transparent, or the alpha itself where the drawing is black beneath
    (a mask drawn as transparency). Shared by evaluation and ``anomaly import``."""
    if alpha.min() == alpha.max():
        return levels
    drawn = alpha > 0
    return np.where(drawn, levels if levels[drawn].any() else alpha, 0)


def mask_level_count(levels: NDArray[Any]) -> int:
    """How many distinct values a mask holds (a histogram for 8/16-bit masks; float or signed masks sorted); more
    than :data:`SOFT_MASK_LEVELS` is a soft or lossy mask."""
    if levels.dtype.kind == "u":
        return int(np.count_nonzero(np.bincount(levels.ravel())))
    return int(np.unique(levels).size)


def border_all_set(mask: NDArray[Any]) -> bool:
    """Every pixel of the mask's outer rows and columns is non-zero: a defect rarely touches all four edges, an
    inverted mask (black defects on a white background) always does."""
    return bool(mask[[0, -1], :].all() and mask[:, [0, -1]].all())


def _alpha(data: NDArray[np.uint8]) -> NDArray[Any] | None:
    """The EXIF-oriented alpha channel of an image that has one; else None."""
    try:
        with Image.open(io.BytesIO(data.tobytes())) as opened:
            if "A" not in opened.mode and "transparency" not in opened.info:
                return None
            return np.asarray(ImageOps.exif_transpose(opened).convert("RGBA"))[:, :, 3]
    except Exception:  # the decoder has already read it: an alpha channel PIL cannot give is none
        return None


def resize_mask(mask: NDArray[np.bool_], size: tuple[int, int]) -> NDArray[np.bool_]:
    """A boolean mask at ``size`` (H, W), nearest neighbour; ValueError unless two positive integers."""
    if tuple(size) == mask.shape:
        return mask
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size must be (H, W) with positive values, got {size}")
    height, width = int(size[0]), int(size[1])
    resized = cv2.resize(mask.view(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST_EXACT)
    return resized > 0


def list_images(
    inputs: Iterable[str | os.PathLike[str]] | str | os.PathLike[str], *, skip_imports: bool = False
) -> tuple[list[Path], int]:
    """Expand files, folders and glob patterns into a list of image files.

    Folders are searched recursively and sorted by relative path; hidden files and folders (name starting with
    ``.``) are skipped without being counted. The order of ``inputs`` is preserved and duplicates (same resolved
    file) are dropped. A path is read as a glob pattern only when no file or folder of that name exists. An
    explicitly named file that is not an image is left out with a warning naming it, and counted.

    Args:
        inputs: Image files, folders or glob patterns (``**`` is recursive).
        skip_imports: Leave out the categories that ``anomaly import`` wrote inside a folder (the importer's own
            sources: an --out there is not imported again). Earlier outputs of anomaly are always left out.

    Returns:
        ``(images, n_ignored)``: the image paths as found (absolute if the input was absolute) and the number
        of files skipped because they are not images.

    Raises:
        DataError: An input does not exist, a glob matches nothing, a folder or glob holds no image, or no
            image was found at all.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = list(inputs)
    images: list[Path] = []
    seen: dict[Path, Path] = {}  # resolved file -> the path it was first listed as
    n_ignored = 0
    unsupported: list[str] = []
    twins: list[tuple[Path, Path]] = []  # (dropped, kept): a symlink or a second listing of one file
    for item in inputs:
        path = Path(item)
        explicit_file = path.is_file()
        files = [path] if explicit_file else _expand(item, skip_imports)
        found = [f for f in files if is_image_file(f)]
        if explicit_file and not found:
            unsupported.append(_printable(path))
        if not found and not explicit_file:
            raise DataError(f"no image found in: {item}")
        n_ignored += len(files) - len(found)
        for file in found:
            key = file.resolve()
            if key not in seen:
                seen[key] = file
                images.append(file)
            else:
                twins.append((file, seen[key]))
    if twins:
        log.info("%d path(s) name a file already listed and are read once, first: %s (= %s)", len(twins), *twins[0])
    if not images and unsupported:
        raise DataError(f"unsupported image format: {', '.join(unsupported)} (supported: {' '.join(IMAGE_SUFFIXES)})")
    if unsupported:  # named by the user, so named back: a folder's other files are only counted
        shown = ", ".join(unsupported[:3]) + (f" and {len(unsupported) - 3} more" if len(unsupported) > 3 else "")
        log.warning("not an image format read here, left out: %s (supported: %s)", shown, " ".join(IMAGE_SUFFIXES))
    if not images:
        raise DataError(f"no image found in: {', '.join(str(i) for i in inputs) or '(no input given)'}")
    return images, n_ignored


def _expand(item: str | os.PathLike[str], skip_imports: bool) -> list[Path]:
    """List the files a folder or glob pattern stands for."""
    path = Path(item)
    if path.is_dir():
        return _walk(path, skip_imports)
    if GLOB_CHARS.isdisjoint(str(item)):
        raise DataError(f"no such file or folder: {item}")
    matches = glob_paths(item, skip_imports=skip_imports)
    if not matches:
        where = " outside earlier outputs of anomaly" if glob.glob(str(item), recursive=True) else ""
        raise DataError(f"no file matches: {item}{where}")
    files: list[Path] = []
    for match in matches:
        files.extend(_walk(match, skip_imports) if match.is_dir() else [match])
    return files


def glob_paths(pattern: str | os.PathLike[str], *, skip_imports: bool = False) -> list[Path]:
    """The matches of a glob ``pattern`` (``**`` recursive), sorted by their parts, leaving out those inside an
    earlier output of anomaly (and with ``skip_imports`` an earlier import) below the pattern's fixed folder, as a
    folder's walk leaves them out: ``'data/*'`` or ``'data/**/*.png'`` does not read the overlays (PNGs) of scores
    written into ``data/run1``, where ``data`` does not either. A pattern inside such a folder reads it."""
    markers = (OUTPUT_MARKER, BENCHMARK_MARKER, *((IMPORT_MARKER,) if skip_imports else ()))
    fixed = len(_glob_root(pattern).parts)
    marked: dict[Path, bool] = {}

    def inside_output(path: Path) -> bool:
        stop = len(path.parts) if path.is_dir() else len(path.parts) - 1  # the folders below the fixed one
        for end in range(fixed + 1, stop + 1):
            folder = Path(*path.parts[:end])
            if folder not in marked:
                marked[folder] = any((folder / marker).is_file() for marker in markers)
            if marked[folder]:
                return True
        return False

    matches = sorted((Path(m) for m in glob.glob(os.fspath(pattern), recursive=True)), key=lambda p: p.parts)
    kept = [m for m in matches if not inside_output(m)]
    if len(kept) < len(matches):
        log.info("%s: left out %d match(es) inside earlier outputs of anomaly", pattern, len(matches) - len(kept))
    return kept


def _glob_root(pattern: str | os.PathLike[str]) -> Path:
    """The folder a glob pattern starts from: its leading parts without a glob character."""
    parts = Path(pattern).parts
    fixed = next((i for i, part in enumerate(parts) if not GLOB_CHARS.isdisjoint(part)), len(parts))
    return Path(*parts[:fixed])


def _walk(root: Path, skip_imports: bool = False) -> list[Path]:
    """Non-hidden files under ``root``, recursively, sorted by relative path; symlinked folders followed once; an
    earlier output of anomaly (a benchmark's folder too: its PIMO plots are PNGs) below ``root`` left out, and with
    ``skip_imports`` an earlier import too."""
    markers = (OUTPUT_MARKER, BENCHMARK_MARKER, *((IMPORT_MARKER,) if skip_imports else ()))
    files: list[Path] = []
    visited: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:
            dirnames.clear()
            continue
        visited.add(real)
        if any(marker in filenames for marker in markers) and Path(dirpath) != root:
            dirnames.clear()  # an earlier output (overlays are PNGs) or import (masks): not this input
            continue
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        files.extend(Path(dirpath, name) for name in filenames if not name.startswith("."))
    files.sort(key=lambda p: p.relative_to(root).parts)
    return files


def _integer_pixels(pixels: NDArray[Any], name: str) -> NDArray[Any]:
    """uint8 or uint16 pixels. Float data (a float TIFF) in [0, 1] is read as image arrays are (x 255, 8 bits);
    other float data (HDR, raw counts) and wider or signed integers (an int32 TIFF) whose values do not fit
    0..65535 are a one-line error naming the image."""
    if pixels.dtype.kind == "f":
        finite = np.isfinite(pixels)
        if not finite.all():  # the range of the finite values would hide them; "nan..nan" named no value at all
            kinds = [k for k, has in (("NaN", np.isnan(pixels).any()), ("inf", np.isinf(pixels).any())) if has]
            raise DataError(
                f"cannot read image: {name} ({pixels.dtype} with {' and '.join(kinds)} values at "
                f"{int((~finite).sum())} pixel(s): float images are read in [0, 1] only; save it as 8 or 16 bits "
                "unsigned)"
            )
        low, high = float(pixels.min(initial=0)), float(pixels.max(initial=0))
        if not (low >= 0 and high <= 1):
            raise DataError(
                f"cannot read image: {name} ({pixels.dtype} values {low:g}..{high:g}: float images are read in [0, 1] "
                "only; save it as 8 or 16 bits unsigned)"
            )
        return np.rint(pixels * 255).astype(np.uint8)
    if pixels.dtype.kind not in "iu":
        raise DataError(f"cannot read image: {name} (unsupported pixel type {pixels.dtype})")
    if pixels.dtype in (np.uint8, np.uint16):
        return pixels
    low, high = int(pixels.min(initial=0)), int(pixels.max(initial=0))
    if low < 0 or high > 65535:
        raise DataError(
            f"cannot read image: {name} ({pixels.dtype} values {low}..{high} do not fit 16 bits; save it as 8 or 16 "
            "bits unsigned)"
        )
    return pixels.astype(np.uint8 if high <= 255 and pixels.dtype.itemsize == 1 else np.uint16)


def _decode(data: NDArray[np.uint8], name: str) -> NDArray[Any]:
    """Decode to a gray ``(H, W)`` or RGB ``(H, W, 3)`` array of the file's own depth, EXIF-oriented, no alpha."""
    mode = _check_header(data, name)
    if mode is None:  # Pillow cannot open it: OpenCV gets a chance at the formats only it reads
        kind = _image_format(data)
        if kind is None:
            raise DataError(f"cannot read image: {name} (not an image file: it starts with {bytes(data[:8])!r})")
        if kind not in _OPENCV_TRIES:  # Pillow reads these: it failed on a broken file, which OpenCV would print of
            raise DataError(f"cannot read image: {name} (corrupt or truncated {kind})")
    if mode in ("RGB", "L") and data[:3].tobytes() == b"\xff\xd8\xff":
        jpeg = _decode_jpeg(data, name, gray=mode == "L")
        return _decode_pil(data, name) if jpeg is None else _orient(jpeg, _pil_orientation(data))
    tiff = data[:4].tobytes() in _TIFF_SIGNATURES
    tags = _tiff_tags(io.BytesIO(data.tobytes())) if tiff else {}  # the copy is small next to the decode
    bits = _sample_bits(tags)
    if tags.get(284) == 2 and tags.get(277, 1) != 1 and bits > 8:  # PlanarConfiguration 2, SamplesPerPixel
        # OpenCV reads the first plane as interleaved samples and Pillow reads 8 bits: colour noise, not an error
        raise DataError(
            f"cannot read image: {name} (a {bits}-bit TIFF with separate colour planes, PlanarConfiguration 2, which "
            "the decoders here misread; save it with interleaved channels)"
        )
    if mode in ("RGBA", "LA") and tiff and bits <= 8:
        # OpenCV's TIFF reader multiplies 8-bit colours by alpha (PNGs drop alpha). Pillow keeps a 16-bit RGBA TIFF's
        # high bytes only (12-bit data read 0..15): OpenCV reads those colours as stored, at their own depth
        return _decode_pil(data, name)
    webp = data[:4].tobytes() == b"RIFF" and data[8:12].tobytes() == b"WEBP"
    pixels: NDArray[Any] | None  # the file's own depth: uint8 or uint16
    try:
        pixels = cv2.imdecode(data, _CV2_FLAGS | cv2.IMREAD_IGNORE_ORIENTATION if webp else _CV2_FLAGS)
    except cv2.error:
        pixels = None
    if pixels is None:
        return _decode_pil(data, name)
    if pixels.dtype == np.uint8 and tiff:
        if bits > 8:  # OpenCV reads a 16-bit gray + alpha TIFF as 8 bits of garbage, and Pillow cannot open it
            raise DataError(f"cannot read image: {name} (a {bits}-bit TIFF that decodes to 8 bits; save it without the "
                            "alpha channel)")  # fmt: skip
    if pixels.ndim == 3:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)
    return _orient(pixels, _pil_orientation(data)) if webp else pixels


def _decode_jpeg(data: NDArray[np.uint8], name: str, gray: bool) -> NDArray[np.uint8] | None:
    """A JPEG's pixels as stored (before EXIF orientation); DataError where data was lost, None where simplejpeg
    cannot decode the file at all (a warning in its headers, which Pillow's decoder passes over in silence)."""
    colorspace = "GRAY" if gray else "RGB"
    try:
        pixels = simplejpeg.decode_jpeg(data, colorspace=colorspace)
    except ValueError as exc:  # strict decoding raises libjpeg's warnings too
        if any(lost in str(exc).lower() for lost in _JPEG_DATA_LOST):
            raise DataError(f"cannot read image: {name} (corrupt or truncated JPEG: {exc})") from None
        try:
            pixels = simplejpeg.decode_jpeg(data, colorspace=colorspace, strict=False)
        except ValueError:
            return None
    return pixels[..., 0] if gray else pixels


def _tiff_bits(stream: BinaryIO) -> int:
    """The largest BitsPerSample of a TIFF's first image, read from its tags (8 when they cannot be read)."""
    return _sample_bits(_tiff_tags(stream))


def _sample_bits(tags: dict[int, Any]) -> int:
    """The largest BitsPerSample of TIFF ``tags`` (8 when it cannot be read)."""
    try:
        return int(max(np.atleast_1d(tags.get(258, 8))))
    except Exception:  # malformed tags: the decoder reports the file
        return 8


def _tiff_tags(stream: BinaryIO) -> dict[int, Any]:
    """The tags of a TIFF's first image (empty when they cannot be read: the decoder reports the file)."""
    from PIL import TiffImagePlugin

    try:
        head = stream.read(16)
        tags = TiffImagePlugin.ImageFileDirectory_v2(head if head[2:4] in (b"+\x00", b"\x00+") else head[:8])
        stream.seek(tags.next)
        tags.load(stream)
        return dict(tags)
    except Exception:  # malformed tags
        return {}


def _check_header(data: NDArray[np.uint8], name: str) -> str | None:
    """Refuse oversized images from their header alone, and corrupt PNGs before libpng prints to stderr; returns
    Pillow's mode of the image (None when Pillow cannot open it)."""
    if data[:8].tobytes() == _PNG_SIGNATURE:
        problem = _png_problem(data.tobytes())
        if problem:
            raise DataError(f"cannot read image: {name} (corrupt PNG: {problem})")
    try:
        with Image.open(io.BytesIO(data.tobytes())) as opened:
            width, height = opened.size
            mode = opened.mode
            pages = getattr(opened, "n_frames", 1) if data[:4].tobytes() in _TIFF_SIGNATURES else 1
    except Image.DecompressionBombError:
        raise DataError(
            f"cannot read image: {name} (over twice the {MAX_PIXELS / 1e6:.3g} MP limit; set ANOMALY_MAX_PIXELS to "
            "allow it)"
        ) from None
    except Exception:
        return None  # not readable by PIL: OpenCV gets its chance, then the PIL fallback names the file
    if pages > 1:  # (GIF / WebP animations are read at their first frame, as every viewer shows them)
        log.info("%s: a TIFF of %d pages; the first is read", name, pages)
    if width * height > MAX_PIXELS:
        raise DataError(
            f"cannot read image: {name} ({width}x{height} = {width * height / 1e6:.3g} MP exceeds the "
            f"{MAX_PIXELS / 1e6:.3g} MP limit; set ANOMALY_MAX_PIXELS to allow it)"
        )
    return mode


def _png_problem(raw: bytes) -> str | None:
    """Walk the PNG chunks checking lengths and CRCs (zlib.crc32: fast); None when the file is sound."""
    import struct
    import zlib

    pos = 8
    while pos + 12 <= len(raw):
        (length,) = struct.unpack(">I", raw[pos : pos + 4])
        end = pos + 12 + length
        if end > len(raw):
            return "truncated"
        kind = raw[pos + 4 : pos + 8]
        (crc,) = struct.unpack(">I", raw[end - 4 : end])
        if zlib.crc32(raw[pos + 4 : end - 4]) != crc:
            return f"CRC error in {kind.decode('latin-1') if kind.isalpha() else 'a'} chunk"
        if kind == b"IEND":
            return None
        pos = end
    return "truncated"


def _read_bytes(path: Path) -> NDArray[np.uint8]:
    if path.is_dir():
        raise DataError(f"{_printable(path)}: a folder, not an image (predict takes image files; fit takes folders)")
    if not path.is_file():
        raise DataError(f"image not found: {_printable(path)}")
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise DataError(f"cannot read image: {_printable(path)} ({exc.strerror or exc})") from exc
    if not data.size:
        raise DataError(f"cannot read image: {_printable(path)} (empty file)")
    return data


def _printable(path: Path) -> str:
    """The path as text that any terminal and UTF-8 file can hold (undecodable bytes escaped)."""
    return os.fsdecode(path).encode("utf-8", "backslashreplace").decode("utf-8")


def _pil_orientation(data: NDArray[np.uint8]) -> int:
    """EXIF orientation (1-8) read by PIL without decoding pixels (fine for JPEG, TIFF and WebP; not PNG)."""
    try:
        with Image.open(io.BytesIO(data.tobytes())) as opened:
            return int(opened.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # metadata is best effort: malformed EXIF leaves the pixels as stored
        return 1


def _orient(pixels: NDArray[Any], orientation: int) -> NDArray[Any]:
    """Apply an EXIF orientation (as PIL's ``ImageOps.exif_transpose``) to an ``(H, W[, C])`` array."""
    if orientation in (5, 6, 7, 8):
        pixels = pixels.swapaxes(0, 1)  # transpose; the flips below complete each rotation
    if orientation in (2, 3, 6, 7):
        pixels = pixels[:, ::-1]
    if orientation in (3, 4, 7, 8):
        pixels = pixels[::-1]
    return pixels


def _decode_pil(data: NDArray[np.uint8], name: str) -> NDArray[Any]:
    """PIL fallback of :func:`_decode` for files OpenCV cannot decode."""
    try:
        with Image.open(io.BytesIO(data.tobytes())) as opened:
            image = ImageOps.exif_transpose(opened)
        if image.mode in _PIL_NATIVE_MODES or image.mode.startswith("I;16"):
            return np.asarray(image)
        return np.asarray(image.convert("L" if image.mode in {"1", "LA", "La"} else "RGB"))
    except Exception as exc:  # PIL raises many exception types on malformed data
        detail = "" if isinstance(exc, UnidentifiedImageError) else f": {exc}"  # that one names a BytesIO object
        kind = _image_format(data) or "image"  # Pillow recognised it (TGA, SGI, PCX: no signature of ours)
        raise DataError(f"cannot read image: {name} (corrupt or truncated {kind}{detail})") from exc


def _image_format(data: NDArray[np.uint8]) -> str | None:
    """The image format that ``data``'s leading bytes announce, None for none of :data:`_FORMAT_SIGNATURES`."""
    head = data[:12].tobytes()
    if head[4:8] == b"ftyp":  # ISO base media files: AVIF, HEIC
        return "AVIF / HEIF"
    for signature, name in _FORMAT_SIGNATURES.items():
        if head.startswith(signature) and (name != "WebP" or head[8:12] == b"WEBP"):
            return name
    return None


def load_map(path: str | os.PathLike[str]) -> NDArray[np.float32]:
    """An anomaly map written by ``anomaly score --maps``: a finite (H, W) array, or DataError naming the file."""
    try:
        amap = np.load(path, allow_pickle=False)
    except OSError as exc:
        raise DataError(f"{path}: cannot read the map ({exc.strerror or exc})") from None
    except (ValueError, EOFError):  # numpy's message (about allow_pickle for any garbage) misleads
        raise DataError(f"{path}: not a readable anomaly map (.npy float array)") from None
    if amap.ndim != 2 or amap.dtype.kind not in "fiu" or min(amap.shape) == 0:
        raise DataError(f"{path}: expected an (H, W) map of numbers, got {amap.dtype} of shape {amap.shape}")
    if not np.isfinite(amap).all():
        raise DataError(f"{path}: the map holds NaN or infinite values")
    with np.errstate(over="ignore"):
        single = amap.astype(np.float32, copy=False)
    if not np.isfinite(single).all():  # a float64 map from another tool, beyond float32's range
        raise DataError(f"{path}: the map holds values beyond float32's range (about 3.4e38); scale it down")
    return single
