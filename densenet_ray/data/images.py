"""One image on its way into a shard: check that it decodes, convert it if it must, encode it.

    stored, pixels, converted = prepare(open("x.JPEG", "rb").read(), channels=3, max_side=None)
    stored, pixels = encode_array(cifar_row)           # lossless PNG of a uint8 HxWxC array

Pure functions, no Ray and no files: `write` calls them inside its conversion tasks.
"""

import io
import math
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

KEPT_FORMATS = {"JPEG": "JPEG", "MPO": "JPEG", "PNG": "PNG"}   # what we store as the source's bytes
MAGIC = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG", b"GIF8": "GIF", b"BM": "BMP",
         b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"RIFF": "WebP"}   # to tell damaged images from non-images


ORIENTATION = 0x0112            # the EXIF tag
ROTATED = {5, 6, 7, 8}          # orientations that swap width and height


class Rejected(Exception):
    """This source file is not stored; str() is the reason written to rejects.jsonl."""


def prepare(data, *, channels=3, max_side=None, quality=90):
    """(stored bytes, pixels HxWxC uint8, converted) for one encoded image, or raise Rejected.

    JPEG and PNG already in the right mode and size, without an EXIF rotation, are stored as their own
    bytes; a rotated one is turned upright (re-encoded, the tag dropped). Everything else
    that decodes (CMYK or grayscale JPEG, PNG named .JPEG in palette mode, GIF, TIFF, 16-bit...)
    is converted to RGB (or L when channels=1), shrunk so its longer side is at most `max_side`,
    and re-encoded: JPEG at `quality` if the source was JPEG, lossless PNG otherwise.
    """
    mode = "L" if channels == 1 else "RGB"
    img = open_image(data)
    w, h = img.size
    target = _fit(w, h, max_side)
    if target != (w, h) and img.format in ("JPEG", "MPO"):
        img.draft(None, target)   # DCT-domain downscale: decodes 2-8x fewer pixels
    load(img)
    out_format = KEPT_FORMATS.get(img.format, "PNG")
    turn = orientation(img)
    if turn != 1:
        # Stored upright, as a person (and every photo viewer) sees it: the readers ignore EXIF, so
        # a phone's sideways JPEG would otherwise train as a sideways image.
        img = ImageOps.exif_transpose(img)
        target = target[::-1] if turn in ROTATED else target
    elif img.format in KEPT_FORMATS and img.mode == mode and target == (w, h):
        return bytes(data), _pixels(img, channels), False
    img = to_mode(img, mode)
    if img.size != target:
        img = img.resize(target, Image.LANCZOS, reducing_gap=3.0)
    return encode(img, out_format, quality), _pixels(img, channels), True


def upright(data):
    """`data` as it came, unless its EXIF says the picture is rotated: then the upright image as lossless
    PNG (predict reads raw photos; a phone's sideways JPEG must be classified as a person sees it, as
    convert stores it). Bytes that do not open are returned as they are, for the decoder to name."""
    try:
        img = Image.open(io.BytesIO(data))
        if orientation(img) == 1:
            return data
        img = ImageOps.exif_transpose(img)
        return encode(img if img.mode in ("RGB", "L") else img.convert("RGB"), "PNG")
    except Exception:
        return data


def orientation(img):
    """The EXIF orientation (1..8) of `img`, 1 when it has none or its EXIF does not parse."""
    try:
        value = img.getexif().get(ORIENTATION, 1)
    except Exception:   # a damaged EXIF block must not reject pixels that decode
        return 1
    return value if value in range(1, 9) else 1


def encode_array(pixels):
    """(lossless PNG bytes, pixels) of a uint8 HxWxC (C = 1 or 3) or HxW array."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    img = Image.fromarray(pixels[..., 0] if pixels.ndim == 3 and pixels.shape[2] == 1 else pixels)
    return encode(img, "PNG"), pixels.reshape(pixels.shape[0], pixels.shape[1], -1)


def encode(img, fmt, quality=90):
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, "JPEG", quality=quality)
    else:
        img.save(buf, "PNG", compress_level=6)
    return buf.getvalue()


def to_mode(img, mode):
    """`img` in `mode` ("RGB" or "L"): CMYK via Pillow's JPEG-aware conversion, 16-bit by its high byte."""
    if img.mode == mode:
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = Image.fromarray((np.asarray(img, dtype=np.uint32) >> 8).clip(0, 255).astype(np.uint8))
    elif img.mode in ("P", "PA") or "A" in img.mode:
        img = img.convert("RGBA" if mode == "RGB" else "LA")   # drop alpha, keep the colours under it
    return img.convert(mode)


def open_image(data):
    """Pillow's lazy image of `data` (header read, pixels not yet), or raise Rejected with the reason."""
    if not data:
        raise Rejected("empty file: 0 bytes")
    with warnings.catch_warnings():
        # Pillow warns above MAX_IMAGE_PIXELS and raises at twice that; we reject from the warning on.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(io.BytesIO(data))
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            raise Rejected(f"decompression bomb: {e}") from None
        except UnidentifiedImageError:
            kind = next((k for magic, k in MAGIC.items() if bytes(data[:len(magic)]) == magic), None)
            if kind:
                raise Rejected(f"truncated or corrupt: starts like a {kind} but Pillow cannot open it "
                               f"({len(data)} bytes)") from None
            # The reason never quotes the bytes: a file that is no image may be a secret.
            raise Rejected(f"not an image: no image format Pillow reads ({len(data):,} bytes)") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise Rejected(f"truncated or corrupt: {e}") from None


def load(img):
    """Decode every pixel of `img` (finds truncation), or raise Rejected with the reason."""
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise Rejected(f"truncated or corrupt {img.format}: {e}") from None


def _fit(w, h, max_side):
    if not max_side or max(w, h) <= max_side:
        return w, h
    r = max_side / max(w, h)
    return max(1, round(w * r)), max(1, round(h * r))


def _pixels(img, channels):
    a = np.asarray(img)
    return a.reshape(a.shape[0], a.shape[1], channels)


def channel_histograms(pixels):
    """(C, 256) int64 histogram of a uint8 HxWxC array: exact per-channel sums for mean/std."""
    return np.stack([np.bincount(pixels[..., c].ravel(), minlength=256) for c in range(pixels.shape[2])])


def mean_std(histograms):
    """Per-channel (mean, std) on the 0..1 scale from summed channel_histograms."""
    values = np.arange(256) / 255.0
    n = histograms.sum(axis=1)
    mean = histograms @ values / n
    var = histograms @ values**2 / n - mean**2
    return tuple(float(m) for m in mean), tuple(float(math.sqrt(max(v, 0.0))) for v in var)
