"""Batch inference: the top-k classes, with names and probabilities, of every image in a dataset or folder.

    python -m densenet_ray.predict models:/densenet-digits@champion ~/photos --out predictions.parquet
    python -m densenet_ray.predict models:/densenet-imagenet/3 s3://bucket/imagenet --split val --top-k 5 \\
        --out val_predictions.parquet

INPUT is a shard dataset (a folder with dataset.json: every split, or --split) or a folder of image
files (read recursively, hidden files left out) or one image file. Each image goes through the
model's evaluation transform (as in training's validation) in the model's colour mode. Ray Data
reads and decodes in tasks; an actor pool (one actor per GPU, else one per two CPUs; --actors) runs
the model, built once per actor.

The output is one Parquet file with one row per input image, in input order:

    key      the file's path relative to INPUT, or the shard row's source key
    split    the dataset split (null for files)
    label    the true label of a shard row (null for files)
    class_ids, classes, probs   the top-k labels, their class names and softmax probabilities
    error    why the image could not be used (unreadable, not an image, truncated...), else null

A bad input is a row with its reason, never a failed run; the command lists the first few.
"""

from __future__ import annotations

import math
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray.data
import torch

from densenet_ray import cli, data, runtime, trained
from densenet_ray.data import images, walk
from densenet_ray.data.manifest import MANIFEST, DataError, filesystem
from densenet_ray.data.pipeline import DECODE_ERRORS
from densenet_ray.data.transforms import TRANSFORMS

SCHEMA = pa.schema([
    ("key", pa.string()), ("split", pa.string()), ("label", pa.int64()),
    ("class_ids", pa.list_(pa.int32())), ("classes", pa.list_(pa.string())), ("probs", pa.list_(pa.float32())),
    ("error", pa.string()),
])
FILES_PER_TASK = 64
READ_SCHEMA = pa.schema([("key", pa.string()), ("split", pa.string()), ("label", pa.int64()),
                         ("image", pa.binary()), ("error", pa.string())])


def read_files(batch: dict, root: str) -> pa.Table:
    """Ray Data task: the bytes of each file in batch["key"] (relative to `root`), or why not."""
    blobs, errors = [], []
    listed = batch.get("error")
    for i, key in enumerate(batch["key"]):
        try:
            # a FIFO, a link leading outside INPUT... (a column with no reason at all arrives as NaN floats)
            if listed is not None and isinstance(listed[i], str):
                raise walk.NotRegular(listed[i])
            blobs.append(images.upright(walk.read_regular(os.path.join(root, key))))
            errors.append(None)
        except walk.NotRegular as e:
            blobs.append(None)
            errors.append(str(e))
        except OSError as e:
            blobs.append(None)
            errors.append(f"unreadable: {e.strerror or e}")
    n = len(blobs)
    return pa.table({"key": list(batch["key"]), "split": [None] * n, "label": [None] * n, "image": blobs,
                     "error": errors}, schema=READ_SCHEMA)


def read_row_group(batch: dict, fs) -> pa.Table:
    """Ray Data task: the rows of one shard row group, images still encoded."""
    tables = []
    for path, group, split in zip(batch["path"], batch["row_group"], batch["split"]):
        try:
            with fs.open_input_file(str(path)) as f:
                t = pq.ParquetFile(f).read_row_group(int(group), columns=["key", "label", "image"])
        except (OSError, pa.ArrowInvalid) as e:
            raise DataError(f"{path}: row group {group} is not readable: {e}; run "
                            "`python -m densenet_ray.data verify` on the dataset") from None
        n = t.num_rows
        tables.append(pa.table({"key": t["key"], "split": [str(split)] * n, "label": t["label"], "image": t["image"],
                                "error": pa.nulls(n, pa.string())}, schema=READ_SCHEMA))
    return pa.concat_tables(tables)


def why_unusable(encoded: bytes | None, err: Exception) -> str:
    """The reason an image failed, in the converter's words where it has them."""
    try:
        images.load(images.open_image(encoded))
    except images.Rejected as rejected:
        return str(rejected)
    return f"{type(err).__name__}: {err}"


class Predictor:
    """A Ray Data actor: the model built once, then per batch the top-k of each decodable image."""

    def __init__(self, spec: dict, mean, std, transform: str, size: int, mode: str, classes: list, k: int) -> None:
        self.net = trained.rebuild(spec).to("cuda" if torch.cuda.is_available() else "cpu")
        self.mean, self.std, self.transform, self.size, self.mode = mean, std, TRANSFORMS[transform], size, mode
        self.classes, self.k = classes, min(k, len(classes))

    def __call__(self, batch: pa.Table) -> pa.Table:
        errors, pixels, good = batch["error"].to_pylist(), [], []
        for i, encoded in enumerate(batch["image"].to_pylist()):
            if errors[i] is not None:
                continue
            try:
                pixels.append(self.transform(encoded, self.size, None, self.mode))
                good.append(i)
            except DECODE_ERRORS as e:
                errors[i] = why_unusable(encoded, e)
        ids = [None] * batch.num_rows
        names, probs = list(ids), list(ids)
        if pixels:
            p = trained.class_probabilities(self.net, torch.from_numpy(np.stack(pixels)), self.mean, self.std).cpu()
            top = p.topk(self.k, dim=1)
            for i, values, indices in zip(good, top.values.tolist(), top.indices.tolist()):
                ids[i], probs[i], names[i] = indices, values, [self.classes[j] for j in indices]
        return pa.table({"key": batch["key"], "split": batch["split"], "label": batch["label"], "class_ids": ids,
                         "classes": names, "probs": probs, "error": errors}, schema=SCHEMA)


def inputs(source: str, splits: list[str] | None, model: trained.Model):
    """(Ray dataset of READ_SCHEMA rows, number of inputs, the Manifest or None) for INPUT."""
    fs, base = filesystem(source)
    if "://" in source or fs.get_file_info(f"{base}/{MANIFEST}").type == pafs.FileType.File:
        m = data.load_manifest(source)
        trained.check_compatible(model, m)
        splits = splits or list(m.splits)
        units = [{"path": path, "row_group": g, "split": name} for name in splits
                 for path, shard in zip(m.shard_paths(name)[1], m.split(name).shards) for g in range(shard.row_groups)]
        rows = sum(m.split(name).rows for name in splits)
        ds = ray.data.from_items(units, override_num_blocks=max(1, len(units)))
        return ds.map_batches(read_row_group, fn_kwargs={"fs": fs}, batch_size=None), rows, m
    if splits:
        raise cli.ModelError(f"--split {','.join(splits)}: {source} is a folder of files, not a shard dataset "
                                f"(no {MANIFEST}); leave --split out")
    if os.path.isfile(source):
        root, listed = os.path.dirname(os.path.abspath(source)), [(os.path.basename(source), None)]
    elif os.path.isdir(source):
        root, listed = source, _listing(source)
    elif os.path.exists(source):   # a FIFO would block the reader forever
        raise cli.ModelError(f"INPUT {source!r}: not a regular file or folder; expected a dataset folder "
                             f"(with {MANIFEST}), a folder of images or an image file")
    else:
        raise cli.ModelError(f"INPUT {source!r}: no such file or folder; expected a dataset folder "
                                f"(with {MANIFEST}), a folder of images or an image file")
    if not listed:
        raise cli.ModelError(f"INPUT {source!r}: a folder without files (hidden ones are left out)")
    ds = ray.data.from_items([{"key": k, "error": e} for k, e in listed],
                             override_num_blocks=math.ceil(len(listed) / FILES_PER_TASK))
    return ds.map_batches(read_files, fn_kwargs={"root": root}, batch_size=None), len(listed), None


def _files(root: str) -> list[str]:
    """Every non-hidden file under `root` that will be read, as sorted paths relative to it."""
    return [k for k, error in _listing(root) if error is None]


def _listing(root: str) -> list[tuple[str, str | None]]:
    """(path relative to `root`, None or why it is not read) for every non-hidden name under `root`,
    sorted; by the converter's rules (data/walk.py): regular files only, links followed only inside
    `root`, each file once."""
    tree = walk.Tree(root)
    return [(k, p.reason if isinstance(p, walk.Skip) else None) for k, p in tree.resolve(tree.list(""))]


def check_out(out: str) -> None:
    """Refuse an --out that cannot be written before any prediction is computed."""
    if "://" in out:
        raise cli.ModelError(f"--out {out}: predictions are written to a local file; give a local path")
    if os.path.isdir(out):
        raise cli.ModelError(f"--out {out}: a folder; expected the Parquet file to write (e.g. {out}/predictions.parquet)")
    if os.path.exists(out) and not os.path.isfile(out):
        raise cli.ModelError(f"--out {out}: not a regular file; expected the Parquet file to write")
    folder = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(folder, exist_ok=True)
        with open(out + ".tmp", "wb"):
            pass
        os.remove(out + ".tmp")
    except OSError as e:
        raise cli.ModelError(f"--out {out}: cannot be written ({e.strerror or e})") from None


def predict(model: trained.Model, source: str, out: str, *, splits: list[str] | None = None, top_k: int = 5,
            actors: int | None = None, batch_size: int = 64, stats: str | None = None) -> dict:
    """Write the predictions for every image of `source` to the Parquet file `out`; returns
    {"rows", "errors": [(key, reason)], "normalised with"}. Needs Ray."""
    check_out(out)
    ds, expected, manifest = inputs(source, splits, model)
    mean, std, where = trained.normalization(model, fallback=manifest,
                                            given=data.load_manifest(stats) if stats else None)
    size, resources = runtime.pool_size(actors)
    ds.context.execution_options.preserve_order = True
    ds = ds.map_batches(Predictor, fn_constructor_kwargs={
        "spec": model.spec(), "mean": mean, "std": std, "transform": model.config.eval_transform,
        "size": model.image_size, "mode": model.mode, "classes": list(model.classes), "k": top_k},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=size), batch_size=batch_size, batch_format="pyarrow",
        **resources)
    rows, errors = 0, []
    try:
        with pq.ParquetWriter(out + ".tmp", SCHEMA) as writer:
            for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                writer.write_table(table.cast(SCHEMA))
                rows += table.num_rows
                bad = table.filter(pc.is_valid(table["error"]))
                errors += zip(bad["key"].to_pylist(), bad["error"].to_pylist())
        os.replace(out + ".tmp", out)  # no half-written predictions under the real name
    finally:
        if os.path.exists(out + ".tmp"):
            os.remove(out + ".tmp")
    if rows != expected:
        raise data.DataError(f"{source}: {expected} inputs but {rows} predictions; shards changed while reading?")
    return {"rows": rows, "errors": errors, "normalised with": where}


def main(argv: list[str] | None = None) -> int:
    p = cli.model_parser("predict", __doc__, logs=False)
    p.add_argument("input", metavar="INPUT", help="a shard dataset, a folder of image files, or one image file")
    p.add_argument("--out", required=True, metavar="PREDICTIONS.parquet", help="the Parquet file to write")
    p.add_argument("--split", help="for a shard dataset: splits to read, comma separated (default: every split)")
    p.add_argument("--top-k", type=int, default=5, help="classes per image")
    p.add_argument("--actors", type=int, help="inference actors (default: one per GPU, else one per two CPUs)")
    p.add_argument("--batch-size", type=int, default=64, help="images per actor call")
    p.add_argument("--stats", metavar="DATASET", help="dataset whose mean/std normalise the images (default: the "
                   "training data's, read from the run's config)")
    args = p.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1 or (args.actors is not None and args.actors < 1):
        p.error("--top-k, --batch-size and --actors: expected positive integers")
    try:
        check_out(args.out)   # before the model is loaded and any image read
        model = trained.load(args.model, tracking_uri=args.mlflow_tracking_uri, trust_pickle=args.trust_pickle)
        runtime.connect(cpus=2)
        result = predict(model, args.input, args.out, splits=args.split.split(",") if args.split else None,
                         top_k=args.top_k, actors=args.actors, batch_size=args.batch_size, stats=args.stats)
    except cli.ERRORS as err:
        return cli.error(err)
    errors = result["errors"]
    print(f"[densenet_ray] {model.name}: {result['rows']} images -> {args.out} (normalised with the mean/std of "
          f"{result['normalised with']}); {len(errors)} could not be used" + (":" if errors else ""), flush=True)
    for key, reason in errors[:10]:
        print(f"  {key}: {reason}")
    if len(errors) > 10:
        print(f"  ... and {len(errors) - 10} more: the rows whose error is not null")
    return 0


if __name__ == "__main__":
    # The imported copy's main: Ray ships the actor class by reference to densenet_ray.predict, not to __main__.
    from densenet_ray.predict import main as imported_main

    sys.exit(imported_main())
