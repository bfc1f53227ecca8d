"""pipelines.images.decode_image: the one decoder every job uses, and the one pixel rule."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from test_serve import png_header

from pipelines.images import DEFAULT_MAX_PIXELS, ImageError, decode_image


def encoded(fmt: str = "PNG", size: tuple[int, int] = (8, 6), mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, format=fmt)
    return buf.getvalue()


def test_decodes_to_rgb_at_full_size():
    image = decode_image(encoded("PNG", mode="L"))  # greyscale in, RGB out
    assert image.mode == "RGB" and image.size == (8, 6)
    assert decode_image(encoded("JPEG"), formats=("JPEG",)).size == (8, 6)


@pytest.mark.parametrize("data, problem, message", [
    (b"", "empty", r"empty file \(0 bytes\)"),
    (b"this is not an image", "not_an_image", "not an image"),
    (encoded("PNG")[:60], "unreadable", "image cannot be decoded"),  # truncated: fails on the full decode
])
def test_bad_bytes_name_the_problem(data, problem, message):
    with pytest.raises(ImageError, match=message) as err:
        decode_image(data)
    assert err.value.problem == problem


def test_pixel_cap_is_checked_from_the_header_before_decoding():
    with pytest.raises(ImageError, match=r"image is 400x300 = 120000 pixels, over the cap of 100000") as err:
        decode_image(png_header(400, 300), max_pixels=100_000)  # no pixel data at all: never decoded
    assert err.value.problem == "too_large" and err.value.pixels == "400x300 = 120000"
    # the default cap applies to every job that sets none (training on the fly among them)
    with pytest.raises(ImageError, match=f"over the cap of {DEFAULT_MAX_PIXELS}"):
        decode_image(png_header(9000, 9000))


def test_formats_filter():
    with pytest.raises(ImageError, match=r"image format JPEG is not accepted; use one of \['PNG'\]") as err:
        decode_image(encoded("JPEG"), formats=("PNG",))
    assert err.value.problem == "format"


def test_training_stream_applies_the_cap(tmp_path):
    from cli_module.loading import load_base
    from jobs.train_stream import decode_pixels

    (tmp_path / "bomb.png").write_bytes(png_header(9000, 9000))
    with pytest.raises(RuntimeError, match=r"image .*bomb.png cannot be read \(ImageError: image is 9000x9000"):
        decode_pixels([str(tmp_path / "bomb.png")], load_base("tiny").image_processor)
