"""Bad input against the data tools and predict (issue 16): special files, symbolic links out of the
source and in loops, an interrupted --overwrite, --strict, leaks between splits, a wrong image_size,
EXIF rotation and bad flags. Whatever could hang runs in a subprocess or a thread with a time limit,
so a regression fails instead of hanging."""

import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_data_convert import encode, photos

from densenet_ray import data, predict
from densenet_ray.data import images, sources, walk
from densenet_ray.data.__main__ import main

SECRET = b"password=hunter2 do-not-print-me"


def run(*argv):
    return main([str(a) for a in argv])


def cli(*argv, module="densenet_ray.data", timeout=60):
    """A real subprocess of the command line, in its own process group, killed whole on timeout."""
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    env.pop("RAY_ADDRESS", None)
    p = subprocess.Popen([sys.executable, "-m", module, *map(str, argv)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        pytest.fail(f"{' '.join(map(str, argv))}: still running after {timeout} s")
    return p.returncode, out, err


def within(seconds, fn, *args):
    """fn(*args) in a daemon thread; fails the test if it has not returned in time (a blocked open)."""
    box = {}

    def target():
        try:
            box["value"] = fn(*args)
        except BaseException as e:   # noqa: BLE001 - handed back to the test
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{getattr(fn, '__name__', fn)} still running after {seconds} s (blocked?)"
    if "error" in box:
        raise box["error"]
    return box["value"]


def tree(root, n=4):
    """An imagefolder source: train/{cat,dog} and val/{cat,dog} of real JPEGs; {key: bytes}."""
    files = {}
    for i, img in enumerate(photos(2 * n)):
        split, cls = ("train" if i < n else "val"), ("cat", "dog")[i % 2]
        key = f"{split}/{cls}/{i}.jpg"
        (root / split / cls).mkdir(parents=True, exist_ok=True)
        files[key] = encode(img, quality=90)
        (root / key).write_bytes(files[key])
    return files


@pytest.fixture
def hostile(tmp_path):
    """A source folder holding every kind of name that must not be read as a file, beside a private
    folder outside it. Returns (src, {key of a good image: bytes}, {key: reason it must give})."""
    src, private = tmp_path / "src", tmp_path / "private"
    good = tree(src)
    private.mkdir()
    (private / "holiday.jpg").write_bytes(encode(photos(1, seed=9)[0]))
    (private / "secret.jpg").write_bytes(SECRET)
    cat = src / "train" / "cat"
    os.mkfifo(cat / "pipe.jpg")
    expected = {"train/cat/pipe.jpg": "a FIFO (named pipe), not a regular file: not opened",
                "train/cat/root": "symbolic link leading outside the source folder",
                "train/cat/photos": "symbolic link leading outside the source folder",
                "train/cat/secret.jpg": "symbolic link leading outside the source folder",
                "train/dog/loopdir": "symbolic link to a folder read already (train/dog)",
                "train/dog/again.jpg": "the same file as train/cat/0.jpg, which is stored once"}
    if len(str(cat / "sock.jpg")) < 100:   # AF_UNIX paths are limited to 108 bytes
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(cat / "sock.jpg"))
        s.close()
        expected["train/cat/sock.jpg"] = "a socket, not a regular file: not opened"
    os.symlink("/", cat / "root")
    os.symlink(private, cat / "photos")
    os.symlink(private / "secret.jpg", cat / "secret.jpg")
    os.symlink(".", src / "train" / "dog" / "loopdir")
    os.symlink("../cat/0.jpg", src / "train" / "dog" / "again.jpg")
    (src / "val" / "dog" / "sub").mkdir()
    os.symlink("../../../train/dog/1.jpg", src / "val" / "dog" / "sub" / "link.jpg")   # inside, stored once
    expected["val/dog/sub/link.jpg"] = "the same file as train/dog/1.jpg, which is stored once"
    return src, good, expected


def test_sources_list_only_regular_files_inside_each_once(hostile):
    src, good, expected = hostile
    s = within(30, sources.imagefolder, src)
    items = {it.key: it for items in s.splits.values() for it in items}
    assert sorted(items) == sorted([*good, *expected])
    for key, reason in expected.items():
        assert isinstance(items[key].payload, walk.Skip) and items[key].payload.reason.startswith(reason), key
    for key in good:
        assert items[key].payload == os.path.realpath(src / key) and items[key].label == ["cat", "dog"].index(key.split("/")[1])


def test_convert_rejects_them_with_reasons_that_quote_no_file(hostile, tmp_path):
    src, good, expected = hostile
    out = tmp_path / "ds"
    rc, stdout, err = cli("convert", "imagefolder", src, out)
    assert rc == 0, err
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert {r["path"]: r["reason"][:len(expected[r["path"]])] for r in rejects} == expected
    assert SECRET.decode()[:8] not in (out / "rejects.jsonl").read_text() + stdout + err
    stored = {}
    for sh in [sh for info in data.load_manifest(out).splits.values() for sh in info.shards]:
        t = pq.read_table(out / sh.file)
        stored.update(zip(t["key"].to_pylist(), t["image"].to_pylist()))
    assert stored == good   # nothing from outside, every file once


def test_a_reject_reason_never_quotes_the_bytes():
    with pytest.raises(images.Rejected) as e:
        images.prepare(SECRET)
    assert str(e.value) == f"not an image: no image format Pillow reads ({len(SECRET)} bytes)"


def test_reading_refuses_what_is_not_a_small_regular_file(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(walk.NotRegular, match="a FIFO"):
        within(10, walk.read_regular, str(tmp_path / "pipe"))
    with open(tmp_path / "huge.png", "wb") as f:   # sparse: 2 GiB on no disk
        f.truncate(2 << 30)
    with pytest.raises(walk.NotRegular, match="larger than any image"):
        walk.read_regular(str(tmp_path / "huge.png"))


@pytest.fixture(scope="module")
def digits(tmp_path_factory, ray_local):
    out = tmp_path_factory.mktemp("digits") / "ds"
    assert run("convert", "digits", out) == 0
    return out


def nested(path):
    path.mkdir()
    (path / "dataset.json").write_text("[" * 100_000 + "]" * 100_000)


def fifo_manifest(path):
    path.mkdir()
    os.mkfifo(path / "dataset.json")


@pytest.mark.parametrize("argv, message", [
    (["convert", "digits", "{tmp}/a", "--seed", "-1"], "--seed -1: expected an integer >= 0"),
    (["convert", "digits", "{tmp}/a", "--shard-mb", "0"], "--shard-mb 0.0: expected a positive number of MiB"),
    (["convert", "digits", "{tmp}/a", "--shard-mb", "nan"], "--shard-mb nan: expected a positive number of MiB"),
    (["convert", "digits", "{tmp}/a", "--holdout", "-3"], "--holdout -3: expected a number of images >= 0"),
    (["convert", "digits", "{tmp}/file"], "/file: a file; OUT is the dataset folder to write"),
    (["convert", "cifar10", "{tmp}/pipe", "{tmp}/a"], "/pipe: a FIFO (named pipe); expected a regular file"),
    (["convert", "cifar10", "{tmp}/missing.tar.gz", "{tmp}/a"], "/missing.tar.gz: no such file or folder"),
    (["convert", "imagefolder", "{tmp}", "{tmp}/a", "--splits", "train,../etc"], "--splits: '../etc' is not a split"),
    (["inspect", "{digits}", "--grid", "{tmp}/missing/grid.png"], "no folder {tmp}/missing; create it first"),
    (["inspect", "{digits}", "--grid", "{tmp}/grid.txt"], "--grid {tmp}/grid.txt: the grid is written as PNG"),
    (["verify", "{digits}", "--sample", "-1"], "--sample -1: expected a number of images >= 0"),
    (["verify", "{tmp}/nested"], "dataset.json: JSON nested too deeply"),
    (["verify", "{tmp}/fifo"], "fifo/dataset.json: not a regular file"),
])
def test_bad_flags_and_files_are_one_sentence(tmp_path, digits, argv, message):
    (tmp_path / "file").write_text("not a folder")
    os.mkfifo(tmp_path / "pipe")
    nested(tmp_path / "nested")
    fifo_manifest(tmp_path / "fifo")
    rc, _, err = cli(*[a.format(tmp=tmp_path, digits=digits) for a in argv])
    assert (rc, err.count("\n")) == (2, 1) and err.startswith("error: "), err
    assert message.format(tmp=tmp_path) in err


def test_a_fifo_shard_is_named_not_opened(digits, tmp_path):
    import shutil

    copy = tmp_path / "ds"
    shutil.copytree(digits, copy)
    shard = copy / data.load_manifest(copy).splits["val"].shards[0].file
    shard.unlink()
    os.mkfifo(shard)
    with pytest.raises(data.DataError, match="val-00000.parquet: not a regular file"):
        within(30, data.check, copy)


def shards_of(root):
    return {sh.file for info in data.load_manifest(root).splits.values() for sh in info.shards}


def test_an_interrupted_overwrite_leaves_the_old_dataset_whole(tmp_path, ray_local):
    src, out = tmp_path / "src", tmp_path / "ds"
    tree(src, n=16)
    assert run("convert", "imagefolder", src, out, "--shard-mb", "0.002") == 0
    before = (out / "dataset.json").read_bytes()
    old = shards_of(out)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    env.pop("RAY_ADDRESS", None)
    p = subprocess.Popen([sys.executable, "-m", "densenet_ray.data", "convert", "imagefolder", str(src), str(out),
                          "--overwrite", "--seed", "1", "--shard-mb", "0.00001"], env=env, start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:   # killed as soon as its first new shard appears: mid-conversion
        deadline = time.monotonic() + 120
        while not {str(f.relative_to(out)) for f in out.rglob("*.parquet")} - old:
            assert p.poll() is None and time.monotonic() < deadline, "the conversion ended before it was killed"
            time.sleep(0.01)
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    assert (out / "dataset.json").read_bytes() == before
    data.check(out)
    assert run("verify", out) == 0
    assert run("convert", "imagefolder", src, out, "--overwrite", "--seed", "2") == 0   # then replaced whole
    new = shards_of(out)
    assert {str(f.relative_to(out)) for f in out.rglob("*.parquet")} == new and not new & old


def test_strict_leaves_no_dataset(tmp_path, ray_local, capsys):
    src, out = tmp_path / "src", tmp_path / "ds"
    tree(src)
    (src / "train" / "cat" / "notes.jpg").write_text("not an image")
    assert run("convert", "imagefolder", src, out, "--strict") == 1
    assert sorted(os.listdir(out)) == ["rejects.jsonl"]
    assert "no dataset was written" in capsys.readouterr().err
    (src / "train" / "cat" / "notes.jpg").unlink()
    assert run("convert", "imagefolder", src, out, "--strict") == 0
    before, files = (out / "dataset.json").read_bytes(), shards_of(out)
    (src / "train" / "cat" / "notes.jpg").write_text("not an image")
    assert run("convert", "imagefolder", src, out, "--strict", "--overwrite") == 1
    assert "train: train/cat/notes.jpg: not an image" in capsys.readouterr().err
    assert (out / "dataset.json").read_bytes() == before   # the previous dataset, whole
    assert {str(f.relative_to(out)) for f in out.rglob("*.parquet")} == files


def test_verify_reports_images_in_two_splits(tmp_path, ray_local, capsys):
    src, out = tmp_path / "src", tmp_path / "ds"
    files = tree(src)
    (src / "val" / "cat" / "copy.jpg").write_bytes(files["train/cat/0.jpg"])
    assert run("convert", "imagefolder", src, out) == 0
    assert run("verify", out) == 1
    err = capsys.readouterr().err
    assert "1 image(s) in split train have the same bytes as images in split val" in err and "train/cat/0.jpg" in err


def edit_manifest(root, change):
    doc = json.loads((root / "dataset.json").read_text())
    change(doc)
    (root / "dataset.json").write_text(json.dumps(doc))


def twice(doc):
    train, val = doc["splits"]["train"], doc["splits"]["val"]
    val["shards"].append(train["shards"][0])
    val["rows"] += train["shards"][0]["rows"]
    val["class_counts"] = [a + b for a, b in zip(val["class_counts"], train["class_counts"])] \
        if len(train["shards"]) == 1 else val["class_counts"]


@pytest.mark.parametrize("stats", [True, False])
def test_check_and_verify_compare_image_size_with_the_rows(digits, tmp_path, stats, capsys):
    import shutil

    copy = tmp_path / "ds"
    shutil.copytree(digits, copy)
    if not stats:   # shards from another tool: no row-group statistics
        sh = data.load_manifest(copy).splits["train"].shards[0]
        pq.write_table(pq.read_table(copy / sh.file), copy / sh.file, write_statistics=False,
                       row_group_size=-(-sh.rows // sh.row_groups))
        edit_manifest(copy, lambda d: d["splits"]["train"]["shards"][0].update(
            bytes=(copy / sh.file).stat().st_size, sha256=hashlib.sha256((copy / sh.file).read_bytes()).hexdigest()))
    edit_manifest(copy, lambda d: d["splits"]["train"].update(image_size=[16, 16]))
    with pytest.raises(data.DataError, match=r"train-00000.parquet: row group 0 holds images of height 8 and "
                                             r"width 8; dataset.json gives the split image_size \[16, 16\]"):
        data.check(copy)
    assert run("verify", copy) == 1 and "image_size [16, 16]" in capsys.readouterr().err


def test_a_shard_in_two_splits_is_refused(digits, tmp_path, capsys):
    import shutil

    copy = tmp_path / "ds"
    shutil.copytree(digits, copy)
    edit_manifest(copy, twice)
    with pytest.raises(data.DataError, match="train/train-00000.parquet.*each shard listed once"):
        data.check(copy)
    assert run("verify", copy) == 2 and "each shard listed once" in capsys.readouterr().err


@pytest.mark.parametrize("turn, max_side", [(6, None), (8, None), (3, None), (6, 32)])
def test_exif_rotated_jpegs_are_stored_upright(turn, max_side):
    img = Image.new("RGB", (64, 32), "white")
    img.paste((0, 0, 0), (0, 0, 16, 32))   # a black band on the left: where it ends up shows the turn
    exif = Image.Exif()
    exif[images.ORIENTATION] = turn
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, exif=exif)
    stored, pixels, converted = images.prepare(buf.getvalue(), max_side=max_side)
    upright = Image.open(io.BytesIO(stored))
    want = ImageOps_upright(buf.getvalue(), max_side)
    assert converted and upright.size == want.size and images.orientation(upright) == 1
    assert np.abs(np.asarray(upright, np.int16) - np.asarray(want, np.int16)).mean() < 4
    assert pixels.shape == (want.height, want.width, 3)


def ImageOps_upright(jpeg, max_side):
    from PIL import ImageOps

    img = ImageOps.exif_transpose(Image.open(io.BytesIO(jpeg))).convert("RGB")
    if max_side:
        img.thumbnail((max_side, max_side))
    return img


@pytest.mark.parametrize("out, message", [
    ("{tmp}", "a folder; expected the Parquet file to write"),
    ("{tmp}/file/p.parquet", "cannot be written ("),
    ("s3://bucket/p.parquet", "predictions are written to a local file"),
])
def test_predict_checks_out_before_anything(tmp_path, out, message):
    (tmp_path / "file").write_text("x")
    rc, _, err = cli("no-such-model", tmp_path, "--out", out.format(tmp=tmp_path), module="densenet_ray.predict")
    assert (rc, err.count("\n")) == (2, 1) and message in err, err


def test_predict_lists_inputs_by_the_converter_rules(hostile):
    src, good, expected = hostile
    (src / "val" / "cat" / "folder.jpg").mkdir()   # a folder named like an image: its files are read
    (src / "val" / "cat" / "folder.jpg" / "x.png").write_bytes(b"x")
    listed = dict(within(30, predict._listing, str(src)))
    assert {k: e[:len(expected[k])] for k, e in listed.items() if e} == expected
    assert sorted(k for k, e in listed.items() if not e) == sorted([*good, "val/cat/folder.jpg/x.png"])
    table = within(30, predict.read_files, {"key": np.array(list(listed)), "error": np.array(list(listed.values()))},
                   str(src))
    rows = {r["key"]: r for r in table.to_pylist()}
    assert all(rows[k]["error"] == listed[k] and rows[k]["image"] is None for k in expected)
    empty = src.parent / "empty"
    empty.mkdir()
    with pytest.raises(predict.cli.ModelError, match="a folder without files"):
        predict.inputs(str(empty), None, None)
    with pytest.raises(predict.cli.ModelError, match="not a regular file or folder"):
        predict.inputs(str(src / "train" / "cat" / "pipe.jpg"), None, None)


@pytest.mark.parametrize("turn", [1, 6, 8])
def test_predict_reads_a_rotated_photo_upright(tmp_path, turn):
    """predict reads raw files: a phone's sideways JPEG reaches the model as a person sees it (convert
    stores it so); an unrotated file is passed on byte for byte."""
    img = Image.new("RGB", (64, 32), "white")
    img.paste((0, 0, 0), (0, 0, 16, 32))
    exif = Image.Exif()
    exif[images.ORIENTATION] = turn
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, exif=exif)
    (tmp_path / "phone.jpg").write_bytes(buf.getvalue())
    from densenet_ray.predict import read_files

    table = read_files({"key": ["phone.jpg"]}, str(tmp_path))
    got = table["image"].to_pylist()[0]
    if turn == 1:
        assert got == buf.getvalue()
        return
    want = ImageOps_upright(buf.getvalue(), None)
    seen = Image.open(io.BytesIO(got)).convert("RGB")
    assert seen.size == want.size == (32, 64)
    assert np.abs(np.asarray(seen, np.int16) - np.asarray(want, np.int16)).mean() < 4
