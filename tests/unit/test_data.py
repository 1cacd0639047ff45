"""Unit tests of anomaly.data: decoding, file discovery, dataset loaders and the synthetic generator."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from anomaly._fs import OUTPUT_MARKER
from anomaly.data import (
    CategoryData,
    find_categories,
    is_category_root,
    list_images,
    load_folder,
    load_ground_truth,
    load_mvtec,
    load_visa,
    make_synthetic_category,
    read_image,
    read_image_size,
    read_images,
    read_mask,
)
from anomaly.data.io import read_pixels, stored_bit_depth
from anomaly.errors import DataError

RNG = np.random.default_rng(0)
PIXELS = RNG.integers(0, 256, (20, 30, 3), dtype=np.uint8)  # H=20, W=30


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def _quadrants(height: int = 40, width: int = 60) -> np.ndarray:
    """Red top-left, green top-right, blue bottom-left, white bottom-right."""
    image = np.zeros((height, width, 3), np.uint8)
    image[: height // 2, : width // 2] = (255, 0, 0)
    image[: height // 2, width // 2 :] = (0, 255, 0)
    image[height // 2 :, : width // 2] = (0, 0, 255)
    image[height // 2 :, width // 2 :] = (255, 255, 255)
    return image


def _touch_image(path: Path, value: int = 128, size: tuple[int, int] = (16, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size, 3), value, np.uint8)).save(path)
    return path


def _touch_mask(path: Path, on: int = 255, size: tuple[int, int] = (16, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros(size, np.uint8)
    mask[4:8, 4:8] = on
    Image.fromarray(mask).save(path)
    return path


# --------------------------------------------------------------------------------------------- read_image


def test_read_rgb_png_exact(tmp_path: Path) -> None:
    Image.fromarray(PIXELS).save(tmp_path / "rgb.png")
    image = read_image(tmp_path / "rgb.png")
    assert image.dtype == np.uint8 and image.shape == (20, 30, 3) and image.flags.c_contiguous
    np.testing.assert_array_equal(image, PIXELS)


def test_read_grayscale_and_bilevel_png(tmp_path: Path) -> None:
    gray = PIXELS[..., 0]
    Image.fromarray(gray).save(tmp_path / "gray.png")
    np.testing.assert_array_equal(read_image(tmp_path / "gray.png"), np.stack([gray] * 3, axis=-1))
    Image.fromarray(gray > 127).save(tmp_path / "bilevel.png")
    np.testing.assert_array_equal(read_image(tmp_path / "bilevel.png")[..., 1], np.where(gray > 127, 255, 0))


def test_read_rgba_drops_alpha(tmp_path: Path) -> None:
    alpha = np.zeros((20, 30), np.uint8)
    alpha[:, 15:] = 255  # half fully transparent: colours must be kept, not composited
    Image.fromarray(np.dstack([PIXELS, alpha]), "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png"), PIXELS)
    Image.fromarray(np.dstack([PIXELS[..., 0], alpha]), "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_image(tmp_path / "la.png"), np.stack([PIXELS[..., 0]] * 3, axis=-1))


@pytest.mark.parametrize("transparency", [None, 0])
def test_read_palette_png(tmp_path: Path, transparency: int | None) -> None:
    palette = Image.fromarray(PIXELS).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    extra: dict[str, Any] = {} if transparency is None else {"transparency": transparency}
    palette.save(tmp_path / "p.png", **extra)
    expected = np.asarray(palette.convert("RGB"))
    np.testing.assert_array_equal(read_image(tmp_path / "p.png"), expected)


def test_read_16bit_png(tmp_path: Path) -> None:
    gray16 = RNG.integers(0, 65536, (20, 30), dtype=np.uint16)
    Image.fromarray(gray16).save(tmp_path / "gray16.png")
    assert Image.open(tmp_path / "gray16.png").mode.startswith("I")
    np.testing.assert_array_equal(read_image(tmp_path / "gray16.png"), np.stack([gray16 >> 8] * 3, axis=-1))
    rgb16 = RNG.integers(0, 65536, (20, 30, 3), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "rgb16.png"), rgb16[..., ::-1].copy())  # OpenCV writes BGR
    image = read_image(tmp_path / "rgb16.png")
    assert image.dtype == np.uint8
    np.testing.assert_array_equal(image, (rgb16 >> 8).astype(np.uint8))
    from anomaly.data.loader import to_rgb

    for array in (gray16, rgb16):  # a 16-bit camera frame handed over as an array reads like the file
        cv2.imwrite(str(tmp_path / "frame.png"), array if array.ndim == 2 else array[..., ::-1].copy())
        np.testing.assert_array_equal(to_rgb(array)[0], read_image(tmp_path / "frame.png"))
    for empty in (np.zeros((0, 5), np.uint16), np.zeros((4, 0, 3), np.uint16)):  # one line, not an OpenCV error
        with pytest.raises(DataError, match="image arrays must be"):
            to_rgb(empty)
    twelve = (np.arange(20 * 30).reshape(20, 30) * 6).astype(np.int32)  # 0..3594: 12-bit data in an int32 array
    np.testing.assert_array_equal(to_rgb(twelve, 12)[0], to_rgb(twelve.astype(np.uint16), 12)[0])
    np.testing.assert_array_equal(to_rgb(Image.fromarray(twelve, mode="I"), 12)[0], to_rgb(twelve, 12)[0])
    np.testing.assert_array_equal(to_rgb(np.full((4, 4), 200, np.int64))[0], np.full((4, 4, 3), 200, np.uint8))
    for wrong, message in ((-twelve, "values -3594..0"), (twelve * 100, "values 0..359400"), (twelve > 9, "boolean")):
        with pytest.raises(DataError, match=message):
            to_rgb(wrong)


def test_16bit_images_are_scaled_by_the_bits_they_use(tmp_path: Path) -> None:
    from anomaly.data.io import significant_bits, stored_bit_depth, to_8bit
    from anomaly.data.loader import raw_pixels, to_rgb

    twelve = RNG.integers(0, 4096, (20, 30), dtype=np.uint16)  # a 12-bit camera's frame in a 16-bit PNG
    cv2.imwrite(str(tmp_path / "g12.png"), twelve)
    expected = np.stack([(twelve >> 4).astype(np.uint8)] * 3, axis=-1)
    np.testing.assert_array_equal(read_image(tmp_path / "g12.png", bit_depth=12), expected)
    assert read_image(tmp_path / "g12.png").max() <= 15  # read as full 16-bit data it is nearly black
    np.testing.assert_array_equal(read_image(tmp_path / "g12.png", bit_depth=None), expected)  # its own depth
    cv2.imwrite(str(tmp_path / "dark12.png"), twelve // 4)  # a darker frame of the same camera: 0..1023
    from anomaly.data.io import read_images

    together = read_images([tmp_path / "g12.png", tmp_path / "dark12.png"], bit_depth=None)  # one depth for both
    np.testing.assert_array_equal(together[1][..., 0], ((twelve // 4) >> 4).astype(np.uint8))
    assert read_image(tmp_path / "dark12.png", bit_depth=None).max() > 200  # alone: its own 10 bits
    np.testing.assert_array_equal(to_rgb(twelve, 12)[0], expected)  # arrays and PIL images read like the file
    np.testing.assert_array_equal(to_rgb(Image.fromarray(twelve), 12)[0], expected)
    np.testing.assert_array_equal(raw_pixels(tmp_path / "g12.png"), twelve)
    assert to_8bit(np.array([16, 4080, 4096, 65535], np.uint16), 12).tolist() == [1, 255, 255, 255]  # saturates
    for top, bits in ((0, 8), (255, 8), (256, 10), (1000, 10), (4095, 12), (4096, 14), (65535, 16)):
        assert significant_bits(np.array([3, top], np.uint16)) == bits
    assert significant_bits(np.full(3, 255, np.uint8)) is None
    # the header says how many bits a file stores, without decoding it
    cv2.imwrite(str(tmp_path / "g8.png"), (twelve >> 4).astype(np.uint8))
    cv2.imwrite(str(tmp_path / "g16.tif"), twelve)
    cv2.imwrite(str(tmp_path / "g8.tif"), (twelve >> 4).astype(np.uint8))
    cv2.imwrite(str(tmp_path / "g.jpg"), (twelve >> 4).astype(np.uint8))
    depths = {name: stored_bit_depth(tmp_path / name) for name in ("g12.png", "g8.png", "g16.tif", "g8.tif", "g.jpg")}
    assert depths == {"g12.png": 16, "g8.png": 8, "g16.tif": 16, "g8.tif": 8, "g.jpg": 8}
    assert raw_pixels(tmp_path / "g8.png", header_first=True) is None


def test_wide_integer_tiffs_read_as_16_bit_when_they_fit_and_are_refused_when_not(tmp_path: Path) -> None:
    values = np.arange(48 * 64, dtype=np.int32).reshape(48, 64)  # 0..3071: a 12-bit frame saved as int32
    Image.fromarray(values, mode="I").save(tmp_path / "fits.tif")
    pixels = read_pixels(tmp_path / "fits.tif")
    assert pixels.dtype == np.uint16
    np.testing.assert_array_equal(pixels, values)
    assert read_image(tmp_path / "fits.tif", bit_depth=12)[-1, -1, 0] == 3071 >> 4
    Image.fromarray(values * 100, mode="I").save(tmp_path / "wide.tif")
    with pytest.raises(DataError, match=r"wide.tif \(int32 values 0..307100 do not fit 16 bits"):
        read_pixels(tmp_path / "wide.tif")


def test_float_tiffs_in_0_1_read_as_float_arrays_do_and_others_are_refused(tmp_path: Path) -> None:
    """A float32 TIFF was refused whatever it held, while predict takes float arrays in [0, 1]: a camera's
    normalised frame saved by a script could not be scored from its file."""
    values = np.random.default_rng(0).random((48, 64)).astype(np.float32)
    Image.fromarray(values, mode="F").save(tmp_path / "unit.tif")
    image = read_image(tmp_path / "unit.tif")
    assert image.dtype == np.uint8 and image.shape == (48, 64, 3)
    np.testing.assert_array_equal(image[..., 0], np.rint(values * 255))
    Image.fromarray(values * 1000, mode="F").save(tmp_path / "counts.tif")
    with pytest.raises(
        DataError, match=r"counts.tif \(float32 values 0\.\.99\d\.\d+: float images are read in \[0, 1\]"
    ):
        read_image(tmp_path / "counts.tif")


def test_float_tiffs_with_nan_or_inf_name_those_values_not_a_range_of_nan(tmp_path: Path) -> None:
    """One inf pixel among values in [0, 1] was reported as "float32 values nan..nan", which names no value the
    file holds; the message says what is wrong: non-finite values, and how many."""
    values = np.random.default_rng(0).random((48, 64)).astype(np.float32)
    values[5, 5] = np.inf
    Image.fromarray(values, mode="F").save(tmp_path / "inf.tif")
    with pytest.raises(DataError, match=r"inf.tif \(float32 with inf values at 1 pixel\(s\)") as caught:
        read_image(tmp_path / "inf.tif")
    assert "nan..nan" not in str(caught.value)
    values[6, 6] = np.nan
    Image.fromarray(values, mode="F").save(tmp_path / "both.tif")
    with pytest.raises(DataError, match=r"both.tif \(float32 with NaN and inf values at 2 pixel\(s\)"):
        read_image(tmp_path / "both.tif")


@pytest.mark.parametrize("alpha", [0, 128, 255])
def test_rgba_drops_its_alpha_alike_in_png_and_tiff(alpha: int) -> None:
    """OpenCV's TIFF reader multiplied the colours by alpha: a transparent frame read black from a TIFF only."""
    import io

    from anomaly.data.io import decode_bytes

    rgba = np.dstack([PIXELS, np.full(PIXELS.shape[:2], alpha, np.uint8)])
    for fmt in ("PNG", "TIFF"):
        buffer = io.BytesIO()
        Image.fromarray(rgba, "RGBA").save(buffer, fmt)
        np.testing.assert_array_equal(decode_bytes(buffer.getvalue()), PIXELS)


def test_a_multi_page_tiff_reads_its_first_page_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first, second = Image.new("L", (30, 20), 40), Image.new("L", (30, 20), 200)
    first.save(tmp_path / "pages.tif", save_all=True, append_images=[second])
    with caplog.at_level("INFO", logger="anomaly.data.io"):
        image = read_image(tmp_path / "pages.tif")
    assert image.shape == (20, 30, 3) and int(image.max()) == 40
    assert "pages.tif: a TIFF of 2 pages; the first is read" in caplog.text


def test_a_16_bit_gray_and_alpha_tiff_is_refused_not_read_as_8_bits(tmp_path: Path) -> None:
    """OpenCV decodes it to 8 bits of garbage (values 0..15 of 12-bit data) and Pillow cannot open it."""
    tifffile = pytest.importorskip("tifffile")  # writes what cv2.imwrite cannot: two 16-bit channels
    gray = np.full((20, 30), 3000, np.uint16)
    pixels = np.dstack([gray, np.full_like(gray, 65535)])
    options = {"photometric": "minisblack", "planarconfig": "contig", "extrasamples": ["unassalpha"]}
    for big in (False, True):  # classic TIFF and BigTIFF
        tifffile.imwrite(tmp_path / "la.tif", pixels, bigtiff=big, **options)
        with pytest.raises(DataError, match=r"la.tif \(a 16-bit TIFF that decodes to 8 bits"):
            read_pixels(tmp_path / "la.tif")
        tifffile.imwrite(tmp_path / "gray.tif", gray, bigtiff=big)
        assert read_pixels(tmp_path / "gray.tif").max() == 3000 and stored_bit_depth(tmp_path / "gray.tif") == 16


def test_a_16_bit_rgba_tiff_keeps_its_depth(tmp_path: Path) -> None:
    """Pillow reads a 16-bit RGBA TIFF as its high bytes: a 12-bit camera's frame (0..4095) read 0..15, near-black
    whatever bit depth the model was given."""
    tifffile = pytest.importorskip("tifffile")
    rgb = _quadrants().astype(np.uint16) * 16  # 12-bit data: 0..4080
    for alpha in (4095, 65535, 0):
        pixels = np.dstack([rgb, np.full(rgb.shape[:2], alpha, np.uint16)])
        tifffile.imwrite(tmp_path / "rgba.tif", pixels, photometric="rgb", extrasamples=["unassalpha"])
        read = read_pixels(tmp_path / "rgba.tif")
        assert read.dtype == np.uint16 and stored_bit_depth(tmp_path / "rgba.tif") == 16
        np.testing.assert_array_equal(read, rgb)
        np.testing.assert_array_equal(read_image(tmp_path / "rgba.tif", bit_depth=12), _quadrants())


def test_a_16_bit_tiff_of_separate_colour_planes_is_refused_not_read_as_colour_noise(tmp_path: Path) -> None:
    """tifffile writes a (3, H, W) uint16 array as planar RGB by default; OpenCV read its first plane as interleaved
    samples and Pillow as 8 bits: each pixel's colour came from three other pixels' red, with exit code 0."""
    tifffile = pytest.importorskip("tifffile")
    rgb = np.moveaxis(_quadrants(), 2, 0).astype(np.uint16) * 257
    for name, pixels, options in (
        ("rgb.tif", rgb, {}),
        ("rgba.tif", np.concatenate([rgb, rgb[:1]]), {"photometric": "rgb", "extrasamples": ["unassalpha"]}),
    ):
        tifffile.imwrite(tmp_path / name, pixels, planarconfig="separate", **options)
        with pytest.raises(DataError, match=rf"{name} \(a 16-bit TIFF with separate colour planes"):
            read_image(tmp_path / name)
    tifffile.imwrite(tmp_path / "interleaved.tif", np.moveaxis(rgb, 0, 2))  # the same pixels, interleaved: read
    np.testing.assert_array_equal(read_image(tmp_path / "interleaved.tif"), _quadrants())
    tifffile.imwrite(tmp_path / "rgb8.tif", np.moveaxis(_quadrants(), 2, 0), planarconfig="separate")  # 8 bits: read
    np.testing.assert_array_equal(read_image(tmp_path / "rgb8.tif"), _quadrants())
    tifffile.imwrite(tmp_path / "gray.tif", rgb[0], planarconfig="separate")  # one sample: nothing to interleave
    np.testing.assert_array_equal(read_pixels(tmp_path / "gray.tif"), rgb[0])


@pytest.mark.parametrize(("orientation", "corner"), [(6, (0, 0, 255)), (8, (0, 255, 0)), (3, (255, 255, 255))])
def test_exif_rotated_jpeg(tmp_path: Path, orientation: int, corner: tuple[int, int, int]) -> None:
    Image.fromarray(_quadrants()).save(tmp_path / "photo.jpg", exif=_exif(orientation), quality=95)
    image = read_image(tmp_path / "photo.jpg")
    assert image.shape == ((40, 60, 3) if orientation == 3 else (60, 40, 3))
    assert read_image_size(tmp_path / "photo.jpg") == image.shape[:2]
    # displayed top-left corner: 6 = rotate 90 clockwise, 8 = 90 counter-clockwise, 3 = 180
    np.testing.assert_allclose(image[3, 3], corner, atol=40)


@pytest.mark.parametrize("suffix", [".png", ".webp", ".tif"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_lossless_matches_pil(tmp_path: Path, suffix: str, orientation: int) -> None:
    path = tmp_path / f"o{orientation}{suffix}"
    Image.fromarray(PIXELS).save(path, exif=_exif(orientation), lossless=True)  # lossless: WebP only
    with Image.open(path) as opened:
        assert opened.getexif().get(0x0112) == orientation
    reference = Image.fromarray(PIXELS)
    reference.info["exif"] = _exif(orientation).tobytes()
    expected = np.asarray(ImageOps.exif_transpose(reference))
    np.testing.assert_array_equal(read_image(path), expected)
    assert read_image_size(path) == expected.shape[:2]  # every format and orientation, as decoded


@pytest.mark.parametrize("orientation", range(1, 9))
def test_an_opened_pil_image_reads_as_its_file(tmp_path: Path, orientation: int) -> None:
    """``Image.open`` leaves the EXIF orientation unapplied: in-memory PIL images were read on their side (8- and
    16-bit alike) where the file was read upright."""
    from anomaly.data.loader import raw_pixels

    deep = (np.arange(40 * 60, dtype=np.uint16).reshape(40, 60) * 7).astype(np.uint16)
    for name, pixels in (("rgb.png", PIXELS), ("deep.png", deep)):
        Image.fromarray(pixels).save(tmp_path / name, exif=_exif(orientation))
        with Image.open(tmp_path / name) as opened:
            np.testing.assert_array_equal(raw_pixels(opened), read_pixels(tmp_path / name))


def test_unicode_path_and_uppercase_suffix(tmp_path: Path) -> None:
    path = tmp_path / "données 图像" / "IMG.PNG"
    path.parent.mkdir()
    Image.fromarray(PIXELS).save(path, format="PNG")
    np.testing.assert_array_equal(read_image(path), PIXELS)


def test_pil_fallback_for_format_opencv_cannot_read(tmp_path: Path) -> None:
    path = tmp_path / "image.tga"  # OpenCV has no TGA decoder; PIL has
    Image.fromarray(PIXELS).save(path)
    assert cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR) is None
    np.testing.assert_array_equal(read_image(path), PIXELS)


_JPEG = cv2.imencode(".jpg", np.full((64, 64, 3), 90, np.uint8))[1].tobytes()
_NOISY_JPEG = cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8))[1].tobytes()


@pytest.mark.parametrize(
    ("content", "cause"),
    [
        (b"", "(empty file)"),
        (b"not an image at all", "(not an image file: it starts with b'not an i')"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "(corrupt PNG: CRC error in a chunk)"),
        (_JPEG[: len(_JPEG) // 2], "(corrupt or truncated JPEG"),
        # the scan's second half lost, the end marker intact: OpenCV and Pillow decode it with the rest grey
        (_NOISY_JPEG[: len(_NOISY_JPEG) // 2] + b"\xff\xd9", "JPEG: Corrupt JPEG data: premature end"),
    ],
)
def test_corrupt_file_raises_naming_it_and_its_cause(
    tmp_path: Path, content: bytes, cause: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """The error names the file and why it cannot be read, and no decoder prints its own complaint to stderr."""
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(DataError, match="cannot read image") as info:
        read_image(path)
    assert str(path) in str(info.value) and cause in str(info.value)
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize(
    ("marker", "stray"),
    [
        (b"\xff\xdb", b"\0\1\2"),  # in the headers: simplejpeg refuses them, Pillow decodes
        (b"\xff\xda", b"\0\1\2"),
        (b"\xff\xd9", b"\xab\xcd\xef\x01" * 4),  # after the scan: simplejpeg decodes once more, not strictly
    ],
)
def test_jpeg_with_harmless_warning_decodes_whole(
    tmp_path: Path, marker: bytes, stray: bytes, capfd: pytest.CaptureFixture[str]
) -> None:
    """Stray bytes between two segments lose no pixel (libjpeg warns): the image reads as without them."""
    at = _NOISY_JPEG.rindex(marker)
    path = tmp_path / "padded.jpg"
    path.write_bytes(_NOISY_JPEG[:at] + stray + _NOISY_JPEG[at:])
    expected = cv2.cvtColor(cv2.imdecode(np.frombuffer(_NOISY_JPEG, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(read_image(path), expected)
    assert capfd.readouterr().err == ""


def test_missing_file_raises_naming_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found") as info:
        read_image(tmp_path / "nope.png")
    assert str(tmp_path / "nope.png") in str(info.value)


def test_read_images_keeps_order_and_names_first_failure(tmp_path: Path) -> None:
    paths = [_touch_image(tmp_path / f"{i}.png", value=i * 20) for i in range(6)]
    images = read_images(paths, num_threads=3)
    assert [int(im[0, 0, 0]) for im in images] == [i * 20 for i in range(6)]
    assert all(np.array_equal(a, b) for a, b in zip(images, read_images(paths, num_threads=1), strict=True))
    (tmp_path / "bad1.png").write_bytes(b"junk")
    (tmp_path / "bad2.png").write_bytes(b"junk")
    with pytest.raises(DataError) as info:
        read_images([paths[0], tmp_path / "bad1.png", paths[1], tmp_path / "bad2.png"], num_threads=2)
    assert str(tmp_path / "bad1.png") in str(info.value)
    with pytest.raises(ValueError, match="num_threads"):
        read_images(paths, num_threads=0)


# --------------------------------------------------------------------------------------------- read_mask


@pytest.mark.parametrize("on", [1, 255])
def test_read_mask_binarises(tmp_path: Path, on: int) -> None:
    mask = read_mask(_touch_mask(tmp_path / "m.png", on=on))
    assert mask.dtype == np.bool_ and mask.shape == (16, 16)
    assert mask.sum() == 16 and mask[4:8, 4:8].all()


def test_read_mask_any_channel_and_resize(tmp_path: Path) -> None:
    rgb = np.zeros((10, 10, 3), np.uint8)
    rgb[0, 0, 2] = 7  # only blue set
    rgb[9, 9, 0] = 1  # only red set
    Image.fromarray(rgb).save(tmp_path / "rgb_mask.png")
    mask = read_mask(tmp_path / "rgb_mask.png")
    assert mask.sum() == 2 and mask[0, 0] and mask[9, 9]
    big = read_mask(tmp_path / "rgb_mask.png", size=(30, 20))
    assert big.shape == (30, 20) and big.dtype == np.bool_
    assert big[:3, :2].all() and big[-3:, -2:].all() and big.sum() == 12
    with pytest.raises(ValueError, match="size"):
        read_mask(tmp_path / "rgb_mask.png", size=(0, 5))


def test_read_mask_takes_a_varying_alpha_channel(tmp_path: Path) -> None:
    """A mask drawn as transparency over black read as empty (alpha dropped); one drawn over white as all defect."""
    for beneath in (0, 255):
        rgba = np.zeros((10, 10, 4), np.uint8)
        rgba[..., :3] = beneath
        rgba[2:4, 5:8, 3] = 255
        Image.fromarray(rgba).save(tmp_path / "alpha.png")
        mask = read_mask(tmp_path / "alpha.png")
        assert mask.sum() == 6 and mask[2:4, 5:8].all()
    cropped = np.zeros((10, 10, 4), np.uint8)  # an opaque black/white mask with a transparent border (a crop)
    cropped[1:9, 1:9, 3] = 255
    cropped[3:5, 3:5, :3] = 255
    Image.fromarray(cropped).save(tmp_path / "cropped.png")
    assert read_mask(tmp_path / "cropped.png").sum() == 4  # the drawing, not the opaque area
    opaque = np.full((10, 10, 4), 255, np.uint8)  # alpha that does not vary: the colours are the mask
    opaque[..., :3] = 0
    opaque[0, 0, :3] = 255
    Image.fromarray(opaque).save(tmp_path / "opaque.png")
    assert read_mask(tmp_path / "opaque.png").sum() == 1


# --------------------------------------------------------------------------------------------- list_images


def test_list_images_folders_globs_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    a = tmp_path / "a"
    for rel in ["2.png", "10.JPG", "sub/1.bmp", "sub/deeper/0.tiff", "z.webp"]:
        _touch_image(a / rel) if not rel.endswith(".JPG") else Image.new("RGB", (4, 4)).save(a / rel)
    (a / "notes.txt").write_text("x")
    (a / "sub" / "data.csv").write_text("x")
    (a / ".hidden.png").write_bytes(b"junk")  # hidden files and folders are skipped, not counted
    (a / ".cache").mkdir()
    _touch_image(a / ".cache" / "x.png")
    images, ignored = list_images([a])
    assert [p.relative_to(a).as_posix() for p in images] == [
        "10.JPG",
        "2.png",
        "sub/1.bmp",
        "sub/deeper/0.tiff",
        "z.webp",
    ]
    assert ignored == 2
    assert all(str(p).startswith(str(a)) for p in images)  # paths as found

    explicit = _touch_image(tmp_path / "solo.jpeg")
    images, ignored = list_images([explicit, str(a / "sub" / "**" / "*"), a / "2.png", a / "notes.txt"])
    assert [p.name for p in images] == ["solo.jpeg", "1.bmp", "0.tiff", "2.png"]
    assert ignored == 2  # data.csv from the glob, notes.txt named explicitly
    caplog.clear()
    with caplog.at_level("INFO", logger="anomaly.data.io"):
        images, _ = list_images([a / "2.png", a])  # duplicates dropped, first occurrence kept
    assert [p.name for p in images] == ["2.png", "10.JPG", "1.bmp", "0.tiff", "z.webp"]
    assert [r.getMessage() for r in caplog.records] == [
        f"1 path(s) name a file already listed and are read once, first: {a / '2.png'} (= {a / '2.png'})"
    ]
    (a / "link.png").symlink_to(a / "z.webp")  # a symlink to an image is read once, and said so
    caplog.clear()
    with caplog.at_level("INFO", logger="anomaly.data.io"):
        images, _ = list_images([a])
    assert [p.name for p in images] == ["10.JPG", "2.png", "link.png", "1.bmp", "0.tiff"]
    assert "first: " + str(a / "z.webp") + " (= " + str(a / "link.png") + ")" in caplog.text
    assert list_images(str(explicit)) == ([explicit], 0)


def test_list_images_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no image found in") as info:
        list_images([empty])
    assert str(empty) in str(info.value)
    with pytest.raises(DataError, match="no such file or folder") as info:
        list_images([tmp_path / "missing"])
    assert str(tmp_path / "missing") in str(info.value)
    with pytest.raises(DataError, match="no file matches"):
        list_images([str(tmp_path / "*.png")])
    with pytest.raises(DataError, match="no image found"):
        list_images([str(empty / "*.txt")])
    with pytest.raises(DataError, match="unsupported image format: .*readme.txt"):
        list_images([empty / "readme.txt"])


# --------------------------------------------------------------------------------------------- MVTec


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_category(
        tmp_path_factory.mktemp("mvtec"), "widget", n_train=5, n_test_good=3, n_test_defect=6, size=64
    )


def test_load_mvtec_synthetic(synthetic_root: Path) -> None:
    assert is_category_root(synthetic_root) and not is_category_root(synthetic_root / "test")
    data = load_mvtec(synthetic_root)
    assert isinstance(data, CategoryData) and data.name == "widget" and data.root == synthetic_root
    assert len(data.train) == 5 and all(s.split == "train" and s.label == 0 for s in data.train)
    assert [s.image_path.name for s in data.train] == [f"{i:03d}.png" for i in range(5)]
    assert len(data.test_normal) == 3 and all(s.mask_path is None for s in data.test_normal)
    assert data.defect_types == ["blob", "missing", "scratch"]
    for sample in data.test_anomalous:
        assert sample.mask_path == synthetic_root / "ground_truth" / sample.defect_type / (
            f"{sample.image_path.stem}_mask.png"
        )
    assert [s.defect_type for s in data.test] == ["blob"] * 2 + ["good"] * 3 + ["missing"] * 2 + ["scratch"] * 2
    assert data.summary() == {
        "name": "widget",
        "root": str(synthetic_root),
        "n_train": 5,
        "n_test": 9,
        "n_test_normal": 3,
        "n_test_anomalous": 6,
        "n_masks": 6,
        "defect_types": {"blob": 2, "missing": 2, "scratch": 2},
    }
    assert find_categories(synthetic_root.parent, "mvtec") == ["widget"]


def test_a_fit_refuses_folders_holding_masks_or_anomalies(synthetic_root: Path, tmp_path: Path) -> None:
    """A folder dataset's root or a VisA category given to fit was learnt whole: defects and masks as normal."""
    from anomaly.data.inputs import training_paths

    assert training_paths([synthetic_root]) == sorted((synthetic_root / "train" / "good").iterdir())  # narrowed
    plain = tmp_path / "partx"
    shutil.copytree(synthetic_root / "train" / "good", plain / "good")
    shutil.copytree(synthetic_root / "ground_truth", plain / "masks")
    with pytest.raises(DataError, match=f"{plain}: a fit would learn masks .* give {plain / 'good'}"):
        training_paths([plain])
    visa = tmp_path / "candle"
    shutil.copytree(synthetic_root / "train" / "good", visa / "Data" / "Images" / "Normal")
    shutil.copytree(synthetic_root / "test" / "good", visa / "Data" / "Images" / "Anomaly")
    with pytest.raises(DataError, match="Data/Images/Anomaly .* a VisA category"):
        training_paths([visa])
    n_train = len(list((synthetic_root / "train" / "good").iterdir()))
    normal = visa / "Data" / "Images" / "Normal"
    assert len(training_paths([normal])) == n_train  # without a split file: a folder of good images
    (tmp_path / "split_csv").mkdir()  # VisA's Normal folder also holds the normal images of its test split
    (tmp_path / "split_csv" / "1cls.csv").write_text("object,split,label,image,mask\n")
    with pytest.raises(DataError, match="Normal: inside a VisA dataset .* benchmark it with --dataset visa"):
        training_paths([normal])
    with pytest.raises(DataError, match="Normal: inside a VisA dataset"):  # its images by a glob too
        training_paths([str(normal / "*.png")])
    assert len(training_paths([normal], for_fit=False)) == n_train  # as references
    shutil.copytree(synthetic_root / "train" / "good", tmp_path / "converted" / "train" / "good")
    assert len(training_paths([tmp_path / "converted" / "train" / "good"])) == n_train  # a converted copy beside it
    test_split = synthetic_root / "test"  # good/ beside a folder per defect type: 6 defects learnt as normal
    with pytest.raises(DataError, match=f"holds good/ beside blob, missing, scratch: .* give {test_split / 'good'}"):
        training_paths([test_split])
    capitals = Path(shutil.copytree(test_split, tmp_path / "capitals"))  # Good/ is normal to the loaders as well
    (capitals / "good").rename(capitals / "Good")
    with pytest.raises(DataError, match=f"holds Good/ beside blob, missing, scratch: .* give {capitals / 'Good'}"):
        training_paths([capitals])
    with pytest.raises(DataError, match="Good beside blob"):  # by a glob
        training_paths([str(capitals / "*" / "*.png")])
    scored = tmp_path / "scored"  # good/ beside an earlier output of anomaly (scores written next to the images)
    shutil.copytree(synthetic_root / "train" / "good", scored / "good")
    (scored / "scores").mkdir()
    (scored / "scores" / OUTPUT_MARKER).write_text("{}")
    assert len(training_paths([scored])) == n_train  # the output is no defect folder
    shutil.copytree(test_split / "blob", scored / "blob")
    with pytest.raises(DataError, match="holds good/ beside blob: "):  # named alone, not with the output
        training_paths([scored])
    assert len(training_paths([plain / "good"])) == len(list((synthetic_root / "train" / "good").iterdir()))


def test_a_glob_leaves_out_earlier_outputs_as_a_folder_does(tmp_path: Path) -> None:
    """`score 'data/*'` or `'data/**/*.png'` read the heatmap overlays (PNGs) of scores written into data/run1,
    where `score data` left them out: they were scored, or joined a zero-shot pool, or were learnt by a fit."""
    from anomaly.data.inputs import training_paths

    images = [_touch_image(tmp_path / "data" / "parts" / f"{i}.png") for i in range(2)]
    run = tmp_path / "data" / "run1"  # an earlier `anomaly score --maps --out data/run1`
    _touch_image(run / "overlays" / "parts" / "0.png")
    (run / OUTPUT_MARKER).write_text("{}")
    data = tmp_path / "data"
    assert list_images([data])[0] == images
    for pattern in ("*", "**/*.png", "*/*.png", "**"):
        assert list_images([str(data / pattern)])[0] == images, pattern
        assert training_paths([str(data / pattern)]) == images, pattern
    inside = [run / "overlays" / "parts" / "0.png"]  # a pattern inside the output reads it, as its folder does
    assert list_images([str(run / "overlays" / "*" / "*.png")])[0] == inside == list_images([run / "overlays"])[0]
    with pytest.raises(DataError, match=r"no file matches: .*run\* outside earlier outputs of anomaly$"):
        list_images([str(data / "run*")])


def test_a_fit_checks_what_a_glob_or_a_symlinked_folder_stands_for(synthetic_root: Path, tmp_path: Path) -> None:
    """A quoted glob or a symlinked sub-folder slipped past the checks: `fit 'data/wid*'` learnt the test split's
    defects and the masks as normal (a model that passed every broken bottle)."""
    from anomaly.data.inputs import training_paths

    good = sorted((synthetic_root / "train" / "good").iterdir())
    parent = synthetic_root.parent
    assert training_paths([str(parent / "wid*")]) == good  # the category root it matches, narrowed
    with pytest.raises(DataError, match=r"matches .*test/good beside blob, missing, scratch: a fit would learn"):
        training_paths([str(synthetic_root / "test" / "*")])
    with pytest.raises(DataError, match=r"_mask.png in ground_truth/ \(masks or anomalous images\): a fit would"):
        training_paths([str(synthetic_root / "ground_truth" / "*" / "*.png")])
    with pytest.raises(DataError, match=r"matches .*test/good beside blob, missing, scratch"):  # files, not folders
        training_paths([str(synthetic_root / "test" / "*" / "*.png")])
    masks = synthetic_root / "ground_truth"  # given by name: learnt as 6 normal images
    for given in (masks, masks / "blob", next((masks / "blob").iterdir())):
        with pytest.raises(DataError, match=r"in ground_truth/ \(masks or anomalous images\): a fit would learn"):
            training_paths([given])
    product = tmp_path / "masks" / "good"  # a product named "masks": given by name, its images are read
    shutil.copytree(synthetic_root / "train" / "good", product)
    assert len(training_paths([product])) == len(training_paths(sorted(map(str, product.iterdir())))) == len(good)
    mine = tmp_path / "mine"
    shutil.copytree(synthetic_root / "train" / "good", mine)
    (mine / "more").symlink_to(synthetic_root)  # a category root linked in under a folder of normal images
    with pytest.raises(DataError, match=r"a fit would learn more/ground_truth"):
        training_paths([mine])
    with pytest.raises(DataError, match="no file matches"):
        training_paths([str(tmp_path / "nothing*")])


def test_scored_paths_match_test_samples_by_defect_folder_and_stem(synthetic_root: Path) -> None:
    data = load_mvtec(synthetic_root)
    sample = data.test_anomalous[0]
    elsewhere = f"/other/machine/test/{sample.defect_type}/{sample.image_path.stem}.jpg"  # a copy, re-encoded
    assert data.match_test([str(sample.image_path), elsewhere], "s.csv") == [sample, sample]
    with pytest.raises(DataError, match=r"s.csv: /x/test/good/none.png is not a test image of "):
        data.match_test(["/x/test/good/none.png"], "s.csv")


def test_scored_paths_that_share_a_stem_match_their_own_image(synthetic_root: Path, tmp_path: Path) -> None:
    """``good/000.png`` and ``good/000.jpg`` both matched whichever of the two was listed last."""
    root = Path(shutil.copytree(synthetic_root, tmp_path / "widget"))
    png = sorted((root / "test" / "good").glob("*.png"))[0]
    jpg = png.with_suffix(".jpg")
    cv2.imwrite(str(jpg), cv2.imread(str(png)))
    data = load_mvtec(root)
    matched = data.match_test([str(png), str(jpg)], "s.csv")
    assert [s.image_path for s in matched] == [png, jpg]
    with pytest.raises(DataError, match=r"is not a test image"):  # the stem alone no longer tells which
        data.match_test([f"/other/test/good/{png.stem}.bmp"], "s.csv")


def test_scored_paths_in_a_test_good_folder_spelt_good_match(synthetic_root: Path, tmp_path: Path) -> None:
    """The loaders read test/Good/ as normal (defect type "good"); its scored paths, in Good/, were matched against
    "good" and refused as "not a test image": `anomaly evaluate` of such a category failed."""
    root = Path(shutil.copytree(synthetic_root, tmp_path / "widget"))
    (root / "test" / "good").rename(root / "test" / "Good")
    data = load_ground_truth(root)
    normal = data.test_normal[0]
    assert normal.image_path.parent.name == "Good"
    paths = [str(normal.image_path), f"/other/machine/test/Good/{normal.image_path.stem}.jpg"]
    assert data.match_test(paths, "s.csv") == [normal, normal]


def test_load_mvtec_reads_train_good_as_a_fit_does(synthetic_root: Path, tmp_path: Path) -> None:
    """A benchmark (load_mvtec) left out train/good's sub-folders, which `anomaly fit CATEGORY` learns."""
    from anomaly.data.inputs import training_paths

    root = Path(shutil.copytree(synthetic_root, tmp_path / "widget"))
    good = root / "train" / "good"
    first = sorted(good.glob("*.png"))[0]
    (good / "batch2").mkdir()
    (good / ".ipynb_checkpoints").mkdir()
    shutil.copy(first, good / "batch2" / "later.png")
    shutil.copy(first, good / ".ipynb_checkpoints" / "hidden.png")
    train = [s.image_path for s in load_mvtec(root).train]
    assert good / "batch2" / "later.png" in train and not any("hidden" in p.name for p in train)
    assert train == training_paths([root])


def test_load_mvtec_missing_mask_and_bad_root(synthetic_root: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(synthetic_root, tmp_path / "widget"))
    (copy / "ground_truth" / "scratch" / "001_mask.png").unlink()
    with pytest.raises(DataError, match="no mask") as info:
        load_mvtec(copy)
    assert str(copy / "test" / "scratch" / "001.png") in str(info.value)
    with pytest.raises(DataError, match="train/good"):
        load_mvtec(copy / "test")
    shutil.rmtree(copy / "ground_truth")  # no mask at all: image labels alone
    assert all(s.mask_path is None for s in load_mvtec(copy).test)
    with pytest.raises(DataError, match="no mvtec category"):
        find_categories(copy / "test", "mvtec")


def test_load_ground_truth_needs_only_the_test_split(synthetic_root: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(synthetic_root, tmp_path / "widget"))
    shutil.rmtree(copy / "train")
    data = load_ground_truth(copy)
    full = load_mvtec(synthetic_root)
    assert not data.train
    assert [(s.image_path.name, s.label, s.mask_path is not None) for s in data.test] == [
        (s.image_path.name, s.label, s.mask_path is not None) for s in full.test
    ]
    (copy / "ground_truth" / "scratch" / "001_mask.png").unlink()  # some masks but not all: an error
    with pytest.raises(DataError, match=r"no mask for defective image .*001.png \(expected .*001_mask.png\)$"):
        load_ground_truth(copy)
    (copy / "ground_truth" / "blob" / "000_mask.png").unlink()  # every image without one is counted
    with pytest.raises(DataError, match=r"blob/000.png \(expected .*\); 1 more defective image\(s\) have no mask$"):
        load_ground_truth(copy)
    shutil.rmtree(copy / "ground_truth")  # no mask at all: image labels alone
    unannotated = load_ground_truth(copy)
    assert sum(s.label for s in unannotated.test) == sum(s.label for s in full.test) > 0
    assert all(s.mask_path is None for s in unannotated.test)


def test_an_empty_mask_folder_is_no_mask_not_a_missing_image(synthetic_root: Path, tmp_path: Path) -> None:
    """An empty ground_truth/<type>/ (or .DS_Store alone) stopped the load with "no image found in" that folder: for
    an empty defect type too, and for a category without masks, which loads with image labels alone."""
    copy = Path(shutil.copytree(synthetic_root, tmp_path / "widget"))
    (copy / "test" / "dent").mkdir()
    (copy / "ground_truth" / "dent").mkdir()
    (copy / "ground_truth" / "dent" / ".DS_Store").write_bytes(b"\0")
    assert load_mvtec(copy).summary() == load_mvtec(synthetic_root).summary() | {"root": str(copy), "name": "widget"}
    shutil.copy(next((copy / "test" / "scratch").iterdir()), copy / "test" / "dent" / "000.png")
    with pytest.raises(DataError, match=r"no mask for defective image .*test/dent/000.png"):
        load_mvtec(copy)
    for defect in (copy / "ground_truth").iterdir():  # masks for no image: image labels alone
        for mask in defect.glob("*.png"):
            mask.unlink()
    assert all(s.mask_path is None for s in load_mvtec(copy).test)


def test_a_test_good_folder_spelt_good_in_capitals_holds_normal_images(synthetic_root: Path, tmp_path: Path) -> None:
    """test/Good/ (a copy from a case-insensitive file system, a hand-made split) was a defect type: its normal images
    counted as defective, without masks, and every metric was computed on wrong labels."""
    copy = Path(shutil.copytree(synthetic_root, tmp_path / "widget"))
    (copy / "test" / "good").rename(copy / "test" / "Good")
    data, expected = load_mvtec(copy), load_mvtec(synthetic_root)

    def labels(d: Any) -> list[tuple[str, str, int]]:
        return sorted((s.defect_type, s.image_path.name, s.label) for s in d.test)

    assert labels(data) == labels(expected)
    assert data.defect_types == expected.defect_types


def test_load_mvtec_visa_converted_masks(tmp_path: Path) -> None:
    root = tmp_path / "candle"
    for i in range(3):
        _touch_image(root / "train" / "good" / f"{i:03d}.JPG")
    _touch_image(root / "test" / "good" / "000.JPG")
    for stem in ["000", "001"]:
        _touch_image(root / "test" / "bad" / f"{stem}.JPG")
        _touch_mask(root / "ground_truth" / "bad" / f"{stem}.png", on=1)  # 0/1 mask, no _mask suffix
    data = load_mvtec(root)
    assert data.defect_types == ["bad"] and len(data.test_anomalous) == 2
    assert [s.mask_path.name for s in data.test_anomalous if s.mask_path] == ["000.png", "001.png"]
    assert read_mask(data.test_anomalous[0].mask_path).sum() == 16  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- VisA


def _visa_tree(root: Path) -> None:
    rows = []
    for obj, n_normal, n_anomaly in [("candle", 5, 2), ("pcb1", 3, 1)]:
        for i in range(n_normal):
            rel = f"{obj}/Data/Images/Normal/{i:04d}.JPG"
            _touch_image(root / rel)
            rows.append([obj, "train" if i < n_normal - 2 else "test", "normal", rel, ""])
        for i in range(n_anomaly):
            rel, mask = f"{obj}/Data/Images/Anomaly/{i:03d}.JPG", f"{obj}/Data/Masks/Anomaly/{i:03d}.png"
            _touch_image(root / rel)
            _touch_mask(root / mask)
            rows.append([obj, "test", "anomaly", rel, mask])
    (root / "split_csv").mkdir()
    with (root / "split_csv" / "1cls.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["object", "split", "label", "image", "mask"])
        writer.writerows(rows[::-1])  # unsorted on purpose


def test_load_visa_original_layout(tmp_path: Path) -> None:
    _visa_tree(tmp_path)
    assert find_categories(tmp_path, "visa") == ["candle", "pcb1"]
    data = load_visa(tmp_path, "candle")
    assert data.name == "candle" and data.root == tmp_path / "candle"
    assert [s.image_path.name for s in data.train] == ["0000.JPG", "0001.JPG", "0002.JPG"]
    assert [(s.defect_type, s.image_path.name) for s in data.test] == [
        ("bad", "000.JPG"),
        ("bad", "001.JPG"),
        ("good", "0003.JPG"),
        ("good", "0004.JPG"),
    ]
    assert all(
        s.mask_path == tmp_path / "candle/Data/Masks/Anomaly" / f"{s.image_path.stem}.png" for s in data.test_anomalous
    )
    assert data.summary()["defect_types"] == {"bad": 2}
    with pytest.raises(DataError, match="available: candle, pcb1"):
        load_visa(tmp_path, "capsules")
    (tmp_path / "pcb1/Data/Masks/Anomaly/000.png").unlink()
    with pytest.raises(DataError, match="mask not found") as info:
        load_visa(tmp_path, "pcb1")
    assert "pcb1/Data/Masks/Anomaly/000.png" in str(info.value)


def test_load_visa_rejects_anomalous_training_row(tmp_path: Path) -> None:
    _touch_image(tmp_path / "c/Data/Images/Anomaly/000.JPG")
    (tmp_path / "split_csv").mkdir()
    (tmp_path / "split_csv" / "1cls.csv").write_text(
        "object,split,label,image,mask\nc,train,anomaly,c/Data/Images/Anomaly/000.JPG,x.png\n"
    )
    with pytest.raises(DataError, match="line 2: anomalous image in the training split"):
        load_visa(tmp_path, "c")


def test_load_visa_reads_split_files_as_written_and_refuses_an_image_listed_twice(tmp_path: Path) -> None:
    """A header written with spaces, `Train` and backslash paths were refused; an image listed in both splits was
    learnt by the fit and then scored as a test image."""
    _visa_tree(tmp_path)
    expected = load_visa(tmp_path, "candle")
    split = tmp_path / "split_csv" / "1cls.csv"
    lines = split.read_text().splitlines()
    edited = [line.replace("/", "\\").replace(",train,", ",Train,") for line in lines[1:]]
    split.write_text("\r\n".join(["object, split, label, image, mask", *edited]) + "\r\n")
    assert load_visa(tmp_path, "candle") == expected
    train_row = next(line for line in lines if line.startswith("candle,train"))
    split.write_text("\n".join([*lines, train_row.replace(",train,", ",test,")]) + "\n")
    with pytest.raises(
        DataError, match=rf"line {len(lines) + 1}: .*Normal/\d+\.JPG is listed again \(first on line \d+\)"
    ):
        load_visa(tmp_path, "candle")


def test_split_files_saved_by_spreadsheets_are_read_and_other_encodings_are_one_line(tmp_path: Path) -> None:
    """Excel's "Unicode text" (UTF-16 with a BOM) and a trailing empty row (",,,,") are read; a cp1252 byte is one
    error line naming the file (a traceback before; the empty row was a category '' that stopped every run)."""
    _visa_tree(tmp_path)
    expected = load_visa(tmp_path, "candle")
    split = tmp_path / "split_csv" / "1cls.csv"
    text = split.read_text() + ",,,,\r\n"
    for encoding in ("utf-16", "utf-32"):
        split.write_text(text, encoding=encoding)
        assert find_categories(tmp_path, "visa") == ["candle", "pcb1"]
        assert load_visa(tmp_path, "candle") == expected
    split.write_text(text, encoding="utf-16-le")  # no byte-order mark
    with pytest.raises(DataError, match=r"1cls.csv: not UTF-8 text \(byte 1\)"):
        find_categories(tmp_path, "visa")
    split.write_bytes(text.replace("object", "obj\xe9ct").encode("cp1252"))
    with pytest.raises(DataError, match=r"1cls.csv: not UTF-8 text \(byte 3\); save it as CSV UTF-8"):
        find_categories(tmp_path, "visa")


def test_a_split_file_row_without_object_names_its_line(tmp_path: Path) -> None:
    """A row with an empty object cell was a category '' (benchmarked into --out itself by a zero-shot config)."""
    _visa_tree(tmp_path)
    split = tmp_path / "split_csv" / "1cls.csv"
    lines = split.read_text().splitlines()
    split.write_text("\n".join([*lines, ",test,normal,candle/Data/Images/Normal/0004.JPG,"]) + "\n")
    for load in (partial(find_categories, tmp_path, "visa"), partial(load_visa, tmp_path, "candle")):
        with pytest.raises(DataError, match=rf"1cls.csv, line {len(lines) + 1}: no object \(category\) named"):
            load()


def test_a_split_file_object_that_is_a_path_names_its_line(tmp_path: Path) -> None:
    """An object '../evil' or '.' was a category whose benchmark outputs went to --out/../evil (outside --out) or
    into --out itself."""
    _visa_tree(tmp_path)
    split = tmp_path / "split_csv" / "1cls.csv"
    lines = split.read_text().splitlines()
    for name in ("../evil", ".", "..", "a\\b"):
        split.write_text("\n".join([*lines, f"{name},test,normal,candle/Data/Images/Normal/0004.JPG,"]) + "\n")
        for load in (partial(find_categories, tmp_path, "visa"), partial(load_visa, tmp_path, "candle")):
            with pytest.raises(DataError, match=rf"1cls.csv, line {len(lines) + 1}: object .* is not a category"):
                load()


def test_a_root_without_categories_says_where_they_are(synthetic_root: Path, tmp_path: Path) -> None:
    _visa_tree(tmp_path / "VisA")
    with pytest.raises(DataError, match=r"no mvtec category found in .*VisA \(it holds split_csv/1cls.csv: use"):
        find_categories(tmp_path / "VisA", "mvtec")
    with pytest.raises(DataError, match=r"holds the split file: --root .*VisA --category candle$"):
        load_visa(tmp_path / "VisA" / "candle", "candle")
    shutil.copytree(synthetic_root, tmp_path / "converted" / "1cls" / "widget")
    with pytest.raises(DataError, match=r"\(categories found under .*converted/1cls: give it as --root\)"):
        find_categories(tmp_path / "converted", "visa")
    with pytest.raises(DataError, match=r"; a dataset root: give one of its categories, e.g. .*1cls/widget$"):
        load_ground_truth(tmp_path / "converted" / "1cls")  # evaluate --root
    with pytest.raises(DataError, match="; a VisA category as published: benchmark it with --dataset visa"):
        load_ground_truth(tmp_path / "VisA" / "candle")
    for inside in ("test", "test/blob"):  # evaluate --root bottle/test: no hint, as if the category were wrong
        with pytest.raises(DataError, match=r"; a folder inside the category .*1cls/widget: give that$"):
            load_ground_truth(tmp_path / "converted" / "1cls" / "widget" / inside)
    (tmp_path / "test").mkdir()  # a project's own test/ folder above a dataset root, or beside a misspelt root
    with pytest.raises(DataError, match=r"; a dataset root: give one of its categories, e.g. .*1cls/widget$"):
        load_ground_truth(tmp_path / "converted" / "1cls")
    with pytest.raises(DataError) as error:
        load_ground_truth(tmp_path / "convertd")
    assert "a folder inside the category" not in str(error.value)


def test_load_visa_converted_layout_without_csv(synthetic_root: Path) -> None:
    assert find_categories(synthetic_root.parent, "visa") == ["widget"]
    assert load_visa(synthetic_root.parent, "widget") == load_mvtec(synthetic_root)
    with pytest.raises(DataError, match="split file not found"):
        load_visa(synthetic_root.parent, "nothing")


# --------------------------------------------------------------------------------------------- folders


def test_load_folder(tmp_path: Path) -> None:
    for i in range(10):
        _touch_image(tmp_path / "ok" / f"{i}.png")
    _touch_image(tmp_path / "dents" / "a.png")
    _touch_image(tmp_path / "dents" / "left" / "b.jpg")
    _touch_image(tmp_path / "rust" / "c.png")
    _touch_mask(tmp_path / "dents_gt" / "a_mask.png")
    _touch_mask(tmp_path / "dents_gt" / "left" / "b.png")
    _touch_mask(tmp_path / "rust_gt" / "c_mask.png")
    data = load_folder(
        tmp_path / "ok", [tmp_path / "dents", tmp_path / "rust"], [tmp_path / "dents_gt", tmp_path / "rust_gt"]
    )
    assert data.name == tmp_path.name and len(data.train) == 8 and len(data.test_normal) == 2
    assert {s.image_path for s in data.train}.isdisjoint(s.image_path for s in data.test)
    assert [
        (s.defect_type, s.mask_path.relative_to(tmp_path).as_posix()) for s in data.test_anomalous if s.mask_path
    ] == [("dents", "dents_gt/a_mask.png"), ("dents", "dents_gt/left/b.png"), ("rust", "rust_gt/c_mask.png")]
    assert load_folder(tmp_path / "ok", [tmp_path / "dents", tmp_path / "rust"], seed=0).test_normal == (
        data.test_normal
    )
    unlabelled = load_folder(tmp_path / "ok", [tmp_path / "rust"], normal_test_dir=tmp_path / "dents")
    assert len(unlabelled.train) == 10 and len(unlabelled.test_normal) == 2
    assert all(s.mask_path is None for s in unlabelled.test)
    with pytest.raises(DataError, match="no mask") as info:
        load_folder(tmp_path / "ok", [tmp_path / "rust"], [tmp_path / "dents_gt"])
    assert str(tmp_path / "rust" / "c.png") in str(info.value)
    with pytest.raises(DataError, match="both as normal and as defective"):
        load_folder(tmp_path, [tmp_path / "rust"])
    with pytest.raises(DataError, match="mask folders"):
        load_folder(tmp_path / "ok", [tmp_path / "rust"], [])


# --------------------------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic(tmp_path: Path) -> None:
    make = partial(make_synthetic_category, n_train=3, n_test_good=2, n_test_defect=3, size=(48, 64))
    first, second, other = make(tmp_path / "a"), make(tmp_path / "b"), make(tmp_path / "c", seed=1)
    files = sorted(p.relative_to(first) for p in first.rglob("*.png"))
    assert len(files) == 3 + 2 + 3 + 3
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)
    assert (first / "train/good/000.png").read_bytes() != (other / "train/good/000.png").read_bytes()
    assert read_image(first / "train/good/000.png").shape == (48, 64, 3)
    with pytest.raises(DataError, match="already exists"):
        make(tmp_path / "a")


@pytest.mark.parametrize("kind", ["object", "texture"])
def test_synthetic_masks_are_exactly_the_defects(tmp_path: Path, kind: Literal["object", "texture"]) -> None:
    data = load_mvtec(make_synthetic_category(tmp_path, n_train=2, n_test_good=1, n_test_defect=6, size=96, kind=kind))
    assert data.summary()["defect_types"] == {"blob": 2, "missing": 2, "scratch": 2}
    colours = {"scratch": (235, 228, 205), "blob": (170, 60, 35) if kind == "object" else (40, 90, 170)}
    for sample in data.test_anomalous:
        assert sample.mask_path is not None
        image, mask = read_image(sample.image_path).astype(int), read_mask(sample.mask_path)
        assert 20 <= mask.sum() <= 0.08 * mask.size  # visible but not huge
        if sample.defect_type == "missing":
            assert image[mask].mean() < 60  # background / hole shows through
            continue
        near = (np.abs(image - colours[sample.defect_type]) <= 15).all(axis=2)
        np.testing.assert_array_equal(near, mask)  # painted pixels exactly where the mask is


def test_read_image_size_fails_like_read_image(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"not an image")
    for path in (tmp_path / "missing.png", tmp_path / "bad.png"):
        with pytest.raises(DataError, match=path.name):
            read_image_size(path)
    cv2.imwrite(str(tmp_path / "gray16.png"), np.zeros((7, 11), np.uint16))
    assert read_image_size(tmp_path / "gray16.png") == (7, 11)


def test_mask_layouts_beyond_mvtec_ad(synthetic_root: Path, tmp_path: Path) -> None:
    """MVTec LOCO keeps a folder of masks per image (read as their union); masks named otherwise than the images
    (`<stem>_gt.png`) dropped the pixel metrics with a mere warning; masks kept beside a folder dataset's images
    were scored as defective images."""
    from anomaly.evaluation import ground_truth_masks

    loco = Path(shutil.copytree(synthetic_root, tmp_path / "loco"))
    for mask in sorted((loco / "ground_truth").glob("*/*_mask.png")):
        regions = mask.parent / mask.name.removesuffix("_mask.png")
        regions.mkdir()
        levels = read_mask(mask)
        top, bottom = levels.copy(), levels.copy()
        top[levels.shape[0] // 2 :], bottom[: levels.shape[0] // 2] = False, False
        Image.fromarray(top.astype(np.uint8) * 255).save(regions / "000.png")
        Image.fromarray(bottom.astype(np.uint8) * 255).save(regions / "001.png")
        mask.unlink()
    data, original = load_mvtec(loco), load_mvtec(synthetic_root)
    assert all(s.mask_path is not None and s.mask_path.is_dir() for s in data.test_anomalous)
    shapes = [(128, 128)] * len(data.test)
    for union, mask in zip(ground_truth_masks(data.test, shapes), ground_truth_masks(original.test, shapes)):
        assert np.array_equal(union, mask)

    renamed = Path(shutil.copytree(synthetic_root, tmp_path / "renamed"))
    for mask in (renamed / "ground_truth").glob("*/*_mask.png"):
        mask.rename(mask.with_name(mask.name.replace("_mask", "_gt")))
    with pytest.raises(DataError, match=r"none of its 2 masks matches an image of .* \(expected <stem>_mask.png"):
        load_mvtec(renamed)

    plain = tmp_path / "plain"
    shutil.copytree(synthetic_root / "train" / "good", plain / "good")
    shutil.copytree(synthetic_root / "test" / "blob", plain / "blob")
    for mask in (synthetic_root / "ground_truth" / "blob").iterdir():
        shutil.copy(mask, plain / "blob" / mask.name)  # beside their images, no masks/ folder
    folder = load_folder(plain / "good", [plain / "blob"])
    assert len(folder.test_anomalous) == 2 and all(
        s.mask_path.name.endswith("_mask.png") for s in folder.test_anomalous
    )


def test_mvtec_ad_2_reads_its_public_test_split(synthetic_root: Path, tmp_path: Path) -> None:
    """MVTec AD 2 keeps its labelled test images in test_public/, masks in test_public/ground_truth/."""
    ad2 = Path(shutil.copytree(synthetic_root, tmp_path / "ad2" / "widget"))
    (ad2 / "test").rename(ad2 / "test_public")
    (ad2 / "ground_truth").rename(ad2 / "test_public" / "ground_truth")
    shutil.copytree(ad2 / "train" / "good", ad2 / "validation" / "good")
    data, original = load_mvtec(ad2), load_mvtec(synthetic_root)
    assert [(s.image_path.name, s.label, s.defect_type) for s in data.test] == [
        (s.image_path.name, s.label, s.defect_type) for s in original.test
    ]
    assert all(s.mask_path is not None and "test_public/ground_truth" in str(s.mask_path) for s in data.test_anomalous)
    assert find_categories(tmp_path / "ad2", "mvtec") == ["widget"]


def test_a_scored_category_root_is_its_test_split_without_the_masks_mvtec_ad_2_keeps_inside_it(
    synthetic_root: Path, tmp_path: Path
) -> None:
    """`anomaly score ROOT` scores its test split: MVTec AD 2's test_public/ holds ground_truth/, whose masks were
    scored as images (and joined zero-shot pools) although the log said they were not."""
    from anomaly.data.inputs import image_paths, scoring_inputs

    ad2 = Path(shutil.copytree(synthetic_root, tmp_path / "ad2" / "widget"))
    (ad2 / "test").rename(ad2 / "test_public")
    (ad2 / "ground_truth").rename(ad2 / "test_public" / "ground_truth")
    for root, split in ((synthetic_root, synthetic_root / "test"), (ad2, ad2 / "test_public")):
        scored = image_paths(scoring_inputs([root]))
        assert scored == image_paths([split], exclude=[split / "ground_truth"]) and scored
        assert not any("ground_truth" in p.parts or "train" in p.parts for p in scored)


def test_a_scored_test_only_category_leaves_its_masks_out(synthetic_root: Path, tmp_path: Path) -> None:
    """A category without train/good (the zero-shot case) was not narrowed: `anomaly score --zero-shot ROOT` put
    its ground_truth masks into the pool and scored them as images."""
    from anomaly.data.inputs import image_paths, scoring_inputs

    copy = Path(shutil.copytree(synthetic_root, tmp_path / "widget"))
    shutil.rmtree(copy / "train")
    scored = image_paths(scoring_inputs([copy]))
    assert scored == image_paths([copy / "test"])
    shutil.rmtree(copy / "ground_truth")  # nothing but a test/ folder: kept as given
    assert scoring_inputs([copy]) == [copy]


def test_a_scored_visa_category_leaves_its_masks_out(tmp_path: Path) -> None:
    """`anomaly score VisA/candle` scored Data/Masks/Anomaly/*.png as images (flagged, and in a zero-shot pool)."""
    from anomaly.data.inputs import image_paths, scoring_inputs

    _visa_tree(tmp_path)
    images = tmp_path / "candle" / "Data" / "Images"
    for given in (tmp_path / "candle", tmp_path / "candle" / "Data"):
        scored = image_paths(scoring_inputs([given]))
        assert scored == image_paths([images]) and not any("Masks" in p.parts for p in scored)
    assert scoring_inputs([images / "Anomaly"]) == [images / "Anomaly"]


def test_batches_count_views_so_that_large_tiled_frames_are_decoded_one_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Sixteen frames of 651 tiles each were decoded at once (two batches of 16 frames ahead): 4 frames took 2.5 GB
    where one took 1.7. Batches now close at ``batch_size`` views, and about twice that many are decoded ahead."""
    import anomaly.data.loader as loader
    from anomaly.data.views import ViewSpec

    decoded: list[int] = []  # how many inputs were decoded when each batch was handed over
    decode = loader.decode_input
    monkeypatch.setattr(loader, "decode_input", lambda item, *a: decoded.append(0) or decode(item, *a))
    frames = [np.full((256, 256, 3), i, np.uint8) for i in range(6)] + [np.zeros((40, 40, 3), np.uint8)] * 5
    seen = []
    for batch in loader.iter_batches(frames, (64, 64), 8, spec=ViewSpec(tile=64)):
        seen.append((len(batch.items), len(batch.images), len(decoded)))
    assert [items for items, _, _ in seen] == [1, 1, 1, 1, 1, 1, 5]  # 25 tiles per frame; the small ones: 1 each
    assert [views for _, views, _ in seen] == [25] * 6 + [5]
    handed = np.cumsum([items for items, _, _ in seen])
    assert all(done <= n + 2 for n, (_, _, done) in zip(handed, seen))  # never more than 2 frames ahead


def test_a_benchmark_folder_inside_the_inputs_is_never_read_as_images(tmp_path: Path) -> None:
    """`anomaly benchmark --out` inside a folder of parts: its PIMO plot (`<category>/pimo.png`, in a folder without
    the output marker) was fitted as a normal image (a toothbrush model's threshold 24.1 -> 72.4) and scored as one,
    and beside good/ it was taken for a defect type."""
    from anomaly._fs import BENCHMARK_MARKER
    from anomaly.data.inputs import image_paths, training_paths

    parts = tmp_path / "parts"
    good = [parts / f"{i}.png" for i in range(3)]
    for i, path in enumerate(good):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((32, 32, 3), 100 + i, np.uint8)).save(path)
    bench = parts / "bench"
    (bench / "parts").mkdir(parents=True)
    (bench / BENCHMARK_MARKER).touch()
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(bench / "parts" / "pimo.png")
    assert image_paths([parts]) == good
    assert training_paths([parts]) == good
    labelled = tmp_path / "labelled"  # good/ beside a benchmark's folder: no defect type
    shutil.copytree(parts, labelled / "good")
    shutil.move(labelled / "good" / "bench", labelled / "bench")
    assert training_paths([labelled]) == [labelled / "good" / p.name for p in good]


def test_anomaly_max_pixels_takes_float_notation_and_a_bad_value_is_one_line(tmp_path: Path) -> None:
    """ANOMALY_MAX_PIXELS=2e8 (the limit as it is thought of) was a ValueError traceback when anomaly.data.io was
    imported, as was any other value int() refuses: every command crashed with exit code 1."""
    image = _touch_image(tmp_path / "in" / "a.png")
    code = "import anomaly.data.io as io; print(io.MAX_PIXELS)"
    env = {**os.environ, "ANOMALY_MAX_PIXELS": "2e8"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and proc.stdout.split() == ["200000000"], proc.stderr
    command = [sys.executable, "-m", "anomaly", "import", "--format", "mask-folders", "--images", str(image.parent),
               "--annotations", str(image.parent), "--out", str(tmp_path / "out")]  # fmt: skip
    for bad in ("200M", "0", "-5", "nan"):
        env["ANOMALY_MAX_PIXELS"] = bad
        proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert lines[0] == f"error: ANOMALY_MAX_PIXELS={bad!r}: expected a positive number of pixels, e.g. 2e8"
        assert not (tmp_path / "out").exists()
