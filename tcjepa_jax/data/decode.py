"""Decoding of stored records' contents: image bytes -> uint8 RGB, raw captions -> clean sentences.

Runs in dataset writers (tools/make_dataset.py validates every item with it) and in Grain worker
processes, so both sides accept and reject exactly the same images and sentences. Every failure is
a `BadRecord` with a short `kind` that callers count; nothing else is ever raised, so one bad file
costs one record, never a run.

Image modes all become 8-bit RGB:
    RGB, YCbCr, LAB, HSV, CMYK    converted by Pillow (JPEG CMYK, Adobe inverted included: Pillow
                                  undoes the inversion when it reads the file)
    1, L, P                       expanded to grey / the palette colours
    RGBA, LA, PA, transparency    alpha-composited over BACKGROUND (P, L or RGB with a tRNS colour
                                  key too), so transparent pixels normalise to about 0
    I;16, I;16B, I;16L, I;16N     16-bit: value >> 8
    I                             32-bit integer, which Pillow uses for 16-bit data from several
                                  formats: clipped to [0, 65535], then >> 8
    F                             32-bit float: taken as intensities in [0, 1] (the convention of
                                  float images written by numpy tools), * 255, rounded, clipped;
                                  NaN becomes 0
EXIF orientation is applied (an unreadable EXIF block leaves the image as stored). Animated
images (GIF, WebP, APNG) give their first frame.
"""

from __future__ import annotations

import collections
import io

import numpy as np
from PIL import Image, ImageOps

BACKGROUND = (124, 116, 104)  # ImageNet mean as uint8: transparent pixels normalise to ~0

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
_HAS_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


class BadRecord(Exception):
    """A record that cannot be used; .kind is a short snake_case reason counted in logs."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


# --- images --------------------------------------------------------------------------------------

def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes -> uint8 (H, W, 3) RGB, C-contiguous. Raises only BadRecord.

    kinds: empty_image (no bytes), truncated_image (the data ends early), undecodable_image (not
    an image, an unknown format, corrupt data, or over Pillow's decompression-bomb limit),
    zero_size_image (width or height 0). The whole image is decoded here (img.load()), so a
    truncated file fails now rather than as a grey band later.
    """
    try:
        if data is None or len(data) == 0:
            raise BadRecord("empty_image", "the image data is empty (0 bytes)")
        with Image.open(io.BytesIO(data)) as img:
            if img.width == 0 or img.height == 0:
                raise BadRecord("zero_size_image", f"the image is {img.width}x{img.height} pixels")
            img.load()
            return _to_rgb(_apply_orientation(img))
    except BadRecord:
        raise
    except Image.DecompressionBombError as e:
        raise BadRecord("undecodable_image", str(e)) from None
    except Exception as e:  # pylint: disable=broad-except  # decoders raise many types
        truncated = isinstance(e, OSError) and "truncated" in str(e).lower()
        raise BadRecord("truncated_image" if truncated else "undecodable_image",
                        f"{type(e).__name__}: {e}") from None


def _apply_orientation(img: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # pylint: disable=broad-except
        return img  # a broken EXIF block: keep the pixels as stored


def _to_rgb(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in _SIXTEEN_BIT:
        return _grey_to_rgb(np.asarray(img).astype(np.uint16) >> 8)
    if mode == "I":
        return _grey_to_rgb(np.clip(np.asarray(img), 0, 65535) >> 8)
    if mode == "F":
        return _grey_to_rgb(np.clip(np.rint(np.nan_to_num(np.asarray(img)) * 255.0), 0, 255))
    if mode in _HAS_ALPHA or "transparency" in img.info:
        return _composite(np.asarray(img.convert("RGBA")))
    if mode != "RGB":
        img = img.convert("RGB")
    return np.array(img, dtype=np.uint8, order="C")


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(grey.astype(np.uint8)[:, :, None], 3, axis=2))


def _composite(rgba: np.ndarray) -> np.ndarray:
    """RGBA over BACKGROUND, rounded to nearest: alpha 0 gives exactly BACKGROUND."""
    alpha = rgba[:, :, 3:].astype(np.uint32)
    rgb = rgba[:, :, :3].astype(np.uint32)
    background = np.asarray(BACKGROUND, np.uint32)
    out = (rgb * alpha + background * (255 - alpha) + 127) // 255
    return np.ascontiguousarray(out.astype(np.uint8))


# --- captions ------------------------------------------------------------------------------------

def clean_captions(captions) -> tuple[list[str], collections.Counter]:
    """Raw caption list -> (kept sentences in order, Counter of dropped sentences by kind).

    Items are str or bytes (strict UTF-8). Dropped: invalid_caption (neither str nor bytes),
    invalid_utf8_caption (bytes that are not UTF-8, or a str with lone surrogates, e.g. from a
    JSON "\\ud800", which no tokenizer or writer can encode), empty_caption (nothing left after
    stripping whitespace). Anything but a list or tuple is no captions: ([], Counter()).
    """
    dropped = collections.Counter()
    if not isinstance(captions, (list, tuple)):
        return [], dropped
    kept = []
    for caption in captions:
        if isinstance(caption, bytes):
            try:
                caption = caption.decode("utf-8")
            except UnicodeDecodeError:
                dropped["invalid_utf8_caption"] += 1
                continue
        elif not isinstance(caption, str):
            dropped["invalid_caption"] += 1
            continue
        else:
            try:
                caption.encode("utf-8")
            except UnicodeEncodeError:
                dropped["invalid_utf8_caption"] += 1
                continue
        caption = caption.strip()
        if not caption:
            dropped["empty_caption"] += 1
            continue
        kept.append(caption)
    return kept, dropped
