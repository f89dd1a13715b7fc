"""Shards to training-ready batches with Ray Data, and the per-worker shares Ray Train hands out.

    ds = read_split("s3://bucket/imagenet", "train", "imagenet_train", order="rows", seed=0)   # a ray.data.Dataset
    trainer = TorchTrainer(loop, datasets={"train": ds, "val": read_split(root, "val", "imagenet_eval")},
                           dataset_config=dataset_config(), ...)
    # in each worker:
    for batch in ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=256):
        x = batch["image"]       # uint8 (N, H, W, C): normalise on the device with m.mean / m.std
        y = batch["label"]       # int64 (N,)
    skipped = skipped_rows(root, "train")   # rows skipped so far (cumulative): see "Bad rows" below

Order: evaluation reads rows as stored. Training (`order=`) reads them in a new order every epoch,
a function of (seed, epoch) whatever the transform: "rows" is a full permutation of the split's
rows (Ray Data's random_shuffle of the still-encoded rows, then decoding), so whether two images
share a batch does not depend on where they were stored (a CIFAR row group holds ~3,300 images);
joined splits ("train+extra") are mixed, not concatenated. It costs a per-epoch barrier: the
shuffle reads the whole split before the first batch (seconds for CIFAR/SVHN, the encoded bytes
of ImageNet through the object store). "row_groups" streams instead: row groups (~8 MB) in a new
order, rows of one row group stay near each other (the local shuffle buffer mixes a little).
The epoch is `first_epoch` plus Ray Data's execution count of the dataset (one execution an
epoch), so a resumed run (first_epoch = its next epoch) sees the order it would have seen.
Random transforms draw fresh crops from OS entropy for every block.

Bad rows: a row whose image does not decode or whose label is not one of the manifest's classes
(shards from another tool, or edited: the pre-flight check sees labels only through row-group
statistics, which such shards may lack) is dropped where it is decoded; a row group that pyarrow
cannot read (a corrupt page, a damaged compressed block) in READ_ATTEMPTS tries is dropped whole.
Both are counted, with the reason (split and key, or file and row group), in the job's counter
for (root, split): skipped_rows and skipped_notes read it. Nothing raises in a worker: an
exception there is a "failed worker" to Ray Train, restarted from the last checkpoint into the
same bad row, again and again, with the cause under pages of retries.

Why a Datasource of our own (RowGroups) rather than read_parquet + map_batches: in Ray 2.60
read_parquet lists files through 32 footer-reading actors on every execution (~2 s per epoch on
a small node), packs reads into 128 MiB units (few tasks for a small split) and decodes in a
separate step after an object-store copy of the bytes; and randomize_block_order would add an
all-to-all operator. RowGroups makes the whole pipeline one operator, reshuffled at planning.
"""

import hashlib
import time
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from PIL import Image
from ray.data import RandomSeedConfig
from ray.data.block import BlockAccessor, BlockMetadata
from ray.data.datasource import ReadTask
from ray.train import DataConfig
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from . import device
from .counter import Counter
from .manifest import DataError, load_manifest
from .transforms import TRANSFORMS, output_shape

# What a corrupt image raises inside Pillow, numpy or our shape check: skip the row, not the block.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, Image.DecompressionBombError)
# What pyarrow raises for a row group it cannot read: a corrupt page or compressed block (OSError,
# ArrowInvalid), and transient I/O of an object store (OSError) too, hence a few tries before the
# row group is skipped; a damaged page fails every time.
READ_ERRORS = (OSError, pa.ArrowException, ValueError)
READ_ATTEMPTS = 3
RETRY_S = 0.5   # before the second try; doubled before the third


ORDERS = (None, "rows", "row_groups")
DECODES = ("pipeline", "device")


def read_split(root, split, transform, *, image_size=None, order=None, seed=0, first_epoch=0, with_keys=False,
               manifest=None, decode="pipeline", row_ids=False, consumed=None):
    """A ray.data.Dataset of {"image": uint8 (H, W, C), "label": int64} rows for `split` of the
    dataset at `root` (local path or URI), transformed by `transform` (a key of TRANSFORMS).

    split: a split name, or names joined by "+" ("train+extra").
    image_size: output side for the imagenet_* transforms (default 224); for "none" and
        "cifar_train", resize to it when given, else keep the stored size (which must be uniform).
    order: None (as stored: evaluation), "rows" or "row_groups" (a new order every epoch from
        (seed, epoch); see the module docstring). first_epoch: the epoch of the first execution.
    with_keys: also give each row its source "key" (a string; for analysis with iter_batches,
        not iter_torch_batches).
    Rows that fail to decode or carry a label outside the manifest's classes are dropped one by
    one, row groups that cannot be read are dropped whole; all are counted with the reason: see
    skipped_rows(root, split) and skipped_notes(root, split).
    "imagenet_tencrop" rows hold (10, H, W, C) images.
    decode="device": rows of encoded JPEGs and their draws instead of images, for device.Decoder
        in the workers (transforms in device.DEVICE_TRANSFORMS only); see data/device.py.
    row_ids: also give each row its "row" (int64): where it is stored, row_id(row group, position),
        the row group numbered in the split's order (manifest shards, then their row groups); the
        same row has the same id in every epoch and every run on these shards.
    consumed: consumed(epoch) -> the row ids (any int64 array-like) an execution of `epoch` leaves
        out, or None; called when each epoch's reads are planned. A run resumed inside an epoch
        passes the rows its checkpoint had trained on: the epoch reads the rest, undecoded rows are
        never read twice. Must pickle (it runs where Ray plans the dataset).
    """
    if transform not in TRANSFORMS:
        raise DataError(f"transform {transform!r}: expected one of {', '.join(TRANSFORMS)}")
    if order not in ORDERS:
        raise DataError(f"order {order!r}: expected rows, row_groups or None (as stored)")
    if decode not in DECODES or (decode == "device" and transform not in device.DEVICE_TRANSFORMS):
        raise DataError(f"decode {decode!r} with transform {transform!r}: expected decode 'pipeline', or 'device' "
                        f"with one of the transforms {', '.join(device.DEVICE_TRANSFORMS)}")
    m = manifest or load_manifest(root)
    info = m.split(split)
    size, shape = batch_shape(m, split, transform, image_size)
    fs, paths = m.shard_paths(split)
    units = [(p, g, sh.rows / sh.row_groups, f"{str(m.root).rstrip('/')}/{sh.file}")
             for p, sh in zip(paths, info.shards) for g in range(sh.row_groups)]
    if not units:
        raise DataError(f"{m.root}: split {split!r} has no rows")
    counter = _counter(m.root, split)
    decode = {"transform": transform, "size": size, "mode": "L" if m.channels == 1 else "RGB", "shape": shape,
              "counter": counter, "classes": m.num_classes, "split": split, "keep_key": with_keys,
              "decode": decode}
    ids = {"ids": row_ids, "consumed": consumed}
    # The key is always read (a few bytes a row): a skipped row is named by it.
    columns = ["image", "label", "key"]
    skip = (counter, split)
    if order == "rows":  # read encoded, shuffle every row, then decode
        source = RowGroups(fs, units, columns, None, seed=None, skip=skip, **ids)
        ds = ray.data.read_datasource(source, override_num_blocks=len(units))
        # Ray Data reseeds from (seed, execution index) every execution: from (seed, epoch) here.
        ds = ds.random_shuffle(seed=RandomSeedConfig(seed=_seed(seed), reseed_after_execution=True))
        ds = ds.map_batches(decode_batch, fn_kwargs=decode, batch_size=None, batch_format="numpy")
    else:
        source = RowGroups(fs, units, columns, decode, seed=None if order is None else _seed(seed), skip=skip, **ids)
        ds = ray.data.read_datasource(source, override_num_blocks=len(units))
        # One operator does all the work; Ray's per-operator reservation would hold half the CPUs back
        # for operators this dataset does not have (measured: one task at a time on a 2-CPU node).
        ds.context.op_resource_reservation_enabled = False
    ds.context._execution_idx = first_epoch  # Ray Data counts executions from here: the epoch
    return ds


def batch_shape(manifest, split, transform, image_size=None):
    """(the size `transform` resizes to, or None: as stored; the (H, W, C) of one of its images)
    for read_split(..., image_size=image_size) of `split`."""
    size = image_size or (224 if transform.startswith("imagenet") else None)
    stored = manifest.split(split).image_size
    if size is None and stored is None:
        raise DataError(f"{manifest.root}: split {split!r} holds images of different sizes; transform "
                        f"{transform!r} needs image_size=N to give batches one shape")
    return size, output_shape(transform, size or stored, manifest.channels)


def _seed(seed):
    return int(seed) % (2**31)


ROW_BITS = 32   # a row id: the row group's number in the split, then the row's position in it


def row_id(group, position):
    """The id read_split(row_ids=True) gives the row at `position` of the split's `group`-th row group."""
    return (np.asarray(group, np.int64) << ROW_BITS) | np.asarray(position, np.int64)


def by_row_group(ids):
    """{row group number: sorted positions} of row ids."""
    ids = np.unique(np.asarray(ids, np.int64))
    groups, positions = ids >> ROW_BITS, ids & ((1 << ROW_BITS) - 1)
    cuts = np.flatnonzero(np.diff(groups)) + 1
    return {int(g[0]): p for g, p in zip(np.split(groups, cuts), np.split(positions, cuts)) if len(g)}


class RowGroups(ray.data.Datasource):
    """Shard row groups as Ray Data read tasks: each reads one row group (~8 MB) and decodes its
    images (`decode`; None: rows stay encoded), so reading and decoding are one step and
    parallelism is the number of row groups. Ray asks for the read tasks at every execution,
    i.e. every epoch: with a `seed` they come in the order of (seed, epoch)."""

    def __init__(self, fs, units, columns, decode, seed, skip=None, ids=False, consumed=None):
        super().__init__()
        self._fs, self._units, self._columns, self._decode, self._seed = fs, units, columns, decode, seed
        self._skip = skip   # (counter, split): where a row group that cannot be read is counted
        self._ids, self._consumed = ids, consumed   # read_split's row_ids and consumed
        self._row_bytes = int(np.prod(decode["shape"])) if decode else 0

    def estimate_inmemory_data_size(self):
        return int(sum(unit[2] for unit in self._units) * self._row_bytes) or None

    def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
        order = range(len(self._units))
        epoch = data_context._execution_idx if data_context is not None else 0
        if self._seed is not None:
            order = np.random.default_rng([self._seed, epoch]).permutation(len(self._units))
        done = by_row_group(found) if self._consumed and (found := self._consumed(epoch)) is not None else {}
        return [ReadTask(partial(read_row_group, self._fs, self._units[i], self._columns, self._decode, self._skip,
                                 select=(i if self._ids else None, done.get(i))),
                         BlockMetadata(num_rows=None, size_bytes=int(self._units[i][2] * self._row_bytes) or None,
                                       exec_stats=None, input_files=[self._units[i][0]]),
                         per_task_row_limit=per_task_row_limit)
                for i in order]


def read_row_group(fs, unit, columns, decode, skip=None, select=(None, None)):
    """[one block]: the row group of `unit` (path, group, rows, name for people), decoded; no
    block, counted in skip = (counter, split), when it cannot be read in READ_ATTEMPTS tries.
    select = (the row group's number in the split: give each row its "row" id, or None; the
    positions to leave out, or None)."""
    path, group, rows, name = unit
    for attempt in range(READ_ATTEMPTS):
        try:
            with fs.open_input_file(path) as f:
                t = pq.ParquetFile(f).read_row_group(group, columns=columns)
            break
        except READ_ERRORS as e:
            if attempt + 1 < READ_ATTEMPTS:
                time.sleep(RETRY_S * 2**attempt)
                continue
            if skip is None:
                raise
            counter, split = skip
            ray.get(counter.add.remote(int(rows), [f"{name}: row group {group} ({int(rows)} rows of split {split!r}) "
                                                   f"cannot be read, skipped: {_reason(e)}"]))
            return []
    number, leave = select
    if number is not None or leave is not None:
        keep = np.ones(len(t), bool)
        if leave is not None:
            keep[leave[leave < len(t)]] = False
        if number is not None:
            t = t.append_column("row", pa.array(row_id(number, np.arange(len(t)))))
        if not keep.all():
            t = t.filter(pa.array(keep))
        if not len(t):
            return []
    if decode is None:
        return [t]
    batch = decode_batch({c: t[c].to_numpy(zero_copy_only=False) for c in t.column_names}, **decode)
    return [BlockAccessor.batch_to_block(batch)]


def _reason(e, limit=200):
    """The exception's type and first line, never the data: a reason must not echo a file's bytes."""
    first = str(e).splitlines()[0][:limit] if str(e) else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def decode_batch(batch, *, transform, size, mode, shape, counter=None, classes=None, split="", keep_key=True,
                 decode="pipeline", rng=None):
    """Transform one batch of encoded rows. Rows whose image fails to decode, or whose label is not
    in 0..classes-1, are dropped and added to `counter` with the reason (naming the key when the
    batch has one); `keep_key`: keep the "key" column in the output. decode="device": rows for the
    workers to decode instead (device.ship_batch; they keep the key, which names a row the worker
    cannot decode). `rng`: the draws' generator (tests); by default fresh OS entropy."""
    fn = TRANSFORMS[transform]
    rng = rng or np.random.default_rng()   # fresh OS entropy: new augmentations every epoch
    labels = np.asarray(batch["label"])
    reasons = {}
    # A worker's cross-entropy would raise on a label outside the classes ("Target 999 is out of bounds");
    # a null label (NaN in a float column) compares False and is caught too.
    known = (labels >= 0) & (labels < classes) if classes is not None else np.ones(len(labels), bool)
    if decode == "device":
        for i in np.flatnonzero(~known):
            reasons[i] = f"label {labels[i]} is not a class (expected 0..{classes - 1})"
        out, keep, dropped = device.ship_batch(batch["image"], known, transform=transform, size=size, mode=mode,
                                               rng=rng)
        reasons.update(dropped)
        keep_key = True
    else:
        out = {"image": np.empty((len(labels), *shape), np.uint8)}
        keep = np.zeros(len(labels), bool)
        for i, data in enumerate(batch["image"]):
            if not known[i]:
                reasons[i] = f"label {labels[i]} is not a class (expected 0..{classes - 1})"
                continue
            try:
                out["image"][i] = fn(data, size, rng, mode)
                keep[i] = True
            except DECODE_ERRORS as e:
                reasons[i] = f"image does not decode ({_reason(e, 120)})"
    columns = [k for k in batch if k not in ("image", "label") and (keep_key or k != "key")]
    if keep.all():
        return {**out, "label": labels.astype(np.int64, copy=False), **{k: batch[k] for k in columns}}
    if counter is not None:
        keys = batch.get("key")
        notes = [f"split {split!r}, " + (f"key {str(keys[i])[:200]}" if keys is not None else f"row {i} of a block")
                 + f": {reason}, skipped" for i, reason in reasons.items()]
        ray.get(counter.add.remote(int((~keep).sum()), notes))
    # int64 again: a null label (a foreign shard) made the column float, and that row is gone
    return {**{k: v[keep] for k, v in out.items()}, "label": labels[keep].astype(np.int64),
            **{k: np.asarray(batch[k])[keep] for k in columns}}


def skipped_rows(root, split):
    """Rows of `split` skipped in read_split datasets (failed to decode, a label outside the
    classes, a row group that cannot be read), summed since the first read_split(root, split) in
    this Ray job. Read it after each epoch (e.g. on rank 0, once its shard is exhausted, when the
    epoch's decoding is complete) and take the difference."""
    try:
        return ray.get(ray.get_actor(_counter_name(root, split)).get.remote())
    except ValueError:   # no read_split for it yet in this job: nothing was skipped
        return 0


def skipped_notes(root, split):
    """Why rows of `split` were skipped (see skipped_rows): the first distinct reasons, each
    naming the split and key, or the file and row group."""
    try:
        return ray.get(ray.get_actor(_counter_name(root, split)).notes.remote())
    except ValueError:
        return []


_told = set()   # notes new_skipped_notes already gave in this process


def new_skipped_notes(root, splits):
    """The notes of `splits` (see skipped_notes) not yet given by this function in this process:
    what the training loop warns about once, rather than every epoch the same rows are skipped."""
    new = [n for s in splits if s for n in skipped_notes(root, s) if n not in _told]
    _told.update(new)
    return new


def skip_counter(root, split):
    """add(n, notes): counts `n` rows of `split` as skipped, with the notes, in the job's counter
    that skipped_rows reads; for a process other than the driver (a training worker's
    device.Decoder). It never raises: one bad image must not fail a worker."""
    def add(n, notes):
        try:
            counter = ray.get_actor(_counter_name(root, split))
            ray.get(counter.add.remote(int(n), [f"split {split!r}, {note}" for note in notes]))
        except (ValueError, ray.exceptions.RayError):   # no counter (no read_split in this job), or it died
            pass
    return add


def dataset_config(equal=("train",), first_epoch=None):
    """The ray.train.DataConfig that gives each worker its share (Ray Train V2, `dataset_config=`).

    Datasets named in `equal` (training) go through streaming_split(n, equal=True): every block
    goes to exactly one worker, so shares are disjoint, and all workers get the same number of
    rows, so DDP steps stay in lockstep; to equalise, Ray drops fewer than n rows per epoch, and
    with row groups read in a new order every epoch they are different rows each time. Every other
    dataset ("val", "test") goes through streaming_split(n, equal=False): disjoint and complete,
    so evaluation sees every image exactly once across workers (shares may differ by a few
    blocks, so evaluation must not run collectives per batch: sum the counts once at the end).
    The `equal` datasets keep their block order (preserve_order): the sequence of rows is the
    (seed, epoch) order read_split made; which worker takes which block depends on timing.
    first_epoch: called at every (re)start of the workers, the epoch they resume with (Ray Data
    counts one execution an epoch from there).
    """
    return _Shares(equal, first_epoch)


class _Shares(DataConfig):
    def __init__(self, equal, first_epoch=None, **kwargs):
        super().__init__(**kwargs)
        self._equal, self._first_epoch = tuple(equal), first_epoch

    @staticmethod
    def default_ingest_options():
        # Ray Train's default copies exclude_resources into every dataset's options even when unset, and
        # Ray Data warns on each worker start that the option is deprecated: pass it only when set.
        from ray.data import DataContext, ExecutionOptions
        from ray.data._internal.execution.interfaces import ExecutionResources

        ctx = DataContext.get_current().execution_options
        excluded = ctx.exclude_resources
        return ExecutionOptions(resource_limits=ctx.resource_limits, preserve_order=ctx.preserve_order,
                                verbose_progress=ctx.verbose_progress,
                                **({} if excluded == ExecutionResources.zero() else {"exclude_resources": excluded}))

    def _resolve_execution_options(self, name):
        options = super()._resolve_execution_options(name)
        options.preserve_order = options.preserve_order or name in self._equal
        return options

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        if self._first_epoch is not None:
            epoch = self._first_epoch()
            datasets = {k: v.copy(v) for k, v in datasets.items()}
            for ds in datasets.values():
                ds.context._execution_idx = epoch
        equal = {k: v for k, v in datasets.items() if k in self._equal}
        out = super().configure(equal, world_size, worker_handles, worker_node_ids, **kwargs)
        hints = worker_node_ids if self._enable_shard_locality else None
        for name, ds in datasets.items():
            if name in equal:
                continue
            ds = ds.copy(ds)
            if ds.name is None:
                ds.set_name(name)
            ds.context.execution_options = self._resolve_execution_options(name)
            for i, it in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=hints)):
                out[i][name] = it
        return out


def _counter_name(root, split):
    return "densenet_ray.data.skipped." + hashlib.sha1(f"{root.rstrip('/')}|{split}".encode()).hexdigest()[:16]


_counters = {}  # (job, name) -> the handle that keeps the job's counter alive between datasets


def _counter(root, split):
    """The job's named counter actor for (root, split); owned by whoever calls read_split first,
    which keeps a handle for the rest of the job (an actor whose handles are all gone is destroyed,
    and the next epoch's dataset would find it dying, or start again from zero)."""
    key = (ray.get_runtime_context().get_job_id(), _counter_name(root, split))
    if key not in _counters:
        # Pinned to the driver's node: a counter on a worker node that dies would fail every retry.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        _counters[key] = Counter.options(name=key[1], get_if_exists=True, scheduling_strategy=here).remote()
    return _counters[key]
