"""Where each epoch is, on every worker in step: the rows trained so far, and when to checkpoint
inside the epoch (--checkpoint-every-steps, --checkpoint-every-min, a SIGTERM).

    where = Position(cfg, world, rank, device, watch)
    where.epoch_start(epoch, step, rows)        # rows: what a resumed epoch had trained on, else None
    for each step:  where.add(batch["row"]); if where.due(step): rows = where.gather()   # every rank

A checkpoint needs every worker's rows, so every worker must gather at the same step. Steps are
agreed by count; time and SIGTERM are not (clocks differ, a signal reaches one process), so every
POLL_S or so rank 0's clock and every worker's SIGTERM are combined in one small all_reduce (MAX),
at steps all workers agree on: rank 0 proposes the spacing to the next poll (as progress.py does).
With one worker nothing is reduced and it polls every step. Nothing else happens per step but
keeping the batch's row ids (a CPU tensor of int64) in a list.

DENSENET_RAY_ROWS_LOG=FOLDER (tests, audits): every worker appends one JSON line per step to a file
of its own in FOLDER: {"epoch", "step", "rank", "rows"}: the ids of the rows that step trained on.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import torch
import torch.distributed as dist

POLL_S = 1.0


class Position:
    def __init__(self, every_steps: int, every_min: float, world: int, rank: int, device, watch=None) -> None:
        self.every_steps, self.every_s = every_steps, every_min * 60
        self.world, self.rank, self.device, self.watch = world, rank, device, watch
        self.log = os.environ.get("DENSENET_RAY_ROWS_LOG")
        self.last_saved = time.monotonic()
        self.preempted = None   # the last due() was for a SIGTERM: to a "worker" or the "driver"

    def epoch_start(self, epoch: int, step: int = 0, rows: np.ndarray | None = None) -> None:
        """A new epoch, or a resumed one after `step` steps: the previous epoch's end (or the
        checkpoint resumed from) was just saved, so --checkpoint-every-min counts from now."""
        self.epoch, self.next_poll, self._mark, self._mark_step = epoch, step + 1, time.monotonic(), step
        self.last_saved = self._mark
        self.saved = np.asarray(rows if rows is not None else [], np.int64)  # rank 0: this epoch's, gathered
        self.fresh: list[np.ndarray] = []   # this worker's since the last gather

    def add(self, rows: torch.Tensor | None, step: int) -> None:
        if rows is None:
            return
        rows = rows.numpy()
        self.fresh.append(rows)
        if self.log:
            with open(os.path.join(self.log, f"rows.{os.getpid()}.jsonl"), "a") as f:
                f.write(json.dumps({"epoch": self.epoch, "step": step, "rank": self.rank, "rows": rows.tolist()}) + "\n")

    def due(self, step: int) -> bool:
        """After optimizer step `step` (of the epoch, counting steps before a resume): whether every
        worker checkpoints now. The same answer on every rank."""
        self.preempted = None
        by_count = bool(self.every_steps) and step % self.every_steps == 0
        if step < self.next_poll or (not self.every_s and self.watch is None):
            return by_count
        now = time.monotonic()
        step_s = (now - self._mark) / max(step - self._mark_step, 1)
        self._mark, self._mark_step = now, step
        spacing = max(1, round(POLL_S / max(step_s, 1e-6))) if self.rank == 0 else 0
        timed = self.rank == 0 and bool(self.every_s) and now - self.last_saved >= self.every_s
        asked = self.watch.requested() if self.watch is not None else None   # "worker", "driver" or None
        flags = [float(spacing), float(timed), float(asked == "worker"), float(asked == "driver")]
        if self.world > 1:
            packed = torch.tensor(flags, dtype=torch.float64, device=self.device)
            dist.all_reduce(packed, op=dist.ReduceOp.MAX)
            flags = packed.tolist()
        self.next_poll = step + (int(flags[0]) if self.world > 1 else 1)
        self.preempted = "worker" if flags[2] else "driver" if flags[3] else None
        return by_count or bool(flags[1]) or self.preempted is not None

    def gather(self) -> np.ndarray | None:
        """Every worker's rows of this epoch so far, on rank 0 (None elsewhere). A collective."""
        mine = np.concatenate(self.fresh) if self.fresh else np.zeros(0, np.int64)
        self.fresh = []
        self.last_saved = time.monotonic()
        if self.world > 1:
            parts = [None] * self.world
            dist.all_gather_object(parts, mine)
        else:
            parts = [mine]
        if self.rank != 0:
            return None
        self.saved = np.concatenate([self.saved, *parts])
        return self.saved
