"""read_image must give the pixels mmcv.imread(color) gives: BGR, 3 channels, EXIF applied."""
import cv2
import numpy as np
import pytest
from PIL import Image

from repq_export.data.images import read_image
from repq_export.errors import UserError


def test_grayscale_is_replicated(tmp_path):
    gray = np.arange(12 * 10, dtype=np.uint8).reshape(12, 10)
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    img = read_image(tmp_path / "g.png")
    assert img.shape == (12, 10, 3) and img.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(img[:, :, c], gray)


def test_rgba_drops_alpha_and_is_bgr(tmp_path):
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[..., :3] = (10, 20, 30)
    rgba[..., 3] = np.arange(24).reshape(4, 6) * 10  # alpha must not blend into the colour
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    img = read_image(tmp_path / "a.png")
    assert img.shape == (4, 6, 3)
    assert (img == (30, 20, 10)).all()


def test_palette_is_converted(tmp_path):
    index = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    pal = Image.fromarray(index, "P")
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    pal.save(tmp_path / "p.png")
    img = read_image(tmp_path / "p.png")
    bgr = {0: (0, 0, 255), 1: (0, 255, 0), 2: (255, 0, 0)}
    expected = np.array([[bgr[int(i)] for i in row] for row in index], np.uint8)
    np.testing.assert_array_equal(img, expected)


def test_cmyk_jpeg_is_converted_to_bgr(tmp_path):
    rgb = (200, 100, 50)
    cmyk = Image.fromarray(np.full((16, 16, 3), rgb, np.uint8)).convert("CMYK")
    cmyk.save(tmp_path / "c.jpg", quality=100)
    img = read_image(tmp_path / "c.jpg")
    assert img.shape == (16, 16, 3)
    assert np.abs(img.astype(int) - rgb[::-1]).max() <= 3


def test_16bit_png_keeps_the_high_byte(tmp_path):
    deep = (np.arange(64, dtype=np.uint16) * 1000).reshape(8, 8)
    cv2.imwrite(str(tmp_path / "d.png"), deep)
    img = read_image(tmp_path / "d.png")
    assert img.dtype == np.uint8 and img.shape == (8, 8, 3)
    np.testing.assert_array_equal(img[:, :, 1], (deep >> 8).astype(np.uint8))


# EXIF orientation -> where the red top-left quadrant of a 16x32 (h, w) image ends up
@pytest.mark.parametrize(
    "orientation, shape, red_at, black_at",
    [
        (1, (16, 32), (4, 8), (12, 24)),
        (3, (16, 32), (12, 24), (4, 8)),  # rotated 180
        (6, (32, 16), (8, 12), (24, 4)),  # rotated 90 clockwise: top-left -> top-right
        (8, (32, 16), (24, 4), (8, 12)),  # rotated 90 counter-clockwise: top-left -> bottom-left
    ],
)
def test_exif_orientation_is_applied(tmp_path, orientation, shape, red_at, black_at):
    rgb = np.zeros((16, 32, 3), np.uint8)
    rgb[:8, :16] = (255, 0, 0)
    pil = Image.fromarray(rgb)
    exif = pil.getexif()
    exif[0x0112] = orientation
    pil.save(tmp_path / "r.jpg", exif=exif, quality=95)
    img = read_image(tmp_path / "r.jpg")
    assert img.shape == (*shape, 3)
    assert np.abs(img[red_at].astype(int) - (0, 0, 255)).max() < 40
    assert img[black_at].max() < 40


def test_same_pixels_as_cv2_imread(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "x.jpg"
    cv2.imwrite(str(path), rng.integers(0, 256, (30, 20, 3), dtype=np.uint8))
    np.testing.assert_array_equal(read_image(path), cv2.imread(str(path)))


@pytest.mark.parametrize("content", [None, b"", b"this is not an image", "dir"])
def test_bad_files_raise_user_error_naming_the_file(tmp_path, content):
    path = tmp_path / "bad.jpg"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match="bad.jpg"):
        read_image(path)
