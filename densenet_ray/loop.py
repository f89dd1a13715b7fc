"""The per-worker training loop that Ray Train runs on every worker (see train.py for the driver).

    TorchTrainer(train_loop, train_loop_config={"cfg": to_dict(cfg), "meta": {...}}, ...)

Each epoch: train on this worker's share of the train split (DDP keeps the replicas equal), evaluate
on its share of the validation split (when there is one), sum the counts across workers (exact: every
validation image once), then `ray.train.report` the same metrics dict everywhere with rank 0's
checkpoint. After the last epoch the selected weights (--select last, or best: the lowest validation
error) are evaluated once on the test split, if any, and registered. Every side effect (checkpoint
files, MLflow, the console line) happens in `publisher.Publisher`, on rank 0 only.

Evaluation runs in fp32 whatever --precision trains in, as `densenet_ray.evaluate` does, so the
logged errors and evaluate's agree.

`train_one_epoch` and `evaluate` take anything with Ray Data's `iter_torch_batches` (the tests drive
them with an in-memory stand-in, without Ray).

Randomness: each epoch seeds torch from (seed, epoch, rank), so dropout in a resumed epoch is what
it would have been without the interruption; data order and crops come from Ray Data.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import ray.train
import ray.train.torch
from densenet_ray import checkpoint, data, preempt
from densenet_ray.config import TrainConfig, from_dict, to_dict
from densenet_ray.console import quiet_libraries
from densenet_ray.data.device import Decoder
from densenet_ray.position import Position
from densenet_ray.progress import Progress
from densenet_ray.publisher import Publisher
from densenet_ray.model import from_config

# Ray Train tees print() on workers to its logger and to stdout (twice on the driver); log once.
log = logging.getLogger("densenet_ray")
# What train_one_epoch and evaluate count over a worker's share: summed cross-entropy, top-1 and
# top-5 hits, images. Summed over workers, they give exact epoch means.
COUNTS = ("loss", "top1", "top5", "images")
_AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}


def train_loop(config: dict) -> None:
    cfg, meta, console = from_dict(config["cfg"]), config["meta"], config.get("console")
    quiet_libraries(cfg.verbose)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    asked, cfg = cfg, cfg.for_device(device.type == "cuda", _native_bf16(device))

    torch.manual_seed(cfg.seed)  # identical initial weights on every worker (DDP also broadcasts them)
    net = from_config(cfg, meta["num_classes"], meta["channels"])
    if cfg.sync_bn and world > 1:
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(net)  # to the device, wrapped in DDP when world > 1
    net = getattr(model, "module", model)
    optimizer = torch.optim.SGD(net.parameters(), lr=cfg.lr_at(0), momentum=cfg.momentum, nesterov=True,
                                dampening=0.0, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")

    start_epoch, start_step, history, example, best = 0, 0, [], None, None
    if state := resume_state(cfg):
        check_resumable(state, cfg, meta)
        restore(state, cfg, net, optimizer, scaler)
        start_step = state.get("step", 0)   # > 0: saved inside epoch state["epoch"], after that many steps
        start_epoch, history, example = state["epoch"] + (0 if start_step else 1), state["history"], state.get("example")
        best = state.get("best")

    publisher = Publisher(cfg, meta, history, start_epoch, world, device, console, asked,
                          start_step=start_step) if rank == 0 else None
    train_step = torch.compile(model) if cfg.compile else model
    evaluate_fn = torch.compile(net) if cfg.compile else net
    prepare = Prepare(meta["mean"], meta["std"], cfg.channels_last, device)
    decoder = Decoder(cfg.train_transform, meta["train_shape"], device, data.skip_counter(
        cfg.data, cfg.train_split)) if cfg.decode == "device" else None   # --decode device: JPEGs decoded here

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if cfg.val_split else None
    steps_per_epoch = meta["train_rows"] // cfg.batch_size
    meter = Progress(cfg.progress_s, steps_per_epoch, cfg.epochs, world, device, rank, cfg.batch_size)
    where = Position(cfg.checkpoint_every_steps, cfg.checkpoint_every_min, world, rank, device,
                     preempt.Watch(cfg.run_name, rank))
    if publisher and meter.on and start_epoch < cfg.epochs:
        publisher.say(f"epoch {start_epoch + 1:>3}/{cfg.epochs} waiting for the first batch: starting the input "
                      f"pipeline (reading and decoding {cfg.data})")
    earlier = None

    def state_of(epoch: int, step: int = 0) -> dict:
        return {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "epoch": epoch, "step": step, "history": history, "config": to_dict(cfg),
                "classes": list(meta["classes"]), "mean": meta["mean"], "std": meta["std"], "run_id": meta["run_id"],
                "example": example,  # two normalised inputs: the signature of a model registered later
                "best": best,        # the epoch with the lowest val_top1_err so far, and its weights
                # Informational: every epoch reseeds from (seed, epoch, rank), so epoch and seed restore it.
                "rng": {"torch": torch.get_rng_state()}}

    def save_inside(step: int, counts: dict) -> None:
        """Every rank, at a step they agreed on: the rows trained so far and the counts to date to
        rank 0, which writes the checkpoint; a SIGTERM that asked for it is then let go."""
        rows, sums = where.gather(), summed(counts, device)
        written = ""
        if publisher:
            sums = {k: v + (earlier or {}).get(k, 0.0) for k, v in sums.items()}
            written = publisher.inside_epoch({**state_of(where.epoch, step), "counts": sums}, rows, where.preempted)
        if where.preempted:
            where.watch.handled(where.preempted, written)

    for epoch in range(start_epoch, cfg.epochs):
        torch.manual_seed(cfg.seed * 1_000_003 + epoch * 1_009 + rank)
        t0 = time.perf_counter()
        meter.epoch_start(epoch, history[-1]["epoch_s"] if history else None)
        step0 = start_step if epoch == start_epoch else 0
        where.epoch_start(epoch, step0, state.get("rows") if step0 else None)
        earlier = state.get("counts") if step0 and rank == 0 else None   # the stretch before the resume

        train_counts, data_wait, train_example = train_one_epoch(
            train_step, optimizer, scaler, train_shard, prepare, cfg, epoch, steps_per_epoch, device,
            meter=meter, on_report=publisher.step if publisher else None, decoder=decoder,
            start_step=step0, where=where, on_checkpoint=save_inside)
        for k, v in (earlier or {}).items():   # rank 0 adds the stretch before the resume, once, to the sums
            train_counts[k] += v
        train_s = time.perf_counter() - t0
        if world > 1:
            # DDP copies rank 0's BatchNorm statistics to the others at the start of each forward, so the
            # last step left every worker its own: validate the model rank 0 checkpoints and registers.
            for buffer in net.buffers():
                dist.broadcast(buffer, 0)
        val_counts, val_example = evaluate(evaluate_fn, val_shard, prepare, device) if val_shard else ({}, None)
        example = val_example if val_example is not None else example if example is not None else train_example
        sums = summed({**{f"train_{k}": v for k, v in train_counts.items()},
                       **{f"val_{k}": v for k, v in val_counts.items()},
                       "data_wait_s": data_wait, "train_s": train_s,
                       **({"worker_decoded_rows": decoder.take()} if decoder else {})}, device)
        metrics = epoch_metrics(sums, world, epoch, optimizer.param_groups[0]["lr"], time.perf_counter() - t0)
        metrics["data_wait_frac"] = largest(data_wait / max(train_s, 1e-9), device)
        if decoder:  # JPEG rows the workers decoded this epoch
            metrics["worker_decoded_rows"] = int(sums["worker_decoded_rows"])
        first_batch_share = meter.first_wait / data_wait if data_wait > 0 else 0.0
        if publisher:
            metrics.update(pipeline_figures(train_shard))
        # Rows skipped (undecodable, a label outside the classes, an unreadable row group), since this job started.
        metrics["skipped_rows"] = sum(data.skipped_rows(cfg.data, s) for s in (cfg.train_split, cfg.val_split) if s)
        if publisher and (notes := data.new_skipped_notes(cfg.data, (cfg.train_split, cfg.val_split))):
            publisher.say(f"[densenet_ray] warning: epoch {epoch + 1} skipped rows:\n  " + "\n  ".join(notes))
        history = history + [metrics]
        if cfg.select == "best":  # a CPU copy of the weights only when they can be chosen
            best = better(best, metrics, net)
        if publisher:
            publisher.epoch_end(metrics, first_batch_share, state_of(epoch))
        else:
            ray.train.report(metrics)

    selected = select(cfg, history, best, net)
    test = None
    if cfg.test_split and selected is not None:
        counts, _ = evaluate(net, ray.train.get_dataset_shard("test"), prepare, device)
        test = held_out_metrics(summed(counts, device), cfg.test_split)
    if publisher:
        publisher.finish(net, example, selected, test)
    preempt.stop_watching()


class Prepare:
    """uint8 NHWC batch -> normalised float NCHW on the device (normalisation on the device: the
    pipeline ships a quarter of the bytes). NHWC data is already channels_last in memory.
    `mean` and `std`: per channel, 0..1 scale (the manifest's)."""

    def __init__(self, mean, std, channels_last: bool, device) -> None:
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255
        self.channels_last = channels_last

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.mean.device, non_blocking=True).permute(0, 3, 1, 2).float()
        x = (x - self.mean) / self.std
        # With one channel the NHWC permute already counts as contiguous, so .contiguous() would keep its
        # channels_last strides: the convolutions then run channels_last and DDP warns that the 1x1
        # weights' gradient strides differ from its buckets'. Make the layout what was asked for.
        return x if self.channels_last else x.clone(memory_format=torch.contiguous_format) if x.shape[1] == 1 \
            else x.contiguous()


def resume_state(cfg: TrainConfig) -> dict | None:
    """The newest checkpoint of the run (at an epoch's end or inside one, from its storage folder,
    as the driver and the data's first epoch see it; Ray Train's own only when the folder has none),
    with "rows" (the row ids it had trained on) when saved inside an epoch; None: a new run."""
    if found := checkpoint.newest(cfg.run_dir):
        state, _ = checkpoint.load(found)
        if checkpoint.inside_epoch(state):
            state["rows"] = checkpoint.rows_of(found)
        return state
    if saved := ray.train.get_checkpoint():   # Ray Train's are epoch ends
        with saved.as_directory() as folder:
            return checkpoint.load(folder)[0]
    return None


def restore(state: dict, cfg: TrainConfig, net, optimizer, scaler) -> None:
    """A checkpoint's weights and optimizer into this run. The gradient scaler's state only when the
    checkpoint trained in the same precision (fp16's scale means nothing to bf16 or fp32, and an
    enabled scaler cannot load a disabled one's empty state): another --precision resumes with a
    fresh scaler."""
    net.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    saved = state["config"].get("precision", "fp32")
    if saved == cfg.precision:
        scaler.load_state_dict(state["scaler"])
    else:
        log.info(f"[densenet_ray] resuming in {cfg.precision} a checkpoint trained in {saved}: a fresh gradient "
                 "scaler")


def better(best: dict | None, metrics: dict, net) -> dict | None:
    """{"epoch", "val_top1_err", "model" (a CPU copy)} of the lowest validation error so far."""
    err = metrics.get("val_top1_err")
    if err is None or (best is not None and best["val_top1_err"] <= err):
        return best
    return {"epoch": metrics["epoch"], "val_top1_err": err,
            "model": {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}}


def select(cfg: TrainConfig, history: list[dict], best: dict | None, net) -> dict | None:
    """The epoch whose weights the run registers and tests: the last, or the best (its weights loaded
    into `net`); None when no epoch ran."""
    if not history:
        return None
    if cfg.select == "best" and best is not None:
        net.load_state_dict(best["model"])
        return next(m for m in history if m["epoch"] == best["epoch"])
    return history[-1]


def train_one_epoch(model, optimizer, scaler, shard, prepare: Prepare, cfg: TrainConfig, epoch: int, steps: int,
                    device, *, meter: Progress | None = None, on_report=None, decoder: Decoder | None = None,
                    start_step: int = 0, where: Position | None = None, on_checkpoint=None
                    ) -> tuple[dict[str, torch.Tensor], float, torch.Tensor | None]:
    """One pass over this worker's share. Returns (its COUNTS; seconds spent waiting for data;
    two normalised images of the first batch, None when no batch came). `meter` (every rank, or
    none) decides when a progress report is due; `on_report` (rank 0) receives it. `decoder`
    (--decode device) decodes the shard's encoded rows here; its time counts as waiting for data.
    A resumed epoch counts its steps from `start_step`. `where` (every rank, or none) keeps the
    batches' row ids and decides when `on_checkpoint(step, counts)` runs (on every rank)."""
    model.train()
    counts = _counts(device)
    data_wait, step, example = 0.0, start_step, None
    options = {"batch_size": cfg.batch_size // cfg.workers, "drop_last": True, "prefetch_batches": 2,
               "local_shuffle_buffer_size": cfg.shuffle_buffer or None}
    batches = iter(decoder.batches(shard, **options) if decoder else shard.iter_torch_batches(**options))
    while True:
        t = time.perf_counter()
        batch = next(batches, None)
        waited = time.perf_counter() - t
        data_wait += waited
        if batch is None:
            break
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr_at(epoch + step / max(steps, 1))
        x, y = prepare(batch["image"]), batch["label"].to(device, non_blocking=True)
        example = x[:2].cpu() if example is None else example
        with torch.autocast(device.type, dtype=_AMP.get(cfg.precision), enabled=cfg.precision in _AMP):
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        _add(counts, loss.detach().double() * len(y), logits.detach().float(), y)
        step += 1
        if where is not None:
            where.add(batch.get("row"), step)
            if where.due(step) and on_checkpoint:
                on_checkpoint(step, counts)
        if meter and (report := meter.step(step, loss, optimizer.param_groups[0]["lr"], waited)) and on_report:
            on_report(report, meter.line(report))
    return counts, data_wait, example


@torch.no_grad()
def evaluate(model, shard, prepare: Prepare, device, batch_size: int = 256) -> tuple[dict[str, torch.Tensor],
                                                                                    torch.Tensor | None]:
    """COUNTS over this worker's share of an evaluation split, in fp32 (whatever the training
    precision, so that ranks and losses are evaluate's), and two of its normalised images (the
    registered model's input example; None for an empty share). The shares differ in size, so no
    collective runs per batch: the caller sums once."""
    model.eval()
    counts, example = _counts(device), None
    for batch in shard.iter_torch_batches(batch_size=batch_size, prefetch_batches=2):
        x, y = prepare(batch["image"]), batch["label"].to(device, non_blocking=True)
        example = x[:2].cpu() if example is None else example
        with torch.autocast(device.type, enabled=False):
            logits = model(x).float()
        _add(counts, F.cross_entropy(logits, y, reduction="sum").double(), logits, y)
    return counts, example


def _counts(device) -> dict[str, torch.Tensor]:
    return {k: torch.zeros((), dtype=torch.float64, device=device) for k in COUNTS}


def _add(counts: dict, loss_sum: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
    top1, top5 = correct(logits, labels)
    counts["loss"] += loss_sum
    counts["top1"] += top1
    counts["top5"] += top5
    counts["images"] += len(labels)


def correct(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How many labels are the top-1 and in the top-5 (top-k for fewer than 5 classes)."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return hits[:, 0].sum().double(), hits.any(dim=1).sum().double()


def summed(values: dict[str, torch.Tensor | float], device, op=dist.ReduceOp.SUM) -> dict[str, float]:
    """`values` combined over the workers (summed, or `op`) with one all_reduce (the same keys, in the
    same order, on every rank), as floats."""
    names = list(values)
    packed = torch.stack([torch.as_tensor(values[k], dtype=torch.float64, device=device) for k in names])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(packed, op=op)
    return dict(zip(names, packed.tolist()))


def largest(value: float, device) -> float:
    """The largest `value` over the workers."""
    return summed({"value": value}, device, op=dist.ReduceOp.MAX)["value"]


def pipeline_figures(shard) -> dict:
    """The input pipeline's own figures for the epoch that just ran, from Ray Data's stats (as far as
    Ray exposes them): task-seconds spent reading, decoding and augmenting, the rows per second and
    bytes it delivered. Empty when this Ray does not give them."""
    try:  # a streaming split's coordinator holds the execution's stats (DataIterator.stats() is a string)
        summary = ray.get(shard._coord_actor.stats.remote(), timeout=10).to_summary()
    except Exception:
        return {}
    # The split itself is the summary's own (empty) operator; read, decode and augment are its parents'.
    ops = [op for op in _operators(summary) if op.wall_time and op.output_num_rows]
    if not ops:
        return {}
    out = {"input_task_s": sum(op.wall_time.sum for op in ops), "input_rows_per_s": ops[-1].num_rows_per_s}
    if ops[-1].output_size_bytes:
        out["input_bytes"] = ops[-1].output_size_bytes.sum
    return out


def _operators(summary):
    for parent in summary.parents:
        yield from _operators(parent)
    yield from summary.operators_stats


def epoch_metrics(sums: dict[str, float], world: int, epoch: int, lr: float, epoch_s: float) -> dict:
    """The one metrics dict of an epoch from the workers' summed COUNTS (train_*, and val_* when
    there is validation), data_wait_s and train_s: console line, ray.train.report and MLflow use
    these keys."""
    n, vn = sums["train_images"], sums.get("val_images")
    if n == 0 or vn == 0:
        raise RuntimeError(f"epoch {epoch}: no {'training' if n == 0 else 'validation'} images reached the "
                           f"workers; is the split empty or smaller than one batch per worker?")
    metrics = {"epoch": epoch, **_errors(sums, "train"), "lr": lr, "images_per_s": n / (sums["train_s"] / world),
               "images_per_s_per_worker": n / sums["train_s"], "data_wait_s": sums["data_wait_s"] / world,
               "epoch_s": epoch_s, "train_images": int(n)}
    if vn is not None:
        metrics.update(_errors(sums, "val"), val_images=int(vn))
    return metrics


def held_out_metrics(sums: dict[str, float], split: str) -> dict:
    """test_loss, test_top1_err, test_top5_err, test_images from the workers' summed COUNTS."""
    if not sums["images"]:
        raise RuntimeError(f"no test images reached the workers: is split {split!r} empty?")
    return {**_errors({f"test_{k}": v for k, v in sums.items()}, "test"), "test_images": int(sums["images"])}


def _errors(sums: dict, prefix: str) -> dict:
    n = sums[f"{prefix}_images"]
    return {f"{prefix}_loss": sums[f"{prefix}_loss"] / n, f"{prefix}_top1_err": 1 - sums[f"{prefix}_top1"] / n,
            f"{prefix}_top5_err": 1 - sums[f"{prefix}_top5"] / n}


def check_resumable(state: dict, cfg: TrainConfig, meta: dict) -> None:
    """A checkpoint of another model or dataset must not be loaded silently."""
    saved = from_dict(state["config"])
    for name in ("arch", "depth", "growth_rate", "compression", "bottleneck"):
        if getattr(saved, name) != getattr(cfg, name):
            raise ValueError(f"checkpoint of run {cfg.run_name!r} in {cfg.storage} was trained with "
                             f"{name}={getattr(saved, name)!r}, this run asks for {getattr(cfg, name)!r}; "
                             f"use another --run-name to start a new run")
    if list(state["classes"]) != list(meta["classes"]):
        raise ValueError(f"checkpoint of run {cfg.run_name!r} was trained on {len(state['classes'])} other classes "
                         f"than the {len(meta['classes'])} of {cfg.data}; use another --run-name")


def _native_bf16(device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
