"""Progress inside an epoch, on every worker in step: when to report, the figures, the line.

    meter = Progress(every_s=30, steps=110, epochs=15, world=2, device=device, rank=rank)
    meter.epoch_start(epoch, last_epoch_s)
    for each step:  report = meter.step(step, loss, lr, wait_s)   # a dict on rank 0 when due, else None

Reporting needs the largest data-wait share over the workers, so every worker must join the same
all_reduce at the same step. Clocks differ between workers, so the schedule is in steps, agreed by
the collective itself: the first step of a (re)start reports, and each report carries rank 0's
choice of how many steps until the next (its step time measured over the interval, so reports come
every `every_s` seconds). One small all_reduce per interval: nothing per step but a few additions.
The loss shown is rank 0's running mean over the interval (no extra collective).
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist


class Progress:
    def __init__(self, every_s: float, steps: int, epochs: int, world: int, device, rank: int,
                 global_batch: int) -> None:
        self.every_s, self.steps, self.epochs, self.world, self.rank = every_s, steps, epochs, world, rank
        self.device, self.global_batch = device, global_batch
        self.next_due = 1  # global step of the next report
        self.epoch, self.last_epoch_s, self.first_wait, self.epoch_t0 = 0, None, 0.0, None

    @property
    def on(self) -> bool:
        return self.every_s > 0

    def epoch_start(self, epoch: int, last_epoch_s: float | None) -> None:
        """`last_epoch_s`: the previous epoch's duration from its metrics, until this meter has seen one
        whole epoch from start to start (which includes evaluation, checkpoint and the pipeline's start)."""
        now = time.perf_counter()
        seen = now - self.epoch_t0 if self.epoch_t0 is not None and epoch == self.epoch + 1 else None
        self.epoch, self.last_epoch_s = epoch, seen or last_epoch_s
        self.epoch_t0 = self._mark = now
        self._wait = self._steps = 0
        self._loss = torch.zeros((), dtype=torch.float64, device=self.device)
        self.next_due = max(self.next_due, epoch * self.steps + 1)

    def step(self, step: int, loss: torch.Tensor, lr: float, wait_s: float) -> dict | None:
        """After optimizer step `step` (1-based within the epoch): this interval's figures on rank 0
        when a report is due (every rank takes part in its all_reduce), else None."""
        if not self.on:
            return None
        if step == 1:
            self.first_wait = wait_s  # mostly the input pipeline starting (see stall_hint)
        self._wait += wait_s
        self._steps += 1
        self._loss += loss.detach()
        global_step = self.epoch * self.steps + step
        if global_step < self.next_due:
            return None
        now = time.perf_counter()
        interval = max(now - self._mark, 1e-9)
        step_s = interval / self._steps
        # rank 0 proposes the spacing to the next report; the others propose 0, so MAX carries it
        spacing = max(1, round(self.every_s / step_s)) if self.rank == 0 else 0
        packed = torch.tensor([self._wait / interval, float(spacing)], dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(packed, op=dist.ReduceOp.MAX)
        wait_frac, spacing = packed.tolist()
        self.next_due = global_step + int(spacing)
        report = None
        if self.rank == 0:
            # The steps ahead go at this interval's pace without the epoch's first-batch wait (the
            # input pipeline starting: seconds once, not every step); each later epoch has it once.
            startup = self.first_wait if step == self._steps else 0.0   # this interval began at step 1
            ahead_s = max(interval - startup, 1e-9) / self._steps
            epoch_eta = (self.steps - step) * ahead_s
            per_epoch = self.last_epoch_s or self.steps * ahead_s + self.first_wait
            report = {"epoch": self.epoch, "step": step, "global_step": global_step, "step_lr": lr,
                      "step_train_loss": self._loss.item() / self._steps,
                      "step_images_per_s": self._steps * self.global_batch / interval,
                      "step_data_wait_frac": min(1.0, wait_frac),
                      "epoch_eta_s": epoch_eta, "run_eta_s": epoch_eta + per_epoch * (self.epochs - self.epoch - 1)}
        self._mark, self._wait, self._steps = now, 0.0, 0
        self._loss.zero_()
        return report

    def line(self, r: dict) -> str:
        width = len(str(self.steps))
        bar = _bar(r["step"] / max(self.steps, 1))
        return (f"epoch {r['epoch'] + 1:>3}/{self.epochs} {bar} step {r['step']:>{width}}/{self.steps}  "
                f"loss {r['step_train_loss']:.4f}  lr {r['step_lr']:.4g}  {r['step_images_per_s']:.0f} img/s  "
                f"data wait {r['step_data_wait_frac']:.0%}  epoch ETA {duration(r['epoch_eta_s'])}  "
                f"run ETA {duration(r['run_eta_s'])}")


def _bar(fraction: float, width: int = 20) -> str:
    done = min(width, int(fraction * width))
    return "[" + "#" * done + "." * (width - done) + "]"


def duration(seconds: float) -> str:
    seconds = int(math.ceil(max(seconds, 0)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def stall_hint(wait_frac: float, first_batch_share: float = 0.0) -> tuple[str, str] | None:
    """(tag for the epoch line, explanation shown the first time) when the workers waited for data more
    than 10% of the epoch; `first_batch_share`: how much of rank 0's wait was for the epoch's first batch."""
    if wait_frac <= 0.10:
        return None
    if first_batch_share > 0.5:
        return ("pipeline start-up", f"waited for data {wait_frac:.0%} of the epoch, most of it for the first batch "
                "while the input pipeline started (Ray Data starts its read and decode tasks every epoch: a large "
                "share only when epochs are short)")
    return ("input-bound", f"waited for data {wait_frac:.0%} of the epoch: the input pipeline is the bottleneck; give "
            "it more CPUs (--cpus-per-worker, CPU-only nodes for decoding) or store smaller images (convert --max-side)")
