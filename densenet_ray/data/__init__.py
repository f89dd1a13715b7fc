"""Sharded Parquet image datasets: convert, verify, inspect, and stream them into Ray Train workers.

    python -m densenet_ray.data convert digits /tmp/digits     # the offline demo dataset
    python -m densenet_ray.data verify /tmp/digits

    from densenet_ray import data
    m = data.check(root, splits=("train", "val"))              # pre-flight, metadata only
    ds = data.read_split(root, "train", "imagenet_train")      # ray.data.Dataset, uint8 NHWC
    TorchTrainer(..., datasets={"train": ds, "val": ...}, dataset_config=data.dataset_config())

Data flows one way: sources (readers of the datasets people have) -> write (shards) -> manifest
(the format and its checks) -> pipeline (Ray Data, transforms) -> training.
"""

from .manifest import MANIFEST, DataError, Manifest, Split, check, load_manifest
from .pipeline import (batch_shape, by_row_group, dataset_config, new_skipped_notes, read_split, row_id, skip_counter,
                       skipped_notes, skipped_rows)
from .transforms import TRANSFORMS

__all__ = ["MANIFEST", "DataError", "Manifest", "Split", "TRANSFORMS", "batch_shape", "by_row_group", "check",
           "dataset_config", "load_manifest", "new_skipped_notes", "read_split", "row_id", "skip_counter",
           "skipped_notes", "skipped_rows"]
