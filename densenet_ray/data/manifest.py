"""The shard format: `dataset.json` plus Parquet shards per split, and the checks that guard it.

    m = load_manifest("s3://bucket/imagenet")     # or a local path, or file:///data/imagenet
    m.classes[:2], m.num_classes, m.mean, m.splits["train"].rows
    check("/data/imagenet", splits=("train", "val"))   # every shard's footer too, no pixels

A dataset folder (README "Dataset format" is the full description):

    dataset.json                      this manifest
    train/train-00000.parquet ...     shards: rows of (image, label, key, height, width)
    val/val-00000.parquet ...
    rejects.jsonl                     source files left out at conversion, one {split, key, reason} a line
"""

import hashlib
import json
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from densenet_ray import storage

FORMAT = "densenet_ray.shards"
VERSION = 1
MANIFEST = "dataset.json"
REJECTS = "rejects.jsonl"
MAX_MANIFEST_BYTES = 64 << 20   # ImageNet's is ~0.5 MB; more is not a manifest, and is not read

SCHEMA = pa.schema([
    pa.field("image", pa.binary(), nullable=False),   # encoded bytes as stored: JPEG or PNG
    pa.field("label", pa.int64(), nullable=False),    # index into the manifest's classes
    pa.field("key", pa.string(), nullable=False),     # source file relative to SRC, or "file[index]"
    pa.field("height", pa.int32(), nullable=False),   # pixels, of the stored image
    pa.field("width", pa.int32(), nullable=False),
])


class DataError(Exception):
    """A dataset problem a person must fix; the message names the file, the field and the value."""


def filesystem(root):
    """(pyarrow FileSystem, path inside it) for a local path or a URI pyarrow reads (file://, s3://)."""
    try:
        return storage.filesystem(root)
    except storage.StorageError as e:
        raise DataError(str(e)) from e


@dataclass(frozen=True)
class Shard:
    file: str         # relative to the dataset root, "/"-separated
    rows: int
    bytes: int
    sha256: str
    row_groups: int   # the reader's unit of work


@dataclass(frozen=True)
class Split:
    rows: int
    shards: tuple
    class_counts: tuple                 # images per label
    image_size: tuple | None = None     # (height, width) when every image has it, else None


@dataclass(frozen=True)
class Manifest:
    root: str
    name: str
    classes: tuple          # display names in label order
    wnids: tuple            # stable class ids in label order: WordNet ids, folder names, digits
    channels: int           # 3 (RGB) or 1 (grayscale)
    mean: tuple             # per channel, 0..1 scale, over the train split's pixels
    std: tuple
    splits: dict            # split name -> Split
    created: dict = field(default_factory=dict)   # how it was made: tool, source, options, counts

    @property
    def num_classes(self):
        return len(self.classes)

    def split(self, name):
        """The Split called `name`; "train+extra" joins splits (SVHN trains on both)."""
        parts = name.split("+")
        missing = [p for p in parts if p not in self.splits]
        if missing:
            raise DataError(f"{self.root}/{MANIFEST}: no split {missing[0]!r}; "
                            f"it has {', '.join(self.splits)}")
        chosen = [self.splits[p] for p in parts]
        sizes = {s.image_size for s in chosen}
        return Split(rows=sum(s.rows for s in chosen),
                     shards=tuple(sh for s in chosen for sh in s.shards),
                     class_counts=tuple(map(sum, zip(*(s.class_counts for s in chosen)))),
                     image_size=sizes.pop() if len(sizes) == 1 else None)

    def shard_paths(self, split):
        """(filesystem, [path of each shard inside it]) for reading `split`."""
        fs, base = filesystem(self.root)
        return fs, [posixpath.join(base, s.file) for s in self.split(split).shards]

    def fingerprint(self):
        """16 hex digits that change when the classes or any shard's bytes change (not with the
        dataset's location or creation time): errors measured on two datasets compare only when
        their fingerprints are equal."""
        doc = {"classes": list(zip(self.wnids, self.classes)), "channels": self.channels,
               "splits": {k: sorted(sh.sha256 for sh in s.shards) for k, s in sorted(self.splits.items())}}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]

    def display_name(self):
        """What people call it: the source's name (cifar10, svhn, ...), else the folder's."""
        if self.name and self.name != "imagefolder":
            return self.name
        return posixpath.basename(str(self.root).rstrip("/")) or self.name

    def to_json(self):
        return {
            "format": FORMAT, "version": VERSION, "name": self.name,
            "classes": [{"id": i, "name": n} for i, n in zip(self.wnids, self.classes)],
            "channels": self.channels, "mean": list(self.mean), "std": list(self.std),
            "splits": {k: {"rows": s.rows, "image_size": list(s.image_size) if s.image_size else None,
                           "class_counts": list(s.class_counts),
                           "shards": [asdict(sh) for sh in s.shards]}
                       for k, s in self.splits.items()},
            "created": self.created,
        }


def write_manifest(m):
    fs, base = filesystem(m.root)
    with fs.open_output_stream(posixpath.join(base, MANIFEST)) as f:
        f.write((_dumps(m.to_json()) + "\n").encode())


def _dumps(value, depth=0):
    """JSON with one class or shard per line, so a 1000-class manifest stays readable."""
    pad = " " * (depth + 1)
    if isinstance(value, dict) and value:
        body = ",\n".join(f"{pad}{json.dumps(k)}: {_dumps(v, depth + 1)}" for k, v in value.items())
        return "{\n" + body + "\n" + " " * depth + "}"
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return "[\n" + ",\n".join(pad + json.dumps(v) for v in value) + "\n" + " " * depth + "]"
    return json.dumps(value)


def load_manifest(root):
    """Read and validate `root`/dataset.json; raises DataError naming the field that is wrong."""
    root = str(root).rstrip("/")
    fs, base = filesystem(root)
    where = f"{root}/{MANIFEST}"
    try:
        with storage.reaching(root):
            info = fs.get_file_info(posixpath.join(base, MANIFEST))
        if info.type == pafs.FileType.NotFound:
            storage.check(root, "dataset")   # a missing bucket lists as an empty folder
    except storage.StorageError as e:
        raise DataError(str(e)) from None
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{where}: no manifest. A dataset folder is written by "
                        "`python -m densenet_ray.data convert ...`")
    if info.type != pafs.FileType.File:   # a FIFO would block the reader forever
        raise DataError(f"{where}: not a regular file; the manifest is a JSON file")
    if info.size is not None and info.size > MAX_MANIFEST_BYTES:
        raise DataError(f"{where}: {info.size:,} bytes; a manifest is at most {MAX_MANIFEST_BYTES:,}")
    try:
        with fs.open_input_stream(posixpath.join(base, MANIFEST)) as f:
            doc = json.loads(f.read(MAX_MANIFEST_BYTES + 1))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{where}: not valid JSON ({e})") from e
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply; a manifest nests a few levels") from None
    return _parse(doc, root, where)


def _parse(doc, root, where):
    def need(obj, key, kind, at):
        value = obj.get(key) if isinstance(obj, dict) else None
        if not isinstance(value, kind) or isinstance(value, bool):
            names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise DataError(f"{where}: field {at}{key} is {value!r}; expected {names}")
        return value

    def bad(at, value, accepted):
        raise DataError(f"{where}: field {at} is {value!r}; expected {accepted}")

    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        bad("format", doc.get("format") if isinstance(doc, dict) else doc, repr(FORMAT))
    if need(doc, "version", int, "") != VERSION:
        bad("version", doc["version"], f"{VERSION} (this densenet_ray reads format version {VERSION})")
    classes = need(doc, "classes", list, "")
    if not classes:
        bad("classes", classes, "a non-empty list of {id, name}")
    for i, c in enumerate(classes):
        need(c, "id", str, f"classes[{i}].")
        need(c, "name", str, f"classes[{i}].")
    ids = [c["id"] for c in classes]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        bad("classes[].id", dup, "unique class ids")
    channels = need(doc, "channels", int, "")
    if channels not in (1, 3):
        bad("channels", channels, "1 (grayscale) or 3 (RGB)")
    stats = {}
    for key in ("mean", "std"):
        v = need(doc, key, list, "")
        if len(v) != channels or not all(isinstance(x, (int, float)) and 0 <= x <= 1 for x in v):
            bad(key, v, f"{channels} numbers in [0, 1], one per channel")
        stats[key] = tuple(float(x) for x in v)
    if not all(s > 0 for s in stats["std"]):
        bad("std", list(stats["std"]), "positive numbers")
    splits = {}
    for name, s in need(doc, "splits", dict, "").items():
        at = f"splits.{name}."
        shards = []
        for i, sh in enumerate(need(s, "shards", list, at)):
            f = need(sh, "file", str, f"{at}shards[{i}].")
            if f.startswith("/") or ".." in f.split("/"):
                bad(f"{at}shards[{i}].file", f, "a path inside the dataset folder")
            rows, size = need(sh, "rows", int, f"{at}shards[{i}]."), need(sh, "bytes", int, f"{at}shards[{i}].")
            digest = need(sh, "sha256", str, f"{at}shards[{i}].")
            groups = need(sh, "row_groups", int, f"{at}shards[{i}].")
            if rows < 0 or size <= 0 or groups < 0 or not re.fullmatch(r"[0-9a-f]{64}", digest):
                bad(f"{at}shards[{i}]", sh, "rows >= 0, bytes > 0, row_groups >= 0 and a hex sha256")
            shards.append(Shard(f, rows, size, digest, groups))
        rows = need(s, "rows", int, at)
        if rows != sum(sh.rows for sh in shards):
            bad(f"{at}rows", rows, f"the sum of its shards' rows, {sum(sh.rows for sh in shards)}")
        counts = need(s, "class_counts", list, at)
        if len(counts) != len(classes) or sum(counts) != rows:
            bad(f"{at}class_counts", f"{len(counts)} counts summing to {sum(counts)}",
                f"{len(classes)} counts summing to {rows}")
        size = s.get("image_size")
        if size is not None and not (isinstance(size, list) and len(size) == 2
                                     and all(isinstance(x, int) and x > 0 for x in size)):
            bad(f"{at}image_size", size, "null or [height, width]")
        splits[name] = Split(rows, tuple(shards), tuple(counts), tuple(size) if size else None)
    if not splits:
        bad("splits", {}, "at least one split")
    listed = {}
    for name, s in splits.items():   # a shard in two splits (or twice in one) is rows read twice: a leak
        for sh in s.shards:
            if sh.file in listed:
                bad(f"splits.{name}.shards", sh.file, f"each shard listed once (it is also in split {listed[sh.file]})")
            listed[sh.file] = name
    return Manifest(root=root, name=str(doc.get("name", "")), classes=tuple(c["name"] for c in classes),
                    wnids=tuple(ids), channels=channels, mean=stats["mean"], std=stats["std"],
                    splits=splits, created=doc.get("created", {}))


def check(root, splits=("train", "val")):
    """Pre-flight before any worker starts: the manifest and each shard's size, footer, schema, row
    count and label range (from footer statistics). Reads metadata only. Returns the Manifest."""
    m = load_manifest(root)
    shards = [(sh, m.split(name).image_size) for name in splits for sh in m.split(name).shards]
    fs, base = filesystem(m.root)
    with ThreadPoolExecutor(16) as pool:   # footers are small reads; object stores want them parallel
        list(pool.map(lambda s: check_footer(fs, base, m, *s), shards))
    return m


def check_footer(fs, base, m, shard, image_size=None):
    """The shard's size, footer, schema, row count, label range and, given the split's image_size
    (height, width), that every row has it (see check_image_size)."""
    where = f"{m.root}/{shard.file}"
    path = posixpath.join(base, shard.file)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{where}: shard listed in {MANIFEST} is missing")
    if info.type != pafs.FileType.File:   # a FIFO would block the reader forever
        raise DataError(f"{where}: not a regular file; a shard listed in {MANIFEST} is a Parquet file")
    if info.size != shard.bytes:
        raise DataError(f"{where}: {info.size} bytes; {MANIFEST} says {shard.bytes}")
    try:
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{where}: not a readable Parquet file (broken footer?): {e}") from e
    check_schema(meta.schema.to_arrow_schema(), where)
    if (meta.num_rows, meta.num_row_groups) != (shard.rows, shard.row_groups):
        raise DataError(f"{where}: {meta.num_rows} rows in {meta.num_row_groups} row groups; "
                        f"{MANIFEST} says {shard.rows} in {shard.row_groups}")
    col = meta.schema.to_arrow_schema().get_field_index("label")
    for g in range(meta.num_row_groups):
        st = meta.row_group(g).column(col).statistics
        if st is not None and st.has_min_max and not (0 <= st.min and st.max < m.num_classes):
            raise DataError(f"{where}: field label spans {st.min}..{st.max} in row group {g}; "
                            f"expected 0..{m.num_classes - 1} ({m.num_classes} classes)")
    if image_size:
        with fs.open_input_file(path) as f:
            check_image_size(pq.ParquetFile(f), where, image_size)


def check_image_size(pf, where, image_size):
    """Every row of the ParquetFile `pf` is image_size (height, width), as dataset.json says: from the
    row groups' min/max statistics of height and width where they are stored (ours are), else from
    those two int32 columns (4 bytes a row: no image is read or decoded)."""
    names = pf.schema_arrow.names
    for g in range(pf.metadata.num_row_groups):
        group = pf.metadata.row_group(g)
        spans = []
        for column in ("height", "width"):
            st = group.column(names.index(column)).statistics
            if st is None or not st.has_min_max:
                col = pf.read_row_group(g, columns=[column])[column].to_numpy()
                spans.append((int(col.min()), int(col.max())) if len(col) else None)
            else:
                spans.append((st.min, st.max))
        if None in spans:
            continue
        (h0, h1), (w0, w1) = spans
        if (h0, h1, w0, w1) != (image_size[0], image_size[0], image_size[1], image_size[1]):
            raise DataError(f"{where}: row group {g} holds images of height {_span(h0, h1)} and width "
                            f"{_span(w0, w1)}; {MANIFEST} gives the split image_size "
                            f"{list(image_size)} ([height, width]): fix or remove it (null means mixed sizes)")


def _span(low, high):
    return str(low) if low == high else f"{low}..{high}"


def check_schema(schema, where):
    for want in SCHEMA:
        if want.name not in schema.names:
            raise DataError(f"{where}: no column {want.name!r}; shards need {_describe(SCHEMA)}")
        got = schema.field(want.name).type
        if got != want.type:
            raise DataError(f"{where}: column {want.name!r} is {got}; expected {want.type} "
                            f"(shards need {_describe(SCHEMA)})")


def _describe(schema):
    return ", ".join(f"{f.name}: {f.type}" for f in schema)
