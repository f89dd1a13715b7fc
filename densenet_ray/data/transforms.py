"""Training and evaluation transforms: encoded image bytes -> uint8 HxWxC array. Pure functions of
(bytes, size, rng, mode), testable without Ray; `pipeline` maps them over shards.

    rng = np.random.default_rng()
    x = TRANSFORMS["imagenet_train"](jpeg_bytes, 224, rng, "RGB")   # (224, 224, 3) uint8
    x = imagenet_tencrop(jpeg_bytes, 224)                           # (10, 224, 224, 3)
    y = color_jitter_lighting(pixels, *color_draws(rng))   # imagenet_train's colour half: uint8 HxWxC

Each decodes only as much as its output needs: a JPEG whose crop will shrink 2x or more is decoded
at 1/2, 1/4 or 1/8 scale in the DCT domain (Pillow's draft mode), and crop + resize is one
antialiased bilinear step on uint8 (torch's vectorised kernel, about 3x faster than Pillow's).
Crops and sizes round as torchvision's do, so results match its reference transforms.
`imagenet_train` is the paper's recipe (fb.resnet.torch's: crop, flip, colour jitter, PCA lighting);
`imagenet_train_crop_flip` is torchvision's reference crop and flip alone.
Normalisation is not here: batches stay uint8 and are normalised on the training device.
"""

import io
import math
import warnings

import numpy as np
import torch
from PIL import Image

from .images import to_mode

EVAL_RESIZE = 256 / 224   # ImageNet eval: resize the shorter side to 256, centre-crop 224

# fb.resnet.torch's ImageNet colour augmentation (datasets/imagenet.lua), which the paper trains with.
JITTER = 0.4          # brightness, contrast and saturation factors: 1 + U(-0.4, 0.4)
LIGHTING_STD = 0.1    # AlexNet's PCA noise: alpha ~ N(0, 0.1) per principal component
EIGVAL = np.array([0.2175, 0.0188, 0.0045])   # ImageNet's RGB covariance, pixels on the 0..1 scale
EIGVEC = np.array([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])
GREY = np.array([0.299, 0.587, 0.114])        # its grayscale(): Rec. 601 luma


def imagenet_train(data, size=224, rng=None, mode="RGB"):
    """The paper's ImageNet augmentation, fb.resnet.torch's: RandomResizedCrop(size, scale=(0.08, 1),
    ratio=(3/4, 4/3)), colour jitter (brightness, contrast, saturation 0.4; the random order it
    draws changes nothing, see color_jitter_lighting), PCA lighting noise (alphastd 0.1) and a
    horizontal flip with p=0.5. On 1-channel ("L") images only brightness and contrast apply: the
    grayscale that saturation blends with is the image itself, and lighting is a direction in RGB."""
    rng = rng or np.random.default_rng()
    a = _random_resized_crop(data, size, rng, mode)
    flip = rng.random() < 0.5
    a = color_jitter_lighting(a, *color_draws(rng))
    return a[:, ::-1] if flip else a


def imagenet_train_crop_flip(data, size=224, rng=None, mode="RGB"):
    """torchvision's reference ImageNet augmentation: RandomResizedCrop(size, scale=(0.08, 1),
    ratio=(3/4, 4/3)) and a horizontal flip with p=0.5, no colour change."""
    rng = rng or np.random.default_rng()
    a = _random_resized_crop(data, size, rng, mode)
    return a[:, ::-1] if rng.random() < 0.5 else a


def color_draws(rng):
    """One image's draws for color_jitter_lighting: the factors 1 + U(-0.4, 0.4) of (brightness,
    contrast, saturation), and the lighting's alpha ~ N(0, 0.1) per principal component."""
    return 1 + rng.uniform(-JITTER, JITTER, 3), rng.normal(0, LIGHTING_STD, 3)


def color_jitter_lighting(a, factors, alpha):
    """fb.resnet.torch's ColorJitter, then its Lighting, on uint8 HxWxC pixels for given draws.

    Jitter blends the image with a target, f * image + (1 - f) * target: brightness with black,
    contrast with the mean of its grayscale, saturation with each pixel's grayscale (GREY . rgb).
    fb.resnet.torch applies the three in random order, but in its arithmetic (floats, no clipping
    between steps) they commute: brightness scales image and targets alike; saturation keeps every
    pixel's grayscale (GREY sums to 1), hence the mean contrast blends to, and leaves contrast's
    uniform grey as it is. So the three are one affine map of colour, p -> M @ p + b, in any order,
    and lighting adds EIGVEC @ (alpha * EIGVAL) to b: one float32 pass, ~0.4 ms at 224x224x3
    (step by step: ~3.4 ms). We round and clip to 0..255 once, at the end; fb.resnet.torch keeps
    floats. With one channel the grayscale is the image itself, so saturation leaves it as it is,
    and lighting (a direction in RGB) is skipped.
    """
    h, w, c = a.shape
    x = a.reshape(-1, c).astype(np.float32)
    grey = GREY if c == 3 else np.ones(1)
    # Column sums of (h, w*c) then of (w, c): x.sum(0) on (N, 3) is 20x slower.
    mean_grey = grey @ x.reshape(h, w * c).sum(0).reshape(w, c).sum(0, dtype=np.float64) / (h * w)
    brightness, contrast, saturation = factors
    m = brightness * contrast * (saturation * np.eye(c) + (1 - saturation) * np.outer(np.ones(c), grey))
    b = np.full(c, brightness * (1 - contrast) * mean_grey)
    if c == 3:
        b += 255 * EIGVEC @ (alpha * EIGVAL)   # EIGVAL is on the 0..1 scale
    y = (x @ m.T.astype(np.float32)).reshape(h, w * c)
    # +0.5: astype below truncates. Adding along rows of w*c is ~7x faster than along (N, 3).
    y += np.tile((b + 0.5).astype(np.float32), w)
    np.clip(y, 0, 255, out=y)
    return y.astype(np.uint8).reshape(h, w, c)


def imagenet_eval(data, size=224, rng=None, mode="RGB"):
    """Resize the shorter side to size*256/224, then take the centre size x size crop."""
    return _center(_resize_shorter(data, round(size * EVAL_RESIZE), mode), size)


def imagenet_tencrop(data, size=224, rng=None, mode="RGB"):
    """The paper's 10-crop test (Table 3): resize the shorter side to size*256/224, take the four
    corner and centre crops, then the same five of the mirrored image -> (10, size, size, C), as
    torchvision's TenCrop (fb.resnet.torch's TenCrop takes the same ten, centre first). How the ten
    predictions are combined: densenet_ray.evaluate."""
    a = _resize_shorter(data, round(size * EVAL_RESIZE), mode)
    return np.stack(_five_crops(a, size) + _five_crops(a[:, ::-1], size))


def _five_crops(a, size):
    H, W = a.shape[:2]
    return [a[:size, :size], a[:size, W - size:], a[H - size:, :size], a[H - size:, W - size:], _center(a, size)]


def _center(a, size):
    t, l = round((a.shape[0] - size) / 2), round((a.shape[1] - size) / 2)   # torchvision's rounding
    return a[t:t + size, l:l + size]


def cifar_train(data, size=None, rng=None, mode="RGB", pad=4):
    """Zero-pad by 4, take a random crop of the original size, flip with p=0.5 (the paper's C10+)."""
    rng = rng or np.random.default_rng()
    a = none(data, size, mode=mode)
    h, w = a.shape[:2]
    y, x = rng.integers(0, 2 * pad + 1, size=2)
    out = np.pad(a, ((pad, pad), (pad, pad), (0, 0)))[y:y + h, x:x + w]
    return out[:, ::-1] if rng.random() < 0.5 else out


def none(data, size=None, rng=None, mode="RGB"):
    """As stored; resized to size x size when `size` is given (the digits demo upsamples 8x8)."""
    img = Image.open(io.BytesIO(data))
    if size is None:
        return _decode(img, mode)[0]
    a, _ = _decode(img, mode, shrink=min(img.size) / size)
    return _resize(a, (size, size))


TRANSFORMS = {"imagenet_train": imagenet_train, "imagenet_train_crop_flip": imagenet_train_crop_flip,
              "imagenet_eval": imagenet_eval, "imagenet_tencrop": imagenet_tencrop, "cifar_train": cifar_train,
              "none": none}
# The ones that want a reshuffled, re-augmented epoch:
RANDOM = {"imagenet_train", "imagenet_train_crop_flip", "cifar_train"}


def output_shape(transform, size, channels):
    """Shape of one transformed image; size is an int or a stored (height, width)."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    return (10, *hw, channels) if transform == "imagenet_tencrop" else (*hw, channels)


def _random_resized_crop(data, size, rng, mode):
    img = Image.open(io.BytesIO(data))
    top, left, h, w = random_resized_crop_box(img.width, img.height, rng)
    a, s = _decode(img, mode, shrink=min(h, w) / size)
    return _resized_crop(a, (top * s, left * s, h * s, w * s), (size, size))


def random_resized_crop_box(width, height, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """(top, left, h, w) as torchvision's RandomResizedCrop.get_params draws it."""
    area = width * height
    log_ratio = np.log(ratio)
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height   # fallback: the whole image, clamped to the ratio range, centred
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _decode(img, mode, shrink=1.0):
    """(uint8 HxWxC pixels, decoded pixels per source pixel). A JPEG is decoded at the coarsest DCT
    scale (1/2, 1/4, 1/8) that still leaves `shrink` >= 1 for the final resize."""
    width = img.width
    if shrink >= 2 and img.format == "JPEG":
        s = min(8, 2 ** int(math.log2(shrink)))
        img.draft(mode, (img.width // s, img.height // s))
    img = to_mode(img, mode)
    a = np.asarray(img)
    return a.reshape(a.shape[0], a.shape[1], -1), img.width / width


def _resize_shorter(data, short, mode):
    """The whole image with its shorter side resized to `short`, as torchvision's Resize(short)."""
    img = Image.open(io.BytesIO(data))
    w, h = img.size
    hw = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
    return _resize(_decode(img, mode, shrink=min(w, h) / short)[0], hw)


def _resized_crop(a, box, hw):
    top, left, h, w = box
    y0, x0 = max(0, round(top)), max(0, round(left))
    y1, x1 = min(a.shape[0], max(y0 + 1, round(top + h))), min(a.shape[1], max(x0 + 1, round(left + w)))
    return _resize(a[y0:y1, x0:x1], hw)


def _resize(a, hw):
    """Antialiased bilinear resize of uint8 HxWxC to hw, as Pillow's BILINEAR does it."""
    if a.shape[:2] == tuple(hw):
        return a
    with warnings.catch_warnings():   # Pillow's arrays are read-only; torch only reads this one
        warnings.simplefilter("ignore", UserWarning)
        x = torch.from_numpy(a).permute(2, 0, 1).unsqueeze(0)
    y = torch.nn.functional.interpolate(x, size=tuple(hw), mode="bilinear", antialias=True, align_corners=False)
    return y.contiguous(memory_format=torch.channels_last)[0].permute(1, 2, 0).numpy()   # HWC in memory too
