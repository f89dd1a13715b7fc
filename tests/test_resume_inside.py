"""Resuming inside an epoch, end to end on a real local Ray, real shards and a real MLflow store: a
worker SIGKILLed after a checkpoint inside the epoch, a worker sent SIGTERM between two, and the
driver sent SIGTERM (`ray job stop`) with the job resubmitted on fewer workers; each time the epoch
goes on from the step with every image used once (DENSENET_RAY_ROWS_LOG: the rows each step trained on)."""

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from runs import assert_each_epoch_once, flags
from servers import the_run

from densenet_ray import data

pytestmark = pytest.mark.usefixtures("ray_local")


def wait_for_checkpoint(storage: str, run_name: str, epoch: int, timeout: float = 600) -> None:
    """Until Ray Train has registered the checkpoint of `epoch` (its controller records it in the
    run's checkpoint-manager snapshot some seconds after the worker reported it)."""
    snapshot = os.path.join(storage, run_name, "checkpoint_manager_snapshot.json")
    deadline = time.monotonic() + timeout
    while not (os.path.exists(snapshot) and f'"epoch_{epoch:04d}"' in open(snapshot).read()):
        assert time.monotonic() < deadline, f"checkpoint of epoch {epoch} never registered in {snapshot}"
        time.sleep(0.5)


def mid_epoch_checkpoint(storage: str, run_name: str, epoch: int, timeout: float = 600) -> str:
    """Until a checkpoint inside `epoch` is whole in the run folder; its folder name. Polled often: on an
    idle machine a digits epoch lasts two seconds, and the caller acts on the checkpoint inside it."""
    deadline = time.monotonic() + timeout
    while True:
        found = sorted(glob.glob(os.path.join(storage, run_name, f"epoch_{epoch:04d}_step_*", "state.pt")))
        if found:
            return os.path.basename(os.path.dirname(found[-1]))
        assert time.monotonic() < deadline, f"no checkpoint inside epoch {epoch} of {run_name}"
        time.sleep(0.02)


def rows_log(folder) -> dict[int, list[dict]]:
    """DENSENET_RAY_ROWS_LOG's lines by epoch, each with the process ("pid") that trained them."""
    epochs = {}
    for name in glob.glob(os.path.join(folder, "rows.*.jsonl")):
        pid = int(name.split(".")[-2])
        for line in open(name):
            record = json.loads(line)
            epochs.setdefault(record["epoch"], []).append({**record, "pid": pid})
    return epochs


def workers_at(log, epoch: int, step: int = 1, timeout: float = 600) -> set[int]:
    """Once every worker of the newest generation in DENSENET_RAY_ROWS_LOG has trained step `step` of
    `epoch` (0-based): their pids, read from the log itself so a signal can follow at once (walking the
    process tree takes longer than a digits step)."""
    deadline = time.monotonic() + timeout
    while True:
        pids = {r["pid"] for r in rows_log(log).get(epoch, []) if r["step"] == step}
        if len(pids) == 2:
            return pids
        assert time.monotonic() < deadline, f"no two workers reached step {step} of epoch {epoch + 1}"
        time.sleep(0.02)


def assert_every_image_once(records: list[dict], restarted_at: int, old: set[int], train_rows: int,
                            per_worker_batch: int, workers: int) -> None:
    """One interrupted epoch: the weights saw the rows of the old processes' steps up to the
    checkpoint (`restarted_at`) and the resumed processes' rows, each once; the old processes' steps
    after the checkpoint are lost work, read again. Every pass leaves out, by design, fewer than
    `workers` rows (equal shares) and fewer than a batch per worker (drop_last)."""
    kept = [i for r in records if r["pid"] in old and r["step"] <= restarted_at for i in r["rows"]]
    resumed = [i for r in records if r["pid"] not in old for i in r["rows"]]
    assert kept and resumed, "expected steps before and after the resume"
    used = kept + resumed
    assert len(used) == len(set(used)), f"{len(used) - len(set(used))} rows trained twice in the weights' lineage"
    assert train_rows - len(set(used)) < 2 * workers * (per_worker_batch + 1), \
        f"{train_rows - len(set(used))} of {train_rows} images unused in the interrupted epoch"


@pytest.mark.slow
def test_worker_killed_or_sent_sigterm_resumes_inside_the_epoch_with_every_image_once(digits_data, places, tmp_path,
                                                                                       ray_local):
    """Epoch 1: a worker SIGKILLed after a periodic checkpoint inside the epoch; epoch 2: a worker sent
    SIGTERM between two of them, which checkpoints at the next step. Ray Train restarts the workers
    each time, and the epoch goes on from the step, every image used once."""
    log = tmp_path / "rows"
    log.mkdir()
    argv = flags(digits_data, places, "--run-name", "inside", "--epochs", "4", "--max-failures", "2",
                 "--checkpoint-every-steps", "8", "--progress-s", "1")
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "DENSENET_RAY_ROWS_LOG": str(log)}
    driver = subprocess.Popen([sys.executable, "-m", "densenet_ray.train", *argv], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        old = workers_at(log, 1)
        first = mid_epoch_checkpoint(places["storage"], "inside", 1)
        os.kill(max(old), signal.SIGKILL)
        wait_for_checkpoint(places["storage"], "inside", 1)   # the epoch finished after the restart
        second = workers_at(log, 2, step=3)
        assert not old & second
        os.kill(min(second), signal.SIGTERM)   # between the periodic checkpoints (steps 8 and 16)
        out, _ = driver.communicate(timeout=1800)
    finally:
        driver.kill()
    assert driver.returncode == 0, out[-6000:]
    # The workers act on a SIGTERM at their next poll (within a second): inside epoch 3, or, when an idle
    # machine finishes epoch 3 first (22 steps in 2 s), inside epoch 4.
    sigterm = re.findall(r"SIGTERM to the worker: checkpoint inside epoch (\d+) after step (\d+)", out)
    assert len(sigterm) == 1 and sigterm[0][0] in ("3", "4"), out[-6000:]
    epoch, step = (int(n) for n in sigterm[0])
    restarts = [(int(e), int(n)) for e, n in re.findall(r"inside epoch (\d+) of 4, after its step (\d+)", out)]
    assert len(restarts) == 2 and restarts[1] == (epoch, step), out[-6000:]
    assert restarts[0][0] == 2 and restarts[0][1] % 8 == 0 and restarts[0][1] >= int(first.split("_")[-1]), out[-6000:]

    m = data.load_manifest(digits_data)
    epochs = rows_log(log)
    assert_every_image_once(epochs[1], restarts[0][1], old, m.splits["train"].rows, 32, 2)
    assert_every_image_once(epochs[epoch - 1], step, second, m.splits["train"].rows, 32, 2)
    assert os.listdir(os.path.join(places["storage"], "inside")).count("epoch_0003") == 1
    assert not glob.glob(os.path.join(places["storage"], "inside", "*_step_*")), "superseded checkpoints kept"

    client, run = the_run(places["uri"], "inside")
    assert run.info.status == "FINISHED"
    assert_each_epoch_once(client, run, 4)
    assert run.data.tags["densenet_ray.resumed_at"] == f"epoch {epoch - 1} step {step}"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "step_train_loss")]
    assert steps and len(set(steps)) == len(steps), "step metrics of the replayed stretch logged twice"


@pytest.mark.slow
def test_driver_sent_sigterm_checkpoints_and_the_resubmitted_job_resumes_at_the_step_on_fewer_workers(
        digits_data, places, tmp_path, ray_local):
    log = tmp_path / "rows"
    log.mkdir()
    argv = flags(digits_data, places, "--run-name", "driverless", "--epochs", "4", "--max-failures", "0")
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "DENSENET_RAY_ROWS_LOG": str(log)}
    driver = subprocess.Popen([sys.executable, "-m", "densenet_ray.train", *argv], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_checkpoint(places["storage"], "driverless", 0)
        old = workers_at(log, 1, step=5)
        driver.send_signal(signal.SIGTERM)   # `ray job stop`, the driver's pod deleted
        out, _ = driver.communicate(timeout=300)
    finally:
        driver.kill()
    assert driver.returncode == -signal.SIGTERM, out[-6000:]
    # The driver's own line names the folder: epoch 2 normally, a later one when epoch 2 ended before rank 0
    # next asked (about once a second, and only between steps: a digits epoch on an idle machine takes two
    # seconds). Rank 0's line, printed through the console, comes before it. 4 epochs: the request lands
    # inside one (with 3, an idle machine could end the run first, which then simply finishes).
    written = re.findall(r"checkpoint written: (\S+); the same command resumes", out)
    assert written, out[-6000:]
    epoch, step = (int(n) for n in re.fullmatch(r"epoch_(\d+)_step_(\d+)", os.path.basename(written[0])).groups())
    assert os.path.isdir(written[0]) and epoch in (1, 2, 3), written
    assert f"SIGTERM to the driver: checkpoint inside epoch {epoch + 1} after step {step} " in out, out[-6000:]
    client, run = the_run(places["uri"], "driverless")
    assert run.info.status == "RUNNING"  # the resubmitted job finishes it

    again = subprocess.run([sys.executable, "-m", "densenet_ray.train", *argv, "--workers", "1"], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1800)
    assert again.returncode == 0, again.stdout[-6000:]
    assert f"inside epoch {epoch + 1} of 4, after its step {step}" in again.stdout, again.stdout[-6000:]
    client, resumed = the_run(places["uri"], "driverless")  # the same MLflow run, not a second one
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    assert_each_epoch_once(client, resumed, 4)
    assert resumed.data.tags["densenet_ray.resumed_at"] == f"epoch {epoch} step {step}"
    m = data.load_manifest(digits_data)
    assert_every_image_once(rows_log(log)[epoch], step, old, m.splits["train"].rows, 64, 2)  # the larger pass's bound
