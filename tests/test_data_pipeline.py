"""Shards back out through Ray Data: pixels equal the sources, bad rows are skipped and counted,
epochs re-augment, and Ray Train's per-worker shares are disjoint (train) and exactly-once (val)."""

import gc
import hashlib
import io
import os
import threading
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images

from densenet_ray import data
from densenet_ray.data.__main__ import main
from densenet_ray.data.manifest import SCHEMA, Manifest, Shard, Split, write_manifest
from densenet_ray.data.verify import verify

pytestmark = pytest.mark.usefixtures("ray_local")


def encode(img, fmt="JPEG", **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def photo_crops(n, size):
    """n different crops of scikit-learn's two sample photos, resized to `size` (w, h)."""
    srcs = load_sample_images().images
    return [Image.fromarray(srcs[i % 2][i * 9:i * 9 + 300, i * 13:i * 13 + 400]).resize(size) for i in range(n)]


def rows(ds, **kw):
    """{key: (image, label)} of one pass over `ds`."""
    out = {}
    for b in ds.iter_batches(batch_size=None, **kw):
        out.update({k: (img, label) for k, img, label in zip(b["key"], b["image"], b["label"])})
    return out


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """An imagefolder of 64x48 photos stored every way: PNG (lossless), JPEG (kept), CMYK JPEG
    (converted); returns (source folder, dataset, the 48x36 --max-side dataset, key -> source RGB)."""
    src = tmp_path_factory.mktemp("photos")
    truth = {}
    for label, cls in enumerate(("a", "b")):
        os.makedirs(src / "train" / cls)
        for i, img in enumerate(photo_crops(9, (64, 48))[label::2]):
            fmt, name, stored = [("PNG", "png", img), ("JPEG", "jpg", img), ("JPEG", "cmyk.jpg", img.convert("CMYK"))][i % 3]
            b = encode(stored, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
            (src / "train" / cls / f"{i}.{name}").write_bytes(b)
            decoded = Image.open(io.BytesIO(b)).convert("RGB")
            truth[f"train/{cls}/{i}.{name}"] = (np.asarray(decoded), label)
    out, small = src.parent / "photos_ds", src.parent / "photos_small"
    assert main(["convert", "imagefolder", str(src), str(out)]) == 0
    assert main(["convert", "imagefolder", str(src), str(small), "--max-side", "48", "--quality", "95"]) == 0
    return src, out, small, truth


@pytest.mark.parametrize("uri", [False, True])
def test_round_trip_equals_source_pixels(photos, uri):
    _, out, _, truth = photos
    root = f"file://{out}" if uri else str(out)
    got = rows(data.read_split(root, "train", "none", with_keys=True))
    assert sorted(got) == sorted(truth)
    for key, (want, label) in truth.items():
        img, got_label = got[key]
        assert got_label == label and img.dtype == np.uint8 and img.shape == (48, 64, 3)
        if key.endswith("cmyk.jpg"):   # converted to RGB, re-encoded at quality 90: that JPEG's pixels
            assert np.array_equal(img, np.asarray(Image.open(io.BytesIO(encode(Image.fromarray(want), quality=90))))), key
        else:                          # PNG, and JPEG kept as its own bytes: exact
            assert np.array_equal(img, want), key


def test_max_side_round_trip_is_within_jpeg_tolerance(photos):
    _, _, small, truth = photos
    got = rows(data.read_split(small, "train", "none", with_keys=True))
    assert sorted(got) == sorted(truth)
    for key, (want, _) in truth.items():
        resized = Image.fromarray(want).resize((48, 36), Image.LANCZOS, reducing_gap=3.0)
        reencoded = np.asarray(Image.open(io.BytesIO(encode(resized, quality=95))))
        if key.endswith(".png"):   # lossless sources stay PNG
            reencoded = np.asarray(resized)
        assert got[key][0].shape == (36, 48, 3) and np.array_equal(got[key][0], reencoded), key
        # and near the resized source: 4:2:0 chroma costs ~4 levels on a 48x36 photo at q95
        assert np.abs(got[key][0].astype(int) - np.asarray(resized)).mean() < 6, key


def test_batches_are_uint8_nhwc_and_each_epoch_draws_new_crops(photos):
    _, out, _, truth = photos
    ds = data.read_split(out, "train", "imagenet_train", image_size=40, with_keys=True)
    first, second = rows(ds), rows(ds)
    assert sorted(first) == sorted(second) == sorted(truth)
    changed = sum(not np.array_equal(first[k][0], second[k][0]) for k in truth)
    assert changed >= len(truth) - 1
    batch = next(iter(data.read_split(out, "train", "imagenet_train").iter_torch_batches(batch_size=4)))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (4, 224, 224, 3)
    assert batch["label"].dtype == torch.int64


def test_tencrop_rows_hold_ten_crops(photos):
    _, out, _, truth = photos
    b = data.read_split(out, "train", "imagenet_tencrop", image_size=32).take_batch(len(truth))
    assert b["image"].shape == (len(truth), 10, 32, 32, 3)


def test_varying_sizes_need_an_image_size(photos, tmp_path):
    src = tmp_path / "mixed"
    os.makedirs(src / "train" / "a")
    for i, size in enumerate([(40, 30), (30, 40)]):
        (src / "train" / "a" / f"{i}.png").write_bytes(encode(photo_crops(1, size)[0], "PNG"))
    assert main(["convert", "imagefolder", str(src), str(tmp_path / "ds")]) == 0
    with pytest.raises(data.DataError, match="holds images of different sizes; transform 'none' needs image_size"):
        data.read_split(tmp_path / "ds", "train", "none")
    assert data.read_split(tmp_path / "ds", "train", "none", image_size=16).take_batch(2)["image"].shape == (2, 16, 16, 3)
    with pytest.raises(data.DataError, match="transform 'random_crop': expected one of imagenet_train"):
        data.read_split(tmp_path / "ds", "train", "random_crop")


def test_rows_that_fail_to_decode_are_skipped_and_counted(tmp_path):
    """A shard written by some other tool, with 3 broken images among 12 in one block."""
    digits = [np.full((8, 8), 20 * i, np.uint8) for i in range(9)]
    good = [encode(Image.fromarray(d), "PNG") for d in digits]
    bad = [good[0][:40], b"", b"<html>not found</html>"]
    images = good[:3] + bad[:1] + good[3:6] + bad[1:] + good[6:]
    labels = [i % 3 for i in range(len(images))]
    table = pa.table({"image": images, "label": labels, "key": [f"r{i}" for i in range(len(images))],
                      "height": [8] * len(images), "width": [8] * len(images)}, schema=SCHEMA)
    os.makedirs(tmp_path / "train")
    pq.write_table(table, tmp_path / "train" / "part.parquet")
    raw = (tmp_path / "train" / "part.parquet").read_bytes()
    write_manifest(Manifest(
        root=str(tmp_path), name="foreign", classes=("x", "y", "z"), wnids=("x", "y", "z"), channels=1,
        mean=(0.5,), std=(0.25,), splits={"train": Split(12, (Shard("train/part.parquet", 12, len(raw),
                                                                         hashlib.sha256(raw).hexdigest(), 1),),
                                                          (4, 4, 4), (8, 8))}))
    data.check(tmp_path, splits=("train",))
    got = rows(data.read_split(tmp_path, "train", "none", with_keys=True))
    assert sorted(got) == sorted(f"r{i}" for i in (0, 1, 2, 4, 5, 6, 9, 10, 11))
    assert all(np.array_equal(got[k][0][..., 0], digits[int(v)]) for k, v in
               zip([f"r{i}" for i in (0, 1, 2, 4, 5, 6, 9, 10, 11)], range(9)))
    assert data.skipped_rows(str(tmp_path), "train") == 3
    gc.collect()  # the first dataset, and its handle on the counter, gone: the count must survive that
    rows(data.read_split(tmp_path, "train", "none", with_keys=True))   # a second epoch
    assert data.skipped_rows(str(tmp_path), "train") == 6
    problems, _ = verify(tmp_path)   # and verify names each bad row
    assert [p.split("(key ")[1].split(")")[0] for p in problems] == ["r3", "r7", "r8"]
    assert "truncated or corrupt: starts like a PNG" in problems[0] and "empty file" in problems[1] and "not an image" in problems[2]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "ds"
    assert main(["convert", "digits", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def small_images(tmp_path_factory):
    """12,000 real 16x16 images in one shard per split (train 8,000, extra 4,000), as the converter
    writes them: row groups of 1,000 and 500 rows, like a CIFAR shard's thousands."""
    from sklearn.datasets import load_digits

    from densenet_ray.data import sources, write

    d = load_digits()
    rng = np.random.default_rng(0)
    base = np.round(d.images * (255 / 16)).astype(np.uint8)

    def items(start, n):  # each row a digit shifted and with noise of its own: 12,000 distinct images
        out = []
        for i in range(start, start + n):
            img = np.kron(np.roll(base[i % len(base)], i % 3 - 1, axis=1), np.ones((2, 2), np.uint8)).astype(int)
            img = np.clip(img + rng.integers(-20, 21, img.shape), 0, 255).astype(np.uint8)
            out.append(sources.Item(f"img{i}", int(d.target[i % len(base)]), img[..., None]))
        return out

    src = sources.Source("small", [str(c) for c in range(10)], [str(c) for c in range(10)],
                         {"train": items(0, 8000), "extra": items(8000, 4000), "val": items(12000, 200)}, channels=1)
    out = tmp_path_factory.mktemp("small") / "ds"
    write.convert(src, str(out), progress=False)
    return out


def epoch_orders(ds, epochs=2):
    ds.context.execution_options.preserve_order = True   # output follows block order exactly
    return [[k for b in ds.iter_batches(batch_size=None) for k in b["key"]] for _ in range(epochs)]


def repeated_pairs(first, second, batch=64):
    """Pairs of images that share a batch in both epochs; and what a uniform permutation gives."""
    where = {k: i // batch for i, k in enumerate(first)}
    repeats = 0
    for j in range(0, len(second) - batch + 1, batch):
        counts = np.unique([where[k] for k in second[j:j + batch]], return_counts=True)[1]
        repeats += int((counts * (counts - 1) // 2).sum())
    n, batches = len(first), len(first) // batch
    return repeats, batches * batch * (batch - 1) / 2 * (batch - 1) / (n - 1)


def test_train_order_mixes_rows_independently_of_storage_every_epoch(small_images):
    m = data.load_manifest(small_images)
    assert m.split("train").shards[0].row_groups == 8 and m.split("train").rows == 8000  # 1,000 rows a group
    first, second = epoch_orders(data.read_split(small_images, "train+extra", "none", order="rows", seed=3,
                                                 with_keys=True))
    assert sorted(first) == sorted(second) and len(set(first)) == 12000
    repeats, uniform = repeated_pairs(first, second)
    assert 0.8 < repeats / uniform < 1.25, (repeats, uniform)   # ~1,980 expected
    grouped = epoch_orders(data.read_split(small_images, "train+extra", "none", order="row_groups", seed=3,
                                           with_keys=True))
    assert repeated_pairs(*grouped)[0] / uniform > 50   # what order="row_groups" (and the old reader) gives
    # train+extra is mixed, not concatenated: a third of the epoch holds a third of extra's rows
    assert 1150 < sum(int(k[3:]) >= 8000 for k in first[:4000]) < 1520
    stored = epoch_orders(data.read_split(small_images, "train", "none", with_keys=True))
    assert stored[0] == stored[1]   # evaluation reads as stored


def test_train_order_is_a_function_of_seed_and_epoch(small_images):
    def read(**kw):
        return epoch_orders(data.read_split(small_images, "train", "none", with_keys=True, **kw))
    a, b = read(order="rows", seed=1), read(order="rows", seed=1)
    assert a == b and a[0] != a[1]                                      # same seed, same epochs
    assert read(order="rows", seed=1, first_epoch=1)[0] == a[1]       # a resumed run's next epoch
    assert read(order="rows", seed=2)[0] != a[0]
    groups = read(order="row_groups", seed=1)
    assert groups == read(order="row_groups", seed=1) and groups[0] != groups[1]


def consume(iterators, epochs=2, **kw):
    """Iterate every worker's iterator at once (streaming_split's barrier needs all of them), like
    Ray Train workers would; returns keys[epoch][worker]."""
    keys = [[None] * len(iterators) for _ in range(epochs)]

    def worker(rank):
        for e in range(epochs):
            keys[e][rank] = [k for b in iterators[rank].iter_batches(batch_size=64, **kw) for k in b["key"]]
    threads = [threading.Thread(target=worker, args=(r,)) for r in range(len(iterators))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return keys


def test_train_shares_are_disjoint_equal_and_miss_fewer_rows_than_workers(digits):
    ds = data.read_split(digits, "train", "cifar_train", with_keys=True)
    shares = data.dataset_config().configure({"train": ds}, world_size=2, worker_handles=None, worker_node_ids=None)
    every = {f"digits[{i}]" for i in range(1797)}
    for epoch in consume([s["train"] for s in shares], local_shuffle_buffer_size=256):
        a, b = epoch
        assert len(a) == len(b) == len(set(a)) == len(set(b))        # equal, no repeats
        assert not set(a) & set(b) and set(a) | set(b) <= every       # disjoint
        assert 1437 - 2 < len(a) + len(b) <= 1437                      # all but < 2 of 1437


def test_val_shares_hold_every_image_exactly_once(digits):
    # Named "val", the 1437-row split gets equal=False: nothing dropped even with an odd count.
    ds = data.read_split(digits, "train", "none", with_keys=True)
    shares = data.dataset_config().configure({"val": ds}, world_size=2, worker_handles=None, worker_node_ids=None)
    for a, b in consume([s["val"] for s in shares]):
        assert len(a) + len(b) == len(set(a) | set(b)) == 1437


def test_row_ids_name_each_stored_row_and_a_resumed_epoch_reads_only_the_rest(small_images):
    """The position a mid-epoch checkpoint records: every row's id is where it is stored, the same in
    every order; an epoch told which rows were consumed reads exactly the others (undecoded rows
    are not read at all), and only that epoch."""
    def ids_and_keys(ds):
        return [(int(i), k) for b in ds.iter_batches(batch_size=None) for i, k in zip(b["row"], b["key"])]

    def read(**kw):
        return data.read_split(small_images, "train+extra", "none", with_keys=True, row_ids=True, **kw)

    stored = ids_and_keys(read())
    ids = [i for i, _ in stored]
    assert len(set(ids)) == 12000
    groups = data.by_row_group(ids)   # train: 8 row groups of 1,000, extra: 8 of 500
    assert sorted(groups) == list(range(16)) and [len(groups[g]) for g in (0, 7, 8, 15)] == [1000, 1000, 500, 500]
    assert min(ids) == data.row_id(0, 0) and max(ids) == data.row_id(15, 499)
    for order in ("rows", "row_groups"):
        first = ids_and_keys(read(order=order, seed=5))
        assert sorted(first) == sorted(stored)   # the same id for the same row, whatever the order
        done = [i for i, _ in first[:5000]]   # the rows a checkpoint had trained on in epoch 0
        ds = read(order=order, seed=5, consumed=partial(dict.get, {0: done}))
        rest, next_epoch = ids_and_keys(ds), ids_and_keys(ds)
        assert sorted(rest) == sorted(first[5000:])
        assert sorted(next_epoch) == sorted(stored)   # epoch 1 is whole again
    # The same through Ray Train's shares: two workers take the rest between them, all but < 2 rows.
    ds = read(order="rows", seed=5, consumed=partial(dict.get, {0: ids[:3000]}))
    shares = data.dataset_config().configure({"train": ds}, world_size=2, worker_handles=None, worker_node_ids=None)
    a, b = consume([s["train"] for s in shares], epochs=1)[0]
    assert not set(a) & set(b) and 9000 - 2 < len(a) + len(b) <= 9000
    assert set(a) | set(b) <= {k for _, k in stored[3000:]}
