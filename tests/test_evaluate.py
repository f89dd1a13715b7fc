"""Evaluate, predict, analyse and export the digits demo model, trained for real (3 epochs, 2 workers
on the shared local Ray) and taken from the registry, as a user would."""

import contextlib
import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from densenet_ray import analyze, data, evaluate, export, predict, train
from densenet_ray.trained import class_probabilities, load as load_model
from densenet_ray.model import summary
from densenet_ray.tracking.registry import load_registered_model

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]
CHAMPION = "models:/densenet-digits@champion"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_local):
    """The README's digits job, 3 epochs, in a store of its own: {data, storage, uri, run}."""
    home = tmp_path_factory.mktemp("digits")
    places = {"data": str(home / "digits"), "storage": str(home / "runs"), "uri": f"sqlite:///{home}/mlflow.db"}
    assert train.main(["digits", "--data", places["data"], "--storage", places["storage"], "--mlflow-tracking-uri",
                       places["uri"], "--run-name", "eval", "--epochs", "3", "--max-failures", "0"]) == 0
    version = MlflowClient(places["uri"]).get_model_version_by_alias("densenet-digits", "champion")
    places["run"] = MlflowClient(places["uri"]).get_run(version.run_id)
    return places


@pytest.fixture(scope="module")
def registered(trained):
    """The registered model itself (the torch.export program), and a normaliser of uint8 NHWC images."""
    m = data.load_manifest(trained["data"])
    mean, std = torch.tensor(m.mean).view(1, -1, 1, 1) * 255, torch.tensor(m.std).view(1, -1, 1, 1) * 255
    module = load_registered_model(CHAMPION, tracking_uri=trained["uri"])
    return module, lambda nchw: (nchw.float() - mean) / std


@pytest.fixture(scope="module")
def cli_evaluation(trained):
    """`python -m densenet_ray.evaluate MODEL DATA --ten-crop`: (exit code, what it printed, the run's metrics)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = evaluate.main([CHAMPION, trained["data"], "--ten-crop", "--mlflow-tracking-uri", trained["uri"]])
    metrics = MlflowClient(trained["uri"]).get_run(trained["run"].info.run_id).data.metrics
    return rc, out.getvalue(), metrics


def val_rows(root):
    """(encoded images, labels, keys) of the val split, straight from the shards."""
    m = data.load_manifest(root)
    fs, paths = m.shard_paths("val")
    tables = [pq.read_table(p, filesystem=fs, columns=["image", "label", "key"]) for p in paths]
    return ([b for t in tables for b in t["image"].to_pylist()], [x for t in tables for x in t["label"].to_pylist()],
            [k for t in tables for k in t["key"].to_pylist()])


def test_evaluate_reproduces_what_training_logged(trained, cli_evaluation):
    rc, printed, metrics = cli_evaluation
    assert rc == 0
    logged = trained["run"].data.metrics
    assert metrics["eval_val_images"] == 360
    assert metrics["eval_val_top1_err"] == pytest.approx(logged["val_top1_err"], abs=1e-9)
    assert metrics["eval_val_top5_err"] == pytest.approx(logged["val_top5_err"], abs=1e-9)
    assert metrics["eval_val_loss"] == pytest.approx(logged["val_loss"], abs=1e-5)
    assert "single-crop" in printed and "10-crop" in printed and "training logged" in printed


def test_ten_crop_is_reported_separately_and_matches_a_direct_computation(trained, registered, cli_evaluation):
    """Independently: Pillow decodes, torchvision resizes (shorter side 16 * 256/224) and takes its
    TenCrop, the registered program scores; softmax averaged over the ten crops."""
    rc, printed, metrics = cli_evaluation
    module, normalise = registered
    images, labels, keys = val_rows(trained["data"])
    direct = {}
    for encoded, key in zip(images, keys):
        pixels = TF.pil_to_tensor(Image.open(io.BytesIO(encoded)).convert("L"))
        crops = torch.stack(TF.ten_crop(TF.resize(pixels, round(16 * 256 / 224), antialias=True), 16))
        with torch.no_grad():
            direct[key] = module(normalise(crops)).softmax(1).mean(0)
    probs = torch.stack([direct[k] for k in keys])
    top5 = probs.topk(5, dim=1).indices == torch.tensor(labels)[:, None]
    assert metrics["eval_val_tencrop_top1_err"] == pytest.approx(1 - int(top5[:, 0].sum()) / 360, abs=1e-9)
    assert metrics["eval_val_tencrop_top5_err"] == pytest.approx(1 - int(top5.any(1).sum()) / 360, abs=1e-9)
    assert metrics["eval_val_tencrop_top1_err"] != metrics["eval_val_top1_err"]  # another protocol, not a copy

    # Image by image, the probabilities evaluate's actors compute from the pipeline's ten-crop rows.
    model = load_model(CHAMPION, tracking_uri=trained["uri"])
    m = data.load_manifest(trained["data"])
    batch = data.read_split(trained["data"], "val", evaluate.TENCROP, image_size=16, with_keys=True).take_batch(12)
    ours = class_probabilities(model.net, torch.tensor(batch["image"]), m.mean, m.std)
    torch.testing.assert_close(ours, torch.stack([direct[k] for k in batch["key"]]), atol=1e-5, rtol=0)


def test_every_form_of_model_argument_is_the_registered_network(trained, registered):
    module, _ = registered
    run_id = trained["run"].info.run_id
    x = torch.randn(4, 1, 16, 16)
    for source in (CHAMPION, "models:/densenet-digits/1", f"runs:/{run_id}", f"runs:/{run_id}/model",
                   f"{trained['storage']}/eval"):
        m = load_model(source, tracking_uri=trained["uri"])
        assert (m.run_id, m.classes, m.image_size) == (run_id, [str(i) for i in range(10)], 16), source
        with torch.no_grad():
            torch.testing.assert_close(m.net(x), module(x), atol=1e-6, rtol=0)


def test_predict_writes_one_row_per_file_and_why_some_could_not_be_used(trained, registered, tmp_path, capsys):
    images, labels, _ = val_rows(trained["data"])
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    for i in range(4):
        (folder / ("nested" if i % 2 else "") / f"digit{i}.png").write_bytes(images[i])
    (folder / "truncated.png").write_bytes(images[0][: len(images[0]) // 2])
    (folder / "notes.txt").write_text("not an image")
    (folder / "empty.jpg").write_bytes(b"")
    Image.new("RGB", (40, 30), (200, 10, 10)).save(folder / "red.jpg")  # colour, another size: converted
    (folder / ".DS_Store").write_bytes(b"\0")
    out = tmp_path / "predictions.parquet"

    assert predict.main([CHAMPION, str(folder), "--out", str(out), "--mlflow-tracking-uri", trained["uri"]]) == 0
    assert "3 could not be used" in capsys.readouterr().out
    rows = {r["key"]: r for r in pq.read_table(out).to_pylist()}
    assert list(rows) == ["digit0.png", "digit2.png", "empty.jpg", "nested/digit1.png", "nested/digit3.png",
                          "notes.txt", "red.jpg", "truncated.png"]  # sorted paths (data.walk lists INPUT)
    assert rows["empty.jpg"]["error"] == "empty file: 0 bytes"
    assert rows["notes.txt"]["error"].startswith("not an image")
    assert rows["truncated.png"]["error"].startswith("truncated or corrupt")
    assert rows["red.jpg"]["error"] is None and len(rows["red.jpg"]["classes"]) == 5

    module, normalise = registered
    for i, key in enumerate(["digit0.png", "nested/digit1.png", "digit2.png", "nested/digit3.png"]):
        pixels = TF.pil_to_tensor(Image.open(io.BytesIO(images[i])).convert("L"))
        with torch.no_grad():
            expected = module(normalise(TF.resize(pixels, [16, 16], antialias=True)[None])).softmax(1)[0]
        row = rows[key]
        assert row["error"] is None and row["label"] is None
        assert row["classes"] == [str(c) for c in row["class_ids"]]
        np.testing.assert_allclose(row["probs"], expected.topk(5).values.numpy(), atol=1e-5)
        assert row["class_ids"] == expected.topk(5).indices.tolist()


def test_predict_on_a_dataset_split_agrees_with_evaluate(trained, tmp_path):
    model = load_model(CHAMPION, tracking_uri=trained["uri"])
    out = tmp_path / "val.parquet"
    result = predict.predict(model, trained["data"], str(out), splits=["val"], top_k=3)
    table = pq.read_table(out)
    assert result["rows"] == table.num_rows == 360 and result["errors"] == []
    assert set(table["split"].to_pylist()) == {"val"} and None not in table["label"].to_pylist()
    wrong = sum(r["class_ids"][0] != r["label"] for r in table.select(["class_ids", "label"]).to_pylist())
    assert wrong / 360 == pytest.approx(model.logged["val_top1_err"], abs=1e-9)


def test_analyze_draws_figure_5_for_the_registered_model(trained, tmp_path):
    out = tmp_path / "analysis"
    assert analyze.main([CHAMPION, "--out", str(out), "--mlflow-tracking-uri", trained["uri"]]) == 0
    model = load_model(CHAMPION, tracking_uri=trained["uri"])
    blocks = json.load(open(out / "feature_reuse.json"))["blocks"]
    assert [np.array(b).shape for b in blocks] == [(n + 1, n + 1) for n in model.net.block_config] == [(4, 4)] * 3
    facts = json.load(open(out / "summary.json"))
    expected = summary("densenet_bc22_k12", num_classes=10, in_channels=1)
    assert facts["params"] == expected["params"] == sum(p.numel() for p in model.net.parameters())
    assert facts["depth"] == 22 and facts["gmacs"] > 0
    Image.open(out / "feature_reuse.png").verify()
    logged = MlflowClient(trained["uri"]).list_artifacts(trained["run"].info.run_id, "analysis")
    assert {a.path for a in logged} == {"analysis/feature_reuse.png", "analysis/feature_reuse.json",
                                        "analysis/summary.json"}


@pytest.mark.parametrize("fmt", list(export.FORMATS))
def test_exports_of_the_registered_model_give_its_outputs(trained, registered, tmp_path, fmt):
    out = tmp_path / f"digits{export.FORMATS[fmt]}"
    assert export.main([CHAMPION, "--format", fmt, "--out", str(out), "--mlflow-tracking-uri", trained["uri"]]) == 0
    module, normalise = registered
    images, _, _ = val_rows(trained["data"])
    x = normalise(torch.stack([TF.pil_to_tensor(Image.open(io.BytesIO(b)).convert("L")) for b in images[:32]]))
    x = TF.resize(x, [16, 16], antialias=True)
    with torch.no_grad():
        torch.testing.assert_close(export.load(str(out))(x), module(x), atol=1e-5, rtol=0)
    info = json.load(open(f"{out}.json"))
    m = data.load_manifest(trained["data"])
    assert (info["input"]["mean"], info["input"]["std"]) == (list(m.mean), list(m.std))
    assert info["classes"] == list(m.classes) and info["run_id"] == trained["run"].info.run_id
