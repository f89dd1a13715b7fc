"""`--decode device`: the rows the pipeline ships, decoded by the worker's Decoder (here on the CPU,
the same code as on a GPU but for nvJPEG and the float resize), give the images `--decode pipeline`
gives, for the same draws; bad JPEGs are dropped and counted; and a digits run stored as JPEG and
decoded in the workers reaches the demo's accuracy."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images

from servers import the_run

from densenet_ray import config as C
from densenet_ray import train
from densenet_ray.data import DataError, device, read_split, sources, transforms, write
from densenet_ray.data.device import Decoder
from densenet_ray.data.pipeline import decode_batch
from densenet_ray.data.transforms import output_shape

# Crops of the two sample photos (427x640): sizes and aspect ratios that take every resize path.
CROPS = [(427, 640), (300, 200), (120, 400), (64, 64), (427, 300)]


def encode(a, mode, fmt="JPEG", **kw):
    buf = io.BytesIO()
    Image.fromarray(a).convert(mode).save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos():
    return load_sample_images().images


def rows(photos, mode):
    """JPEG rows (quality 90) in the dataset's mode, as convert stores them, and one PNG row last."""
    images = [encode(p[:h, :w], mode, quality=90) for p in photos for h, w in CROPS]
    images.append(encode(photos[1][100:260, 200:400], mode, "PNG"))
    return {"image": np.array(images, object), "label": np.arange(len(images)) % 3,
            "key": np.array([f"r{i}" for i in range(len(images))], object)}


def both(batch, transform, size, mode, seed=1):
    """(pipeline's batch, the device rows, the Decoder's batch), both drawn from rng(seed)."""
    shape = output_shape(transform, size, 1 if mode == "L" else 3)
    kw = {"transform": transform, "size": size, "mode": mode, "shape": shape, "classes": 3}
    cpu = decode_batch(batch, **kw, rng=np.random.default_rng(seed))
    shipped = decode_batch(batch, **kw, rng=np.random.default_rng(seed), decode="device")
    return cpu, shipped, Decoder(transform, shape, "cpu")(shipped)


def differences(a, b):
    """(mean |a - b| over everything, the largest per-image mean, the largest) in 0..255 levels."""
    d = np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16))
    return d.mean(), d.reshape(len(d), -1).mean(1).max(), d.max()


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("transform", device.DEVICE_TRANSFORMS)
@pytest.mark.parametrize("size", [64, 224])
def test_device_decoding_gives_the_pipelines_images(photos, transform, mode, size, monkeypatch):
    batch = rows(photos, mode)
    cpu, shipped, got = both(batch, transform, size, mode)
    assert shipped["jpeg"].tolist() == [True] * (len(batch["label"]) - 1) + [False]   # the PNG stays on the CPU
    assert got["label"].tolist() == cpu["label"].tolist() == batch["label"].tolist()
    assert got["image"].shape == cpu["image"].shape and got["image"].dtype == torch.uint8
    image = got["image"].numpy()
    assert np.array_equal(image[-1], cpu["image"][-1])   # the PNG: the pipeline's own pixels
    # Pillow decodes a JPEG whose crop shrinks 2x or more at 1/2..1/8 scale in the DCT domain, its box
    # rounded to that scale; the worker decodes it whole (nvJPEG has no reduced scale). Measured on these
    # rows, seed 1 (mean, worst image's mean, largest): at 64 px 0.55-1.40, 2.2-5.8, 19-75 levels (a box
    # edge moved by up to 4 source pixels shifts a sharp edge); at 224 px no crop shrinks 2x: 0, 0, 1.
    mean, worst, largest = differences(image, cpu["image"])
    assert (mean < 1.75 and worst < 7.5) if size == 64 else (mean < 0.01 and largest <= 1)
    # Without draft mode the pipeline's transform is the worker's arithmetic: equal but for the colour
    # map's float32 rounding (one level, here and there).
    full = transforms._decode
    monkeypatch.setattr(transforms, "_decode", lambda img, m, shrink=1.0: full(img, m))
    whole, _, _ = both(batch, transform, size, mode)
    _, _, largest = differences(image, whole["image"])
    assert largest <= 1


def test_device_draws_are_the_transforms_draws(photos):
    """The crop box, flip and colours ship_batch draws are those the CPU transform would draw from
    the same rng state, and different seeds give different crops."""
    batch = rows(photos, "RGB")
    _, a, _ = both(batch, "imagenet_train", 64, "RGB", seed=3)
    _, b, _ = both(batch, "imagenet_train", 64, "RGB", seed=4)
    rng = np.random.default_rng(3)
    for i, data in enumerate(batch["image"][:-1]):
        img = Image.open(io.BytesIO(data))
        box = transforms.random_resized_crop_box(img.width, img.height, rng)
        flip = rng.random() < 0.5
        factors, alpha = transforms.color_draws(rng)
        assert a["params"][i].tolist() == pytest.approx([*box, float(flip), *factors, *alpha], rel=1e-6)
    assert not np.array_equal(a["params"], b["params"])
    assert a["params"].dtype == np.float32 and a["params"].shape == (len(batch["label"]), 11)


def test_cmyk_jpeg_and_unknown_labels_are_handled_in_the_pipeline(photos):
    """A CMYK JPEG (nvJPEG refuses it) is transformed in the pipeline; a row whose label is not a
    class, or whose JPEG header does not parse, is dropped there, as with --decode pipeline."""
    good = encode(photos[0][:200, :300], "RGB", quality=90)
    cmyk = encode(photos[0][:200, :300], "CMYK", quality=90)
    batch = {"image": np.array([good, cmyk, good, good[:40]], object), "label": np.array([0, 1, 7, 2]),
             "key": np.array(["a", "b", "c", "d"], object)}
    cpu, shipped, got = both(batch, "imagenet_train_crop_flip", 64, "RGB")
    assert shipped["key"].tolist() == ["a", "b"] and shipped["jpeg"].tolist() == [True, False]
    assert cpu["label"].tolist() == got["label"].tolist() == [0, 1]
    assert np.array_equal(got["image"][1].numpy(), cpu["image"][1])


@pytest.mark.parametrize("damage", ["truncated", "garbled"])
def test_jpeg_that_fails_in_the_worker_is_dropped_and_counted(photos, damage):
    good = [encode(photos[i][:200, :300], "RGB", quality=90) for i in (0, 1)]
    sos = good[0].index(b"\xff\xda") + 20   # the header parses; the scan data is damaged
    bad = good[0][:len(good[0]) // 3] if damage == "truncated" else \
        good[0][:sos] + np.random.default_rng(0).integers(0, 256, len(good[0]) - sos, dtype=np.uint8).tobytes()
    batch = {"image": np.array([good[0], bad, good[1]], object), "label": np.array([0, 1, 2]),
             "key": np.array(["a", "b", "c"], object), "row": np.array([7, 8, 9])}   # row: read_split(row_ids=True)
    shape = (64, 64, 3)
    shipped = decode_batch(batch, transform="imagenet_train", size=64, mode="RGB", shape=shape, classes=3,
                           decode="device", rng=np.random.default_rng(0))
    assert shipped["jpeg"].all()   # only the worker finds out
    skipped = []
    decoder = Decoder("imagenet_train", shape, "cpu", on_skip=lambda n, notes: skipped.append((n, notes)))
    got = decoder(shipped)
    assert got["label"].tolist() == [0, 2] and got["image"].shape == (2, *shape) and got["row"].tolist() == [7, 9]
    assert len(skipped) == 1 and skipped[0][0] == 1 and "key b" in skipped[0][1][0]
    assert decoder.counts == {"jpeg": 2, "pillow": 0, "pipeline": 0, "skipped": 1} and decoder.take() == 2
    ref = decode_batch(batch, transform="imagenet_train", size=64, mode="RGB", shape=shape, classes=3,
                       rng=np.random.default_rng(0))
    assert np.array_equal(got["image"][0].numpy(), ref["image"][0])   # the draws before it: unchanged


def test_jpeg_torchvision_refuses_is_decoded_by_pillow(photos, monkeypatch):
    """A JPEG the device decoder refuses (as nvJPEG refuses some) is retried alone, then decoded by
    Pillow in the worker: the same image, nothing dropped."""
    batch = rows(photos, "RGB")
    cpu, shipped, _ = both(batch, "imagenet_train", 64, "RGB")
    refused = batch["image"][2]
    real = device._decode_jpeg

    def picky(tensors, mode, dev):
        if any(t.numel() == len(refused) and bytes(t.numpy()) == refused for t in tensors):
            raise RuntimeError("nvjpegDecodeBatched failed")
        return real(tensors, mode, dev)

    monkeypatch.setattr(device, "_decode_jpeg", picky)
    decoder = Decoder("imagenet_train", (64, 64, 3), "cpu")
    again = decoder(shipped)
    assert decoder.counts == {"jpeg": 9, "pillow": 1, "pipeline": 1, "skipped": 0}
    _, _, baseline = both(batch, "imagenet_train", 64, "RGB")
    assert torch.equal(again["image"], baseline["image"])   # Pillow's full decode is libjpeg's


def test_decode_is_validated():
    ok = C.PRESETS["imagenet"].replace(run_name="x", decode="device")
    ok.validate()
    assert C.DEVICE_TRANSFORMS == device.DEVICE_TRANSFORMS and set(C.DECODES) == {"pipeline", "device"}
    with pytest.raises(ValueError, match="--decode 'gpu': expected pipeline or device"):
        ok.replace(decode="gpu").validate()
    with pytest.raises(ValueError, match="--decode 'device': expected pipeline with --train-transform cifar_train"):
        C.PRESETS["cifar10"].replace(run_name="x", decode="device").validate()
    assert C.from_args(["digits", "--decode", "device"]).decode == "device"
    assert C.PRESETS["digits"].decode == "pipeline"
    with pytest.raises(DataError, match="decode 'device' with transform 'cifar_train': expected"):
        read_split("/nowhere", "train", "cifar_train", decode="device")


@pytest.fixture(scope="module")
def digits_jpeg(tmp_path_factory, ray_local):
    """scikit-learn's digits (the demo's split) upsampled to 32 px and stored as quality-95 grayscale
    JPEGs in an ImageFolder layout, converted as a dataset of one's own would be."""
    folder = tmp_path_factory.mktemp("digits_jpeg")
    for split, items in sources.digits().splits.items():
        for item in items:
            at = folder / "images" / split / str(item.label)
            at.mkdir(parents=True, exist_ok=True)
            Image.fromarray(item.payload[..., 0]).resize((32, 32), Image.BILINEAR).save(
                at / f"{item.key.strip('digits[]')}.jpg", quality=95)
    write.convert(sources.imagefolder(str(folder / "images")), str(folder / "ds"), progress=False)
    return str(folder / "ds")


@pytest.mark.slow
def test_digits_stored_as_jpeg_and_decoded_in_the_workers_reach_the_demos_accuracy(digits_jpeg, tmp_path):
    """The digits demo (15 epochs, 2 workers) with --decode device: every training row reaches the
    workers as a JPEG and is decoded there (worker_decoded_rows), and validation error is within the
    demo's bar (test_train: 5%)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    rc = train.main(["digits", "--data", digits_jpeg, "--dataset", "custom", "--decode", "device",
                     "--storage", str(tmp_path / "runs"), "--mlflow-tracking-uri", uri, "--run-name", "jpeg",
                     "--max-failures", "0", "--progress-s", "0"])
    assert rc == 0
    client, run = the_run(uri, "jpeg")
    assert run.data.params["decode"] == "device" and run.data.metrics["val_top1_err"] <= 0.05
    decoded = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "worker_decoded_rows")}
    images = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train_images")}
    assert decoded == images and len(decoded) == 15 and min(decoded.values()) > 0
    assert run.data.metrics["skipped_rows"] == 0


def test_a_worker_counts_its_skipped_rows_in_the_jobs_counter(tmp_path, ray_local):
    """data.skip_counter (what a worker's Decoder reports to) adds to the counter skipped_rows and
    skipped_notes read, naming the split; with no counter in the job it does nothing, never raises."""
    from densenet_ray.data import pipeline

    root = str(tmp_path / "ds")
    pipeline.skip_counter(root, "train")(1, ["key x: no counter yet"])   # no read_split: nothing to count in
    pipeline._counter(root, "train")                                    # what read_split makes
    pipeline.skip_counter(root, "train")(2, ["key a: JPEG does not decode in the training worker, skipped"])
    assert pipeline.skipped_rows(root, "train") == 2
    assert pipeline.skipped_notes(root, "train") == [
        "split 'train', key a: JPEG does not decode in the training worker, skipped"]
