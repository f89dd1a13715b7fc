"""What Ray Train costs: a plain single-process PyTorch loop against our Ray Train run, same model,
same data, same CPUs, steady-state images/s side by side.

    python benchmarks/train_overhead.py                          # DenseNet-BC-100 k=12 on digits at 32x32
    python benchmarks/train_overhead.py --arch densenet_bc --depth 40 --growth-rate 12 --image-size 16 --epochs 3
    python benchmarks/train_overhead.py --progress-overhead ...   # 2 workers, progress lines off vs every 1 s

The plain loop is the most favourable reference: every image decoded once into memory up front,
then shuffle, batch, normalise and step, with torch using every core. Ours streams the Parquet
shards through Ray Data (decoding every epoch) into 1 worker (all cores) or 2 workers (DDP over
gloo, one core each), and includes its per-epoch evaluation's share of data waiting, checkpoint and
MLflow logging outside the timed training pass. Steady state = the last epoch (the first pays for
start-up and warm-up).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from densenet_ray import config as C  # noqa: E402
from densenet_ray import data, train  # noqa: E402
from densenet_ray.data import sources, write  # noqa: E402
from densenet_ray.model import build  # noqa: E402


def load_decoded(root: str, split: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    m = data.load_manifest(root)
    fs, paths = m.shard_paths(split)
    images, labels = [], []
    for path in paths:
        table = pq.read_table(path, filesystem=fs, columns=["image", "label"])
        for blob, label in zip(table["image"].to_pylist(), table["label"].to_pylist()):
            img = Image.open(io.BytesIO(blob)).convert("L" if m.channels == 1 else "RGB").resize((size, size))
            images.append(np.asarray(img).reshape(size, size, m.channels))
            labels.append(label)
    return torch.from_numpy(np.stack(images)), torch.tensor(labels)


def plain_loop(args, root: str) -> float:
    """Images/s of the last epoch of a single-process loop over pre-decoded images."""
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    m = data.load_manifest(root)
    x_all, y_all = load_decoded(root, "train", args.image_size)
    model = build(args.arch, num_classes=m.num_classes, in_channels=m.channels, **overrides(args))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    mean = torch.tensor(m.mean).view(1, -1, 1, 1) * 255
    std = torch.tensor(m.std).view(1, -1, 1, 1) * 255
    rate = 0.0
    for epoch in range(args.epochs):
        t0, seen = time.perf_counter(), 0
        order = torch.randperm(len(y_all))
        for i in range(0, len(order) - args.batch_size + 1, args.batch_size):
            idx = order[i:i + args.batch_size]
            x = ((x_all[idx].permute(0, 3, 1, 2).float() - mean) / std).contiguous()
            loss = F.cross_entropy(model.train()(x), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(idx)
        rate = seen / (time.perf_counter() - t0)
        print(f"  plain loop epoch {epoch + 1}: {rate:.1f} img/s", flush=True)
    return rate


def overrides(args) -> dict:
    return {k: v for k, v in {"depth": args.depth, "growth_rate": args.growth_rate}.items() if v}


def ray_run(args, root: str, workers: int, tmp: str, *extra: str) -> float:
    cpus = (os.cpu_count() or 1) / workers
    flags = ["digits", "--data", root, "--arch", args.arch, "--image-size", str(args.image_size),
             "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--workers", str(workers),
             "--cpus-per-worker", f"{cpus:g}", "--storage", os.path.join(tmp, "runs"),
             "--mlflow-tracking-uri", f"sqlite:///{tmp}/mlflow.db", "--run-name", f"overhead-{workers}-{time.time_ns()}",
             "--max-failures", "0", "--lr-milestones", "0.5,0.75", *extra]
    for name, value in overrides(args).items():
        flags += [f"--{name.replace('_', '-')}", str(value)]
    result = train.run(C.from_args(flags))
    return result.metrics["images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="densenet_bc100_k12")
    parser.add_argument("--depth", type=int, default=None)
    parser.add_argument("--growth-rate", type=int, default=None)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--progress-overhead", action="store_true",
                        help="instead: 2 workers with progress lines and step metrics off (--progress-s 0) and every "
                             "second (--progress-s 1, 30x the default's rate), in interleaved rounds")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    # The local Ray the training driver starts for the largest run here (one worker on every core),
    # before the conversion's tasks would start a smaller one.
    train.connect(C.PRESETS["digits"].replace(workers=1, cpus_per_worker=os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "digits")
        write.convert(sources.digits(), root, progress=False)
        print(f"{args.arch} at {args.image_size}x{args.image_size}, global batch {args.batch_size}, "
              f"{os.cpu_count()} CPUs, torch {torch.__version__}", flush=True)
        if args.progress_overhead:
            return progress_overhead(args, root, tmp)
        plain = plain_loop(args, root)
        rows = [("plain PyTorch loop (pre-decoded)", plain)]
        for workers in (1, 2):
            rows.append((f"Ray Train, {workers} worker{'s' * (workers > 1)}", ray_run(args, root, workers, tmp)))
    print(f"\n{'run':<36}{'img/s':>9}{'ratio':>8}")
    for name, rate in rows:
        print(f"{name:<36}{rate:>9.1f}{rate / plain:>8.2f}")
    print("\nGoal: Ray Train >= 0.90x the plain loop's steady-state throughput.")


def progress_overhead(args, root: str, tmp: str) -> None:
    """Steady-state images/s of 2 workers with progress reporting off and every second, interleaved
    (off, on, off, on, ...) so that the machine's drift hits both alike."""
    rates = {"0": [], "1": []}
    for r in range(args.rounds):
        for every in ("0", "1"):
            rate = ray_run(args, root, 2, tmp, "--progress-s", every)
            rates[every].append(rate)
            print(f"  round {r + 1}, --progress-s {every}: {rate:.1f} img/s", flush=True)
    off, on = (sum(rates[k]) / len(rates[k]) for k in ("0", "1"))
    print(f"\n{'run':<40}{'img/s':>9}{'ratio':>8}")
    print(f"{'Ray Train, 2 workers, --progress-s 0':<40}{off:>9.1f}{1.0:>8.2f}")
    print(f"{'Ray Train, 2 workers, --progress-s 1':<40}{on:>9.1f}{on / off:>8.3f}")
    print(f"\nprogress reporting every second costs {(1 - on / off):.1%} (goal: under 1% at the default 30 s)")


if __name__ == "__main__":
    main()
