"""What checkpoints inside an epoch cost (issue 14): the pause per checkpoint, and the position
bookkeeping's share of steady-state images/s.

    python benchmarks/checkpoint_inside.py                   # DenseNet-121's state; BC-40 steps, 40 a round
    python benchmarks/checkpoint_inside.py --storage s3://bucket/tmp --steps 20

Pause: what training waits for at a checkpoint inside an epoch, measured on DenseNet-121's state
(weights and SGD momentum, ~8M parameters: ~64 MB): `checkpoint.save_inside` (torch.save into
memory, written as state.pt and rows.npy beside it, moved into place, the superseded one deleted)
with 1.28M row ids (an ImageNet epoch's, the most a checkpoint can hold), against the reference
`torch.save` of the same state to a local file. Rank 0 writes while the other workers wait in the
next collective; the gather of the row ids is timed apart (one process here: no collective).

Bookkeeping: the same training step (DenseNet-BC-40 k=12, 32 px, batch 64, in-memory batches
with their row ids) through `loop.train_one_epoch`, with the Position (row ids kept per step, a
SIGTERM poll, --checkpoint-every-steps 0) and without it, in interleaved rounds in this process.
Goal: under 1% (ratio >= 0.99).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from densenet_ray import checkpoint  # noqa: E402
from densenet_ray import config as C  # noqa: E402
from densenet_ray.loop import Prepare, train_one_epoch  # noqa: E402
from densenet_ray.model import DenseNet, from_config  # noqa: E402
from densenet_ray.position import Position  # noqa: E402


class Batches:
    """ray.train's shard, as far as the loop asks: the same in-memory batches every pass."""

    def __init__(self, n: int, batch: int, size: int, classes: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.batches = [{"image": torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=g),
                         "label": torch.randint(0, classes, (batch,), generator=g),
                         "row": torch.arange(i * batch, (i + 1) * batch, dtype=torch.int64)} for i in range(n)]

    def iter_torch_batches(self, **options):
        yield from self.batches


class NoSignal:
    def requested(self) -> bool:
        return False


def pause(storage: str, rounds: int) -> None:
    net = DenseNet(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64, num_classes=1000)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(2, 3, 64, 64)).sum().backward()
    optimizer.step()   # momentum buffers exist, as after any step
    state = {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3, "history": [],
             "config": {}, "step": 0}
    rows = np.random.default_rng(0).permutation(1_281_167).astype(np.int64)
    ours, ref = [], []
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = storage.rstrip("/") + "/pause" if storage else os.path.join(tmp, "run")
        os.makedirs(run_dir, exist_ok=True) if "://" not in run_dir else None
        for i in range(rounds):
            t = time.perf_counter()
            torch.save(state, os.path.join(tmp, "ref.pt"))
            ref.append(time.perf_counter() - t)
            t = time.perf_counter()
            checkpoint.save_inside(run_dir, {**state, "step": i + 1}, rows)
            ours.append(time.perf_counter() - t)
    mb = sum(v.numel() * v.element_size() for v in net.state_dict().values()) / 2**20
    print(f"pause per checkpoint inside an epoch, DenseNet-121 (weights {mb:.0f} MB + momentum), "
          f"{len(rows):,} row ids, to {storage or 'a local folder'}; median of {rounds}:")
    print(f"  reference torch.save to a local file  {np.median(ref):6.2f} s")
    print(f"  ours (checkpoint.save_inside)         {np.median(ours):6.2f} s   ratio {np.median(ref) / np.median(ours):.2f}x")
    print("  written in the training thread: " + ("under a second, no need to write asynchronously"
                                                   if np.median(ours) < 1 else "over a second: write asynchronously"))


def bookkeeping(steps: int, rounds: int) -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = C.from_args(["cifar10", "--arch", "densenet_bc", "--depth", "40", "--growth-rate", "12", "--batch-size",
                       "64", "--workers", "1", "--progress-s", "0"])
    net = from_config(cfg, 10, 3)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    shard, prepare, cpu = Batches(steps, 64, 32, 10), Prepare([0.5] * 3, [0.25] * 3, False, torch.device("cpu")), \
        torch.device("cpu")
    timed = {"without": [], "with": []}
    train_one_epoch(net, optimizer, scaler, shard, prepare, cfg, 0, steps, cpu)   # warm-up
    for _ in range(rounds):
        for name in timed:
            where = Position(0, 0.0, 1, 0, cpu, NoSignal()) if name == "with" else None
            if where:
                where.epoch_start(0)
            t = time.perf_counter()
            train_one_epoch(net, optimizer, scaler, shard, prepare, cfg, 0, steps, cpu, where=where,
                            on_checkpoint=lambda step, counts: None)
            timed[name].append(steps * 64 / (time.perf_counter() - t))
    without, with_ = np.median(timed["without"]), np.median(timed["with"])
    where, rows = Position(0, 0.0, 1, 0, cpu, NoSignal()), torch.arange(64)
    where.epoch_start(0)
    t = time.perf_counter()
    for step in range(1, 20_001):
        where.add(rows, step)
        where.due(step)
    per_step_us = (time.perf_counter() - t) / 20_000 * 1e6
    print(f"position bookkeeping, DenseNet-BC-40 k=12, 32 px, batch 64, {steps} steps a round, median of {rounds} "
          "interleaved rounds:")
    print(f"  without  {without:7.1f} img/s")
    print(f"  with     {with_:7.1f} img/s   ratio {with_ / without:.3f}x (goal >= 0.99)")
    print(f"  the bookkeeping alone: {per_step_us:.1f} us a step (row ids kept, SIGTERM polled)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storage", default="", help="where the checkpoints go (default: a local temporary folder)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40, help="training steps a round (bookkeeping)")
    args = parser.parse_args()
    pause(args.storage, args.rounds)
    bookkeeping(args.steps, args.rounds)


if __name__ == "__main__":
    main()
