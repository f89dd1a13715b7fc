"""Hostile input at the far end of the data flow (issue 16): bad rows that reach the training
workers' pipeline, and tampered checkpoints and models that evaluate, export and a resumed run load.
Real shards (written with pyarrow as another tool would, or damaged on disk), real state.pt files;
each case names what is wrong within seconds and never raises inside a Ray task."""

import hashlib
import os
import re
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from densenet_ray import checkpoint, data, export, train, trained
from densenet_ray import config as C
from densenet_ray.cli import ModelError
from densenet_ray.data.images import encode_array
from densenet_ray.data.manifest import SCHEMA, Manifest, Shard, Split, write_manifest
from densenet_ray.model import from_config

ROWS, GROUP = 60, 20   # one shard of three row groups
CLASSES = ("a", "b", "c")


def foreign_dataset(root, labels, *, statistics=True):
    """A 1-channel 8x8 dataset, one shard in split train, written as another tool would: row
    groups of GROUP rows, statistics on every column or none (write_statistics=False)."""
    images = [encode_array(np.full((8, 8, 1), 4 * i, np.uint8))[0] for i in range(len(labels))]
    table = pa.table({"image": images, "label": labels, "key": [f"k{i}" for i in range(len(labels))],
                      "height": [8] * len(labels), "width": [8] * len(labels)}, schema=SCHEMA)
    os.makedirs(root / "train")
    pq.write_table(table, root / "train" / "part.parquet", row_group_size=GROUP, compression="none",
                   write_statistics=statistics)
    raw = (root / "train" / "part.parquet").read_bytes()
    counts = [sum(label == c for label in labels) for c in range(len(CLASSES))]
    counts[0] += len(labels) - sum(counts)   # the manifest as before the labels were edited
    groups = -(-len(labels) // GROUP)
    write_manifest(Manifest(
        root=str(root), name="foreign", classes=CLASSES, wnids=CLASSES, channels=1, mean=(0.5,), std=(0.25,),
        splits={"train": Split(len(labels), (Shard("train/part.parquet", len(labels), len(raw),
                                                   hashlib.sha256(raw).hexdigest(), groups),), tuple(counts), (8, 8))}))
    return root


def keys(ds):
    return [k for b in ds.iter_batches(batch_size=None) for k in b["key"]]


# --- bad rows ------------------------------------------------------------------------------------

@pytest.mark.parametrize("order", [None, "rows", "row_groups"])
def test_a_label_outside_the_classes_is_skipped_and_named(ray_local, tmp_path, order):
    labels = [i % 3 for i in range(ROWS)]
    labels[7], labels[45] = 999, -1
    root = foreign_dataset(tmp_path, labels, statistics=False)
    data.check(root, splits=("train",))   # nothing to see without statistics: caught where rows decode
    ds = data.read_split(root, "train", "none", order=order, seed=1, with_keys=True)
    batches = list(ds.iter_batches(batch_size=None))
    got = [k for b in batches for k in b["key"]]
    assert sorted(got) == sorted(f"k{i}" for i in range(ROWS) if i not in (7, 45))
    assert all(b["label"].dtype == np.int64 and set(b["label"]) <= {0, 1, 2} for b in batches)
    assert data.skipped_rows(str(root), "train") == 2
    notes = data.skipped_notes(str(root), "train")
    assert sorted(notes) == ["split 'train', key k45: label -1 is not a class (expected 0..2), skipped",
                             "split 'train', key k7: label 999 is not a class (expected 0..2), skipped"]
    # Without with_keys the key is still read (to name the row), but not handed on.
    assert "key" not in data.read_split(root, "train", "none", order=order).take_batch(4)


def test_a_label_outside_the_classes_is_refused_before_training_when_statistics_show_it(tmp_path):
    labels = [i % 3 for i in range(ROWS)]
    labels[45] = 999
    root = foreign_dataset(tmp_path, labels, statistics=True)
    with pytest.raises(data.DataError, match=r"part.parquet: field label spans 0..999 in row group 2; "
                                             r"expected 0..2 \(3 classes\)"):
        data.check(root, splits=("train",))


def damage(shard, how):
    """Row group 1 of `shard` damaged in place, its footer intact: 16 bytes of 0xFF over the image
    column's data page header, or 96 over its values (~75 bytes each: a length prefix is hit)."""
    c = pq.ParquetFile(shard).metadata.row_group(1).column(0)
    start = c.dictionary_page_offset or c.data_page_offset
    at, n = (c.data_page_offset, 16) if how == "page header" else (start + c.total_compressed_size // 4, 96)
    raw = bytearray(shard.read_bytes())
    raw[at:at + n] = b"\xff" * n
    shard.write_bytes(bytes(raw))


@pytest.mark.parametrize("how", ["page header", "values"])
def test_a_corrupt_page_skips_its_row_group_and_names_it(ray_local, tmp_path, how):
    root = foreign_dataset(tmp_path, [i % 3 for i in range(ROWS)])
    shard = root / "train" / "part.parquet"
    with pytest.raises(OSError):   # the damage is real: pyarrow cannot read row group 1
        damage(shard, how) or pq.ParquetFile(shard).read_row_group(1)
    data.check(root, splits=("train",))   # the footer is intact: only reading finds it
    t0 = time.monotonic()
    ds = data.read_split(root, "train", "none", with_keys=True)
    assert sorted(keys(ds)) == sorted(f"k{i}" for i in (*range(0, 20), *range(40, 60)))
    assert keys(ds)   # a second epoch, again without an exception: skipped every time, no retry loop
    assert time.monotonic() - t0 < 60
    assert data.skipped_rows(str(root), "train") == 2 * GROUP
    [note] = data.skipped_notes(str(root), "train")   # the same row group twice is one reason
    assert note.startswith(f"{root}/train/part.parquet: row group 1 (20 rows of split 'train') cannot be read, "
                           "skipped: OSError: ")


# --- tampered checkpoints and models -------------------------------------------------------------

CFG = C.PRESETS["digits"].replace(run_name="r1", data="/nowhere", epochs=2)


def state_of(cfg=CFG, epoch=0):
    """A real training checkpoint's state, as loop.py saves it."""
    torch.manual_seed(0)
    net = from_config(cfg, 3, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    return {"model": net.state_dict(), "optimizer": opt.state_dict(),
            "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict(), "epoch": epoch,
            "history": [{"epoch": e, "val_top1_err": 0.5} for e in range(epoch + 1)], "config": C.to_dict(cfg),
            "classes": list(CLASSES), "mean": [0.5], "std": [0.25], "run_id": None, "example": None}


def save_run(storage, state, epoch=0):
    folder = storage / CFG.run_name / checkpoint.folder_name(epoch)
    folder.mkdir(parents=True)
    torch.save(state, folder / checkpoint.STATE_FILE)
    return folder / checkpoint.STATE_FILE


class NotOurs:
    """Pickled by class: loading it would import and call this module's code."""


def huge(state):
    return {**state, "config": {**state["config"], "arch": "densenet_bc", "depth": 6 * 100_000 + 4, "growth_rate": 12}}


def wide(state):
    return {**state, "config": {**state["config"], "arch": "densenet_bc", "depth": 22, "growth_rate": 40_000}}


def expanded(state):   # stride 0: a billion elements claimed over one float
    return {**state, "model": {**state["model"], "classifier.weight": torch.zeros(1).expand(1_000_000_000)}}


MODELS = {
    "a config of 100,000-layer blocks": (huge, r"describes 300,000 dense layers, but its weights hold \d+ tensors"),
    "a config 3,000 times wider": (wide, r"the config describes [\d,]+ values in \d+ tensors, the weights hold "
                                         r"[\d,]+ in \d+; \d+ of other shape: features.conv0.weight"),
    "a tensor claiming more than its data": (expanded, r"weight 'classifier.weight' claims shape \[1000000000\]"),
    "weights of another architecture": (lambda s: {**s, "model": state_of(CFG.replace(arch="densenet_bc40_k12"))["model"]},
                                        r"do not fit the architecture in its config .*\d+ unexpected"),
    "no weights": (lambda s: {**s, "model": {}}, "not a state dict of named tensors"),
}


@pytest.mark.parametrize("case", MODELS)
def test_a_crafted_checkpoint_is_refused_before_anything_is_built(tmp_path, case):
    tamper, message = MODELS[case]
    path = save_run(tmp_path, tamper(state_of()))
    t0 = time.monotonic()
    with pytest.raises(ModelError, match=message):
        trained.load(str(path))
    assert time.monotonic() - t0 < 10


def write_truncated(path):
    path.write_bytes(path.read_bytes()[:4000])


def write_pickle(path):
    torch.save({**state_of(), "extra": NotOurs()}, path)


RESUMES = {
    "truncated": (write_truncated, "is not a readable checkpoint"),
    "not ours (pickle)": (write_pickle, "needs pickle to load, which can run any code"),
    "not a dict": (lambda p: torch.save([1, 2], p), "is not a densenet_ray checkpoint: expected a dict"),
    "no optimizer": (lambda p: torch.save({k: v for k, v in state_of().items() if k != "optimizer"}, p),
                     "is not a checkpoint a run can resume from: optimizer is missing"),
    "epoch and history disagree": (lambda p: torch.save({**state_of(), "epoch": 5}, p),
                                   "epoch 5 and history .1 epochs. disagree"),
    "wrong shapes": (lambda p: torch.save({**state_of(), "model": state_of(CFG.replace(growth_rate=24))["model"]}, p),
                     "its weights do not fit the architecture in its config"),
    "another model": (lambda p: torch.save(state_of(CFG.replace(growth_rate=24)), p),
                      "was trained with growth_rate=24, this run asks for None"),
    "other classes": (lambda p: torch.save({**state_of(), "classes": ["x", "y", "z"]}, p),
                      "was trained on 3 other classes"),
}


@pytest.mark.parametrize("case", RESUMES)
def test_a_tampered_checkpoint_to_resume_from_is_an_error_naming_it(tmp_path, case, capsys, monkeypatch):
    """Through train.main with the pre-flight (Ray, MLflow, data) stood in for: refused on the
    driver, one error line naming the file, exit status 2, before any worker or MLflow run."""
    write, message = RESUMES[case]
    path = save_run(tmp_path, state_of())
    write(path)
    root = foreign_dataset(tmp_path / "ds", [i % 3 for i in range(ROWS)])
    monkeypatch.setattr(train, "preflight", lambda cfg, concurrent=1: ("sqlite:///unused", data.load_manifest(root)))
    monkeypatch.setattr(train, "open_run", lambda *a, **k: pytest.fail("a run was opened"))
    code = train.main(["digits", "--storage", str(tmp_path), "--run-name", CFG.run_name, "--data", str(root),
                       "--epochs", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert err.startswith("error: ") and str(path) in err and "pass another --run-name" in err, err
    assert re.search(message, err), err


def test_a_good_checkpoint_to_resume_from_passes(tmp_path):
    save_run(tmp_path, state_of(epoch=0))
    save_run(tmp_path, state_of(epoch=1), epoch=1)
    trained.check_resume(str(tmp_path / CFG.run_name), CFG, list(CLASSES))   # no error
    trained.check_resume(str(tmp_path / "never-ran"), CFG, list(CLASSES))    # nothing to resume: nothing to check


# --- export and evaluate with hostile arguments --------------------------------------------------

def run_cli(main, argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: "), (code, err)
    return err


def test_export_refuses_an_existing_out_before_loading_the_model(tmp_path, capsys):
    out = tmp_path / "model.pt2"
    out.write_bytes(b"keep me")
    err = run_cli(export.main, ["/no/such/run", "--format", "exported-program", "--out", str(out)], capsys)
    assert f"--out {out}: {out} exists; pass --overwrite" in err and out.read_bytes() == b"keep me"
    err = run_cli(export.main, ["/no/such/run", "--format", "safetensors", "--out", str(tmp_path)], capsys)
    assert f"{tmp_path} is a folder" in err


@pytest.mark.parametrize("model, message", [
    ("/no/such/run", "no such file or folder"),
    ("models:/", "models:/"),
    ("runs:/", "runs:/"),
])
def test_export_and_evaluate_name_a_model_they_cannot_find(tmp_path, capsys, home, model, message):
    from densenet_ray import evaluate

    out = str(tmp_path / "m.safetensors")
    assert message in run_cli(export.main, [model, "--format", "safetensors", "--out", out], capsys)
    assert message in run_cli(evaluate.main, [model, "--no-log"], capsys)
    assert not os.path.exists(out)


def test_export_and_evaluate_refuse_a_crafted_checkpoint(tmp_path, capsys):
    from densenet_ray import evaluate

    path = save_run(tmp_path, huge(state_of()))
    out = str(tmp_path / "m.safetensors")
    assert "describes 300,000 dense layers" in run_cli(export.main, [str(path), "--format", "safetensors",
                                                                    "--out", out], capsys)
    assert "describes 300,000 dense layers" in run_cli(evaluate.main, [str(path), "--no-log"], capsys)


def test_the_checkpoint_fixture_is_loadable(tmp_path):
    """The tampering above starts from a checkpoint every loader accepts: the refusals are the tampering's."""
    path = save_run(tmp_path, state_of())
    m = trained.load(str(path))
    assert m.num_classes == 3 and m.channels == 1
    state, _ = checkpoint.load(str(path))
    checkpoint.check_training_state(state, str(path))


def test_evaluate_leaves_bad_rows_out_and_names_them(ray_local, tmp_path):
    from densenet_ray import evaluate

    labels = [i % 3 for i in range(ROWS)]
    labels[7] = 999
    root = foreign_dataset(tmp_path / "ds", labels, statistics=False)
    model = trained.load(str(save_run(tmp_path, state_of())))
    results = evaluate.evaluate(model, str(root), "train", actors=1)
    assert results["single"]["images"] == ROWS - 1 and results["single"]["skipped"] == 1
    assert "skipped_notes" not in "".join(evaluate.metric_names(results, "train"))
    text = evaluate.report(model, results, str(root), "train")
    assert "(1 skipped, left out)" in text
    assert "skipped: split 'train', key k7: label 999 is not a class (expected 0..2), skipped" in text
