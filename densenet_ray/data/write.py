"""Sources to shards: shuffle with a seed, plan shards, convert them in parallel Ray tasks, then
write the manifest (a folder without dataset.json is an unfinished run) and rejects.jsonl.

    from densenet_ray.data import sources, write
    summary = write.convert(sources.imagenet("/datasets/ILSVRC2012"), "s3://bucket/imagenet-512",
                            max_side=512)

One Ray task per shard: it reads its source files, checks and converts every image, and writes
its Parquet file straight to the destination, so a conversion scales with the cluster's CPUs.
"""

import datetime
import hashlib
import json
import math
import posixpath
import re
import sys
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from densenet_ray import runtime, storage

from .counter import Counter
from .images import Rejected, channel_histograms, encode_array, mean_std, prepare
from .manifest import (MANIFEST, REJECTS, SCHEMA, DataError, Manifest, Shard, Split, filesystem, load_manifest,
                       write_manifest)
from .walk import NotRegular, Skip, read_regular

SHARD_MB = 200       # object stores stream 100-250 MB objects well
ROW_GROUP_MB = 8     # the reader's unit of work and of per-epoch shuffling (~70 ImageNet images)
MIN_ROW_GROUPS = 8   # per shard, so that even a split smaller than one shard is read by 8 tasks


class StrictFailure(Exception):
    """convert(strict=True) rejected source files: nothing was kept; str() says what is left at OUT."""

    def __init__(self, message, summary, rejects):
        super().__init__(message)
        self.summary, self.rejects = summary, rejects


def convert(source, out, *, shard_mb=SHARD_MB, max_side=None, quality=90, seed=0, holdout=0,
            overwrite=False, strict=False, progress=True, command=""):
    """Write `source` (a sources.Source) as a dataset folder at `out` (local path or URI).

    holdout: move this many seeded-random train images to a new "val" split (the paper holds out
    5,000 CIFAR and 6,000 SVHN training images). Returns {split: {written, converted, rejected,
    shards}}; rejected source files are listed in OUT/rejects.jsonl with their reason. strict: any
    rejected file raises StrictFailure and no dataset is written (see _discard).

    A dataset already at OUT (overwrite=True) stays whole and readable until the new one is: the new
    shards get names the old manifest does not list, the new dataset.json replaces the old in one
    write (a single object on object storage too: no renames, which object stores do not have), and
    only then are the old shards deleted. Interrupted before that, OUT still holds the old dataset;
    the new run's orphan shards are deleted by the next conversion into OUT.
    """
    if not (isinstance(seed, int) and seed >= 0):
        raise DataError(f"--seed {seed}: expected an integer >= 0")
    if not (isinstance(shard_mb, (int, float)) and math.isfinite(shard_mb) and shard_mb > 0):
        raise DataError(f"--shard-mb {shard_mb}: expected a positive number of MiB (default {SHARD_MB})")
    out = str(out).rstrip("/")
    fs, base = filesystem(out)
    old = _previous(fs, base, out, overwrite)
    splits = _holdout(source.splits, holdout, seed)
    opts = {"channels": source.channels, "max_side": max_side, "quality": quality}
    rng = np.random.default_rng(seed)
    plans = []   # (split, shard file, items)
    for split, items in splits.items():
        # One seeded permutation per split: every shard mixes all classes.
        items = [items[i] for i in rng.permutation(len(items))]
        n = _num_shards(items, shard_mb, opts, rng)
        for i, idx in enumerate(np.array_split(np.arange(len(items)), n)):
            plans.append((split, f"{split}/{split}-{i:05d}", [items[j] for j in idx]))
    # Names the dataset at OUT does not use, so that its shards are never overwritten.
    tag = f"-{uuid.uuid4().hex[:8]}" if any(f"{file}.parquet" in old for _, file, _ in plans) else ""
    plans = [(split, f"{file}{tag}.parquet", items) for split, file, items in plans]

    runtime.connect()
    counter = Counter.remote()
    refs = [_write_shard.remote(items, fs, base, file, opts, len(source.wnids), split == "train", counter)
            for split, file, items in plans]
    try:
        _wait(refs, counter, sum(len(p[2]) for p in plans), progress)
        results = ray.get(refs)
    except BaseException:   # Ctrl-C, a failed task: leave no half of a new dataset beside the old one
        for ref in refs:
            ray.cancel(ref, force=True)
        _delete(fs, base, [file for _, file, _ in plans])
        raise

    by_split = {split: [r for (s, _, _), r in zip(plans, results) if s == split] for split in splits}
    split_info = {split: _split(mine, len(source.wnids)) for split, mine in by_split.items()}
    summary = {split: {"written": split_info[split].rows, "converted": sum(r["converted"] for r in mine),
                       "rejected": sum(len(r["rejects"]) for r in mine), "shards": len(split_info[split].shards)}
               for split, mine in by_split.items()}
    rejects = [{"split": split, **r} for split, mine in by_split.items() for res in mine for r in res["rejects"]]
    written = [file for _, file, _ in plans]
    if strict and rejects:
        raise StrictFailure(_discard(fs, base, out, written, rejects, old), summary, rejects)
    if not split_info["train"].rows:
        _discard(fs, base, out, written, rejects, old)
        raise DataError(f"{out}: no train image could be stored; see "
                        + (f"{out}/{REJECTS}" if not old else "the reasons above (the dataset at OUT is unchanged)"))
    mean, std = mean_std(sum(r["hist"] for r in by_split["train"]))
    created = {"command": command, "at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "source": source.name, "seed": seed, "max_side": max_side, "jpeg_quality": quality,
               "shard_mb": shard_mb, "holdout": holdout, "counts": summary}
    m = Manifest(root=out, name=source.name, classes=tuple(source.classes), wnids=tuple(source.wnids),
                 channels=source.channels, mean=mean, std=std, splits=split_info, created=created)
    write_manifest(m)   # the swap: from here on OUT is the new dataset
    _write_rejects(fs, base, rejects)
    kept = {sh.file for info in split_info.values() for sh in info.shards}
    _delete(fs, base, sorted(old - kept) + _orphans(fs, base, set(splits) | {f.split("/")[0] for f in old}, kept))
    return summary


def _previous(fs, base, out, overwrite):
    """The shard files of the dataset at OUT ({} if none), after checking that OUT can be one."""
    try:
        storage.check(out, "OUT")   # an object store's missing bucket or endpoint, named with its settings
        found = fs.get_file_info(base).type
    except storage.StorageError as e:
        raise DataError(str(e)) from None
    if found not in (pafs.FileType.NotFound, pafs.FileType.Directory):
        raise DataError(f"{out}: {'a file' if found == pafs.FileType.File else 'not a folder'}; OUT is the "
                        "dataset folder to write: a missing or empty folder, or a dataset to replace (--overwrite)")
    try:
        fs.create_dir(base, recursive=True)
    except OSError as e:
        raise DataError(f"{out}: cannot create the dataset folder: {e}") from None
    if fs.get_file_info(posixpath.join(base, MANIFEST)).type == pafs.FileType.NotFound:
        return set()
    if not overwrite:
        raise DataError(f"{out}/{MANIFEST}: a dataset is already here; pass --overwrite to replace it")
    try:
        m = load_manifest(out)
    except DataError:   # not a readable dataset: nothing in it to keep whole
        return set()
    return {sh.file for info in m.splits.values() for sh in info.shards}


def _discard(fs, base, out, written, rejects, old):
    """Delete this run's shards (nothing that looks like a dataset is left) and say what remains:
    rejects.jsonl where no dataset was, else nothing new at all (the old dataset's files untouched)."""
    _delete(fs, base, written)
    if old:
        return (f"{len(rejects)} source file(s) rejected, so no dataset was written: the dataset already "
                f"at {out} is unchanged; the reasons are listed here")
    _write_rejects(fs, base, rejects)
    return (f"{len(rejects)} source file(s) rejected, so no dataset was written: {out} holds only "
            f"{REJECTS} (the reasons); fix or remove those files and convert again, or leave out --strict")


def _write_rejects(fs, base, rejects):
    with fs.open_output_stream(posixpath.join(base, REJECTS)) as f:
        f.write("".join(json.dumps(r) + "\n" for r in rejects).encode())


def _orphans(fs, base, splits, kept):
    """Shard files our converter named, in these split folders, that no manifest lists: left by an
    interrupted conversion (nothing else in the folders is touched)."""
    out = []
    for split in splits:
        pattern = re.compile(rf"{re.escape(split)}-\d{{5}}(-[0-9a-f]{{8}})?\.parquet")
        try:
            infos = fs.get_file_info(pafs.FileSelector(posixpath.join(base, split), allow_not_found=True))
        except OSError:
            continue
        out += [f"{split}/{i.base_name}" for i in infos if i.type == pafs.FileType.File
                and pattern.fullmatch(i.base_name) and f"{split}/{i.base_name}" not in kept]
    return out


def _delete(fs, base, files):
    """Best effort: a file that cannot be deleted is only left over, never an error."""
    for file in files:
        try:
            fs.delete_file(posixpath.join(base, file))
        except (OSError, FileNotFoundError):
            pass
    for folder in {posixpath.dirname(f) for f in files}:
        try:
            if not fs.get_file_info(pafs.FileSelector(posixpath.join(base, folder))):
                fs.delete_dir(posixpath.join(base, folder))
        except OSError:
            pass


def _split(results, num_classes):
    """The manifest's Split from its shard tasks' results (shards that kept no row are left out)."""
    written = [r for r in results if r["rows"]]
    sizes = {r["image_size"] for r in written}
    return Split(rows=sum(r["rows"] for r in written),
                 shards=tuple(Shard(r["file"], r["rows"], r["bytes"], r["sha256"], r["row_groups"]) for r in written),
                 class_counts=tuple(int(c) for c in sum((r["class_counts"] for r in written), np.zeros(num_classes))),
                 image_size=sizes.pop() if len(sizes) == 1 else None)


def prepare_item(item, channels, max_side, quality):
    """(stored bytes, pixels, converted) for a sources.Item, or raise Rejected."""
    if isinstance(item.payload, np.ndarray):
        return *encode_array(item.payload), False
    if isinstance(item.payload, Skip):   # listed but never opened: a FIFO, a link outside SRC, ...
        raise Rejected(item.payload.reason)
    try:
        data = read_regular(item.payload)
    except NotRegular as e:
        raise Rejected(str(e)) from None
    except OSError as e:
        raise Rejected(f"unreadable: {e.strerror or e}") from None
    return prepare(data, channels=channels, max_side=max_side, quality=quality)


def _holdout(splits, n, seed):
    if not n:
        return splits
    if "val" in splits:
        raise DataError(f"--holdout {n}: this source already has a val split")
    train = splits["train"]
    if not 0 < n < len(train):
        raise DataError(f"--holdout {n}: expected 1..{len(train) - 1} (train has {len(train)} images)")
    order = np.random.default_rng([seed, 1]).permutation(len(train))
    return {"train": [train[i] for i in sorted(order[n:])], "val": [train[i] for i in sorted(order[:n])],
            **{k: v for k, v in splits.items() if k != "train"}}


def _num_shards(items, shard_mb, opts, rng):
    """Enough shards of about shard_mb, from the stored size of a few sampled images."""
    sizes = []
    for i in rng.choice(len(items), min(16, len(items)), replace=False):
        try:
            sizes.append(len(prepare_item(items[i], **opts)[0]))
        except Rejected:
            pass
    return max(1, math.ceil(np.mean(sizes) * len(items) / (shard_mb * 2**20)) if sizes else 1)


@ray.remote(num_cpus=1)
def _write_shard(items, fs, base, file, opts, num_classes, with_stats, counter):
    cols = {name: [] for name in SCHEMA.names}
    rejects, converted = [], 0
    hist = np.zeros((opts["channels"], 256), np.int64)
    for n, item in enumerate(items, 1):
        try:
            stored, pixels, was_converted = prepare_item(item, **opts)
        except Rejected as e:
            rejects.append({"path": item.key, "reason": str(e)})
        else:
            for name, value in zip(SCHEMA.names, (stored, item.label, item.key, *pixels.shape[:2])):
                cols[name].append(value)
            converted += was_converted
            if with_stats:
                hist += channel_histograms(pixels)
        if n % 64 == 0 or n == len(items):
            counter.add.remote(n % 64 or 64)
    result = {"file": file, "rows": len(cols["label"]), "rejects": rejects, "converted": converted,
              "hist": hist, "class_counts": np.bincount(np.asarray(cols["label"], dtype=np.int64), minlength=num_classes)}
    if not result["rows"]:
        return result
    table = pa.table(cols, schema=SCHEMA)
    buf = pa.BufferOutputStream()
    group_rows = max(1, min(ROW_GROUP_MB * 2**20 // max(1, table.nbytes // table.num_rows),
                            math.ceil(table.num_rows / MIN_ROW_GROUPS)))
    pq.write_table(table, buf, row_group_size=group_rows, compression="none",
                   write_statistics=["label", "height", "width"])   # image bytes: no stats, no compression
    data = buf.getvalue()
    path = posixpath.join(base, file)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)
    sizes = set(zip(cols["height"], cols["width"]))
    return {**result, "bytes": data.size, "sha256": hashlib.sha256(data).hexdigest(),
            "row_groups": math.ceil(table.num_rows / group_rows),
            "image_size": sizes.pop() if len(sizes) == 1 else None}


def _wait(refs, counter, total, show):
    """Block until every shard task is done, drawing one line: images, images/s, ETA."""
    start, last = time.monotonic(), 0.0
    tty = sys.stderr.isatty()
    while True:
        _, pending = ray.wait(refs, num_returns=len(refs), timeout=0.5)
        now = time.monotonic()
        if show and (not pending or tty or now - last > 30):
            done = ray.get(counter.get.remote()) if pending else total
            rate = done / max(now - start, 1e-9)
            eta = (total - done) / rate if rate else float("inf")
            eta_s = f"{int(eta // 60)}m{int(eta % 60):02d}s" if math.isfinite(eta) else "?"
            print(f"\r  {done:,}/{total:,} images  {rate:,.0f} img/s  ETA {eta_s}   ",
                  end="" if tty and pending else "\n", file=sys.stderr, flush=True)
            last = now
        if not pending:
            return
