"""The input ceiling (issue 12): how many images per second per CPU core our input pipeline delivers
to a training worker whose model costs nothing, against the most this CPU does per core.

    python benchmarks/input_ceiling.py                        # both rows: 3,000 JPEGs, 30,000 PNGs, 4 epochs
    python benchmarks/input_ceiling.py --rows jpeg --jpeg-images 5000 --epochs 5
    python benchmarks/input_ceiling.py --quick                # a smoke run: a few hundred images, 2 epochs
    python benchmarks/input_ceiling.py --order rows --shuffle-buffer 0   # every row as CIFAR's presets read
    python benchmarks/input_ceiling.py --rows jpeg --jpeg-images 9000 --epochs 3 --spy 30   # + py-spy by process

Ours is the real training path: a 1-worker Ray Train TorchTrainer fed by
`read_split(root, "train", transform, image_size=..., order=..., seed=0)` with
`dataset_config()`, consumed with `iter_torch_batches(batch_size=..., drop_last=True,
prefetch_batches=2, local_shuffle_buffer_size=...)` as loop.train_one_epoch does, in the order and
buffer of the row's preset (JPEG: imagenet's row_groups + 2,048 rows; PNG: cifar10's rows, no
buffer) unless --order / --shuffle-buffer say otherwise; the worker's model is a linear layer over a
strided global average pool of the uint8 batch, so the worker asks for the next batch at once.
Local Ray as the training driver makes it (runtime.connect): a logical CPU for the worker plus two,
at least one per core, so Ray Data's read and decode tasks run on every core but the worker's.
Rows: ImageNet-like ~500x375 JPEGs (q90) with `imagenet_train` at 224 px (batch 256, the recipe's
per-GPU batch) and CIFAR-like 32x32 PNGs with `cifar_train` at 32 px (batch 64).

The reference is the most this CPU does: one process on ONE core (torch.set_num_threads(1)),
doing only decode + augment with the same functions (transforms.TRANSFORMS[transform](bytes, size,
rng, mode)) over the same encoded bytes, read once from the shards into memory; best of two timed
passes. Ours is divided by os.cpu_count() (Ray Data's tasks run on all of them): ratio = ours per
core / reference per core. Goal: >= 0.8x.

Columns: `epoch` is images / the whole epoch (with its start-up: order="rows" reads and shuffles
the split's encoded rows before the first batch; on a few thousand images that weighs much more
than on ImageNet's 1.28M), `after 1st` is images after the first batch / the time from the first
batch to the last (the decode-bound rate); both the best of the epochs after the first. `CPU
ms/img` is process CPU time (user + system) per image: time.process_time() for the reference;
for ours, psutil over every process of the local Ray (the driver and all its descendants: GCS,
raylet, the training worker, Ray Data's task workers), sampled by the worker at its epoch's start
and end (a process that exits and is reaped counts in its parent's children times). Unlike
wall-clock rates it holds still when other jobs share the machine.

Then the cores a GPU needs at our per-core rate (and at the reference's): DenseNet-121 at 3,376
img/s (AMP + channels_last, batch 256, one H200, measured earlier) from the JPEG row, and
DenseNet-BC-100 k=12 at 32 px at an assumed 1,600 img/s from the PNG row.

And, for each row, the anatomy of one read task, in this process: CPU ms per image to read its row
group from the shard, decode + augment it (pipeline.decode_batch), make the Arrow block and
serialise it (what Ray does with a task's output), against the transform alone; what the task
processes spend beyond these sums is Ray's (task dispatch, the object store, idle workers).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from sample_data import make_images, to_shards  # noqa: E402

# name: (what, data kind, train transform, image side, batch, GPU appetite img/s and whose, preset)
ROWS = {
    "jpeg": ("ImageNet-like JPEG, imagenet_train 224", "jpeg", "imagenet_train", 224, 256,
             (3376, "DenseNet-121, AMP + channels_last, batch 256, one H200 (measured)"), "imagenet"),
    "png": ("CIFAR-like PNG, cifar_train 32", "png", "cifar_train", 32, 64,
            (1600, "DenseNet-BC-100 k=12 at 32 px (assumed)"), "cifar10"),
}


def worker_loop(config: dict) -> None:
    """The training worker: every epoch, its shard through iter_torch_batches as train_one_epoch
    consumes it, into a model that costs nothing; per-epoch figures to config["out"] (JSON lines)."""
    import psutil
    import ray.train

    torch.set_num_threads(1)
    model = torch.nn.Linear(config["channels"], config["classes"])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    shard = ray.train.get_dataset_shard("train")
    ray_root = psutil.Process(config["driver_pid"])

    me = os.getpid()

    def cpu_s():
        """CPU seconds so far of every process of the local Ray, by role (see ROLES)."""
        total = dict.fromkeys(ROLES, 0.0)
        for p in [ray_root, *ray_root.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total[role(p, me, ray_root.pid)] += t.user + t.system + t.children_user + t.children_system
            except psutil.Error:
                pass
        return total

    for epoch in range(config["epochs"]):
        c0, t0, first, n, n_first = cpu_s(), time.perf_counter(), None, 0, 0
        for batch in shard.iter_torch_batches(batch_size=config["batch"], drop_last=True, prefetch_batches=2,
                                              local_shuffle_buffer_size=config["buffer"] or None):
            x, y = batch["image"], batch["label"]
            # every 4th pixel each way: what a real worker does with the batch is the GPU's business
            pooled = x[:, ::4, ::4].float().mean((1, 2)) / 255
            loss = torch.nn.functional.cross_entropy(model(pooled), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if first is None:
                first, n_first = time.perf_counter(), len(y)
            n += len(y)
        end = time.perf_counter()
        row = {"epoch": epoch, "images": n, "epoch_s": end - t0, "first_s": (first or end) - t0,
               # a rate over fewer than 3 batches says nothing: they may all have been prefetched
               "after_first": (n - n_first) / (end - first) if n - n_first >= 3 * config["batch"] else None,
               "cpu_by_role": {k: v - c0[k] for k, v in cpu_s().items()}}
        row["cpu_s"] = sum(row["cpu_by_role"].values())
        with open(config["out"], "a") as f:
            f.write(json.dumps(row) + "\n")


# Where the CPU of our pipeline goes: the processes of the local Ray by role.
ROLES = ("training worker", "Ray Data tasks", "Ray Data coordinator", "Ray Train controller", "Ray daemons",
         "driver")


def role(p, worker_pid: int, driver_pid: int) -> str:
    """The ROLES entry of process `p` (a psutil.Process of the local Ray)."""
    if p.pid == worker_pid:
        return "training worker"
    if p.pid == driver_pid:
        return "driver"
    title = " ".join(p.cmdline()[:2])
    if "SplitCoordinator" in title:
        return "Ray Data coordinator"
    if "TrainController" in title or "RayTrainWorker" in title:
        return "Ray Train controller"
    if title.startswith("ray::") or "default_worker.py" in title or "setup_worker.py" in title:
        return "Ray Data tasks"   # task workers (read, shuffle, decode) and idle ones: one pool
    return "Ray daemons"   # raylet, gcs_server, dashboard and its agents, log monitor


def spy_on(seconds: float, after_s: float, tmp: str, found: dict) -> None:
    """In a thread while ours() runs: `after_s` after the training worker starts, py-spy (on-CPU
    samples only) on every Python process of the local Ray but the driver for `seconds`; into
    `found`: {role: {what: (CPU s, [commonest innermost frames])}} (see what_it_does)."""
    import collections

    import psutil

    import spy

    driver = psutil.Process()
    deadline = time.time() + 600
    while time.time() < deadline and not any("RayTrainWorker" in " ".join(p.cmdline()[:2])
                                             for p in driver.children(recursive=True) if _alive(p)):
        time.sleep(0.5)
    time.sleep(after_s)
    worker = next((p.pid for p in driver.children(recursive=True) if _alive(p)
                   and "RayTrainWorker" in " ".join(p.cmdline()[:2])), -1)
    targets = {}
    for p in driver.children(recursive=True):
        try:
            title = " ".join(p.cmdline()[:2])
            if p.name() != "py-spy" and ("python" in p.name() or title.startswith("ray::")):
                targets[p.pid] = (role(p, worker, driver.pid), os.path.join(tmp, f"spy-{p.pid}.txt"))
        except psutil.Error:
            pass
    rate = 25
    procs = [spy.record(pid, seconds, out, idle=False, rate=rate) for pid, (_, out) in targets.items()]
    for proc in procs:
        proc.wait()
    samples = collections.defaultdict(collections.Counter)
    leaves = collections.defaultdict(lambda: collections.defaultdict(collections.Counter))
    for pid, (who, out) in targets.items():
        for _, frames, count in spy.stacks(out):
            what = what_it_does(frames)
            samples[who][what] += count
            leaves[who][what][frames[-1].rsplit(":", 1)[0] + ")" if frames else "?"] += count
    found.update({who: {what: (n / rate, [f"{leaf} {k / n:.0%}" for leaf, k in leaves[who][what].most_common(5)])
                        for what, n in counter.most_common()} for who, counter in samples.items()})


def _alive(p) -> bool:
    try:
        return bool(p.cmdline())
    except Exception:
        return False


def what_it_does(frames: list[str]) -> str:
    """What a sampled stack (root first, py-spy's "function (file:line)") was doing, by the code it ran."""
    text = ";".join(frames)
    if "decode_batch" in text:
        return "decode + augment (our decode_batch)"
    if "densenet_ray/" in text and "read_row_group" in text:
        return "our read task, besides decoding (read, Arrow)"
    if "worker_loop" in text and "iter_torch_batches" not in text and "ray/data/" not in text:
        return "the benchmark's model step"
    if "ray/data/" in text:
        return "Ray Data (" + ("iterator, batching, shuffle buffer" if "iterator" in text or "batcher" in text
                              else "executor, operators, block handling") + ")"
    if "ray/" in text:
        return "Ray core (task execution, object store, RPC)"
    return "other (" + (frames[-1].split(" (")[0] if frames else "?") + ")"


def ours(root: str, transform: str, side: int, batch: int, epochs: int, tmp: str, order: str = "rows",
         buffer: int = 0) -> list[dict]:
    """Per-epoch figures of a 1-worker TorchTrainer reading `root` through read_split."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from densenet_ray import data

    m = data.load_manifest(root)
    out = os.path.join(tmp, f"epochs-{time.time_ns()}.jsonl")
    context = ray.data.DataContext.get_current()
    context.print_on_execution_start = False
    context.enable_progress_bars = False
    ds = data.read_split(root, "train", transform, image_size=side, order=order, seed=0, manifest=m)
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"epochs": epochs, "batch": batch, "channels": m.channels, "classes": m.num_classes,
                           "out": out, "driver_pid": os.getpid(), "buffer": buffer},
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name=f"ceiling-{time.time_ns()}", storage_path=os.path.join(tmp, "runs"),
                                       logging_config=ray.train.LoggingConfig("WARNING")),
        datasets={"train": ds}, dataset_config=data.dataset_config())
    trainer.fit()
    with open(out) as f:
        return [json.loads(line) for line in f]


def encoded(root: str) -> tuple[list[bytes], str]:
    """The train split's encoded images, read once into memory, and the decode mode."""
    from densenet_ray import data

    m = data.load_manifest(root)
    fs, paths = m.shard_paths("train")
    blobs = [b for p in paths for b in pq.read_table(p, filesystem=fs, columns=["image"])["image"].to_pylist()]
    return blobs, "L" if m.channels == 1 else "RGB"


def reference(root: str, transform: str, side: int, seconds: float) -> tuple[float, float]:
    """(images/s, CPU ms per image) of decode + augment alone on one core, best of two passes of
    at least `seconds` each over the split's encoded bytes."""
    from densenet_ray.data import TRANSFORMS

    fn = TRANSFORMS[transform]
    blobs, mode = encoded(root)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # _resize runs torch's interpolate: one core, as each Ray Data task has
    rng = np.random.default_rng(0)
    best = (0.0, float("inf"))
    for _ in range(2):
        n, t0, c0 = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - t0 < seconds or n < len(blobs) // 4:
            fn(blobs[n % len(blobs)], side, rng, mode)
            n += 1
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        best = max(best, (n / wall, 1000 * cpu / n))
    torch.set_num_threads(threads)
    return best


def anatomy(root: str, transform: str, side: int) -> dict[str, float]:
    """CPU ms per image of each part of a read task (pipeline.read_row_group) over the split's row
    groups, in this process on one thread, and of the transform alone on the same images."""
    import pickle

    from ray.data.block import BlockAccessor

    from densenet_ray import data
    from densenet_ray.data import TRANSFORMS, pipeline

    m = data.load_manifest(root)
    fs, paths = m.shard_paths("train")
    size, shape = pipeline.batch_shape(m, "train", transform, side)
    mode = "L" if m.channels == 1 else "RGB"
    fn, rng = TRANSFORMS[transform], np.random.default_rng(0)
    parts = dict.fromkeys(("read", "decode + augment", "Arrow block", "serialise", "transform alone"), 0.0)
    threads, n = torch.get_num_threads(), 0
    torch.set_num_threads(1)

    def timed(part, f, *a, **kw):
        c = time.process_time()
        out = f(*a, **kw)
        parts[part] += time.process_time() - c
        return out

    for path in paths:
        with fs.open_input_file(path) as f:
            groups = pq.ParquetFile(f)
            for g in range(min(groups.num_row_groups, 8)):   # 8 row groups a shard: thousands of images
                t = timed("read", groups.read_row_group, g, columns=["image", "label", "key"])
                columns = {c: t[c].to_numpy(zero_copy_only=False) for c in t.column_names}
                out = timed("decode + augment", pipeline.decode_batch, columns, transform=transform, size=size,
                            mode=mode, shape=shape, classes=m.num_classes, keep_key=False)
                block = timed("Arrow block", BlockAccessor.batch_to_block, out)
                timed("serialise", pickle.dumps, block, protocol=5)
                timed("transform alone", lambda: [fn(x, size, rng, mode) for x in columns["image"]])
                n += len(t)
    torch.set_num_threads(threads)
    return {k: 1000 * v / n for k, v in parts.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="jpeg,png", help="comma-separated: " + ", ".join(ROWS))
    p.add_argument("--jpeg-images", type=int, default=3000, help="JPEGs made (a tenth held out)")
    p.add_argument("--png-images", type=int, default=30000, help="PNGs made (a tenth held out)")
    p.add_argument("--epochs", type=int, default=4, help="epochs of ours; the first (start-up) is not counted")
    p.add_argument("--ref-seconds", type=float, default=15, help="each reference pass runs at least this long")
    p.add_argument("--batch", type=int, default=None, help="every row's batch (default: the row's, 256 or 64)")
    p.add_argument("--order", default=None, choices=("rows", "row_groups"),
                   help="the train order (--shuffle) of every row (default: the row's preset's)")
    p.add_argument("--shuffle-buffer", type=int, default=None,
                   help="rows in the worker's local shuffle buffer (default: the row's preset's)")
    p.add_argument("--spy", type=float, default=0, metavar="SECONDS",
                   help="also py-spy (needs py-spy) every Python process of Ray but the driver for SECONDS, 30 s into "
                        "each row's run: what the CPU of each role is spent on (its CPU ms/img in that epoch is "
                        "then inflated by py-spy's reading)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 800 JPEGs, 2,000 PNGs, batch 64, 2 epochs, 2 s reference passes")
    args = p.parse_args()
    if args.quick:
        args.jpeg_images, args.png_images, args.epochs, args.ref_seconds = 800, 2000, 2, 2
        args.batch = args.batch or 64
    rows = [r.strip() for r in args.rows.split(",")]
    if unknown := [r for r in rows if r not in ROWS]:
        p.error(f"--rows {','.join(unknown)}: expected some of {', '.join(ROWS)}")
    if args.epochs < 2:
        p.error("--epochs: at least 2 (the first includes start-up and is not counted)")
    cores = os.cpu_count() or 1

    import ray

    from densenet_ray import config, runtime

    table = []
    with tempfile.TemporaryDirectory() as tmp:
        folders = {}
        for row in rows:   # every image before Ray starts: the pool's children must not inherit Ray's handlers
            kind = ROWS[row][1]
            n = args.jpeg_images if kind == "jpeg" else args.png_images
            t = time.perf_counter()
            folders[row] = (make_images(os.path.join(tmp, f"{kind}-src"), kind, n), n)
            print(f"made {n} {kind.upper()}s in {time.perf_counter() - t:.0f} s", flush=True)
        # Shards in a Ray of their own, shut down before training starts: twice here a Ray worker process that
        # had run a conversion task later aborted (abseil "Mutex corrupt") while the training pipeline used it
        # (Ray retried its task).
        roots = {row: to_shards(folder, os.path.join(tmp, ROWS[row][1]), holdout=n // 10)
                 for row, (folder, n) in folders.items()}
        ray.shutdown()
        runtime.connect(cpus=1 + 2, quiet=True)   # as train.connect: the worker's CPU plus two, at least the cores
        print(f"{cores} CPUs, torch {torch.__version__}, Ray's logical CPUs: "
              f"{runtime.cluster_cpus():g} (1 for the worker); {args.epochs} epochs, the first not counted",
              flush=True)
        for row in rows:
            what, kind, transform, side, batch, _, preset_name = ROWS[row]
            root, batch = roots[row], args.batch or batch
            ref_rate, ref_cpu = reference(root, transform, side, args.ref_seconds)
            print(f"\n{what}: reference (1 core) {ref_rate:.1f} img/s, {ref_cpu:.2f} CPU ms/img", flush=True)
            preset = config.PRESETS[preset_name]
            order = args.order or preset.shuffle
            buffer = preset.shuffle_buffer if args.shuffle_buffer is None else args.shuffle_buffer
            parts = anatomy(root, transform, side)
            print("  one read task, CPU ms/img in this process: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in parts.items()), flush=True)
            print(f"  ours: --shuffle {order} --shuffle-buffer {buffer} (the {preset_name} preset's"
                  f"{'' if (order, buffer) == (preset.shuffle, preset.shuffle_buffer) else ', overridden'})",
                  flush=True)
            found: dict = {}
            if args.spy:
                import threading

                watcher = threading.Thread(target=spy_on, args=(args.spy, 30, tmp, found))
                watcher.start()
            epochs = ours(root, transform, side, batch, args.epochs, tmp, order, buffer)
            if args.spy:
                watcher.join()
                print(f"  py-spy, {args.spy:g} s, CPU seconds by process role and what it ran:")
                for who, parts in found.items():
                    total = sum(cpu for cpu, _ in parts.values())
                    print(f"    {who}: {total:.1f} CPU s")
                    for part, (cpu, inner) in parts.items():
                        if cpu / total >= 0.02:
                            print(f"      {part:<52}{cpu / total:6.1%}   innermost: {' | '.join(inner)}")
            for e in epochs:
                print(f"  epoch {e['epoch'] + 1}: {e['images']} images in {e['epoch_s']:.1f} s (first batch after "
                      f"{e['first_s']:.1f} s): {e['images'] / e['epoch_s']:.1f} img/s, "
                      f"{e['after_first'] or float('nan'):.1f} after the first batch, "
                      f"{1000 * e['cpu_s'] / max(e['images'], 1):.2f} CPU ms/img", flush=True)
            steady = epochs[1:]
            roles = {k: sum(e["cpu_by_role"][k] for e in steady) / sum(e["images"] for e in steady) * 1000
                     for k in ROLES}
            print("  CPU ms/img by process (epochs after the first): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in roles.items()), flush=True)
            rate = max(e["images"] / e["epoch_s"] for e in steady)
            after = max((e["after_first"] or 0) for e in steady) or float("nan")   # nan: one batch an epoch
            cpu = min(1000 * e["cpu_s"] / max(e["images"], 1) for e in steady)
            table.append((row, what, batch, ref_rate, ref_cpu, rate, after, cpu))

    print(f"\n{'row':<40}{'batch':>6}{'ref img/s/core':>16}{'ours img/s/core':>17}{'ratio':>7}"
          f"{'after 1st':>11}{'ratio':>7}{'CPU ms/img ref':>16}{'ours':>7}{'ratio':>7}")
    for row, what, batch, ref_rate, ref_cpu, rate, after, cpu in table:
        print(f"{what:<40}{batch:>6}{ref_rate:>16.1f}{rate / cores:>17.1f}{rate / cores / ref_rate:>6.2f}x"
              f"{after / cores:>11.1f}{after / cores / ref_rate:>6.2f}x{ref_cpu:>16.2f}{cpu:>7.2f}"
              f"{ref_cpu / cpu:>6.2f}x")
    print(f"\nours per core = img/s / {cores} cores; ratio = ours per core / the reference's (CPU: ref ms / ours ms). "
          "Goal: >= 0.8x.")
    for row, what, batch, ref_rate, _, rate, after, _ in table:
        appetite, whose = ROWS[row][5]
        print(f"cores a GPU needs, {whose}, {appetite:,} img/s: {appetite / (rate / cores):.1f} at ours per core "
              f"(whole epochs), {appetite / (after / cores):.1f} after the first batch, "
              f"{appetite / ref_rate:.1f} at the reference's")


if __name__ == "__main__":
    main()
