"""Opening image files a user hands us, with raster decoders only.

Pillow picks a decoder by the file's content, not its name, and some of its plugins
start an external program to decode (EPS runs Ghostscript): a file called ``cat.png``
holding PostScript would run it. So every image is opened with an explicit list of
raster formats, and its pixel count is checked against :data:`MAX_PIXELS` from the
header, before a byte of pixel data is decoded.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

# What users have; none of these plugins starts a program.
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")
EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm"}
MAX_PIXELS = 50_000_000  # 50 megapixels (~7,000 x 7,000): more than any camera photo this tool needs


class ImageRefused(ValueError):
    """The file is not an image vitlab will decode (the message says why)."""


def read_image(path: Path, mode: str, size: int) -> np.ndarray:
    """``path`` decoded, converted to ``mode`` ("L" or "RGB") and resized (bilinear) to
    size x size: a uint8 array (size, size) or (size, size, 3).

    Raises :class:`ImageRefused` for a file in another format or over the pixel limit,
    and Pillow's own errors (OSError, ValueError) for a damaged one."""
    from PIL import Image, UnidentifiedImageError

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(path, formats=FORMATS)
        except UnidentifiedImageError:
            raise ImageRefused(f"cannot read as an image (not a {', '.join(FORMATS[:-1])} or {FORMATS[-1]} file)") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageRefused(_too_large()) from None
    with im:
        width, height = im.size
        if width * height > MAX_PIXELS:
            raise ImageRefused(_too_large(f"{width} x {height} pixels is "))
        im = im.convert(mode)
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


def _too_large(what: str = "") -> str:
    return (f"refused: {what}over the limit of {MAX_PIXELS:,} pixels (a decompression bomb, or a photo far "
            f"larger than this tool needs)")


def failure_reason(error: Exception) -> str:
    """Why a file could not be read, in a few words."""
    if isinstance(error, FileNotFoundError):
        return "no such file"
    if isinstance(error, ImageRefused):
        return str(error)
    return f"cannot read as an image ({type(error).__name__})"


def load_image(path: Path, channels: int, size: int) -> torch.Tensor:
    """An image file as a uint8 (C, size, size) tensor, converted to the model's mode and size."""
    arr = read_image(Path(path), "L" if channels == 1 else "RGB", size)
    return torch.from_numpy(arr.reshape(size, size, channels).transpose(2, 0, 1).copy())
