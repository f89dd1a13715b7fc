"""Predict's parts without Ray: which files a folder holds, reading them, and the actor's rows: the
top-k of every usable image, a reason for every other one, one row per input either way."""

import io
import os

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from densenet_ray import predict, trained
from densenet_ray.config import PRESETS
from densenet_ray.trained import class_probabilities
from densenet_ray.model import build

MEAN, STD = (0.3,), (0.4,)


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def predictor():
    torch.manual_seed(0)
    cfg = PRESETS["digits"]
    net = build(cfg.arch, num_classes=10, in_channels=1, **cfg.model_overrides())
    net.train()(torch.randn(16, 1, 16, 16))
    classes = [f"digit {i}" for i in range(10)]
    model = trained.Model(net.eval(), cfg, classes, classes, source="tiny", name="tiny")
    return predict.Predictor(model.spec(), MEAN, STD, cfg.eval_transform, 16, "L", classes, k=3), model


def test_folder_listing_skips_hidden_files_and_folders(tmp_path):
    for path in ["b.png", "a.jpg", "sub/c.png", ".hidden.png", ".git/d.png", "sub/.e.png"]:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(b"x")
    assert predict._files(str(tmp_path)) == ["a.jpg", "b.png", os.path.join("sub", "c.png")]


def test_a_file_that_cannot_be_read_is_a_row_with_the_reason(tmp_path):
    (tmp_path / "ok.png").write_bytes(b"bytes")
    os.symlink(tmp_path / "gone.png", tmp_path / "dangling.png")
    table = predict.read_files({"key": np.array(["ok.png", "dangling.png"])}, str(tmp_path))
    assert table.to_pylist() == [
        {"key": "ok.png", "split": None, "label": None, "image": b"bytes", "error": None},
        {"key": "dangling.png", "split": None, "label": None, "image": None, "error": "unreadable: No such file or directory"}]


def test_every_input_gets_a_row_usable_ones_their_top_k(predictor):
    actor, model = predictor
    rng = np.random.default_rng(0)
    digits = [rng.integers(0, 256, (8, 8), dtype=np.uint8) for _ in range(3)]
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)  # colour and another size: converted, resized
    encoded = [png(digits[0]), b"", png(digits[1])[:40], b"%PDF-1.4", png(digits[2]), png(rgb), None]
    batch = pa.table({"key": [f"k{i}" for i in range(7)], "split": ["val"] * 7, "label": [1, 2, 3, 4, 5, 6, 7],
                      "image": encoded, "error": [None] * 6 + ["unreadable: Permission denied"]},
                     schema=predict.READ_SCHEMA)
    rows = actor(batch).to_pylist()
    assert [r["key"] for r in rows] == [f"k{i}" for i in range(7)] and [r["label"] for r in rows] == list(range(1, 8))
    assert [r["error"] for r in rows] == [
        None, "empty file: 0 bytes", "truncated or corrupt: starts like a PNG but Pillow cannot open it (40 bytes)",
        "not an image: no image format Pillow reads (8 bytes)", None, None, "unreadable: Permission denied"]

    usable = [digits[0], digits[2], np.asarray(Image.fromarray(rgb).convert("L"))]  # Pillow's luma for RGB
    x = torch.stack([TF.resize(torch.tensor(a)[None], [16, 16], antialias=True).permute(1, 2, 0) for a in usable])
    expected = class_probabilities(model.net, x, MEAN, STD).topk(3)
    for row, values, indices in zip([rows[0], rows[4], rows[5]], expected.values, expected.indices):
        assert row["class_ids"] == indices.tolist() and row["classes"] == [f"digit {i}" for i in indices.tolist()]
        np.testing.assert_allclose(row["probs"], values.numpy(), atol=1e-5)
        assert row["probs"] == sorted(row["probs"], reverse=True)
    assert all(r["class_ids"] is None and r["probs"] is None for r in rows if r["error"])
