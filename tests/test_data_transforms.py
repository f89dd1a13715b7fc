"""One image at a time, no Ray: what the converter keeps, converts and rejects, and what each
transform returns, checked against torchvision's reference transforms on real photos and against
fb.resnet.torch's colour augmentation computed step by step."""

import io
import itertools
import struct

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from sklearn.datasets import load_sample_images

from densenet_ray.data import TRANSFORMS
from densenet_ray.data.images import Rejected, mean_std, channel_histograms, prepare
from densenet_ray.data.transforms import (cifar_train, color_draws, color_jitter_lighting, imagenet_eval,
                                          imagenet_tencrop, imagenet_train, imagenet_train_crop_flip, none,
                                          random_resized_crop_box)


@pytest.fixture(scope="module")
def photo():
    """scikit-learn's china.jpg as a PIL image, 640x427."""
    return Image.fromarray(load_sample_images().images[0])


def encode(img, fmt="JPEG", **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def decode(data):
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def diff(a, b):
    return np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean()


def bomb(jpeg):
    """The JPEG with its SOF0 header claiming 30000x30000 pixels: Pillow's limit is ~89M."""
    at = jpeg.index(b"\xff\xc0") + 5   # marker, length (2), precision (1), then height, width
    return jpeg[:at] + struct.pack(">HH", 30000, 30000) + jpeg[at + 4:]


def test_rgb_jpeg_and_png_named_jpeg_keep_their_bytes(photo):
    for data, fmt in ((encode(photo, quality=90), "JPEG"), (encode(photo, "PNG"), "PNG")):
        stored, pixels, converted = prepare(data)
        assert stored == data and not converted
        assert decode(stored).format == fmt
        assert np.array_equal(pixels, np.asarray(decode(data)))


@pytest.mark.parametrize("mode", ["CMYK", "L"])
def test_cmyk_and_grayscale_jpegs_become_rgb_jpegs(photo, mode):
    data = encode(photo.convert(mode), quality=95)
    stored, pixels, converted = prepare(data, quality=95)
    out = decode(stored)
    assert converted and out.format == "JPEG" and out.mode == "RGB" and out.size == photo.size
    assert diff(out, decode(data).convert("RGB")) < 3.0   # one more JPEG generation at q95
    assert pixels.shape == (427, 640, 3)


def test_palette_png_is_converted_losslessly(photo):
    pal = photo.convert("P", palette=Image.ADAPTIVE, colors=64)
    stored, _, converted = prepare(encode(pal, "PNG"))
    out = decode(stored)
    assert converted and out.format == "PNG" and out.mode == "RGB"
    assert np.array_equal(np.asarray(out), np.asarray(pal.convert("RGB")))


@pytest.mark.parametrize("make, reason", [
    (lambda jpg: jpg[: len(jpg) // 2], "truncated or corrupt"),
    (lambda jpg: b"", "empty file"),
    (lambda jpg: b"this is a text file, not a JPEG\n" * 4, "not an image"),
    (bomb, "decompression bomb"),
])
def test_bad_images_are_rejected_with_a_reason(photo, make, reason):
    with pytest.raises(Rejected, match=f"^{reason}"):
        prepare(make(encode(photo)))


def test_max_side_reencodes_keeping_aspect(photo):
    big = photo.resize((1280, 854))
    stored, pixels, converted = prepare(encode(big, quality=95), max_side=320, quality=95)
    out = decode(stored)
    assert converted and out.format == "JPEG" and out.size == (320, 214) and pixels.shape == (214, 320, 3)
    assert diff(out, big.resize((320, 214), Image.LANCZOS)) < 3.0
    assert prepare(encode(photo), max_side=640)[2] is False   # already small enough: kept


def test_grayscale_dataset_stores_one_channel(photo):
    stored, pixels, _ = prepare(encode(photo), channels=1)
    assert decode(stored).mode == "L" and pixels.shape == (427, 640, 1)


def test_mean_std_from_histograms_is_exact():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 256, (30, 40, 3), np.uint8), rng.integers(0, 256, (7, 9, 3), np.uint8)
    mean, std = mean_std(channel_histograms(a) + channel_histograms(b))
    px = np.concatenate([a.reshape(-1, 3), b.reshape(-1, 3)]) / 255.0
    assert np.allclose(mean, px.mean(0)) and np.allclose(std, px.std(0))


@pytest.mark.parametrize("scale", [1, 2])   # 2: a 1280x854 JPEG takes the DCT-scaled decode path
def test_imagenet_eval_matches_torchvision(photo, scale):
    img = photo.resize((640 * scale, 427 * scale))
    data = encode(img, quality=95)
    ref = TF.center_crop(TF.resize(decode(data), 256), 224)
    out = imagenet_eval(data, 224)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    assert diff(out, ref) < (0.5 if scale == 1 else 3.0)   # 2: DCT scaling differs a little


def test_tencrop_matches_torchvision(photo):
    data = encode(photo, quality=95)
    ref = TF.ten_crop(TF.resize(decode(data), 256), 224)
    out = imagenet_tencrop(data, 224)
    assert out.shape == (10, 224, 224, 3)
    for got, want in zip(out, ref):
        assert diff(got, want) < 0.5   # same resize, same crops
    assert np.array_equal(out[6], out[0][:, ::-1])   # the mirror's top-right is the top-left mirrored


def test_imagenet_train_crop_flip_is_torchvisions_random_resized_crop(photo):
    data = encode(photo, quality=95)
    top, left, h, w = random_resized_crop_box(640, 427, np.random.default_rng(7))
    out = imagenet_train_crop_flip(data, 224, np.random.default_rng(7))
    ref = np.asarray(TF.resized_crop(decode(data), top, left, h, w, [224, 224]))
    assert out.shape == (224, 224, 3)
    assert min(diff(out, ref), diff(out, ref[:, ::-1])) < 3.0
    assert np.array_equal(out, imagenet_train_crop_flip(data, 224, np.random.default_rng(7)))
    outs = [imagenet_train_crop_flip(data, 160, np.random.default_rng(s)) for s in range(8)]
    assert len({o.tobytes() for o in outs}) == 8 and outs[0].shape == (160, 160, 3)
    assert TRANSFORMS["imagenet_train_crop_flip"] is imagenet_train_crop_flip


# fb.resnet.torch, datasets/imagenet.lua: ImageNet's RGB PCA on the 0..1 scale.
EIGVAL = np.array([0.2175, 0.0188, 0.0045])
EIGVEC = np.array([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])


def fb_color(a, order, factors, alpha):
    """fb.resnet.torch's ColorJitter + Lighting (datasets/transforms.lua) step by step, in float64 on the
    0..1 scale, then rounded and clipped to uint8. order indexes (Brightness, Contrast, Saturation)."""
    x = a / 255.0
    for i in order:
        gs = (0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2])[..., None]
        target = (np.zeros_like(x), np.full_like(x, gs.mean()), np.broadcast_to(gs, x.shape))[i]
        x = factors[i] * x + (1 - factors[i]) * target   # blend(img1, img2, alpha)
    x = x + EIGVEC @ (np.asarray(alpha) * EIGVAL)          # Lighting: the same RGB offset for every pixel
    return np.clip(np.round(x * 255), 0, 255)


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_color_jitter_and_lighting_are_fb_resnet_torchs_in_any_order(photo, order):
    a = np.asarray(photo.resize((224, 160)))
    for seed in range(3):
        rng = np.random.default_rng(seed)
        factors, alpha = 1 + rng.uniform(-0.4, 0.4, 3), rng.normal(0, 0.1, 3)
        out = color_jitter_lighting(a, factors, alpha)
        want = fb_color(a, order, factors, alpha)
        assert out.shape == a.shape and out.dtype == np.uint8
        assert np.abs(out - want).max() <= 1 and (out != want).mean() < 0.001   # float32 vs float64 rounding
        assert diff(out, a) > 2   # it did change the colours


def test_each_jitter_and_the_lighting_count(photo):
    a = np.asarray(photo.resize((64, 48)))
    base, alpha = np.array([1.2, 0.8, 0.7]), np.array([0.1, -0.2, 0.05])
    want = fb_color(a, [0, 1, 2], base, alpha)
    for i in range(3):   # a different factor for one of the three changes the image as fb's does
        f = base.copy()
        f[i] = 1.3
        got = color_jitter_lighting(a, f, alpha)
        assert np.abs(got - fb_color(a, [0, 1, 2], f, alpha)).max() <= 1 and diff(got, want) > 1
    assert diff(color_jitter_lighting(a, base, np.zeros(3)), want) > 1   # lighting
    assert np.array_equal(color_jitter_lighting(a, np.ones(3), np.zeros(3)), a)   # identity draws
    bright = color_jitter_lighting(a, [1.4, 1.4, 1.4], np.array([-0.3, 0.3, 0.3]))   # saturates, never wraps
    assert (bright == 255).mean() > 0.05
    assert np.abs(bright - fb_color(a, [0, 1, 2], [1.4] * 3, [-0.3, 0.3, 0.3])).max() <= 1


def test_color_jitter_on_grayscale_is_brightness_and_contrast_only(photo):
    g = np.asarray(photo.convert("L").resize((96, 64)))[..., None]
    rgb = np.repeat(g, 3, axis=2)   # the same image as grey RGB: its grayscale is itself
    for factors in ([1.3, 0.7, 1.4], [0.6, 1.4, 0.8]):
        out = color_jitter_lighting(g, factors, np.array([0.2, -0.1, 0.1]))
        assert out.shape == g.shape and diff(out, g) > 2
        assert np.abs(out[..., 0] - fb_color(rgb, [0, 1, 2], factors, np.zeros(3))[..., 0]).max() <= 1
        no_saturation = [factors[0], factors[1], 1.0]   # and no lighting: the same image
        assert np.array_equal(out, color_jitter_lighting(g, no_saturation, np.zeros(3)))


def test_color_draws_follow_fb_resnet_torch():
    draws = [color_draws(np.random.default_rng(s)) for s in range(2000)]
    factors, alphas = np.array([f for f, _ in draws]), np.array([a for _, a in draws])
    assert factors.min() >= 0.6 and factors.max() <= 1.4 and factors.min() < 0.61 and factors.max() > 1.39
    assert np.allclose(factors.mean(0), 1, atol=0.02)
    assert np.allclose(alphas.std(0), 0.1, atol=0.01) and np.allclose(alphas.mean(0), 0, atol=0.01)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_imagenet_train_is_crop_flip_then_fb_resnet_torchs_colour(photo, mode):
    data = encode(photo.convert(mode), quality=95)
    for seed in range(4):
        rng = np.random.default_rng(seed)
        crop = imagenet_train_crop_flip(data, 224, rng, mode)   # the same crop and flip draws, then the colour ones
        want = color_jitter_lighting(np.ascontiguousarray(crop), *color_draws(rng))
        out = imagenet_train(data, 224, np.random.default_rng(seed), mode)
        assert out.shape == (224, 224, 3 if mode == "RGB" else 1) and out.dtype == np.uint8
        assert np.array_equal(out, want)
        assert diff(out, crop) > 1   # not the crop alone
    assert TRANSFORMS["imagenet_train"] is imagenet_train


def test_random_resized_crop_boxes_follow_scale_and_ratio():
    rng = np.random.default_rng(0)
    boxes = np.array([random_resized_crop_box(500, 375, rng) for _ in range(2000)])
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 375).all() and (left + w <= 500).all()
    area, aspect = h * w / (500 * 375), w / h
    assert area.min() >= 0.07 and area.max() <= 1.0 and 0.74 <= aspect.min() and aspect.max() <= 1.34
    assert area.min() < 0.15 and area.max() > 0.9   # the whole range is drawn


def test_cifar_train_is_a_padded_shift_and_maybe_a_flip(photo):
    src = np.asarray(photo.resize((32, 32)))
    data = encode(Image.fromarray(src), "PNG")
    padded = np.pad(src, ((4, 4), (4, 4), (0, 0)))
    seen = set()
    for seed in range(40):
        out = cifar_train(data, rng=np.random.default_rng(seed))
        matches = [(y, x, f) for y in range(9) for x in range(9) for f in (0, 1)
                   if np.array_equal(out, padded[y:y + 32, x:x + 32][:, ::-1] if f else padded[y:y + 32, x:x + 32])]
        assert matches, f"seed {seed}: not a shifted window of the zero-padded image"
        seen |= {m[2] for m in matches} | {("shift", m[:2]) for m in matches}
    assert {0, 1} <= seen and len(seen) > 10


def test_none_keeps_pixels_or_resizes():
    digit = (np.arange(64, dtype=np.uint8).reshape(8, 8) * 4)
    data = encode(Image.fromarray(digit), "PNG")
    assert np.array_equal(none(data, mode="L")[..., 0], digit)
    up = none(data, 32, mode="L")
    assert up.shape == (32, 32, 1)
    assert np.array_equal(TRANSFORMS["none"](data, 8, None, "L")[..., 0], digit)
    assert abs(int(up.mean()) - int(digit.mean())) <= 2
    assert torch.from_numpy(up).dtype == torch.uint8
