"""Where files live: a local path or a URI pyarrow opens (file://, s3://, gs://, hdfs://), the one
rule for datasets, checkpoints and run storage.

    fs, path = filesystem("s3://bucket/runs/r1")   # (pyarrow FileSystem, path inside it)
    kind("~/.densenet_ray/data/digits")             # 'file', 'directory' or 'missing'
    uri_of(path, like="s3://bucket/runs")           # back to what people and Ray Train pass around
"""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.fs as pafs


class StorageError(ValueError):
    """A location that no filesystem opens; the message names it and what is accepted."""


def filesystem(location) -> tuple[pafs.FileSystem, str]:
    """(pyarrow FileSystem, path inside it) for a local path (~ expanded) or a URI."""
    location = str(location)
    if "://" not in location:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(location))
    try:
        fs, path = pafs.FileSystem.from_uri(location)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
        raise StorageError(f"{location}: not a location pyarrow can open ({e}); use a local path, "
                           "file:///abs/path, s3://bucket/prefix, gs://... or hdfs://...") from e
    return fs, path.rstrip("/") or "/"


def uri_of(path: str, like: str) -> str:
    """`path` inside the filesystem of `like`, written as `like` is (a local path or scheme://)."""
    return f"{like.split('://')[0]}://{path}" if "://" in like else path


def kind(location) -> str:
    """'file', 'directory' or 'missing'."""
    fs, path = filesystem(location)
    found = fs.get_file_info(path).type
    return {pafs.FileType.File: "file", pafs.FileType.Directory: "directory"}.get(found, "missing")
