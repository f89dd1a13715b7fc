"""Images/s from stored images to training-ready ImageNet batches: torchvision's ImageFolder +
DataLoader against our shards + Ray Data, on the same number of CPUs, in one run.

    python benchmarks/data_throughput.py                        # 4,000 images, every CPU
    python benchmarks/data_throughput.py --images 6000 --cpus 4 --max-side 320

Both pipelines do RandomResizedCrop(224) + horizontal flip, batch 256. torchvision decodes, crops
and normalises to float in N DataLoader workers; ours decodes and crops to uint8 on N Ray CPUs and
leaves normalising to the training device (a GPU in real runs); one row also normalises on this
CPU, in the consuming process, to show that cost. The images are made here: crops and rescales of scikit-learn's two sample photos
at ImageNet's typical ~500x375, JPEG quality 90, in ImageFolder layout for torchvision, converted
to shards for us (once at the original size, once with --max-side). After a warm-up epoch each,
the pipelines take turns for --epochs epochs; we print medians of: img/s from each epoch's first
batch to its last (steady state, the rate an ImageNet epoch of 1.28M images runs at), img/s over
the whole epoch (with per-epoch start-up, which weighs on a few thousand images), and CPU time
per image summed over the pipeline's processes (driver, DataLoader workers or Ray's processes),
which holds still when other jobs share the machine and wall-clock rates do not.
"""

import argparse
import os
import sys
import tempfile
import time
from multiprocessing import Pool

import numpy as np
import psutil
import torch
from PIL import Image
from sklearn.datasets import load_sample_images

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZES = [(500, 375), (375, 500), (500, 333), (500, 400), (400, 300), (640, 480), (333, 500)]


def make_image(args):
    """One ~500x375 quality-90 JPEG: a random crop of a sample photo, rescaled."""
    path, seed = args
    rng = np.random.default_rng(seed)
    src = load_sample_images().images[seed % 2]
    h, w = int(rng.integers(213, 428)), int(rng.integers(320, 641))
    y, x = int(rng.integers(0, 428 - h)), int(rng.integers(0, 641 - w))
    img = Image.fromarray(src[y:y + h, x:x + w]).resize(SIZES[seed % len(SIZES)], Image.BICUBIC)
    img.save(path, quality=90)


def make_folder(root, n, classes=10):
    jobs = []
    for c in range(classes):
        os.makedirs(os.path.join(root, "train", f"class{c:02d}"))
        jobs += [(os.path.join(root, "train", f"class{c:02d}", f"{i:06d}.JPEG"), i) for i in range(c, n, classes)]
    with Pool() as pool:
        pool.map(make_image, jobs, chunksize=64)


def cpu_seconds(pids):
    """CPU time (user + system) used so far by the live processes among `pids`."""
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def timed(batches, normalise, pids):
    """(img/s first batch to last, img/s whole epoch, CPU ms per image over `pids()`) of one epoch."""
    cpu0, start = cpu_seconds(pids()), time.perf_counter()
    first, n = None, 0
    for x in batches:
        x = normalise(x)
        if first is None:
            first, n0 = time.perf_counter(), len(x)
        n += len(x)
    end = time.perf_counter()
    return (n - n0) / (end - first), n / (end - start), 1000 * (cpu_seconds(pids()) - cpu0) / n


def torchvision_epochs(root, cpus, batch):
    """A function that runs one epoch of the reference pipeline (persistent workers)."""
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                             transforms.PILToTensor(), transforms.ConvertImageDtype(torch.float),
                             transforms.Normalize(MEAN, STD)])
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(os.path.join(root, "train"), tf), batch_size=batch,
                                         shuffle=True, num_workers=cpus, persistent_workers=True)
    next(iter(loader))   # start the workers, so their pids are known
    workers = {w.pid for w in loader._iterator._workers}
    return workers, lambda: timed((x for x, _ in loader), lambda x: x, lambda: {os.getpid()} | workers)


def ray_epochs(root, batch, exclude, normalise):
    """A function that runs one epoch of ours. Batches leave it as uint8 NHWC; training normalises
    them on its device (a GPU: free here). normalise=True does that on this CPU, in the timing."""
    from densenet_ray import data

    m = data.load_manifest(root)
    mean = torch.tensor(m.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(m.std).view(1, 3, 1, 1) * 255
    ds = data.read_split(root, "train", "imagenet_train")
    ours = lambda: {p.pid for p in psutil.Process().children(recursive=True)} - exclude | {os.getpid()}   # noqa: E731
    # float first, then an NCHW view of the channels-last memory: no transposing copy
    on_device = (lambda x: x.float().permute(0, 3, 1, 2).sub_(mean).div_(std)) if normalise else (lambda x: x)
    return lambda: timed((b["image"] for b in ds.iter_torch_batches(batch_size=batch)), on_device, ours)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--epochs", type=int, default=3, help="measured epochs per pipeline (median)")
    p.add_argument("--cpus", type=int, default=os.cpu_count())
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--max-side", type=int, default=320, help="the re-encoded variant (default %(default)s)")
    args = p.parse_args()
    torch.set_num_threads(1)   # the consuming process gets one core in both pipelines

    import ray

    from densenet_ray.data import load_manifest, sources, write

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "folder")
        t = time.perf_counter()
        make_folder(src, args.images)
        print(f"made {args.images} JPEGs in {time.perf_counter() - t:.0f}s", file=sys.stderr)
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        shards = {}
        for max_side in (None, args.max_side):
            out = os.path.join(tmp, f"shards-{max_side or 'orig'}")
            t = time.perf_counter()
            write.convert(sources.imagefolder(src), out, max_side=max_side, progress=False)
            size = sum(s.bytes for s in load_manifest(out).splits["train"].shards)
            print(f"converted (max side {max_side}) in {time.perf_counter() - t:.0f}s: {size / 2**20:.0f} MiB",
                  file=sys.stderr)
            shards[max_side] = out
        workers, tv = torchvision_epochs(src, args.cpus, args.batch)
        runs = {"torchvision ImageFolder + DataLoader": tv,
                "ours: shards + Ray Data, uint8 batches": ray_epochs(shards[None], args.batch, workers, False),
                "ours, + normalise to float on this CPU": ray_epochs(shards[None], args.batch, workers, True),
                f"ours, --max-side {args.max_side}, uint8 batches": ray_epochs(shards[args.max_side], args.batch,
                                                                             workers, False)}
        for run in runs.values():
            run()   # warm-up epoch: worker processes, imports, page cache
        results = {name: [] for name in runs}
        for _ in range(args.epochs):   # interleaved, so load from elsewhere hits every pipeline alike
            for name, run in runs.items():
                results[name].append(run())
        ray.shutdown()
    medians = {name: np.median(np.array(r), axis=0) for name, r in results.items()}
    base = next(iter(medians.values()))
    print(f"{args.images} images of ~500x375 (JPEG q90), RandomResizedCrop 224 + flip, batch "
          f"{args.batch}, {args.cpus} CPUs, median of {args.epochs} epochs after a warm-up, torch {torch.__version__}")
    print(f"{'pipeline':<48}{'img/s':>7}{'x':>7}{'img/s epoch':>13}{'x':>7}{'CPU ms/img':>12}{'x':>7}")
    for name, (steady, epoch, cpu) in medians.items():
        print(f"{name:<48}{steady:>7,.0f}{steady / base[0]:>6.2f}x{epoch:>13,.0f}{epoch / base[1]:>6.2f}x"
              f"{cpu:>12.2f}{base[2] / cpu:>6.2f}x")


if __name__ == "__main__":
    main()
