"""`python -m densenet_ray.data convert | verify | inspect` on real encoded files in every official
layout, with the bad files ImageNet really holds. A stored dataset damaged afterwards: test_data_check.py."""

import io
import json
import os
import pickle
import struct
import tarfile

import numpy as np
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
import pytest
from PIL import Image
from scipy.io import savemat
from sklearn.datasets import load_sample_images

from densenet_ray import data
from densenet_ray.data import sources
from densenet_ray.data.__main__ import main

pytestmark = pytest.mark.usefixtures("ray_local")


def photos(n, size=(64, 48), seed=0):
    """n different real photo crops (scikit-learn's china.jpg and flower.jpg), as PIL RGB images."""
    rng = np.random.default_rng(seed)
    srcs = load_sample_images().images
    out = []
    for i in range(n):
        src = srcs[i % 2]
        y, x = rng.integers(0, 427 - 200), rng.integers(0, 640 - 260)
        out.append(Image.fromarray(src[y:y + 200, x:x + 260]).resize(size))
    return out


def encode(img, fmt="JPEG", **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def bomb(jpeg):
    at = jpeg.index(b"\xff\xc0") + 5   # SOF0: marker, length, precision, then height and width
    return jpeg[:at] + struct.pack(">HH", 30000, 30000) + jpeg[at + 4:]


BAD = {   # file name -> (bytes made from a good JPEG, reason rejects.jsonl must give)
    "truncated.JPEG": (lambda j: j[: len(j) // 2], "truncated or corrupt"),
    "empty.JPEG": (lambda j: b"", "empty file"),
    "text.JPEG": (lambda j: b"GET / HTTP/1.1\r\nHost: image-net.org\r\n\r\n", "not an image"),
    "bomb.JPEG": (bomb, "decompression bomb"),
}


def read_rows(root, split):
    tables = [pq.read_table(os.path.join(root, s.file)) for s in data.load_manifest(root).splits[split].shards]
    return {k: (img, label) for t in tables for k, img, label in
            zip(t["key"].to_pylist(), t["image"].to_pylist(), t["label"].to_pylist())}


def decoded(b):
    img = Image.open(io.BytesIO(b))
    img.load()
    return img


def run(*argv):
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    """An imagefolder tree: 2 classes; class "tench" holds every kind of file ImageNet has."""
    src = tmp_path_factory.mktemp("messy")
    good = photos(12)
    expected = {}   # key -> (label, PIL image it must decode to, stored bytes must equal source?)
    for split, classes in (("train", {"goldfish": good[:4], "tench": good[4:8]}), ("val", {"goldfish": good[8:10], "tench": good[10:]})):
        for label, (cls, imgs) in enumerate(sorted(classes.items())):
            os.makedirs(src / split / cls)
            for i, img in enumerate(imgs):
                key = f"{split}/{cls}/{cls}_{i}.JPEG"
                (src / key).write_bytes(encode(img, quality=90))
                expected[key] = (label, decoded(encode(img, quality=90)), True)
    tench = src / "train" / "tench"
    odd = {"cmyk.JPEG": encode(good[0].convert("CMYK"), quality=95),
           "gray.JPEG": encode(good[1].convert("L"), quality=95),
           "png.JPEG": encode(good[2], "PNG")}
    for name, b in odd.items():
        (tench / name).write_bytes(b)
        expected[f"train/tench/{name}"] = (1, decoded(b).convert("RGB"), name == "png.JPEG")
    jpeg = encode(good[3], quality=90)
    for name, (make, _) in BAD.items():
        (tench / name).write_bytes(make(jpeg))
    os.symlink(src / "gone.JPEG", tench / "unreadable.JPEG")   # a dangling link: open() fails
    return src, expected


@pytest.fixture(scope="module")
def messy_out(messy, tmp_path_factory):
    out = tmp_path_factory.mktemp("messy_out") / "ds"
    assert run("convert", "imagefolder", messy[0], out) == 0
    return out


def test_every_good_image_once_with_its_label_every_bad_one_rejected(messy, messy_out):
    src, expected = messy
    rows = {**read_rows(messy_out, "train"), **read_rows(messy_out, "val")}
    assert sorted(rows) == sorted(expected)
    for key, (label, want, same_bytes) in expected.items():
        stored, got_label = rows[key]
        img = decoded(stored)
        assert got_label == label and img.mode == "RGB" and img.size == want.size, key
        if same_bytes:
            assert stored == (src / key).read_bytes(), key
        else:   # CMYK / grayscale: converted to RGB by Pillow, re-encoded as JPEG at --quality 90
            assert img.format == "JPEG" and stored == encode(want, quality=90), key
    rejects = [json.loads(line) for line in (messy_out / "rejects.jsonl").read_text().splitlines()]
    reasons = {r["path"]: r["reason"] for r in rejects}
    assert sorted(reasons) == sorted([f"train/tench/{n}" for n in BAD] + ["train/tench/unreadable.JPEG"])
    for name, (_, reason) in BAD.items():
        assert reasons[f"train/tench/{name}"].startswith(reason)
    assert reasons["train/tench/unreadable.JPEG"].startswith("unreadable")
    m = data.load_manifest(messy_out)
    assert m.classes == ("goldfish", "tench") and m.channels == 3
    assert m.created["counts"]["train"] == {"written": 11, "converted": 2, "rejected": 5, "shards": 1}
    assert m.splits["train"].class_counts == (4, 7) and m.splits["val"].class_counts == (2, 2)


@pytest.mark.parametrize("argv", [[], ["convert"], ["convert", "imagenet"], ["convert", "digits"], ["verify"],
                                  ["inspect"]])
def test_every_command_has_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        run(*argv, "--help")
    assert e.value.code == 0 and "usage: python -m densenet_ray.data" in capsys.readouterr().out


def test_strict_makes_rejects_an_error(messy, tmp_path, capsys):
    assert run("convert", "imagefolder", messy[0], tmp_path / "ds", "--strict") == 1
    assert "rejected" in capsys.readouterr().out


def test_mean_std_are_the_train_pixels(messy, messy_out):
    px = np.concatenate([np.asarray(decoded(b)).reshape(-1, 3) for b, _ in read_rows(messy_out, "train").values()])
    m = data.load_manifest(messy_out)
    # Re-encoded images count with their pixels before the JPEG encode: equal to ~1e-4.
    assert np.allclose(m.mean, px.mean(0) / 255, atol=1e-3) and np.allclose(m.std, px.std(0) / 255, atol=1e-3)
    assert not np.allclose(m.mean, m.mean[0])   # per channel, not one number


def test_verify_and_inspect_accept_it(messy_out, tmp_path, capsys):
    assert run("verify", messy_out) == 0
    assert run("inspect", messy_out, "--grid", tmp_path / "grid.png") == 0
    assert "train: 11 images" in capsys.readouterr().out
    assert Image.open(tmp_path / "grid.png").size[1] == 2 * 96   # one row per class


def test_max_side_shrinks_and_rows_are_shuffled_across_shards(tmp_path):
    src = tmp_path / "big"
    for cls in ("a", "b"):
        os.makedirs(src / "train" / cls)
        for i, img in enumerate(photos(20, size=(320, 240), seed=ord(cls))):
            (src / "train" / cls / f"{i}.jpg").write_bytes(encode(img))
    out = tmp_path / "ds"
    assert run("convert", "imagefolder", src, out, "--max-side", "100", "--shard-mb", "0.03") == 0
    m = data.load_manifest(out)
    assert m.splits["train"].image_size == (75, 100) and len(m.splits["train"].shards) > 2
    for shard in m.splits["train"].shards:
        labels = pq.read_table(out / shard.file, columns=["label"])["label"].to_pylist()
        assert set(labels) == {0, 1}, f"{shard.file} does not mix classes"
    assert run("verify", out, "--sample", "5") == 0


def imagenet_tree(root, val_labels):
    """A tiny ILSVRC2012 layout: train/<wnid>/<wnid>_<n>.JPEG and a flat val/."""
    wnids = ["n01440764", "n01443537", "n01484850"]
    imgs = iter(photos(15, seed=3))
    for w in wnids:
        os.makedirs(root / "train" / w)
        for i in range(3):
            (root / "train" / w / f"{w}_{i}.JPEG").write_bytes(encode(next(imgs)))
    os.makedirs(root / "val")
    truth = {}
    for n in range(1, 7):
        (root / "val" / f"ILSVRC2012_val_{n:08d}.JPEG").write_bytes(encode(next(imgs)))
        truth[n] = wnids[(n * 2) % 3]
    words = {"n01440764": "tench, Tinca tinca", "n01443537": "goldfish, Carassius auratus",
             "n01484850": "great white shark"}
    if val_labels == "csv":
        (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} {t}\n" for w, t in words.items()))
        (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "".join(
            f"ILSVRC2012_val_{n:08d},{w} 12 34 200 300 {w} 1 2 3 4\n" for n, w in truth.items()))
    else:   # devkit: labels are ILSVRC2012_IDs, which are not in sorted-wnid order
        ids = {"n01443537": 1, "n01484850": 2, "n01440764": 3}
        devkit = root / "ILSVRC2012_devkit_t12" / "data"
        os.makedirs(devkit)
        (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{ids[w]}\n" for w in truth.values()))
        synsets = np.array([(i, w, words[w], 0) for w, i in ids.items()] + [(1001, "n00001740", "entity", 3)],
                           dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")])
        savemat(devkit / "meta.mat", {"synsets": synsets})
    return {f"val/ILSVRC2012_val_{n:08d}.JPEG": wnids.index(w) for n, w in truth.items()}


@pytest.mark.parametrize("val_labels", ["csv", "devkit"])
def test_imagenet_val_labels(tmp_path, val_labels):
    want = imagenet_tree(tmp_path / "src", val_labels)
    out = tmp_path / "ds"
    assert run("convert", "imagenet", tmp_path / "src", out) == 0
    assert {k: label for k, (_, label) in read_rows(out, "val").items()} == want
    m = data.load_manifest(out)
    assert m.wnids == ("n01440764", "n01443537", "n01484850") and m.classes[0] == "tench, Tinca tinca"
    assert m.splits["train"].rows == 9
    assert run("verify", out) == 0


def write_cifar(root, num_classes, per_file=6):
    """The official python-version archive, pickled the way the originals are (bytes keys)."""
    rng = np.random.default_rng(num_classes)
    folder = "cifar-10-batches-py" if num_classes == 10 else "cifar-100-python"
    os.makedirs(root / folder)
    pixels = {}
    files = ([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]) if num_classes == 10 else ["train", "test"]
    for name in files:
        imgs = np.stack([np.asarray(p) for p in photos(per_file, size=(32, 32), seed=len(pixels))])
        labels = rng.integers(0, num_classes, per_file).tolist()
        key = b"labels" if num_classes == 10 else b"fine_labels"
        batch = {b"batch_label": name.encode(), key: labels, b"filenames": [b"x.png"] * per_file,
                 b"data": imgs.transpose(0, 3, 1, 2).reshape(per_file, 3072)}
        if num_classes == 100:
            batch[b"coarse_labels"] = [y // 5 for y in labels]
        with open(root / folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        pixels.update({f"{name}[{i}]": (img, y) for i, (img, y) in enumerate(zip(imgs, labels))})
    names = [f"class{i}".encode() for i in range(num_classes)]
    meta = {b"label_names": names} if num_classes == 10 else {b"fine_label_names": names, b"coarse_label_names": names[:20]}
    with open(root / folder / ("batches.meta" if num_classes == 10 else "meta"), "wb") as f:
        pickle.dump(meta, f, protocol=2)
    archive = root / f"cifar-{num_classes}-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root / folder, arcname=folder)
    return archive, pixels


@pytest.mark.parametrize("num_classes", [10, 100])
def test_cifar_archive_is_stored_losslessly(tmp_path, num_classes):
    archive, pixels = write_cifar(tmp_path, num_classes)
    out = tmp_path / "ds"
    assert run("convert", f"cifar{num_classes}", archive, out, "--holdout", "3") == 0
    m = data.load_manifest(out)
    assert list(m.splits) == ["train", "val", "test"] and m.num_classes == num_classes
    assert m.splits["val"].rows == 3 and m.splits["train"].rows + 3 + m.splits["test"].rows == len(pixels)
    rows = {**read_rows(out, "train"), **read_rows(out, "val"), **read_rows(out, "test")}
    assert sorted(rows) == sorted(pixels)
    for key, (img, label) in pixels.items():
        assert rows[key][1] == label and np.array_equal(np.asarray(decoded(rows[key][0])), img), key
    assert run("verify", out) == 0


def test_cifar_pickle_may_hold_only_arrays(tmp_path, capsys):
    archive, _ = write_cifar(tmp_path, 10)
    folder = tmp_path / "cifar-10-batches-py"
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": os.system}, f)   # a pickle that would call a function
    assert run("convert", "cifar10", folder, tmp_path / "ds") == 2
    assert "posix.system" in capsys.readouterr().err


def test_svhn_mat_files(tmp_path):
    src = tmp_path / "svhn"
    os.makedirs(src)
    want = {}
    for split, n in (("train", 10), ("test", 4), ("extra", 3)):
        X = np.stack([np.asarray(p) for p in photos(n, size=(32, 32), seed=n)], axis=3)   # 32x32x3xN
        y = (np.arange(n) % 10 + 1).reshape(n, 1).astype(np.uint8)                        # 10 means 0
        savemat(src / f"{split}_32x32.mat", {"X": X, "y": y})
        want.update({f"{split}_32x32.mat[{i}]": (X[..., i], int(y[i, 0]) % 10) for i in range(n)})
    out = tmp_path / "ds"
    assert run("convert", "svhn", src, out) == 0
    rows = {k: v for s in ("train", "test", "extra") for k, v in read_rows(out, s).items()}
    assert sorted(rows) == sorted(want)
    for key, (img, label) in want.items():
        assert rows[key][1] == label and np.array_equal(np.asarray(decoded(rows[key][0])), img)
    assert data.load_manifest(out).split("train+extra").rows == 13
    assert run("verify", out) == 0


def test_digits(tmp_path):
    out = tmp_path / "ds"
    assert run("convert", "digits", out) == 0
    m = data.check(out)
    assert m.channels == 1 and m.num_classes == 10 and m.splits["train"].image_size == (8, 8)
    assert m.splits["train"].rows == 1437 and m.splits["val"].rows == 360
    assert run("verify", out, "--sample", "50") == 0


def grey_tree(root, extra=None):
    """An imagefolder tree of grayscale files in each grey mode Pillow opens (8-bit JPEG and PNG,
    16-bit PNG, 1-bit PNG, grey + alpha PNG), plus `extra` {name: bytes} in train/b.
    Returns {key: the 8-bit grey pixels each must be stored as}."""
    g = [np.asarray(p.convert("L")) for p in photos(7, size=(40, 30), seed=11)]
    files = {"train/a/0.JPEG": (encode(Image.fromarray(g[0]), quality=90), None),
             "train/a/1.png": (encode(Image.fromarray(g[1]), "PNG"), g[1]),
             "train/a/2.png": (encode(Image.fromarray(g[2].astype(np.uint16) * 257), "PNG"), g[2]),   # I;16
             "train/b/3.png": (encode(Image.fromarray(g[3]).convert("1"), "PNG"), None),
             "train/b/4.png": (encode(Image.fromarray(np.dstack([g[4], g[4] // 2]), "LA"), "PNG"), g[4]),
             "val/a/5.JPEG": (encode(Image.fromarray(g[5]), quality=90), None),
             "val/b/6.png": (encode(Image.fromarray(g[6]), "PNG"), g[6])}
    assert [Image.open(io.BytesIO(b)).mode for b, _ in files.values()] == ["L", "L", "I;16", "1", "LA", "L", "L"]
    files |= {f"train/b/{name}": (b, None) for name, b in (extra or {}).items()}
    for key, (b, _) in files.items():
        os.makedirs((root / key).parent, exist_ok=True)
        (root / key).write_bytes(b)
    return {k: np.asarray(decoded(b).convert("L")) if want is None else want for k, (b, want) in files.items()}


def test_grayscale_imagefolder_stays_one_channel(tmp_path):
    want = grey_tree(tmp_path / "src")
    out = tmp_path / "ds"
    assert run("convert", "imagefolder", tmp_path / "src", out) == 0
    m = data.load_manifest(out)
    assert m.channels == 1 and len(m.mean) == len(m.std) == 1
    rows = {**read_rows(out, "train"), **read_rows(out, "val")}
    assert sorted(rows) == sorted(want)
    for key, pixels in want.items():
        img = decoded(rows[key][0])
        assert img.mode == "L" and np.array_equal(np.asarray(img), pixels), key
    for key in ("train/a/0.JPEG", "train/a/1.png", "val/a/5.JPEG", "val/b/6.png"):   # 8-bit grey: kept as is
        assert rows[key][0] == (tmp_path / "src" / key).read_bytes(), key
    assert m.created["counts"]["train"]["converted"] == 3   # 16-bit, 1-bit, grey + alpha
    assert run("verify", out) == 0


def extra_image(kind):
    """One more file for grey_tree: a colour JPEG, or a PNG in palette mode with a grey palette."""
    img = photos(1, size=(40, 30), seed=12)[0]
    if kind == "colour":
        return {"colour.JPEG": encode(img)}
    pal = img.convert("L").convert("P")
    assert pal.mode == "P" and Image.open(io.BytesIO(encode(pal, "PNG"))).mode == "P"
    return {"palette.png": encode(pal, "PNG")}


@pytest.mark.parametrize("extra, argv, channels", [
    ("colour", [], 3),                   # one colour image among grey ones
    ("palette", [], 3),                  # palette images count as colour, even with a grey palette
    (None, ["--channels", "3"], 3),      # forced, all grey
    ("colour", ["--channels", "1"], 1),  # forced, some colour
])
def test_channels_of_mixed_or_forced_imagefolder(tmp_path, capsys, extra, argv, channels):
    extra = extra_image(extra) if extra else {}
    grey_tree(tmp_path / "src", extra)
    out = tmp_path / "ds"
    assert run("convert", "imagefolder", tmp_path / "src", out, *argv) == 0
    assert f"({channels} channel" in capsys.readouterr().out
    m = data.load_manifest(out)
    assert m.channels == channels and len(m.mean) == channels
    rows = {**read_rows(out, "train"), **read_rows(out, "val")}
    assert len(rows) == 7 + len(extra)
    assert {decoded(b).mode for b, _ in rows.values()} == {"L" if channels == 1 else "RGB"}
    assert run("verify", out) == 0


def test_channels_must_be_auto_1_or_3(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run("convert", "imagefolder", tmp_path, tmp_path / "ds", "--channels", "2")
    assert "invalid choice: '2'" in capsys.readouterr().err
    with pytest.raises(data.DataError, match="channels 2: expected 'auto', 1 or 3"):
        sources.imagefolder(tmp_path, channels=2)


@pytest.mark.parametrize("break_it, message", [
    (lambda src: os.makedirs(src / "train" / "empty"), "train/empty: empty folder"),
    (lambda src: os.makedirs(src / "val" / "shark") or (src / "val" / "shark" / "x.jpg").write_bytes(b"x"),
     "class 'shark' is in val/ but not in train/"),
])
def test_source_structure_errors(tmp_path, capsys, break_it, message):
    src = tmp_path / "src"
    for split in ("train", "val"):
        os.makedirs(src / split / "tench")
        (src / split / "tench" / "a.jpg").write_bytes(encode(photos(1)[0]))
    break_it(src)
    assert run("convert", "imagefolder", src, tmp_path / "ds") == 2
    assert message in capsys.readouterr().err


def test_unknown_val_label(tmp_path, capsys):
    imagenet_tree(tmp_path, "csv")
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text(csv.read_text().replace("n01484850", "n09999999"))
    assert run("convert", "imagenet", tmp_path, tmp_path / "ds") == 2
    assert "LOC_val_solution.csv: val image ILSVRC2012_val_" in capsys.readouterr().err
