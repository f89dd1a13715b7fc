"""Training end to end on a real local Ray, real Parquet shards and a real MLflow store: the README's
digits job, a run submitted again or interrupted while it finished, the imagenet preset, bad input.
Resuming inside an epoch: test_resume_inside.py."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from runs import assert_each_epoch_once, flags
from servers import the_run

from densenet_ray import data, train
from densenet_ray.data import sources, write
from densenet_ray.tracking.registry import load_registered_model

pytestmark = pytest.mark.usefixtures("ray_local")


def val_error_of(model, root: str, image_size: int) -> float:
    """Top-1 error of a registered model over every validation image, computed here, not by training."""
    m = data.load_manifest(root)
    mean = torch.tensor(m.mean).view(1, -1, 1, 1) * 255
    std = torch.tensor(m.std).view(1, -1, 1, 1) * 255
    wrong = total = 0
    for batch in data.read_split(root, "val", "none", image_size=image_size).iter_torch_batches(batch_size=128):
        x = (batch["image"].permute(0, 3, 1, 2).float() - mean) / std
        with torch.no_grad():
            wrong += (model(x).argmax(1) != batch["label"]).sum().item()
        total += len(batch["label"])
    assert total == m.splits["val"].rows
    return wrong / total


@pytest.fixture(scope="module")
def demo(digits_data, tmp_path_factory, ray_local):
    """The README's main job, run once for the tests below: 2 workers, 15 epochs, as its own driver
    process whose console (stdout and stderr, Ray's forwarded worker lines included) is captured;
    progress every second, so that even an epoch of seconds shows some."""
    tmp = tmp_path_factory.mktemp("demo")
    places = {"storage": str(tmp / "runs"), "uri": f"sqlite:///{tmp}/mlflow.db"}
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    argv = flags(digits_data, places, "--run-name", "demo", "--max-failures", "0", "--progress-s", "1")
    done = subprocess.run([sys.executable, "-m", "densenet_ray.train", *argv], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=2400)
    client, run = the_run(places["uri"], "demo")
    return {"rc": done.returncode, "out": done.stdout, "places": places, "client": client, "run": run}


@pytest.mark.slow
def test_digits_demo_trains_to_95_percent(demo):
    assert demo["rc"] == 0
    assert "configuration:" in demo["out"] and "done: 'demo', 15 epochs" in demo["out"]
    assert demo["run"].info.status == "FINISHED"
    assert demo["run"].data.metrics["val_top1_err"] <= 0.05


NOISE = ("Reporting training result", "TrainingReport(", "Checkpoint successfully created", "Grad strides do not match",
         "exclude_resources", "tqdm is not installed", "Setting up process group", "Moving model to device",
         "Started monitoring system metrics")


def progress_line(line: str) -> bool:
    return line.startswith("epoch ") and " step " in line and "run ETA" in line


@pytest.mark.slow
def test_digits_demo_console_shows_progress_and_nothing_of_the_libraries(demo):
    out, lines = demo["out"], demo["out"].splitlines()
    epoch_lines = [i for i, line in enumerate(lines) if line.startswith("epoch ") and "  loss " in line
                   and "(train/val)" in line]
    assert len(epoch_lines) == 15, "\n".join(lines)
    waiting = next(i for i, line in enumerate(lines) if "waiting for the first batch" in line)
    first_progress = next(i for i, line in enumerate(lines) if progress_line(line))
    assert waiting < first_progress < epoch_lines[0]
    assert "step  1/22" in lines[first_progress]  # from the first step: 1,437 images / 64 = 22 steps
    assert [n for n in NOISE if n in out] == []
    ours = [line for line in lines if not progress_line(line)]
    assert len(ours) <= 60, f"{len(ours)} lines besides progress:\n" + "\n".join(ours)


@pytest.mark.slow
def test_digits_demo_logs_step_and_stall_telemetry_to_mlflow(demo):
    client, run_id = demo["client"], demo["run"].info.run_id
    history = {key: client.get_metric_history(run_id, key)
               for key in ("step_train_loss", "step_images_per_s", "step_data_wait_frac", "step_lr")}
    steps = [m.step for m in history["step_train_loss"]]
    assert len(steps) >= 15 and len(set(steps)) == len(steps) and max(steps) <= 15 * 22
    for key, points in history.items():
        assert [m.step for m in points] == steps, key  # every report logs all four at the same global step
    assert all(0 <= m.value <= 1 for m in history["step_data_wait_frac"])
    assert all(m.value > 0 for m in history["step_images_per_s"] + history["step_lr"])
    assert_each_epoch_once(client, demo["run"], 15)
    for key in ("data_wait_frac", "images_per_s_per_worker", "input_rows_per_s", "input_task_s", "input_bytes"):
        points = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in points) == list(range(15)), key
        assert all(m.value > 0 for m in points), (key, [m.value for m in points])
    assert all(0 <= m.value <= 1 for m in client.get_metric_history(run_id, "data_wait_frac"))


@pytest.mark.slow
def test_digits_demo_run_is_complete_in_mlflow(demo):
    client, run = demo["client"], demo["run"]
    assert_each_epoch_once(client, run, 15)
    assert run.data.params["arch"] == "densenet_bc22_k12" and run.data.params["workers"] == "2"
    # --precision auto as given, and what the CPU workers made of it
    assert (run.data.params["precision"], run.data.params["precision_resolved"]) == ("auto", "fp32")
    assert run.data.params["channels_last_resolved"] == "False"
    assert {"ray_version", "torch_version", "device"} <= run.data.tags.keys()
    assert any(k.startswith("system/") for k in run.data.metrics), "no system metrics"
    assert {"config.json", "class_index.json", "training_curves.png"} <= {a.path for a in
                                                                         client.list_artifacts(run.info.run_id)}


@pytest.mark.slow
def test_digits_demo_model_is_registered_and_reproduces_the_logged_error(demo, digits_data):
    client, run = demo["client"], demo["run"]
    version = client.get_model_version_by_alias("densenet-digits", "champion")
    assert set(version.aliases) == {"candidate", "champion"} and version.run_id == run.info.run_id
    model = load_registered_model("models:/densenet-digits@champion", tracking_uri=demo["places"]["uri"])
    logged_err = run.data.metrics["val_top1_err"]
    assert val_error_of(model, digits_data, image_size=16) == pytest.approx(logged_err, abs=1e-9)


@pytest.mark.slow
def test_finished_run_submitted_again_trains_nothing(demo, digits_data, capfd):
    """No second run, no second model version, the run's end time as it was."""
    client, run, places = demo["client"], demo["run"], demo["places"]
    assert train.main(flags(digits_data, places, "--run-name", "demo")) == 0
    assert "'demo' already finished its 15 epochs" in capfd.readouterr().out
    assert len(client.search_runs([run.info.experiment_id], "attributes.run_name = 'demo'")) == 1
    assert len(client.search_model_versions("name = 'densenet-digits'")) == 1
    assert client.get_run(run.info.run_id).info.end_time == run.info.end_time


@pytest.mark.slow
def test_run_interrupted_while_it_finished_is_completed_on_resubmission(demo, digits_data):
    """The driver marks the run FAILED: resubmitted, it trains nothing, completes the run and
    registers its model."""
    client, run, places = demo["client"], demo["run"], demo["places"]
    versions = len(client.search_model_versions("name = 'densenet-digits'"))
    client.set_terminated(run.info.run_id, "FAILED")
    assert train.main(flags(digits_data, places, "--run-name", "demo", "--max-failures", "0")) == 0
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    assert_each_epoch_once(client, run, 15)
    assert int(client.get_model_version_by_alias("densenet-digits", "candidate").version) == versions + 1


def tiny_imagenet(root):
    """ILSVRC2012's layout with real JPEG photo crops: train/<wnid>/*.JPEG, a flat val/ and its labels."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    wnids = ["n01440764", "n01443537", "n01484850"]
    rng = np.random.default_rng(0)
    rows = ["ImageId,PredictionString"]

    def crop(i):
        photo = photos[i % 2]
        y, x = rng.integers(0, 200), rng.integers(0, 300)
        return Image.fromarray(photo[y:y + 150, x:x + 200])

    for c, wnid in enumerate(wnids):
        os.makedirs(os.path.join(root, "train", wnid))
        for i in range(6):
            crop(c * 6 + i).save(os.path.join(root, "train", wnid, f"{wnid}_{i}.JPEG"), quality=90)
    os.makedirs(os.path.join(root, "val"))
    for i in range(6):
        name = f"ILSVRC2012_val_{i + 1:08d}"
        crop(i).save(os.path.join(root, "val", name + ".JPEG"), quality=90)
        rows.append(f"{name},{wnids[i % 3]} 0 0 10 10")
    with open(os.path.join(root, "LOC_val_solution.csv"), "w") as f:
        f.write("\n".join(rows) + "\n")
    with open(os.path.join(root, "LOC_synset_mapping.txt"), "w") as f:
        f.write("\n".join(f"{w} class {w}" for w in wnids) + "\n")


@pytest.mark.slow
def test_imagenet_preset_end_to_end_on_tiny_shards(tmp_path, places):
    tiny_imagenet(tmp_path / "ilsvrc")
    write.convert(sources.imagenet(str(tmp_path / "ilsvrc")), str(tmp_path / "shards"), progress=False)
    rc = train.main(["imagenet", "--data", str(tmp_path / "shards"), "--epochs", "1", "--batch-size", "4",
                     "--storage", places["storage"], "--mlflow-tracking-uri", places["uri"], "--run-name", "inet",
                     "--max-failures", "0", "--precision", "bf16", "--channels-last"])
    assert rc == 0
    client, run = the_run(places["uri"], "inet")
    assert run.info.status == "FINISHED" and run.data.params["arch"] == "densenet121"
    assert run.data.metrics["train_images"] == 16 and run.data.metrics["val_images"] == 6  # 18 // 4 * 4 images
    assert client.get_model_version_by_alias("densenet-imagenet", "candidate").run_id == run.info.run_id


def test_unreachable_tracking_server_fails_fast_before_training(digits_data, places, capfd):
    rc = train.main(["digits", "--data", digits_data, "--storage", places["storage"],
                     "--mlflow-tracking-uri", "http://127.0.0.1:9"])
    assert rc == 2
    assert "http://127.0.0.1:9" in capfd.readouterr().err
    assert not os.path.exists(places["storage"])


@pytest.mark.parametrize("change,message", [
    (lambda d, tmp: ["cifar10", "--data", str(tmp / "nowhere")], "no manifest"),  # only digits converts itself
    (lambda d, tmp: ["digits", "--data", d, "--num-classes", "3"], "--num-classes 3 does not match"),
    (lambda d, tmp: ["digits", "--data", d, "--val-split", "test"], "no split 'test'"),
    (lambda d, tmp: ["digits", "--data", d, "--batch-size", "4096"], "fewer than one global batch"),
    (lambda d, tmp: ["digits", "--data", d, "--workers", "4"], "Ray Data needs at least one more CPU"),
])
def test_bad_input_is_a_clear_error_before_any_worker_starts(digits_data, places, tmp_path, capfd, change, message):
    argv = [*change(digits_data, tmp_path), "--storage", places["storage"], "--mlflow-tracking-uri", places["uri"]]
    assert train.main(argv) == 2
    assert message in capfd.readouterr().err
    assert not os.path.exists(places["storage"])


def test_wrong_schema_shard_is_named(digits_data, places, tmp_path, capfd):
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    broken = tmp_path / "broken"
    shutil.copytree(digits_data, broken)
    shard = sorted((broken / "train").glob("*.parquet"))[0]
    pq.write_table(pa.table({"pixels": [b"x"], "label": ["seven"]}), shard)
    assert train.main(["digits", "--data", str(broken), "--storage", places["storage"],
                       "--mlflow-tracking-uri", places["uri"]]) == 2
    err = capfd.readouterr().err
    assert shard.name in err


@pytest.fixture(scope="module")
def digits_with_test(tmp_path_factory):
    """The digits with a test split of their own (val halved): the paper's CIFAR/SVHN layout."""
    src = sources.digits()
    val = src.splits["val"]
    src.splits = {"train": src.splits["train"], "val": val[::2], "test": val[1::2]}
    src.name = "digits3"
    out = tmp_path_factory.mktemp("digits3") / "ds"
    write.convert(src, str(out), progress=False)
    return str(out)


@pytest.mark.slow
def test_validation_chooses_and_the_test_split_is_measured_once_at_the_end(digits_with_test, places):
    """--select best registers the epoch with the lowest validation error; the test split is evaluated
    once, with those weights, logged at that epoch's step; the registered name follows the data."""
    rc = train.main(["digits", "--data", digits_with_test, "--storage", places["storage"], "--mlflow-tracking-uri",
                     places["uri"], "--run-name", "proto", "--epochs", "2", "--test-split", "test", "--select", "best",
                     "--max-failures", "0"])
    assert rc == 0
    client, run = the_run(places["uri"], "proto")
    val = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_top1_err")}
    chosen = min(val, key=lambda e: (val[e], e))
    test = client.get_metric_history(run.info.run_id, "test_top1_err")
    assert [m.step for m in test] == [chosen] and run.data.tags["densenet_ray.selected_epoch"] == str(chosen)
    assert run.data.metrics["test_images"] == 180
    version = client.get_model_version_by_alias("densenet-digits3", "champion")
    assert (version.tags["selected_epoch"], version.tags["eval_split"], version.tags["dataset"]) == (
        str(chosen), "val", "digits3")
    assert float(version.tags["val_top1_err"]) == pytest.approx(val[chosen])

    # The paper's final run: train on train+val, no validation, test at the end; a candidate, not a champion.
    rc = train.main(["digits", "--data", digits_with_test, "--storage", places["storage"], "--mlflow-tracking-uri",
                     places["uri"], "--run-name", "final", "--epochs", "1", "--train-split", "train+val",
                     "--val-split", "none", "--test-split", "test", "--max-failures", "0"])
    assert rc == 0
    _, final = the_run(places["uri"], "final")
    assert "test_top1_err" in final.data.metrics and not any(k.startswith("val_") for k in final.data.metrics)
    aliases = client.get_registered_model("densenet-digits3").aliases
    assert aliases["candidate"] == 2 and aliases["champion"] == 1
