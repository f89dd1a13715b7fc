"""Read-only reports on a dataset folder: `verify` (is every byte right?) and `inspect` (what is in it?).

    problems, lines = verify("/data/imagenet", sample=10_000)   # problems == [] means good
    print(inspect("/data/imagenet", grid="imagenet.png"))

verify checks the manifest, then one Ray task per shard checks size, sha256, footer, schema, row
count, labels against the manifest's class counts, image sizes against the split's image_size, and
that every (or a seeded sample of) image decodes fully with the stored height, width and channels;
last, that no image's bytes are in two splits (a leak between train and val).
"""

import hashlib
import posixpath

import numpy as np
import pyarrow.parquet as pq
import ray
from PIL import Image, ImageDraw

from densenet_ray import runtime

from .images import Rejected, load, open_image
from .manifest import SCHEMA, DataError, check_footer, filesystem, load_manifest

MAX_SHOWN = 20   # problems listed per shard; the count is always complete


def verify(root, sample=None, seed=0):
    """(problems, summary lines). `sample`: decode this many seeded-random images instead of all.
    A manifest that cannot be read raises DataError: with no list of shards there is nothing to verify."""
    m = load_manifest(root)
    fs, base = filesystem(m.root)
    shards = [(split, sh) for split, info in m.splits.items() for sh in info.shards]
    total = sum(sh.rows for _, sh in shards)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(total, min(sample, total), replace=False)) if sample is not None else None
    runtime.connect()
    refs, start = [], 0
    for split, sh in shards:
        rows = None if chosen is None else chosen[(chosen >= start) & (chosen < start + sh.rows)] - start
        refs.append(_verify_shard.remote(fs, base, m, sh, rows, m.splits[split].image_size))
        start += sh.rows
    results = ray.get(refs)
    problems, lines = [], []
    for split, info in m.splits.items():
        mine = [r for (s, _), r in zip(shards, results) if s == split]
        problems += [p for r in mine for p in r["problems"]]
        counts = sum((r["class_counts"] for r in mine), np.zeros(m.num_classes, np.int64))
        if all(r["read"] for r in mine) and tuple(counts) != info.class_counts:
            wrong = int(np.flatnonzero(counts != np.array(info.class_counts))[0])
            problems.append(f"{m.root}: split {split}: class {wrong} ({m.classes[wrong]}) has "
                            f"{counts[wrong]} rows in the shards; dataset.json says {info.class_counts[wrong]}")
        lines.append(f"{split}: {len(info.shards)} shards, {info.rows:,} rows, "
                     f"{sum(r['decoded'] for r in mine):,} images decoded")
    problems += leaks(fs, base, m, shards, results)
    return problems, lines


def leaks(fs, base, m, shards, results, shown=3):
    """Images whose bytes are in more than one split: each pair of splits, how many, a few keys.
    Each shard task hashed every row's encoded bytes into 8 bytes (blake2b), so the driver holds
    8 bytes an image (ImageNet: 10 MB) and reads back only the keys it shows."""
    hashes = {}   # split -> (sorted unique hashes)
    for (split, _), r in zip(shards, results):
        hashes.setdefault(split, []).append(r["hashes"])
    hashes = {s: np.unique(np.concatenate(h)) for s, h in hashes.items()}
    problems, names = [], list(hashes)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            common = np.intersect1d(hashes[a], hashes[b], assume_unique=True)
            if not len(common):
                continue
            keys = _keys_of(fs, base, shards, results, a, common[:shown])
            problems.append(f"{m.root}: {len(common):,} image(s) in split {a} have the same bytes as images in "
                            f"split {b} (a leak: {b}'s error no longer measures unseen images), e.g. {a} keys "
                            + ", ".join(keys) + "; remove them from one split and convert again")
    return problems


def _keys_of(fs, base, shards, results, split, wanted):
    """The keys of the rows of `split` whose hash is in `wanted` (a few)."""
    keys = []
    for (s, sh), r in zip(shards, results):
        rows = np.flatnonzero(np.isin(r["hashes"], wanted)) if s == split else []
        if len(rows):
            with fs.open_input_file(posixpath.join(base, sh.file)) as f:
                column = pq.read_table(f, columns=["key"])["key"]
            keys += [column[int(i)].as_py() for i in rows]
        if len(keys) >= len(wanted):
            break
    return keys[:len(wanted)]


@ray.remote(num_cpus=1)
def _verify_shard(fs, base, m, shard, rows, image_size):
    where = f"{m.root}/{shard.file}"
    out = {"problems": [], "class_counts": np.zeros(m.num_classes, np.int64), "decoded": 0, "read": False,
           "hashes": np.zeros(0, np.uint64)}
    try:
        check_footer(fs, base, m, shard, image_size)
    except DataError as e:
        out["problems"].append(str(e))
        return out
    path = posixpath.join(base, shard.file)
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    if digest.hexdigest() != shard.sha256:
        out["problems"].append(f"{where}: sha256 {digest.hexdigest()}; dataset.json says {shard.sha256}")
        return out
    with fs.open_input_file(path) as f:
        table = pq.read_table(f, columns=SCHEMA.names)
    labels = table["label"].to_numpy()
    bad = np.flatnonzero((labels < 0) | (labels >= m.num_classes))
    if len(bad):
        out["problems"].append(f"{where}: row {bad[0]}: field label is {labels[bad[0]]}; expected "
                               f"0..{m.num_classes - 1} ({len(bad)} rows out of range)")
        return out
    out["class_counts"], out["read"] = np.bincount(labels, minlength=m.num_classes), True
    mode = "L" if m.channels == 1 else "RGB"
    keys, heights, widths = table["key"].to_pylist(), table["height"].to_numpy(), table["width"].to_numpy()
    images = table["image"]
    out["hashes"] = np.array([int.from_bytes(hashlib.blake2b(v.as_buffer(), digest_size=8).digest(), "little")
                              for v in images], np.uint64)
    bad = []
    for i in range(table.num_rows) if rows is None else rows:
        i = int(i)
        try:
            img = open_image(images[i].as_py())
            load(img)
            if img.format not in ("JPEG", "PNG") or img.mode != mode:
                raise Rejected(f"{img.format} {img.mode}; stored images are JPEG or PNG in {mode}")
            if img.size != (widths[i], heights[i]):
                raise Rejected(f"{img.size[0]}x{img.size[1]}; the row says {widths[i]}x{heights[i]}")
        except Rejected as e:
            bad.append(f"{where}: row {i} (key {keys[i]}): {e}")
        out["decoded"] += 1
    out["problems"] += bad[:MAX_SHOWN] + ([f"{where}: ... {len(bad) - MAX_SHOWN} more rows like these"]
                                          if len(bad) > MAX_SHOWN else [])
    return out


def inspect(root, grid=None, per_class=8, max_classes=20):
    """A text report (classes, splits, counts, image sizes, how it was made); with `grid`, also a PNG
    of up to `per_class` training images for each of the first `max_classes` classes."""
    m = load_manifest(root)
    fs, base = filesystem(m.root)
    lines = [f"{m.root}: {m.name}, {m.num_classes} classes, {m.channels} channel(s)",
             f"mean {_fmt(m.mean)}  std {_fmt(m.std)}"]
    for split, info in m.splits.items():
        size = "x".join(map(str, info.image_size)) if info.image_size else "mixed sizes"
        counts = np.array(info.class_counts)
        lines.append(f"{split}: {info.rows:,} images, {len(info.shards)} shards, "
                     f"{sum(s.bytes for s in info.shards) / 2**20:,.1f} MiB, {size}; images per class "
                     f"min {counts.min()} median {int(np.median(counts))} max {counts.max()}")
        if info.image_size is None and info.shards:
            with fs.open_input_file(posixpath.join(base, info.shards[0].file)) as f:
                t = pq.read_table(f, columns=["height", "width"])
            h, w = t["height"].to_numpy(), t["width"].to_numpy()
            lines.append(f"  sizes in {info.shards[0].file}: height {h.min()}..{h.max()} (median "
                         f"{int(np.median(h))}), width {w.min()}..{w.max()} (median {int(np.median(w))})")
    shown = list(range(min(m.num_classes, max_classes)))
    counts = m.splits[next(iter(m.splits))].class_counts
    lines.append("classes (label, id, name, images in the first split): " + ", ".join(
        f"{i} {m.wnids[i]}{'' if m.classes[i] == m.wnids[i] else ' ' + repr(m.classes[i])} ({counts[i]})"
        for i in shown) + (" ..." if m.num_classes > max_classes else ""))
    lines.append(f"made by: {m.created.get('command') or m.created.get('source', '?')} at {m.created.get('at', '?')}")
    if grid:
        _grid(m, fs, base, grid, shown, per_class)
        lines.append(f"grid: {grid}")
    return "\n".join(lines)


def _grid(m, fs, base, path, classes, per_class, cell=96):
    split = "train" if "train" in m.splits else next(iter(m.splits))
    picked = {c: [] for c in classes}
    for sh in m.splits[split].shards:
        with fs.open_input_file(posixpath.join(base, sh.file)) as f:
            t = pq.read_table(f, columns=["image", "label"])
        for data, label in zip(t["image"].to_pylist(), t["label"].to_pylist()):
            if label in picked and len(picked[label]) < per_class:
                picked[label].append(data)
        if all(len(v) == per_class for v in picked.values()):
            break
    label_w = 160
    canvas = Image.new("RGB", (label_w + per_class * cell, len(classes) * cell), "white")
    draw = ImageDraw.Draw(canvas)
    for row, c in enumerate(classes):
        draw.text((4, row * cell + cell // 2 - 6), f"{c}: {m.classes[c]}"[:24], fill="black")
        for col, data in enumerate(picked[c]):
            img = open_image(data).convert("RGB")
            img.thumbnail((cell - 4, cell - 4))
            if max(img.size) < cell // 2:   # tiny images (8x8 digits, 32x32 CIFAR): enlarge to see them
                k = (cell - 4) // max(img.size)
                img = img.resize((img.width * k, img.height * k), Image.NEAREST)
            canvas.paste(img, (label_w + col * cell + 2, row * cell + 2))
    canvas.save(path)


def _fmt(values):
    return "(" + ", ".join(f"{v:.4f}" for v in values) + ")"
