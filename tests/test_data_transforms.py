"""One image at a time, no Ray: what the converter keeps, converts and rejects, and what each
transform returns, checked against torchvision's reference transforms on real photos."""

import io
import struct

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from sklearn.datasets import load_sample_images

from densenet_ray.data import TRANSFORMS
from densenet_ray.data.images import Rejected, mean_std, channel_histograms, prepare
from densenet_ray.data.transforms import (cifar_train, imagenet_eval, imagenet_tencrop, imagenet_train,
                                          none, random_resized_crop_box)


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


def test_imagenet_train_is_torchvisions_random_resized_crop(photo):
    data = encode(photo, quality=95)
    top, left, h, w = random_resized_crop_box(640, 427, np.random.default_rng(7))
    out = imagenet_train(data, 224, np.random.default_rng(7))
    ref = np.asarray(TF.resized_crop(decode(data), top, left, h, w, [224, 224]))
    assert out.shape == (224, 224, 3)
    assert min(diff(out, ref), diff(out, ref[:, ::-1])) < 3.0
    assert np.array_equal(out, imagenet_train(data, 224, np.random.default_rng(7)))
    outs = [imagenet_train(data, 160, np.random.default_rng(s)) for s in range(8)]
    assert len({o.tobytes() for o in outs}) == 8 and outs[0].shape == (160, 160, 3)


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
