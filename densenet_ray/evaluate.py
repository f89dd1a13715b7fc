"""Top-1 and top-5 error of a trained DenseNet as the paper reports them: single-crop and 10-crop (Table 3).

    python -m densenet_ray.evaluate models:/densenet-digits@champion ~/.densenet_ray/data/digits
    python -m densenet_ray.evaluate models:/densenet-imagenet/3 s3://bucket/imagenet --ten-crop
    python -m densenet_ray.evaluate ~/.densenet_ray/runs/cifar10-r1 ~/data/cifar10 --split test --no-log

    from densenet_ray.evaluate import evaluate
    results = evaluate(trained.load(MODEL), DATA, ten_crop=True)  # {"single": {top1_err, ...}, "tencrop": {...}}

Single-crop uses the run's own evaluation transform and size, so it reproduces the validation error
training logged: resize 256 and centre 224 for ImageNet, the stored (native) size for CIFAR/SVHN.
10-crop resizes the shorter side to size*256/224 and takes the four corners and the centre, and the
same of the mirrored image; the softmax probabilities of the ten crops are averaged, then ranked.
fb.resnet.torch, whose test Table 3 follows, ranks the sum of the ten crops' raw scores (logits)
instead: its models end in nn.Linear, the softmax lives in its CrossEntropyCriterion, and
Trainer:computeScore sums the output over crops (its `:exp()` commented out). The two rankings agree
for most images, not all, so 10-crop errors can differ slightly from what its code would report.
Single-crop and 10-crop are reported side by side, never mixed.

Distributed with Ray Data: tasks read and decode the split's row groups in parallel, and an actor
pool (one actor per GPU, else one per two CPUs; --actors) runs the model, built once per actor.
Each batch gives counts, summed on the driver: exact, every image once. The result is printed and
logged to the model's MLflow run (a new run when it has none) as eval_SPLIT_top1_err, _top5_err,
_loss, _images and eval_SPLIT_tencrop_top1_err, ...; --no-log skips that.
"""

from __future__ import annotations

import sys

import numpy as np
import ray.data
import torch

from densenet_ray import cli, data, runtime, trained
from densenet_ray.tracking.uri import check_tracking

TENCROP = "imagenet_tencrop"


class Scorer:
    """A Ray Data actor: the model built once, then per batch of images and labels the counts
    {images, top1 (correct), top5 (correct), nll (summed -log p of the true class)}."""

    def __init__(self, spec: dict, mean, std) -> None:
        self.net = trained.rebuild(spec).to("cuda" if torch.cuda.is_available() else "cpu")
        self.mean, self.std = mean, std

    def __call__(self, batch: dict) -> dict:
        # Copies: Ray's batches are read-only views of its object store, which torch.from_numpy warns about.
        probs = trained.class_probabilities(self.net, torch.tensor(batch["image"]), self.mean, self.std).cpu()
        labels = torch.tensor(batch["label"])
        top = probs.topk(min(5, probs.shape[1]), dim=1).indices
        hits = top == labels[:, None]
        nll = -probs.gather(1, labels[:, None]).clamp_min(1e-12).log().sum()
        return {"images": np.array([len(labels)]), "top1": np.array([int(hits[:, 0].sum())]),
                "top5": np.array([int(hits.any(1).sum())]), "nll": np.array([float(nll)])}


def default_split(model: trained.Model) -> str:
    """The run's validation split, else its test split (a final run on train+val)."""
    split = model.config.val_split or model.config.test_split
    if not split:
        raise trained.ModelError(f"{model.name} was trained without a validation or test split: name one with --split")
    return split


def evaluate(model: trained.Model, root: str | None = None, split: str | None = None, *, ten_crop: bool = False,
             actors: int | None = None, batch_size: int = 64) -> dict[str, dict]:
    """{"single": metrics, "tencrop": metrics (when ten_crop)} for `model` on `split` (default: the
    run's validation split) of the dataset at `root` (default: the training data); metrics are
    top1_err, top5_err, loss, images and skipped (rows that failed to decode, carry a label outside
    the classes or sit in a row group that cannot be read), and skipped_notes (why, for people).
    Needs Ray."""
    root = root or model.config.data
    split = split or default_split(model)
    manifest = data.load_manifest(root)
    trained.check_compatible(model, manifest)
    rows = manifest.split(split).rows
    mean, std, _ = trained.normalization(model, fallback=manifest)
    transforms = {"single": model.config.eval_transform, **({"tencrop": TENCROP} if ten_crop else {})}
    results = {}
    for kind, transform in transforms.items():
        ds = data.read_split(root, split, transform, image_size=model.image_size, manifest=manifest)
        sums = _counts(ds, model, mean, std, actors, batch_size)
        n = sums["images"]
        if n == 0:
            raise data.DataError(f"{manifest.root}: no image of split {split!r} could be decoded ({rows} rows)")
        results[kind] = {"top1_err": 1 - sums["top1"] / n, "top5_err": 1 - sums["top5"] / n,
                         "loss": sums["nll"] / n, "images": int(n), "skipped": int(rows - n),
                         "skipped_notes": data.skipped_notes(manifest.root, split) if rows > n else []}
    return results


def _counts(ds, model: trained.Model, mean, std, actors: int | None, batch_size: int) -> dict:
    size, resources = runtime.pool_size(actors)
    scored = ds.map_batches(Scorer, fn_constructor_kwargs={"spec": model.spec(), "mean": mean, "std": std},
                            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=size), batch_size=batch_size,
                            batch_format="numpy", **resources)
    sums = dict.fromkeys(("images", "top1", "top5", "nll"), 0)
    for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
        for key in sums:
            sums[key] += batch[key].sum().item()
    return sums


def metric_names(results: dict[str, dict], split: str) -> dict[str, float]:
    """{"eval_val_top1_err": ..., "eval_val_tencrop_top1_err": ...}: MLflow metric names."""
    split = split.replace("+", "_")
    return {f"eval_{split}{'' if kind == 'single' else '_' + kind}_{key}": value
            for kind, metrics in results.items() for key, value in metrics.items()
            if key not in ("skipped", "skipped_notes")}


def report(model: trained.Model, results: dict[str, dict], root: str, split: str) -> str:
    """The table people read: one line per protocol, and training's own numbers on the same split."""
    single = results["single"]
    lines = [f"[densenet_ray] {model.name} on {root} split {split!r}: {single['images']} images"
             + (f" ({single['skipped']} skipped, left out)" if single["skipped"] else ""),
             *(f"  skipped: {note}" for note in single.get("skipped_notes", [])[:10]),
             f"{'':<18}{'top-1 err':>10}{'top-5 err':>11}{'loss':>9}"]
    for kind, label in (("single", "single-crop"), ("tencrop", "10-crop")):
        if kind in results:
            r = results[kind]
            lines.append(f"{label:<18}{r['top1_err']:>10.4f}{r['top5_err']:>11.4f}{r['loss']:>9.4f}")
    same_split = split == model.config.val_split and str(root).rstrip("/") == str(model.config.data).rstrip("/")
    if same_split and "val_top1_err" in model.logged:
        lines.append(f"{'training logged':<18}{model.logged['val_top1_err']:>10.4f}"
                     f"{model.logged.get('val_top5_err', float('nan')):>11.4f}   (single-crop, final epoch)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = cli.model_parser("evaluate", __doc__, logs=True)
    p.add_argument("data", metavar="DATA", nargs="?", help="dataset folder or URI (default: the training data)")
    p.add_argument("--split", help="split to evaluate (default: the run's validation split, e.g. val)")
    p.add_argument("--ten-crop", action="store_true", help="also the 10-crop test (Table 3), reported separately")
    p.add_argument("--actors", type=int, help="inference actors (default: one per GPU, else one per two CPUs)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch and actor call")
    p.add_argument("--no-log", action="store_true", help="print only; log nothing to MLflow")
    args = p.parse_args(argv)
    if args.batch_size < 1 or (args.actors is not None and args.actors < 1):
        p.error("--batch-size and --actors: expected positive integers")
    try:
        model = trained.load(args.model, tracking_uri=args.mlflow_tracking_uri, trust_pickle=args.trust_pickle)
        root, split = args.data or model.config.data, args.split or default_split(model)
        if not args.no_log:
            check_tracking(trained.tracking_uri(model))  # seconds now, rather than a lost result later
        runtime.connect(cpus=2)
        results = evaluate(model, root, split, ten_crop=args.ten_crop, actors=args.actors,
                           batch_size=args.batch_size)
        print(report(model, results, root, split), flush=True)
        if not args.no_log:
            run_id = trained.record(model, metrics=metric_names(results, split),
                                   tags={f"eval_{split.replace('+', '_')}_data": root})
            print(f"[densenet_ray] logged to MLflow run {run_id} as eval_{split.replace('+', '_')}_*", flush=True)
    except cli.ERRORS as err:
        return cli.error(err)
    return 0


if __name__ == "__main__":
    # The imported copy's main: Ray ships the actor class by reference to densenet_ray.evaluate, not to __main__.
    from densenet_ray.evaluate import main as imported_main

    sys.exit(imported_main())
