"""Shards to training-ready batches with Ray Data, and the per-worker shares Ray Train hands out.

    ds = read_split("s3://bucket/imagenet", "train", "imagenet_train", order="rows", seed=0)   # a ray.data.Dataset
    trainer = TorchTrainer(loop, datasets={"train": ds, "val": read_split(root, "val", "imagenet_eval")},
                           dataset_config=dataset_config(), ...)
    # in each worker:
    for batch in ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=256):
        x = batch["image"]       # uint8 (N, H, W, C): normalise on the device with m.mean / m.std
        y = batch["label"]       # int64 (N,)
    skipped = skipped_rows(root, "train")   # rows that failed to decode so far (cumulative)

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

Why a Datasource of our own (RowGroups) rather than read_parquet + map_batches: in Ray 2.60
read_parquet lists files through 32 footer-reading actors on every execution (~2 s per epoch on
a small node), packs reads into 128 MiB units (few tasks for a small split) and decodes in a
separate step after an object-store copy of the bytes; and randomize_block_order would add an
all-to-all operator. RowGroups makes the whole pipeline one operator, reshuffled at planning.
"""

import hashlib
from functools import partial

import numpy as np
import pyarrow.parquet as pq
import ray
from PIL import Image
from ray.data import RandomSeedConfig
from ray.data.block import BlockAccessor, BlockMetadata
from ray.data.datasource import ReadTask
from ray.train import DataConfig
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .counter import Counter
from .manifest import DataError, load_manifest
from .transforms import TRANSFORMS, output_shape

# What a corrupt image raises inside Pillow, numpy or our shape check: skip the row, not the block.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, Image.DecompressionBombError)


ORDERS = (None, "rows", "row_groups")


def read_split(root, split, transform, *, image_size=None, order=None, seed=0, first_epoch=0, with_keys=False,
               manifest=None):
    """A ray.data.Dataset of {"image": uint8 (H, W, C), "label": int64} rows for `split` of the
    dataset at `root` (local path or URI), transformed by `transform` (a key of TRANSFORMS).

    split: a split name, or names joined by "+" ("train+extra").
    image_size: output side for the imagenet_* transforms (default 224); for "none" and
        "cifar_train", resize to it when given, else keep the stored size (which must be uniform).
    order: None (as stored: evaluation), "rows" or "row_groups" (a new order every epoch from
        (seed, epoch); see the module docstring). first_epoch: the epoch of the first execution.
    with_keys: also give each row its source "key" (a string; for analysis with iter_batches,
        not iter_torch_batches).
    Rows that fail to decode are dropped one by one and counted: see skipped_rows(root, split).
    "imagenet_tencrop" rows hold (10, H, W, C) images.
    """
    if transform not in TRANSFORMS:
        raise DataError(f"transform {transform!r}: expected one of {', '.join(TRANSFORMS)}")
    if order not in ORDERS:
        raise DataError(f"order {order!r}: expected rows, row_groups or None (as stored)")
    m = manifest or load_manifest(root)
    info = m.split(split)
    size = image_size or (224 if transform.startswith("imagenet") else None)
    if size is None and info.image_size is None:
        raise DataError(f"{m.root}: split {split!r} holds images of different sizes; transform "
                        f"{transform!r} needs image_size=N to give batches one shape")
    fs, paths = m.shard_paths(split)
    units = [(p, g, sh.rows / sh.row_groups) for p, sh in zip(paths, info.shards) for g in range(sh.row_groups)]
    if not units:
        raise DataError(f"{m.root}: split {split!r} has no rows")
    decode = {"transform": transform, "size": size, "mode": "L" if m.channels == 1 else "RGB",
              "shape": output_shape(transform, size or info.image_size, m.channels),
              "counter": _counter(m.root, split)}
    columns = ["image", "label"] + ["key"] * with_keys
    if order == "rows":  # read encoded, shuffle every row, then decode
        source = RowGroups(fs, units, columns, None, seed=None)
        ds = ray.data.read_datasource(source, override_num_blocks=len(units))
        # Ray Data reseeds from (seed, execution index) every execution: from (seed, epoch) here.
        ds = ds.random_shuffle(seed=RandomSeedConfig(seed=_seed(seed), reseed_after_execution=True))
        ds = ds.map_batches(decode_batch, fn_kwargs=decode, batch_size=None, batch_format="numpy")
    else:
        source = RowGroups(fs, units, columns, decode, seed=None if order is None else _seed(seed))
        ds = ray.data.read_datasource(source, override_num_blocks=len(units))
        # One operator does all the work; Ray's per-operator reservation would hold half the CPUs back
        # for operators this dataset does not have (measured: one task at a time on a 2-CPU node).
        ds.context.op_resource_reservation_enabled = False
    ds.context._execution_idx = first_epoch  # Ray Data counts executions from here: the epoch
    return ds


def _seed(seed):
    return int(seed) % (2**31)


class RowGroups(ray.data.Datasource):
    """Shard row groups as Ray Data read tasks: each reads one row group (~8 MB) and decodes its
    images (`decode`; None: rows stay encoded), so reading and decoding are one step and
    parallelism is the number of row groups. Ray asks for the read tasks at every execution,
    i.e. every epoch: with a `seed` they come in the order of (seed, epoch)."""

    def __init__(self, fs, units, columns, decode, seed):
        super().__init__()
        self._fs, self._units, self._columns, self._decode, self._seed = fs, units, columns, decode, seed
        self._row_bytes = int(np.prod(decode["shape"])) if decode else 0

    def estimate_inmemory_data_size(self):
        return int(sum(rows for _, _, rows in self._units) * self._row_bytes) or None

    def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
        order = range(len(self._units))
        if self._seed is not None:
            epoch = data_context._execution_idx if data_context is not None else 0
            order = np.random.default_rng([self._seed, epoch]).permutation(len(self._units))
        return [ReadTask(partial(read_row_group, self._fs, path, group, self._columns, self._decode),
                         BlockMetadata(num_rows=None, size_bytes=int(rows * self._row_bytes) or None,
                                       exec_stats=None, input_files=[path]),
                         per_task_row_limit=per_task_row_limit)
                for path, group, rows in (self._units[i] for i in order)]


def read_row_group(fs, path, group, columns, decode):
    """[one block]: row group `group` of the shard at `path`, decoded."""
    with fs.open_input_file(path) as f:
        t = pq.ParquetFile(f).read_row_group(group, columns=columns)
    if decode is None:
        return [t]
    batch = decode_batch({c: t[c].to_numpy(zero_copy_only=False) for c in columns}, **decode)
    return [BlockAccessor.batch_to_block(batch)]


def decode_batch(batch, *, transform, size, mode, shape, counter=None):
    """Transform one batch of encoded rows; rows that fail are dropped and added to `counter`."""
    fn = TRANSFORMS[transform]
    rng = np.random.default_rng()   # fresh OS entropy: new augmentations every epoch
    out = np.empty((len(batch["label"]), *shape), np.uint8)
    keep = np.zeros(len(out), bool)
    for i, data in enumerate(batch["image"]):
        try:
            out[i] = fn(data, size, rng, mode)
            keep[i] = True
        except DECODE_ERRORS:
            pass
    if keep.all():
        return {"image": out, **{k: v for k, v in batch.items() if k != "image"}}
    if counter is not None:
        ray.get(counter.add.remote(int((~keep).sum())))
    return {"image": out[keep], **{k: np.asarray(v)[keep] for k, v in batch.items() if k != "image"}}


def skipped_rows(root, split):
    """Rows of `split` that failed to decode in read_split datasets, summed since the first
    read_split(root, split) in this Ray job. Read it after each epoch (e.g. on rank 0, once its
    shard is exhausted, when the epoch's decoding is complete) and take the difference."""
    try:
        return ray.get(ray.get_actor(_counter_name(root, split)).get.remote())
    except ValueError:   # no read_split for it yet in this job: nothing was skipped
        return 0


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
