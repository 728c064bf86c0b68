"""images.py: one loader for every input, content hashes, and input inspection."""
import hashlib

import pytest
from PIL import Image

from omnigen2_batch.images import (ImageError, content_hash, image_size, inspect_input,
                                   load_rgb)


def save(tmp_path, name, image, **kwargs):
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


def test_rgba_is_composited_on_white(tmp_path):
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    image.putpixel((0, 0), (0, 0, 255, 255))  # one opaque blue pixel
    image.putpixel((1, 0), (0, 0, 0, 128))  # half-transparent black
    loaded = load_rgb(save(tmp_path, "a.png", image))
    assert loaded.mode == "RGB"
    assert loaded.getpixel((3, 3)) == (255, 255, 255)
    assert loaded.getpixel((0, 0)) == (0, 0, 255)
    assert all(126 <= channel <= 128 for channel in loaded.getpixel((1, 0)))


def test_la_and_palette_with_transparency(tmp_path):
    la = Image.new("LA", (2, 2), (0, 0))
    assert load_rgb(save(tmp_path, "la.png", la)).getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (2, 2), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.putpixel((0, 0), 0)
    path = save(tmp_path, "p.png", palette, transparency=0)
    loaded = load_rgb(path)
    assert loaded.getpixel((0, 0)) == (255, 255, 255)  # transparent index -> white
    assert loaded.getpixel((1, 1)) == (10, 200, 30)


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    grey = Image.new("I;16", (2, 2), 32896)  # half of 65535
    loaded = load_rgb(save(tmp_path, "g16.png", grey))
    assert loaded.getpixel((0, 0)) == (128, 128, 128)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # red in CMYK
    red, green, blue = load_rgb(save(tmp_path, "c.jpg", cmyk, quality=95)).getpixel((4, 4))
    assert red > 200 and green < 60 and blue < 60


def test_exif_orientation_is_applied_and_image_size_agrees(tmp_path):
    image = Image.new("RGB", (60, 20), "white")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = save(tmp_path, "rot.jpg", image, exif=exif)
    assert load_rgb(path).size == (20, 60)
    assert image_size(path) == (20, 60)


@pytest.mark.parametrize("content, reason", [
    (b"", "empty"),
    (b"not an image at all", "not an image"),
])
def test_bad_files_raise_image_error_naming_the_path(tmp_path, content, reason):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(ImageError, match=reason) as caught:
        load_rgb(path)
    assert str(path) in str(caught.value)


def test_truncated_png_is_an_error(tmp_path):
    full = save(tmp_path, "full.png", Image.effect_noise((64, 64), 50).convert("RGB"))
    cut = tmp_path / "cut.png"
    cut.write_bytes(full.read_bytes()[:2000])
    with pytest.raises(ImageError, match="truncated"):
        load_rgb(cut)
    assert [issue.level for issue in inspect_input(cut)] == ["error"]


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        load_rgb(tmp_path / "nope.png")


def test_content_hash_is_sha256_of_the_bytes_and_follows_pixels(tmp_path):
    path = save(tmp_path, "a.png", Image.new("RGB", (8, 8), "red"))
    assert content_hash(path) == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    copy = tmp_path / "elsewhere.png"
    copy.write_bytes(path.read_bytes())
    assert content_hash(copy) == content_hash(path)  # moving a file keeps its identity
    save(tmp_path, "a.png", Image.new("RGB", (8, 8), "blue"))
    assert content_hash(path) != content_hash(copy)


def test_inspect_input_warns_about_small_and_elongated_images(tmp_path):
    good = save(tmp_path, "good.png", Image.new("RGB", (512, 768)))
    assert inspect_input(good) == []
    small = inspect_input(save(tmp_path, "small.png", Image.new("RGB", (300, 400))))
    assert [(i.level, "short side is 300 px" in i.message) for i in small] == [("warning", True)]
    strip = inspect_input(save(tmp_path, "strip.png", Image.new("RGB", (2560, 600))))
    assert [i.level for i in strip] == ["warning"] and "beyond 1:4" in strip[0].message
    assert all(i.path.endswith("strip.png") for i in strip)
