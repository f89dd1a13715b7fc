"""Checkpoints inside an epoch, without Ray: their folders, which is newest, what is kept, the rows a
resumed epoch leaves out, when the workers agree to checkpoint, and the preStop hook's SIGTERM.
End to end (a killed worker, SIGTERM to a worker and to the driver, fewer workers): test_train.py;
on S3: test_s3.py."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import torch

from densenet_ray import checkpoint, preempt
from densenet_ray.position import Position

CPU = torch.device("cpu")


def state(epoch: int, step: int = 0) -> dict:
    return {"model": {"w": torch.zeros(2)}, "config": {}, "optimizer": {}, "scaler": {}, "epoch": epoch,
            "step": step, "history": [{"epoch": e} for e in range(epoch + (0 if step else 1))], "classes": ["a", "b"]}


def write_epoch_end(run_dir, epoch: int) -> None:
    folder = os.path.join(run_dir, checkpoint.folder_name(epoch))
    os.makedirs(folder)
    checkpoint.save(state(epoch), folder)


def test_a_checkpoint_inside_an_epoch_is_newest_until_the_epoch_ends_and_then_deleted(tmp_path):
    run_dir = str(tmp_path / "run")
    write_epoch_end(run_dir, 0)
    assert checkpoint.next_epoch(run_dir) == 1 and checkpoint.consumed_rows(run_dir, 1) is None
    checkpoint.save_inside(run_dir, state(1, 40), np.array([7, 3, 5]))
    checkpoint.save_inside(run_dir, state(1, 120), np.array([7, 3, 5, 11]))
    assert sorted(os.listdir(run_dir)) == ["epoch_0000", "epoch_0001_step_000120"]   # the step-40 one superseded
    assert checkpoint.newest(run_dir).endswith("epoch_0001_step_000120/state.pt")
    assert checkpoint.next_epoch(run_dir) == 1           # the epoch it stopped inside
    assert checkpoint.consumed_rows(run_dir, 1).tolist() == [7, 3, 5, 11]
    assert checkpoint.consumed_rows(run_dir, 2) is None  # another epoch reads everything
    loaded, _ = checkpoint.load(run_dir)
    assert loaded["step"] == 120 and checkpoint.inside_epoch(loaded)
    checkpoint.check_training_state(loaded, "x")          # history holds the epochs before it only
    write_epoch_end(run_dir, 1)
    checkpoint.prune(run_dir)
    assert sorted(os.listdir(run_dir)) == ["epoch_0000", "epoch_0001"]
    assert checkpoint.next_epoch(run_dir) == 2 and checkpoint.consumed_rows(run_dir, 2) is None


def test_a_torn_checkpoint_inside_an_epoch_is_passed_over(tmp_path):
    run_dir = str(tmp_path / "run")
    write_epoch_end(run_dir, 0)
    os.makedirs(os.path.join(run_dir, "epoch_0001_step_000008"))   # the job died before state.pt was whole
    open(os.path.join(run_dir, "epoch_0001_step_000008", "state.pt.partial"), "wb").write(b"torn")
    assert checkpoint.newest(run_dir).endswith("epoch_0000/state.pt") and checkpoint.next_epoch(run_dir) == 1


def test_a_state_whose_step_and_history_disagree_is_refused(tmp_path):
    bad = {**state(2, 10), "history": [{"epoch": 0}, {"epoch": 1}, {"epoch": 2}]}
    with pytest.raises(checkpoint.CheckpointError, match="0..epoch-1 inside an epoch"):
        checkpoint.check_training_state(bad, "f.pt")
    with pytest.raises(checkpoint.CheckpointError, match="step is a str"):
        checkpoint.check_training_state({**state(2, 10), "step": "10"}, "f.pt")


class Asked:
    def __init__(self) -> None:
        self.asked = False

    def requested(self) -> str | None:
        return "worker" if self.asked else None


def test_position_checkpoints_every_n_steps_and_at_the_step_after_a_sigterm():
    watch = Asked()
    where = Position(every_steps=4, every_min=0.0, world=1, rank=0, device=CPU, watch=watch)
    where.epoch_start(3, step=2, rows=np.array([100, 101]))   # resumed after step 2
    due = []
    for step in range(3, 12):
        where.add(torch.tensor([step * 10, step * 10 + 1]), step)
        watch.asked = step == 6
        if where.due(step):
            due.append((step, where.preempted))
            rows = where.gather()
    assert due == [(4, None), (6, "worker"), (8, None)]
    assert rows.tolist() == [100, 101] + [v for s in range(3, 9) for v in (s * 10, s * 10 + 1)]


def test_the_prestop_hook_sends_sigterm_and_waits_for_the_process_to_go(tmp_path):
    marker = tmp_path / "got"
    code = (f"import signal, sys, time\n"
            f"def bye(*_):\n    time.sleep(0.5); open({str(marker)!r}, 'w').write('1'); sys.exit(0)\n"
            f"signal.signal(signal.SIGTERM, bye)\nprint('ready', flush=True)\ntime.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code, "-m", "densenet_ray.train"], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        other = psutil.Process()   # not ours: left alone
        t = time.monotonic()
        pids = preempt.stop_local(10, processes=[psutil.Process(child.pid), other])
        assert pids == [child.pid] and marker.exists() and time.monotonic() - t >= 0.5
        assert child.wait(5) == 0
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)
