"""The data CLI: turn datasets into shards, check them, look at them.

    python -m densenet_ray.data convert imagenet /datasets/ILSVRC2012 s3://bucket/imagenet --max-side 512
    python -m densenet_ray.data convert imagefolder /datasets/flowers /data/flowers [--channels auto|1|3]
    python -m densenet_ray.data convert cifar10 cifar-10-python.tar.gz /data/cifar10 --holdout 5000
    python -m densenet_ray.data convert svhn /datasets/svhn /data/svhn --holdout 6000
    python -m densenet_ray.data convert digits /tmp/digits
    python -m densenet_ray.data verify /data/imagenet [--sample 10000]
    python -m densenet_ray.data inspect /data/imagenet --grid imagenet.png

Conversion and verification run as Ray tasks: on a cluster set RAY_ADDRESS (or run it as a Ray job).
Exit status: 0 good, 1 problems found (verify, or rejects with --strict: then no dataset is written),
2 unusable input.
"""

import argparse
import math
import os
import shlex
import sys

from . import sources
from .manifest import REJECTS, DataError
from .verify import inspect, verify
from .write import SHARD_MB, StrictFailure, convert

MAX_REJECTS_SHOWN = 10   # printed on a --strict failure

READERS = {
    "imagefolder": ("SRC/<split>/<class>/<image>: one folder per split (train/, val/, ...), each with "
                    "one folder per class; also the ILSVRC2012 train layout",
                    lambda a: sources.imagefolder(a.src, a.splits.split(",") if a.splits else None,
                                                  a.channels if a.channels == "auto" else int(a.channels))),
    "imagenet": ("ILSVRC2012 as distributed: train/<wnid>/*.JPEG, flat val/ labelled by LOC_val_solution.csv "
                 "or ILSVRC2012_validation_ground_truth.txt + ILSVRC2012_devkit_t12/data/meta.mat in SRC",
                 lambda a: sources.imagenet(a.src)),
    "cifar10": ("cifar-10-python.tar.gz (the official python version) or the folder it extracts to",
                lambda a: sources.cifar(a.src, 10)),
    "cifar100": ("cifar-100-python.tar.gz (the official python version) or the folder it extracts to",
                 lambda a: sources.cifar(a.src, 100)),
    "svhn": ("a folder with train_32x32.mat, test_32x32.mat and optionally extra_32x32.mat",
             lambda a: sources.svhn(a.src)),
    "digits": ("scikit-learn's bundled 8x8 digits, no SRC: a seeded 80/20 train/val split",
               lambda a: sources.digits(a.seed)),
}


def parser():
    p = argparse.ArgumentParser(prog="python -m densenet_ray.data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="write a dataset folder of Parquet shards")
    kinds = conv.add_subparsers(dest="kind", required=True)
    for kind, (help_text, _) in READERS.items():
        k = kinds.add_parser(kind, help=help_text, description=help_text)
        if kind != "digits":
            k.add_argument("src", help="the dataset as downloaded (a local path)")
        k.add_argument("out", help="the dataset folder to write: a local path or URI (file://, s3://)")
        if kind == "imagefolder":
            k.add_argument("--splits", help="comma-separated split folders to convert (default: all)")
            k.add_argument("--channels", choices=["auto", "1", "3"], default="auto",
                           help="store grayscale (1) or RGB (3); auto: 1 when every image is grayscale "
                                "(Pillow modes 1, L, LA, I;16, I, F; palette images count as colour), "
                                "else 3 (default %(default)s)")
        k.add_argument("--shard-mb", type=float, default=SHARD_MB, help="target shard size in MiB (default %(default)s)")
        k.add_argument("--max-side", type=int, help="re-encode images whose longer side exceeds N pixels, keeping aspect")
        k.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images (default %(default)s)")
        k.add_argument("--seed", type=int, default=0, help="row shuffle and split seed (default %(default)s)")
        k.add_argument("--holdout", type=int, default=0, help="move N random train images to a new val split")
        k.add_argument("--strict", action="store_true", help="all or nothing: if any source file is rejected, "
                       "write no dataset (OUT keeps only rejects.jsonl, or its previous dataset) and exit 1")
        k.add_argument("--overwrite", action="store_true", help="replace an existing dataset at OUT")
    ver = sub.add_parser("verify", help="check manifest, checksums, schema, labels; decode images")
    ver.add_argument("out")
    ver.add_argument("--sample", type=int, help="decode N seeded-random images instead of all")
    ins = sub.add_parser("inspect", help="class counts, sizes, and a PNG grid of sample images")
    ins.add_argument("out")
    ins.add_argument("--grid", metavar="FILE.png", help="write a grid of training images per class")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        if args.command == "convert":
            return _convert(args, argv)
        if args.command == "verify":
            if args.sample is not None and args.sample < 0:
                raise DataError(f"--sample {args.sample}: expected a number of images >= 0 (leave it out to decode all)")
            problems, lines = verify(args.out, sample=args.sample)
            print("\n".join(lines))
            if problems:
                print(f"{len(problems)} problem(s):\n" + "\n".join(f"  {p}" for p in problems), file=sys.stderr)
                return 1
            print(f"{args.out}: OK")
            return 0
        if args.grid:
            _check_grid(args.grid)
        print(inspect(args.out, grid=args.grid))
        return 0
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _check_grid(path):
    """--grid FILE.png: a PNG in a folder that exists, checked before any shard is read."""
    if not path.lower().endswith(".png"):
        raise DataError(f"--grid {path}: the grid is written as PNG; give a file name ending in .png")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise DataError(f"--grid {path}: no folder {folder}; create it first or write the grid elsewhere")
    if os.path.isdir(path):
        raise DataError(f"--grid {path}: a folder; expected a file name ending in .png")


def _convert(args, argv):
    if args.quality not in range(1, 101) or (args.max_side is not None and args.max_side < 1):
        raise DataError(f"--quality {args.quality} / --max-side {args.max_side}: expected 1..100 and N >= 1")
    if args.seed < 0:
        raise DataError(f"--seed {args.seed}: expected an integer >= 0")
    if not (math.isfinite(args.shard_mb) and args.shard_mb > 0):
        raise DataError(f"--shard-mb {args.shard_mb}: expected a positive number of MiB (default {SHARD_MB})")
    if args.holdout < 0:
        raise DataError(f"--holdout {args.holdout}: expected a number of images >= 0")
    source = READERS[args.kind][1](args)
    command = "python -m densenet_ray.data " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        summary = convert(source, args.out, shard_mb=args.shard_mb, max_side=args.max_side, quality=args.quality,
                          seed=args.seed, holdout=args.holdout, overwrite=args.overwrite, strict=args.strict,
                          command=command)
    except StrictFailure as e:
        _table(e.summary)
        print(f"--strict: {e}", file=sys.stderr)
        for r in e.rejects[:MAX_REJECTS_SHOWN]:
            print(f"  {r['split']}: {r['path']}: {r['reason']}", file=sys.stderr)
        if len(e.rejects) > MAX_REJECTS_SHOWN:
            print(f"  ... and {len(e.rejects) - MAX_REJECTS_SHOWN} more", file=sys.stderr)
        return 1
    _table(summary)
    rejected = sum(s["rejected"] for s in summary.values())
    print(f"wrote {args.out} ({'1 channel, grayscale' if source.channels == 1 else '3 channels, RGB'})"
          + (f"; rejected files and reasons: {os.path.join(args.out, REJECTS)}" if rejected else ""))
    return 0


def _table(summary):
    print(f"{'split':<8}{'written':>10}{'converted':>11}{'rejected':>10}{'shards':>8}")
    for split, s in summary.items():
        print(f"{split:<8}{s['written']:>10,}{s['converted']:>11,}{s['rejected']:>10,}{s['shards']:>8}")


if __name__ == "__main__":
    sys.exit(main())
