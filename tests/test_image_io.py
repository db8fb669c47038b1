"""load_image: every kind of photo an album holds comes out as RGB uint8 (H, W, 3)."""
import io

import numpy as np
import pytest
from PIL import Image

from diffusionrig_core import image_io
from diffusionrig_core.errors import ImageError
from diffusionrig_core.image_io import from_tensor, load_image, to_tensor


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=kw.pop("format", "PNG"), **kw)
    return buf.getvalue()


def test_rgb_png_round_trips_exactly(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    path = tmp_path / "a.png"
    Image.fromarray(arr).save(path)
    for src in (path, str(path), path.read_bytes(), arr, Image.fromarray(arr)):
        out = load_image(src)
        assert out.dtype == np.uint8 and out.shape == (5, 7, 3)
        assert np.array_equal(out, arr)


def test_greyscale_becomes_three_equal_channels():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    out = load_image(_png(Image.fromarray(grey, "L")))
    assert out.shape == (3, 4, 3)
    assert all(np.array_equal(out[:, :, c], grey) for c in range(3))


def test_rgba_keeps_the_first_three_channels_like_the_official_code():
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2] = 10, 20, 30
    rgba[0, 0, 3] = 0  # fully transparent pixel keeps its colour (no compositing)
    rgba[1, 1, 3] = 255
    out = load_image(_png(Image.fromarray(rgba, "RGBA")))
    assert np.array_equal(out, rgba[..., :3])
    assert np.array_equal(load_image(rgba), rgba[..., :3])


def test_palette_image_gives_its_colours():
    pal = Image.new("P", (3, 1))
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    pal.putdata([0, 1, 2])
    out = load_image(_png(pal))
    assert out.tolist() == [[[255, 0, 0], [0, 255, 0], [0, 0, 255]]]


def test_16_bit_grey_is_scaled_to_8_bits():
    arr16 = np.array([[0, 257, 65535, 32896]], dtype=np.uint16)
    img = Image.fromarray(arr16)  # mode I;16
    out = load_image(_png(img))
    assert out[0, :, 0].tolist() == [0, 1, 255, 128]
    assert load_image(arr16)[0, :, 0].tolist() == [0, 1, 255, 128]


def test_cmyk_jpeg_is_converted_to_rgb():
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    out = load_image(_png(cmyk, format="JPEG", quality=100))
    assert out.shape == (8, 8, 3)
    r, g, b = out[4, 4].astype(int)
    assert r > 200 and g < 60 and b < 60


def test_exif_orientation_is_applied_and_can_be_ignored():
    arr = np.zeros((2, 3, 3), dtype=np.uint8)
    arr[0, 0] = 255  # top-left marker
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = _png(img, format="JPEG", exif=exif.tobytes(), quality=100)
    upright = load_image(data)
    assert upright.shape == (3, 2, 3)
    assert upright[0, 1].mean() > 200  # the marker moved to the top-right
    raw = load_image(data, apply_exif=False)  # what the official align.py sees
    assert raw.shape == (2, 3, 3) and raw[0, 0].mean() > 200


def test_float_and_bool_arrays():
    assert load_image(np.full((2, 2), 0.5))[0, 0].tolist() == [128, 128, 128]
    assert load_image(np.ones((2, 2), dtype=bool))[0, 0].tolist() == [255, 255, 255]


@pytest.mark.parametrize("make, words", [
    (lambda p: p / "missing.png", "not found"),
    (lambda p: (p / "empty.png").write_bytes(b"") and p / "empty.png" or p / "empty.png", "empty"),
    (lambda p: (p / "t.jpg").write_text("hello") and p / "t.jpg" or p / "t.jpg", "not an image"),
    (lambda p: p, "folder"),
])
def test_unreadable_files_raise_image_error(tmp_path, make, words):
    with pytest.raises(ImageError, match=words):
        load_image(make(tmp_path))


def test_truncated_png_is_reported_as_damaged():
    data = _png(Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    with pytest.raises(ImageError, match="damaged|truncated"):
        load_image(data[: len(data) // 2])


def test_huge_images_are_refused_with_the_limit(monkeypatch):
    monkeypatch.setattr(image_io, "MAX_PIXELS", 100)
    with pytest.raises(ImageError, match="limit is 0 MP|megapixels"):
        load_image(_png(Image.new("RGB", (20, 20))))
    with pytest.raises(ImageError, match="megapixels"):
        load_image(np.zeros((20, 20, 3), dtype=np.uint8))


def test_bad_arrays_say_what_shape_is_expected():
    with pytest.raises(ImageError, match="channels-first"):
        load_image(np.zeros((3, 8, 8), dtype=np.uint8))
    with pytest.raises(ImageError, match="empty"):
        load_image(np.zeros((0, 4, 3), dtype=np.uint8))
    with pytest.raises(ImageError, match="cannot read"):
        load_image(12345)


def test_tensor_helpers_round_trip():
    arr = np.random.default_rng(2).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    t = to_tensor(arr)
    assert t.shape == (3, 4, 5) and float(t.max()) <= 1.0
    assert np.array_equal(from_tensor(t), arr)
