"""Opening image files a user hands us, with raster decoders only, decoded faithfully or refused.

Pillow picks a decoder by the file's content, not its name, and some of its plugins
start an external program to decode (EPS runs Ghostscript): a file called ``cat.png``
holding PostScript would run it. So every image is opened with an explicit list of
raster formats, from a regular file of at most :data:`MAX_FILE_BYTES`, and its pixel
count is checked against :data:`MAX_PIXELS` from the header, before a byte of pixel data
is decoded.

Faithful means: an image is turned upright as its EXIF orientation says; samples of more
than 8 bits are scaled to 8 (Pillow's own conversion clips a 16-bit grey image to 255, and
rounds float samples in 0..1 to black); transparent pixels are composited over black and
the caller is told (:data:`TRANSPARENCY_NOTE`); what has no one meaning in 8 bits (32-bit
integer samples, float samples outside 0..1) is refused, saying why.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from .errors import DataError
from .fileio import NotRegularFile, open_regular

# What users have; none of these plugins starts a program.
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")
MAX_PIXELS = 50_000_000  # 50 megapixels (~7,000 x 7,000): more than any camera photo this tool needs
MAX_FILE_BYTES = 512 << 20  # 50 megapixels of 16-bit RGBA, uncompressed, is 400 MB
TRANSPARENCY_NOTE = "transparent pixels composited over black"
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageRefused(ValueError):
    """The file is not an image vitlab will decode (the message says why)."""


def read_image(path: Path, mode: str, size: int, notes: list[str] | None = None) -> np.ndarray:
    """``path`` decoded, converted to ``mode`` ("L" or "RGB") and resized (bilinear) to
    size x size: a uint8 array (size, size) or (size, size, 3). What the decoding did to
    the image beyond that (compositing transparency) is added to ``notes``.

    Raises :class:`ImageRefused` for a file in another format, over the pixel or size limit,
    or with samples that have no 8-bit meaning; NotRegularFile (an OSError) for a pipe or
    device; and Pillow's own errors (OSError, ValueError) for a damaged file."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        f = open_regular(Path(path), MAX_FILE_BYTES)
    except ValueError:
        raise ImageRefused(f"refused: over the {MAX_FILE_BYTES >> 20} MiB limit for an image file") from None
    with f, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(f, formats=FORMATS)
        except UnidentifiedImageError:
            raise ImageRefused(f"cannot read as an image (not a {', '.join(FORMATS[:-1])} or {FORMATS[-1]} file)") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageRefused(_too_large()) from None
        with im:
            width, height = im.size
            if width * height > MAX_PIXELS:
                raise ImageRefused(_too_large(f"{width} x {height} pixels is "))
            im = _to_8_bits(im, _bits_per_sample(im))
            im = ImageOps.exif_transpose(im)  # upright, as a viewer shows it
            if im.mode in _ALPHA_MODES or "transparency" in im.info:
                rgba = np.asarray(im.convert("RGBA"), dtype=np.float32)
                flat = rgba[..., :3] * (rgba[..., 3:] / 255.0)  # over black
                im = Image.fromarray(np.rint(flat).astype(np.uint8), "RGB")
                if notes is not None and bool((rgba[..., 3] < 255).any()):
                    notes.append(TRANSPARENCY_NOTE)
            im = im.convert(mode)
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(im, dtype=np.uint8)


def _bits_per_sample(im) -> int:
    """Bits per sample of a single-channel integer image ("I" or "I;16*"): Pillow decodes 16-bit
    PNG, PGM and TIFF samples to these modes, and 32-bit TIFF samples to "I"."""
    if im.mode == "I" and im.format == "TIFF":
        try:
            return int((im.tag_v2.get(258) or (32,))[0])
        except (TypeError, ValueError, IndexError):
            return 32
    return 16


def _to_8_bits(im, bits: int):
    """A single-channel image of 16-bit, 32-bit or float samples as 8-bit grey ("L"), each
    sample scaled from its full range; other modes as they are."""
    from PIL import Image

    if not (im.mode.startswith("I") or im.mode == "F"):
        return im
    a = np.asarray(im)
    if im.mode == "F":
        if not (np.isfinite(a).all() and a.min() >= 0 and a.max() <= 1):
            raise ImageRefused("refused: float samples outside 0..1 (their range has no one 8-bit meaning; save the "
                               "image with 8 or 16 bits per sample)")
        scaled = np.rint(a.astype(np.float64) * 255)
    else:
        if bits > 16 or a.min() < 0:
            raise ImageRefused(f"refused: {bits}-bit {'signed ' if a.min() < 0 else ''}integer samples (their range "
                               f"has no one 8-bit meaning; save the image with 8 or 16 bits per sample)")
        top = (1 << bits) - 1
        scaled = (a.astype(np.int64) * 255 + top // 2) // top
    return Image.fromarray(scaled.astype(np.uint8), "L")


def _too_large(what: str = "") -> str:
    return (f"refused: {what}over the limit of {MAX_PIXELS:,} pixels (a decompression bomb, or a photo far "
            f"larger than this tool needs)")


def failure_reason(error: Exception) -> str:
    """Why a file could not be read, in a few words."""
    if isinstance(error, FileNotFoundError):
        return "no such file"
    if isinstance(error, NotRegularFile):
        return error.what
    if isinstance(error, ImageRefused):
        return str(error)
    return f"cannot read as an image ({type(error).__name__})"


def check_channels(channels: int, what: str) -> None:
    """Image files are grey or colour: a model of another channel count cannot take them (DataError)."""
    if channels not in (1, 3):
        raise DataError(f"{what} takes {channels}-channel images; image files give 1 (grey) or 3 (colour) channels")


def load_image(path: Path, channels: int, size: int, notes: list[str] | None = None) -> torch.Tensor:
    """An image file as a uint8 (C, size, size) tensor, converted to the model's mode and size."""
    check_channels(channels, "this model")
    arr = read_image(Path(path), "L" if channels == 1 else "RGB", size, notes)
    return torch.from_numpy(arr.reshape(size, size, channels).transpose(2, 0, 1).copy())
