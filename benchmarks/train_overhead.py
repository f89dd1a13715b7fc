"""What Ray Train costs: a plain single-process PyTorch loop against our Ray Train runs, same model,
same data, same augmentation, same global batch, same CPUs, steady-state images/s side by side.

    python benchmarks/train_overhead.py                                  # every row, real size (hours on 2 cores)
    python benchmarks/train_overhead.py --rows bc40 --images 20000 --epochs 3
    python benchmarks/train_overhead.py --rows bc40 --images 2000 --epochs 2    # a smoke run
    python benchmarks/train_overhead.py --rows bc40 --progress-overhead          # progress lines off vs every 1 s

Rows (issue 12): DenseNet-BC-40 k=12 and DenseNet-BC-100 k=12 at 32 px on CIFAR-like PNGs (crops of
scikit-learn's two photos, 10 classes, `cifar_train`: pad-4 crop + flip), and a small ImageNet-style
set of ~500x375 JPEGs at 224 px (`imagenet_train_crop_flip`; DenseNet-121's layout at k=12, a CPU's
budget). Each on 1 worker (all cores) and 2 workers (DDP over gloo, a core each).

The reference is what a user would run instead: the same network in one process on pre-decoded
uint8 tensors (decoded once, up front), the same augmentation drawn per batch in torch, torch on
every core. Ours streams the Parquet shards through Ray Data (decoding every epoch) and includes
the per-step bookkeeping (progress meter, step metrics at the default --progress-s); evaluation,
checkpoint and MLflow logging are outside its timed training pass. Steady state = the last epoch.

Diagnostic columns: `model ms` is the same step (forward, backward, SGD) measured here, in this
process, at the per-worker threads and batch (1 worker: all threads, the global batch; 2 workers:
one thread, half the batch); `other ms` is our measured step time less that: DDP's all-reduce, the
input pipeline's CPU taken from training, the iterator, bookkeeping, Ray's own processes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import ray
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from sample_data import make_images, to_shards  # noqa: E402  (real encoded images, their shards)
from densenet_ray import config as C  # noqa: E402
from densenet_ray import data, train  # noqa: E402
from densenet_ray.data import transforms  # noqa: E402
from densenet_ray.model import build  # noqa: E402

# name: (what, build() arch and overrides, train transform, image side, global batch, data kind)
ROWS = {
    "bc40": ("DenseNet-BC-40 k=12, 32 px PNG", ("densenet_bc", {"depth": 40, "growth_rate": 12}), "cifar_train", 32, 64,
             "png"),
    "bc100": ("DenseNet-BC-100 k=12, 32 px PNG", ("densenet_bc100_k12", {}), "cifar_train", 32, 64, "png"),
    "jpeg224": ("DenseNet-121 layout k=12, 224 px JPEG", ("densenet121", {"growth_rate": 12}),
                "imagenet_train_crop_flip", 224, 32, "jpeg"),
}


def load_decoded(root: str, split: str, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of `split` decoded once to uint8 NHWC: as stored for PNGs, the shorter side
    resized to side*256/224 and centre-cropped square for JPEGs (what random crops are drawn from)."""
    m = data.load_manifest(root)
    fs, paths = m.shard_paths(split)
    images, labels = [], []
    for path in paths:
        table = pq.read_table(path, filesystem=fs, columns=["image", "label"])
        for blob, label in zip(table["image"].to_pylist(), table["label"].to_pylist()):
            a = transforms.none(blob) if side == 32 else transforms.imagenet_eval(blob, round(side * 256 / 224))
            images.append(a)
            labels.append(label)
    return torch.from_numpy(np.stack(images)), torch.tensor(labels)


def augment(x: torch.Tensor, transform: str, side: int) -> torch.Tensor:
    """The train transform, drawn per image on a uint8 NHWC batch -> float NCHW (0..255)."""
    x = x.permute(0, 3, 1, 2).float()
    n = len(x)
    if transform == "cifar_train":   # pad 4, random crop of the original size
        padded = F.pad(x, (4, 4, 4, 4))
        dy, dx = torch.randint(0, 9, (2, n))
        x = torch.stack([padded[i, :, dy[i]:dy[i] + side, dx[i]:dx[i] + side] for i in range(n)])
    else:   # a random resized crop (scale 0.08..1) of the pre-decoded square
        out = []
        for img in x:
            s = img.shape[-1]
            area = s * s * float(torch.empty(1).uniform_(0.08, 1))
            ratio = float(torch.empty(1).uniform_(np.log(3 / 4), np.log(4 / 3)).exp())
            w, h = min(s, round((area * ratio) ** 0.5)), min(s, round((area / ratio) ** 0.5))
            t, l = int(torch.randint(0, s - h + 1, ())), int(torch.randint(0, s - w + 1, ()))
            out.append(F.interpolate(img[None, :, t:t + h, l:l + w], size=(side, side), mode="bilinear",
                                     antialias=True, align_corners=False)[0])
        x = torch.stack(out)
    flip = torch.rand(n) < 0.5
    x[flip] = x[flip].flip(-1)
    return x


def network(row: str, classes: int):
    arch, extra = ROWS[row][1]
    return build(arch, num_classes=classes, **extra)


def plain_loop(row: str, root: str, epochs: int) -> float:
    """Images/s of the last epoch of a single-process loop over pre-decoded images, every core."""
    _, _, transform, side, batch, _ = ROWS[row]
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    m = data.load_manifest(root)
    x_all, y_all = load_decoded(root, "train", side)
    model = network(row, m.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    mean = torch.tensor(m.mean).view(1, -1, 1, 1) * 255
    std = torch.tensor(m.std).view(1, -1, 1, 1) * 255
    rate = 0.0
    for epoch in range(epochs):
        t0, seen = time.perf_counter(), 0
        order = torch.randperm(len(y_all))
        for i in range(0, len(order) - batch + 1, batch):
            idx = order[i:i + batch]
            x = ((augment(x_all[idx], transform, side) - mean) / std).contiguous()
            loss = F.cross_entropy(model.train()(x), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(idx)
        rate = seen / (time.perf_counter() - t0)
        print(f"  plain loop epoch {epoch + 1}: {rate:.1f} img/s", flush=True)
    return rate


def model_step_ms(row: str, threads: int, batch: int, classes: int, steps: int = 12) -> float:
    """Median ms of one forward + backward + SGD step at `threads` torch threads and `batch` images."""
    _, _, _, side, _, _ = ROWS[row]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    model = network(row, classes).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    x, y = torch.randn(batch, 3, side, side), torch.randint(0, classes, (batch,))
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    torch.set_num_threads(before)
    return 1000 * float(np.median(times[2:]))


def ray_at_rest(seconds: float = 15.0) -> float:
    """Cores the local Ray's processes (this driver's descendants: GCS, raylet, dashboard and its
    agents, idle workers) use while no job runs: what they take from training on every core."""
    import psutil

    def used() -> dict[int, float]:
        times = {}
        for p in psutil.Process().children(recursive=True):
            try:
                t = p.cpu_times()
                times[p.pid] = t.user + t.system
            except psutil.Error:
                pass
        return times
    c0, t0 = used(), time.perf_counter()
    time.sleep(seconds)
    c1 = used()
    # processes alive at both samples: one that exited in between (a worker the run left) took its time with it
    return sum(c1[pid] - c0[pid] for pid in c1.keys() & c0.keys()) / (time.perf_counter() - t0)


def ray_run(row: str, root: str, epochs: int, workers: int, tmp: str, *extra: str) -> dict:
    """The last epoch's metrics of `python -m densenet_ray.train` on this data."""
    what, (arch, over), transform, side, batch, kind = ROWS[row]
    cpus = (os.cpu_count() or 1) / workers
    flags = ["cifar10" if kind == "png" else "imagenet", "--dataset", "custom", "--data", root, "--arch", arch,
             "--image-size", str(side), "--train-transform", transform, "--eval-transform", "imagenet_eval" if kind ==
             "jpeg" else "none", "--test-split", "none", "--epochs", str(epochs), "--batch-size", str(batch),
             "--reference-batch", str(batch), "--workers", str(workers), "--cpus-per-worker", f"{cpus:g}",
             "--storage", os.path.join(tmp, "runs"), "--mlflow-tracking-uri", f"sqlite:///{tmp}/mlflow.db",
             "--run-name", f"overhead-{row}-{workers}-{time.time_ns()}", "--max-failures", "0",
             "--lr-milestones", "0.5,0.75", *extra]
    for name, value in over.items():
        flags += [f"--{name.replace('_', '-')}", str(value)]
    return train.run(C.from_args(flags)).metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="bc40,bc100,jpeg224", help="comma-separated: " + ", ".join(ROWS))
    parser.add_argument("--images", type=int, default=20000, help="PNG rows: images made (a tenth held out)")
    parser.add_argument("--jpeg-images", type=int, default=2000, help="the 224 px row: JPEGs made")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", default="1,2", help="worker layouts to run")
    parser.add_argument("--progress-overhead", action="store_true",
                        help="instead: 2 workers with progress lines and step metrics off (--progress-s 0) and every "
                             "second (--progress-s 1, 30x the default's rate), in interleaved rounds")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    rows = [r.strip() for r in args.rows.split(",")]
    layouts = [int(w) for w in args.workers.split(",")]

    table = []
    with tempfile.TemporaryDirectory() as tmp:
        # Every dataset first: the images are made in a process pool, whose children must not inherit
        # the signal handlers Ray installs.
        sizes = {kind: args.jpeg_images if kind == "jpeg" else args.images for kind in {ROWS[r][5] for r in rows}}
        folders = {kind: make_images(os.path.join(tmp, f"{kind}-src"), kind, n) for kind, n in sizes.items()}
        shards = {kind: to_shards(folders[kind], os.path.join(tmp, kind), holdout=n // 10) for kind, n in sizes.items()}
        roots = {row: shards[ROWS[row][5]] for row in rows}
        # A fresh Ray for training, as the training driver starts it for the largest run here (one worker on
        # every core): workers that ran conversion tasks have aborted later (abseil "Mutex corrupt") here.
        ray.shutdown()
        train.connect(C.PRESETS["digits"].replace(workers=1, cpus_per_worker=os.cpu_count() or 1))
        print(f"{os.cpu_count()} CPUs, torch {torch.__version__}, {args.epochs} epochs; steady state = the last",
              flush=True)
        for row in rows:
            what, _, _, side, batch, kind = ROWS[row]
            root = roots[row]
            m = data.load_manifest(root)
            print(f"\n{what}: {m.split('train').rows} train images, global batch {batch}", flush=True)
            if args.progress_overhead:
                progress_overhead(args, row, root, tmp)
                continue
            print(f"  Ray's processes at rest: {ray_at_rest():.2f} cores", flush=True)
            plain = plain_loop(row, root, args.epochs)
            table.append((what, "plain loop (pre-decoded)", plain, 1.0, "", ""))
            for workers in layouts:
                metrics = ray_run(row, root, args.epochs, workers, tmp)
                print(f"  Ray's processes at rest after the run: {ray_at_rest():.2f} cores", flush=True)
                rate = metrics["images_per_s"]
                threads, per_batch = max(1, (os.cpu_count() or 1) // workers), batch // workers
                model_ms = model_step_ms(row, threads, per_batch, m.num_classes)
                step_ms = 1000 * per_batch / metrics["images_per_s_per_worker"]
                table.append((what, f"Ray Train, {workers} worker{'s' * (workers > 1)}", rate, rate / plain,
                              f"{model_ms:.0f}", f"{step_ms - model_ms:.0f}"))
                print(f"  {workers} worker(s): {rate:.1f} img/s, data wait {metrics.get('data_wait_frac', 0):.1%}, "
                      f"step {step_ms:.0f} ms of which the model's own {model_ms:.0f} ms", flush=True)
    if table:
        print(f"\n{'workload':<40}{'run':<28}{'img/s':>8}{'ratio':>7}{'model ms':>10}{'other ms':>10}")
        for what, run, rate, ratio, model_ms, other in table:
            print(f"{what:<40}{run:<28}{rate:>8.1f}{ratio:>7.2f}{model_ms:>10}{other:>10}")
        print("\nGoal: >= 0.95x the plain loop on every row (the best of our layouts counts).")


def progress_overhead(args, row: str, root: str, tmp: str) -> None:
    """Steady-state images/s of 2 workers with progress reporting off and every second, interleaved
    (off, on, off, on, ...) so that the machine's drift hits both alike."""
    rates = {"0": [], "1": []}
    for r in range(args.rounds):
        for every in ("0", "1"):
            rate = ray_run(row, root, args.epochs, 2, tmp, "--progress-s", every)["images_per_s"]
            rates[every].append(rate)
            print(f"  round {r + 1}, --progress-s {every}: {rate:.1f} img/s", flush=True)
    off, on = (sum(rates[k]) / len(rates[k]) for k in ("0", "1"))
    print(f"\n{'run':<40}{'img/s':>9}{'ratio':>8}")
    print(f"{'Ray Train, 2 workers, --progress-s 0':<40}{off:>9.1f}{1.0:>8.2f}")
    print(f"{'Ray Train, 2 workers, --progress-s 1':<40}{on:>9.1f}{on / off:>8.3f}")
    print(f"\nprogress reporting every second costs {(1 - on / off):.1%} (goal: under 1% at the default 30 s)")


if __name__ == "__main__":
    main()
