"""Image decoding for every job: bytes -> a PIL RGB image, with one decompression-bomb rule.

Features, training on the fly, evaluation, captioning and serving all decode through ``decode_image``: the size
is read from the header and checked against ``max_pixels`` before any pixel is decoded (Pillow's own bomb guard
raises the same error), then the whole image is decoded, so a truncated file fails here and not later inside a
model. Each caller decides what a bad image means for it: a recorded, skipped row (features, caption), a run
that stops naming the file (training, evaluation), or a 4xx (serving).
"""

from __future__ import annotations

import io
import re
from typing import Any, Literal

DEFAULT_MAX_PIXELS = 64 * 1024 * 1024  # the cap every job uses unless told otherwise (PIL's own order of magnitude)
_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")

Problem = Literal["empty", "not_an_image", "format", "too_large", "unreadable"]


class ImageError(ValueError):
    """An image that cannot be used; ``problem`` says why (``too_large``: over the pixel cap)."""

    def __init__(self, problem: Problem, message: str, pixels: str | None = None):
        super().__init__(message)
        self.problem = problem
        self.pixels = pixels  # too_large: the size found ("640x480 = 307200", or Pillow's count)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, formats: tuple[str, ...] | None = None) -> Any:
    """Encoded image bytes -> a fully decoded PIL image in RGB. ``formats``: the Pillow format names accepted
    (None: any Pillow reads). Raises ImageError naming the problem and, for size, the numbers."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ImageError("empty", "empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if formats is not None and im.format not in formats:
                raise ImageError("format", f"image format {im.format} is not accepted; use one of {list(formats)}")
            width, height = im.size
            if width * height > max_pixels:
                size = f"{width}x{height} = {width * height}"
                raise ImageError("too_large", f"image is {size} pixels, over the cap of {max_pixels} "
                                              f"(decompression-bomb guard)", size)
            return im.convert("RGB")  # a full decode: truncated files fail here
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not_an_image", "not an image: PIL cannot identify the format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:  # Pillow's guard, same rule
        found = _BOMB_PIXELS.search(str(err))
        pixels = found.group(1) if found else f"more than {max_pixels}"
        raise ImageError("too_large", f"image is {pixels} pixels, over the cap of {max_pixels} "
                                      f"(decompression-bomb guard)", pixels) from None
    except Exception as err:  # noqa: BLE001 (PIL raises OSError, SyntaxError, ValueError, struct.error, ...)
        raise ImageError("unreadable", f"image cannot be decoded ({type(err).__name__}: {err})".splitlines()[0][:500]) \
            from None
