"""Tune search spaces: validation with key paths, dry runs of every shipped space, and a real
ASHA sweep on digits that is interrupted and resumed."""

import glob
import os
import subprocess
import sys
import time

import pytest
from mlflow import MlflowClient
from servers import stop_group

from densenet_ray import spaces
from densenet_ray import tune as T

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = sorted(glob.glob(os.path.join(REPO, "tune_spaces", "*.yaml")))


def test_the_three_spaces_are_shipped():
    assert {os.path.basename(p) for p in SHIPPED} >= {"digits.yaml", "cifar10_bc.yaml", "imagenet_bc.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=os.path.basename)
def test_dry_run_prints_every_trial_with_params_and_gmacs(path, capsys):
    assert T.main([path, "--dry-run"]) == 0
    out = capsys.readouterr().out
    trials, _ = spaces.load_space(path).trials()
    assert len(trials) >= 4
    rows = [line for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == len(trials)
    assert all("," in row.split()[5] for row in rows)  # params, thousands-separated


def test_imagenet_space_covers_table1_block_configurations():
    space = spaces.load_space(os.path.join(REPO, "tune_spaces", "imagenet_bc.yaml"))
    assert space.domains["arch"][1] == ["densenet121", "densenet169", "densenet201"]
    assert space.domains["growth_rate"][1] == [24, 32, 40]
    assert space.domains["compression"][1] == [0.5, 0.75, 1.0]


def write(tmp_path, text: str) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return str(path)


GOOD = """preset: digits
space:
  growth_rate: {choice: [8, 12]}
  depth: {choice: [16, 22]}
scheduler: {type: asha, grace_period: 1}
num_samples: 3
"""


@pytest.mark.parametrize("text,message", [
    (GOOD.replace("depth: {choice: [16, 22]}", "depth: {choice: [16, 23]}"),
     "space.depth.choice[1]: 23 fits no variant in this space: depth=23 is not valid for a 3-block DenseNet-BC"),
    (GOOD.replace("growth_rate:", "growth_rat:"), "space.growth_rat: not searchable"),
    (GOOD.replace("{choice: [8, 12]}", "{choice: [8, twelve]}"), "space.growth_rate.choice[1]: 'twelve' is not an integer"),
    (GOOD.replace("{choice: [8, 12]}", "{pick: [8, 12]}"), "space.growth_rate: {'pick': [8, 12]}: expected one domain"),
    (GOOD.replace("grace_period: 1", "grace_period: 0"), "scheduler.grace_period: 0: expected an integer >= 1"),
    (GOOD.replace("type: asha", "type: pbt"), "scheduler.type: 'pbt': expected one of asha, fifo, grid"),
    (GOOD + "epochs: 3\n", "epochs: unknown key; allowed: preset, fixed"),
    (GOOD + "fixed: {epoch: 3}\n", "fixed.epoch: unknown field"),
    (GOOD + "fixed: {epochs: three}\n", "fixed.epochs: 'three' is not an integer"),
    (GOOD + "resources: {gpus: 1}\n", "resources.gpus: unknown key; allowed: workers, cpus_per_worker, gpus_per_worker"),
    (GOOD.replace("preset: digits", "preset: mnist"), "preset: 'mnist' is not a preset"),
    (GOOD + "space2: {}\n", "space2: unknown key"),
    ("preset: digits\nspace: {lr: {loguniform: [0.1, 0.01]}}\n", "space.lr.loguniform: [0.1, 0.01]: expected [low, high] with low < high"),
    (GOOD + "fixed: {val_split: none}\n", "fixed.val_split: a sweep chooses on validation error"),
    (GOOD.replace("type: asha,", "type: asha, metric: test_top1_err,"), "the test split is never used to choose"),
])
def test_bad_space_names_the_key_path(tmp_path, text, message):
    with pytest.raises(spaces.SpaceError) as err:
        spaces.load_space(write(tmp_path, text))
    assert message in str(err.value)


def test_bad_space_is_exit_code_2_with_the_message(tmp_path, capsys):
    assert T.main([write(tmp_path, GOOD.replace("growth_rate:", "growth_rat:")), "--dry-run"]) == 2
    assert "space.growth_rat" in capsys.readouterr().err


def test_combinations_that_fit_no_densenet_are_skipped_with_the_reason(tmp_path):
    text = """preset: digits
space:
  depth: {grid: [16, 19]}      # 19 fits a plain DenseNet ((L-4) % 3 == 0), not DenseNet-BC
  bottleneck: {grid: [true, false]}
scheduler: {type: grid}
"""
    trials, skipped = spaces.load_space(write(tmp_path, text)).trials()
    assert {(t["depth"], t["bottleneck"]) for t in trials} == {(16, True), (16, False), (19, False)}
    assert len(skipped) == 1 and skipped[0][0] == {"depth": 19, "bottleneck": True}
    assert "depth=19 is not valid for a 3-block DenseNet-BC" in skipped[0][1]


def test_sampling_is_seeded_and_without_repeats(tmp_path):
    a, _ = spaces.load_space(write(tmp_path, GOOD)).trials()
    b, _ = spaces.load_space(write(tmp_path, GOOD)).trials()
    assert a == b and len({tuple(sorted(t.items())) for t in a}) == len(a) == 3


def child_runs(uri: str, sweep: str):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("densenet_ray")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{T.SWEEP_TAG}` = '{sweep}'")
    parent = [r for r in runs if r.info.run_name == sweep]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    return client, parent, children


@pytest.mark.slow
def test_digits_sweep_is_interrupted_resumed_and_reported(tmp_path, ray_local):
    """The shipped digits space: >= 4 trials, 2 at a time, ASHA stopping some; the driver is
    killed after the first trial finished and the sweep is resumed without re-running it."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    argv = [os.path.join(REPO, "tune_spaces", "digits.yaml"), "--name", "sweep", "--data", str(tmp_path / "digits"),
            "--storage", str(tmp_path / "runs"), "--mlflow-tracking-uri", uri]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    log = tmp_path / "driver.log"
    with open(log, "wb") as out:
        driver = subprocess.Popen([sys.executable, "-m", "densenet_ray.tune", *argv], env=env,
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 900
        while True:  # until one trial's run is complete
            assert time.monotonic() < deadline and driver.poll() is None, log.read_text()[-5000:]
            # Not before a trial wrote its last epoch: till then the driver may be creating the store.
            if glob.glob(str(tmp_path / "runs" / "sweep-*" / "epoch_0005")):
                _, _, children = child_runs(uri, "sweep")
                finished = [c for c in children if c.info.status == "FINISHED"]
                if finished:
                    break
            time.sleep(2)
    finally:
        stop_group(driver, grace_s=0)  # killed, as a lost driver node would be
    first = finished[0]
    first_points = len(MlflowClient(uri).get_metric_history(first.info.run_id, "val_top1_err"))

    assert T.main([*argv, "--resume"]) == 0
    client, parent, children = child_runs(uri, "sweep")
    trial_ids = [c.data.tags[T.TRIAL_TAG] for c in children]
    assert len(parent) == 1 and len(children) >= 4 and len(set(trial_ids)) == len(trial_ids)
    again = client.get_run(first.info.run_id)
    assert len(client.get_metric_history(first.info.run_id, "val_top1_err")) == first_points  # not run again
    assert again.info.end_time == first.info.end_time

    epochs = {c.data.tags[T.TRIAL_TAG]: len(client.get_metric_history(c.info.run_id, "val_top1_err"))
              for c in children}
    assert any(n < 6 for n in epochs.values()), f"ASHA stopped nothing: {epochs}"
    assert max(epochs.values()) == 6
    for c in children:
        steps = sorted(m.step for m in client.get_metric_history(c.info.run_id, "val_top1_err"))
        assert steps == list(range(len(steps)))  # each epoch once
        assert {"growth_rate", "depth", "compression"} <= c.data.params.keys()
        assert client.get_run(c.info.run_id).info.status in ("FINISHED", "KILLED")

    artifacts = {a.path for a in client.list_artifacts(parent[0].info.run_id)}
    assert {"trials.csv", "error_vs_params.png", "space.json"} <= artifacts
    csv_text = open(client.download_artifacts(parent[0].info.run_id, "trials.csv", str(tmp_path))).read()
    header = csv_text.splitlines()[0].split(",")
    assert {"k", "L", "theta", "params", "gmacs", "best_val_top1_err", "epochs_run", "wall_s"} <= set(header)
    assert len(csv_text.strip().splitlines()) == 1 + len(children)
    best = client.get_model_version_by_alias("densenet-digits", "candidate")
    best_run = client.get_run(best.run_id)
    assert best_run.data.tags[T.SWEEP_TAG] == "sweep"
    assert best_run.info.status == "FINISHED" and best_run.outputs.model_outputs
    assert best_run.info.end_time < best.creation_timestamp  # the model was added without reopening the run
