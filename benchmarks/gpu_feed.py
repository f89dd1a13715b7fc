"""Can our input path keep a GPU busy? Images/s of the real training step fed (a) synthetic
batches already on the device, (a') the same with torch.compile, (b) our pipeline decoding on the
CPU, (c) `--decode device` (the GPU decodes the JPEGs); side by side in one run (issue 12).

    python benchmarks/gpu_feed.py                             # on a GPU node: both rows, a few minutes on an H200
    python benchmarks/gpu_feed.py --rows 121 --jpeg-images 12000 --epochs 4
    python benchmarks/gpu_feed.py --device cpu --quick        # a smoke run of every path on a CPU, tiny sizes

Rows: DenseNet-121 (model.build("densenet121"), 1,000 classes) at 224 px, batch 256, on ImageNet-like
~500x375 JPEGs (q90) with `imagenet_train`; DenseNet-BC-100 k=12 (build("densenet_bc100_k12"), 10
classes) at 32 px, batch 64, on CIFAR-like 32x32 PNGs with `cifar_train`. (c) is JPEG only: a
PNG is decoded on the CPU whatever --decode says, and `cifar_train` is no device transform, so
the PNG row has no (c). On a GPU: bf16 autocast and channels_last (what --precision auto gives on
Ampere and later); on a CPU: fp32, as --precision auto gives there.

Every mode runs in a 1-worker Ray Train TorchTrainer (use_gpu on a GPU) and every step is
loop.train_one_epoch itself (loop.Prepare normalising on the device, the loss, SGD, the counts):
what `python -m densenet_ray.train` runs, not a copy. Why a TorchTrainer and not the Ray Data
iterator in the driver: training reads a streaming_split shard through a SplitCoordinator actor
into a worker process that also holds the model; the driver's own iterator skips that hop and
shares no process with anything, so it would measure a path no run takes. (a) feeds the same
device tensor every step through a stand-in shard, in the worker of (b), before (b) reads a row.
(b) is read_split(..., order="rows") + dataset_config(), as train.make_trainer makes it; (c) is
read_split(..., decode="device") and data.device.Decoder in the worker, as loop.py does.

Timing: (a) and (a'): --warmup steps (compilation, cuDNN autotuning), then --steps timed steps;
(b) and (c): --epochs epochs, the first a warm-up; in each other epoch the clock starts once
--warmup batches have been consumed (the pipeline's per-epoch start-up: order="rows" reads and
shuffles the split before the first batch) and stops at the last, the device synchronised at both
ends; the best epoch counts. Also printed: the whole epoch's rate (with that start-up; on a few
thousand images it weighs far more than on ImageNet's 1.28M). Goal: (b) or (c) >= 0.95x (a).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from sample_data import make_images, to_shards  # noqa: E402

# name: (what, arch, classes, data kind, train transform, preset, image side, batch)
ROWS = {
    "121": ("DenseNet-121, JPEG", "densenet121", 1000, "jpeg", "imagenet_train", "imagenet", 224, 256),
    "bc100": ("DenseNet-BC-100 k=12, PNG", "densenet_bc100_k12", 10, "png", "cifar_train", "cifar10", 32, 64),
}


class Timed:
    """A dataset shard whose batches are timed: the device is synchronised and the clock read when
    batch `warm` is asked for (the first `warm` are done) and by stop() after the last."""

    def __init__(self, shard, warm: int, device):
        self.shard, self.warm, self.device = shard, warm, device
        self.t0 = self.t1 = None
        self.n = self.n0 = 0

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _timed(self, batches):
        for i, batch in enumerate(batches):
            if i == self.warm:
                self.t0, self.n0 = self._sync(), self.n
            self.n += len(batch["label"])
            yield batch

    def iter_torch_batches(self, **options):
        return self._timed(self.shard.iter_torch_batches(**options))

    def iter_batches(self, **options):   # Decoder.batches reads numpy batches
        return self._timed(self.shard.iter_batches(**options))

    def stop(self) -> dict:
        self.t1 = self._sync()
        timed = self.n - self.n0 if self.t0 is not None else 0
        return {"images": self.n, "timed_images": timed, "rate": timed / (self.t1 - self.t0) if timed else None}


class Synthetic:
    """A stand-in shard: the same uint8 NHWC batch, already on the device, `steps` times."""

    def __init__(self, batch: int, side: int, classes: int, steps: int, device):
        self.x = torch.randint(0, 256, (batch, side, side, 3), dtype=torch.uint8, device=device)
        self.y = torch.randint(0, classes, (batch,), device=device)
        self.steps = steps

    def iter_torch_batches(self, **options):
        for _ in range(self.steps):
            yield {"image": self.x, "label": self.y}


def worker_loop(config: dict) -> None:
    """One Ray Train worker: the modes in config["modes"], each through loop.train_one_epoch; one
    JSON line per measurement to config["out"]."""
    import ray.train
    import ray.train.torch

    from densenet_ray import config as C
    from densenet_ray.data.device import Decoder
    from densenet_ray.loop import Prepare, train_one_epoch
    from densenet_ray.model import build

    device = ray.train.torch.get_device()
    cfg = C.from_dict(config["cfg"])
    side, batch, classes = config["side"], cfg.batch_size, config["classes"]
    prepare = Prepare(config["mean"], config["std"], cfg.channels_last, device)

    def record(**row):
        with open(config["out"], "a") as f:
            f.write(json.dumps(row) + "\n")

    def fresh():
        torch.manual_seed(0)
        net = build(config["arch"], num_classes=classes)
        if cfg.channels_last:
            net = net.to(memory_format=torch.channels_last)
        net = ray.train.torch.prepare_model(net)
        opt = torch.optim.SGD(net.parameters(), lr=cfg.lr_at(0), momentum=cfg.momentum, nesterov=True,
                              weight_decay=cfg.weight_decay)
        return net, opt, torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")

    def one_epoch(model, opt, scaler, shard, decoder=None):
        train_one_epoch(model, opt, scaler, shard, prepare, cfg, 0, 1000, device, decoder=decoder)
        return shard.stop()

    for mode in config["modes"]:
        net, opt, scaler = fresh()
        if mode in ("synthetic", "compiled"):
            model = torch.compile(net, backend=config["compile_backend"]) if mode == "compiled" else net
            t = time.perf_counter()
            one_epoch(model, opt, scaler, Timed(Synthetic(batch, side, classes, config["warmup"], device), 0, device))
            warm_s = time.perf_counter() - t
            out = one_epoch(model, opt, scaler,
                            Timed(Synthetic(batch, side, classes, config["steps"], device), 0, device))
            record(mode=mode, rate=out["rate"], warmup_s=warm_s, images=out["timed_images"])
            continue
        shard = ray.train.get_dataset_shard("train")
        decoder = Decoder(cfg.train_transform, config["shape"], device) if mode == "device" else None
        for epoch in range(config["epochs"]):
            t = time.perf_counter()
            out = one_epoch(net, opt, scaler, Timed(shard, config["warmup"], device), decoder)
            record(mode=mode, epoch=epoch, rate=out["rate"], epoch_rate=out["images"] / (time.perf_counter() - t),
                   images=out["images"], timed_images=out["timed_images"])


def run_trainer(row: str, modes: list[str], root: str, args, tmp: str, use_gpu: bool) -> list[dict]:
    """The measurements of `modes` in a 1-worker TorchTrainer, as JSON rows."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from densenet_ray import config as C
    from densenet_ray import data

    what, arch, classes, kind, transform, preset, side, batch = ROWS[row]
    side, batch = args.sides.get(row, side), args.batches.get(row, batch)
    m = data.load_manifest(root)
    decode = "device" if "device" in modes else "pipeline"
    precision = args.precision if args.precision != "auto" else ("bf16" if use_gpu else "fp32")
    cfg = C.PRESETS[preset].replace(batch_size=batch, workers=1, precision=precision, channels_last=use_gpu,
                                    train_transform=transform, image_size=side, decode=decode)
    ds = data.read_split(root, "train", transform, image_size=side, order="rows", seed=0, manifest=m, decode=decode)
    out = os.path.join(tmp, f"{row}-{decode}-{time.time_ns()}.jsonl")
    config = {"cfg": C.to_dict(cfg), "modes": modes, "arch": arch, "classes": classes, "side": side, "out": out,
              "mean": list(m.mean), "std": list(m.std), "warmup": args.warmup, "steps": args.steps,
              "epochs": args.epochs, "compile_backend": args.compile_backend,
              "shape": data.batch_shape(m, "train", transform, side)[1]}
    resources = {"CPU": 1, **({"GPU": 1} if use_gpu else {})}
    TorchTrainer(worker_loop, train_loop_config=config,
                 scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=use_gpu, resources_per_worker=resources),
                 run_config=ray.train.RunConfig(name=f"feed-{time.time_ns()}", storage_path=os.path.join(tmp, "runs"),
                                                logging_config=ray.train.LoggingConfig("WARNING")),
                 datasets={"train": ds}, dataset_config=data.dataset_config()).fit()
    with open(out) as f:
        return [json.loads(line) for line in f]


def pairs(text: str) -> dict:
    """'121=64,bc100=32' -> {'121': 64, 'bc100': 32}"""
    return {k: int(v) for k, v in (item.split("=") for item in text.split(",") if item)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="121,bc100", help="comma-separated: " + ", ".join(ROWS))
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--jpeg-images", type=int, default=8000, help="JPEGs made for the 121 row (a tenth held out)")
    p.add_argument("--png-images", type=int, default=30000, help="PNGs made for the bc100 row (a tenth held out)")
    p.add_argument("--epochs", type=int, default=3, help="(b), (c): epochs, the first a warm-up")
    p.add_argument("--warmup", type=int, default=10, help="warm-up steps of (a), batches before the clock in (b), (c)")
    p.add_argument("--steps", type=int, default=50, help="(a), (a'): timed steps")
    p.add_argument("--compile", default="121", help="rows that also run (a') torch.compile: comma-separated, or none")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile's backend for (a'); default inductor (--quick on a CPU: eager, which runs "
                        "dynamo's tracing without minutes of C++ compilation)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="auto: bf16 + channels_last on a GPU, fp32 on a CPU")
    p.add_argument("--batch", default="", help="override batches, e.g. 121=128,bc100=64")
    p.add_argument("--image-size", default="", help="override image sides, e.g. 121=64")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 80 JPEGs at 64 px batch 8, 400 PNGs batch 16, 2 epochs, 2 warm-up and 4 timed "
                        "steps")
    args = p.parse_args()
    args.batches, args.sides = pairs(args.batch), pairs(args.image_size)
    if args.quick:
        args.jpeg_images, args.png_images, args.epochs, args.warmup, args.steps = 80, 400, 2, 2, 4
        args.batches = {"121": 8, "bc100": 16, **args.batches}
        args.sides = {"121": 64, **args.sides}
    if args.compile_backend is None:
        args.compile_backend = "eager" if args.quick and args.device == "cpu" else "inductor"
    rows = [r.strip() for r in args.rows.split(",")]
    if unknown := [r for r in rows if r not in ROWS]:
        p.error(f"--rows {','.join(unknown)}: expected some of {', '.join(ROWS)}")
    compiled = {r.strip() for r in args.compile.split(",")} - {"none", ""}
    use_gpu = args.device == "cuda"
    if use_gpu and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no GPU here; --device cpu runs the smoke version")

    from densenet_ray import runtime

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folders = {}
        for row in rows:   # every image before Ray starts: the pool's children must not inherit Ray's handlers
            kind = ROWS[row][3]
            n = args.jpeg_images if kind == "jpeg" else args.png_images
            folders[row] = (make_images(os.path.join(tmp, f"{kind}-src"), kind, n), n)
        # Shards in a Ray of their own, shut down before training starts (see input_ceiling.py: a Ray worker
        # process that had run a conversion task aborted later, while the training pipeline used it).
        roots = {row: to_shards(folder, os.path.join(tmp, ROWS[row][3]), holdout=n // 10)
                 for row, (folder, n) in folders.items()}
        import ray

        ray.shutdown()
        runtime.connect(cpus=1 + 2, quiet=True)   # as train.connect: the worker's CPU plus two, at least the cores

        card = torch.cuda.get_device_name(0) if use_gpu else "no GPU (CPU)"
        print(f"{card}; {os.cpu_count()} CPUs (Ray: {runtime.cluster_cpus():g} logical, 1 for the worker); torch "
              f"{torch.__version__}; Ray {ray.__version__}", flush=True)
        ray.data.DataContext.get_current().print_on_execution_start = False
        ray.data.DataContext.get_current().enable_progress_bars = False
        for row in rows:
            what, _, _, kind, *_ = ROWS[row]
            root = roots[row]
            modes = ["synthetic"] + ["compiled"] * (row in compiled) + ["pipeline"]
            print(f"\n{what}: {modes}", flush=True)
            found = run_trainer(row, modes, root, args, tmp, use_gpu)
            if kind == "jpeg":
                print(f"{what}: ['device']", flush=True)
                found += run_trainer(row, ["device"], root, args, tmp, use_gpu)
            for r in found:
                print("  " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()),
                      flush=True)
            results[row] = found

    names = {"synthetic": "(a) synthetic, on the device", "compiled": f"(a') synthetic, compile {args.compile_backend}",
             "pipeline": "(b) our pipeline, CPU decode", "device": "(c) --decode device"}
    print(f"\n{'row':<34}{'input':<32}{'px':>4}{'batch':>6}{'img/s':>9}{'x (a)':>7}{'epoch img/s':>13}{'x (a)':>7}")
    for row, found in results.items():
        what, *_, side, batch = ROWS[row]
        side, batch = args.sides.get(row, side), args.batches.get(row, batch)
        base = next(r["rate"] for r in found if r["mode"] == "synthetic")
        for mode, name in names.items():
            rs = [r for r in found if r["mode"] == mode and (mode in ("synthetic", "compiled") or r["epoch"] > 0)]
            if not rs:
                if mode == "device" and ROWS[row][3] == "png":
                    print(f"{what:<34}{'(c) none: PNGs decode on the CPU':<32}")
                continue
            rate = max(r["rate"] or 0 for r in rs)
            epoch = max((r.get("epoch_rate", 0) for r in rs), default=0)
            tail = f"{epoch:>13.1f}{epoch / base:>6.2f}x" if mode in ("pipeline", "device") else ""
            print(f"{what:<34}{name:<32}{side:>4}{batch:>6}{rate:>9.1f}{rate / base:>6.2f}x{tail}")
    print("\nimg/s: the steady state (after warm-up batches, device synchronised); epoch img/s: whole epochs "
          "with the pipeline's start-up. Goal: (b) or (c) >= 0.95x (a).")


if __name__ == "__main__":
    main()
