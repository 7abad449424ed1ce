"""Image input: safe decoding of client images with Pillow."""

from __future__ import annotations

import io
import warnings

__all__ = ["ImageError", "decode_image", "sniff_image_format", "DEFAULT_MAX_PIXELS"]

# 4096 x 4096: far above what a VQA model looks at, far below a decompression bomb.
DEFAULT_MAX_PIXELS = 4096 * 4096

_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
)


class ImageError(ValueError):
    """An image that cannot or must not be decoded (``bad_image``)."""


def sniff_image_format(data: bytes) -> str | None:
    """``"JPEG"``, ``"PNG"``, ``"WEBP"`` from the magic bytes, else None."""
    for magic, name in _SIGNATURES:
        if data.startswith(magic):
            return name
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS):  # -> PIL.Image.Image
    """Decode JPEG, PNG or WebP bytes into an RGB ``PIL.Image``.

    The pixel count is checked from the header before any pixel is decoded, so
    a decompression bomb is refused without allocating it.  Raises
    :class:`ImageError` with the reason.
    """
    from PIL import Image, UnidentifiedImageError

    fmt = sniff_image_format(data)
    if fmt is None:
        raise ImageError("not a JPEG, PNG or WebP image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[fmt])
            width, height = img.size
            if width * height > max_pixels:
                raise ImageError(
                    f"image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels"
                )
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image refused as a decompression bomb: {exc}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"unreadable {fmt} image: {exc}") from None
    return img.convert("RGB")
