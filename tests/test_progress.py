"""Progress inside an epoch (the schedule every worker agrees on, the figures, the line) and the
driver's console (redrawn on a terminal, plain lines in logs), without training."""

import io
import time

import pytest
import torch

from densenet_ray.console import Console, say
from densenet_ray.progress import Progress, stall_hint

CPU = torch.device("cpu")


def run_epoch(meter, epoch, steps, step_s, wait_s):
    meter.epoch_start(epoch, None)
    reports = []
    for step in range(1, steps + 1):
        time.sleep(step_s)
        if report := meter.step(step, torch.tensor(2.0), 0.1, wait_s):
            reports.append(report)
    return reports


def test_reports_start_at_the_first_step_then_come_every_interval():
    meter = Progress(every_s=0.1, steps=40, epochs=3, world=1, device=CPU, rank=0, global_batch=64)
    reports = run_epoch(meter, 0, 40, step_s=0.01, wait_s=0.0)
    steps = [r["step"] for r in reports]
    assert steps[0] == 1 and steps == sorted(steps)
    # ~10 steps of 10 ms per 0.1 s interval once the first step has measured the pace
    assert 3 <= len(reports) <= 12, steps
    gaps = [b - a for a, b in zip(steps[1:], steps[2:])]
    assert all(4 <= g <= 20 for g in gaps), gaps
    r = reports[-1]
    assert r["step_train_loss"] == pytest.approx(2.0)
    assert 0 <= r["step_data_wait_frac"] <= 0.05
    assert 64 / 0.011 * 0.3 < r["step_images_per_s"] < 64 / 0.01 * 1.1
    assert 0 <= r["epoch_eta_s"] < 1 and r["run_eta_s"] > r["epoch_eta_s"]
    later = run_epoch(meter, 1, 40, step_s=0.01, wait_s=0.0)
    assert later and later[0]["global_step"] > reports[-1]["global_step"]  # MLflow steps keep increasing


def test_waiting_for_data_shows_as_its_share_of_the_interval():
    meter = Progress(every_s=0.05, steps=20, epochs=1, world=1, device=CPU, rank=0, global_batch=8)
    meter.epoch_start(0, None)
    report = None
    for step in range(1, 21):
        t = time.perf_counter()
        time.sleep(0.01)  # "waiting" for the batch: all of the step
        report = meter.step(step, torch.tensor(1.0), 0.1, time.perf_counter() - t) or report
    assert 0.6 <= report["step_data_wait_frac"] <= 1.0
    assert stall_hint(0.3)[0] == "input-bound" and "--cpus-per-worker" in stall_hint(0.3)[1]
    assert stall_hint(0.3, first_batch_share=0.8)[0] == "pipeline start-up" and stall_hint(0.05) is None


def test_the_first_batchs_wait_is_not_projected_onto_every_step_ahead():
    """Step 1 waits for the input pipeline to start (seconds, once an epoch): the ETAs at that first
    report count it once per epoch, not once per step left (an ETA of 50 min for a 3 min run, seen)."""
    meter = Progress(every_s=10, steps=40, epochs=3, world=1, device=CPU, rank=0, global_batch=64)
    meter.epoch_start(0, None)
    time.sleep(0.51)
    first = meter.step(1, torch.tensor(2.0), 0.1, 0.5)
    assert first["step"] == 1 and first["step_data_wait_frac"] > 0.9
    assert first["epoch_eta_s"] < 39 * 0.05                      # not 39 x 0.51 s
    assert 2 * 0.5 <= first["run_eta_s"] < 2 * (0.5 + 40 * 0.05) + 39 * 0.05   # the start-up once per later epoch


def test_off_means_no_reports_and_no_collectives():
    meter = Progress(every_s=0, steps=5, epochs=1, world=2, device=CPU, rank=0, global_batch=8)
    assert run_epoch(meter, 0, 5, 0, 0) == []  # world=2 without a process group: any collective would raise


def test_the_line_names_every_figure():
    meter = Progress(every_s=30, steps=110, epochs=15, world=2, device=CPU, rank=0, global_batch=64)
    line = meter.line({"epoch": 2, "step": 55, "global_step": 275, "step_lr": 0.1, "step_train_loss": 0.51234,
                       "step_images_per_s": 312.4, "step_data_wait_frac": 0.031, "epoch_eta_s": 61,
                       "run_eta_s": 1500})
    assert line.startswith("epoch   3/15 [##########..........] step  55/110  loss 0.5123  lr 0.1  312 img/s")
    assert "data wait 3%  epoch ETA 0:01:01  run ETA 0:25:00" in line


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("tty", [False, True])
def test_console_redraws_progress_on_a_terminal_and_prints_plain_lines_in_logs(ray_local, tty):
    out = FakeTTY() if tty else io.StringIO()
    console = Console.open()
    console.out, console.tty = out, tty
    for i in range(3):
        say(console.handle, f"progress {i}", progress=True)
    say(console.handle, "epoch 1 done")
    deadline = time.time() + 30
    while "epoch 1 done" not in out.getvalue() and time.time() < deadline:
        time.sleep(0.1)
    console.close()
    text = out.getvalue()
    if tty:
        assert text == "\r\x1b[Kprogress 0\r\x1b[Kprogress 1\r\x1b[Kprogress 2\r\x1b[Kepoch 1 done\n"
    else:
        assert text.splitlines() == ["progress 0", "progress 1", "progress 2", "epoch 1 done"]
