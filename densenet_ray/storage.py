"""Where files live: a local path or a URI pyarrow opens (file://, s3://, gs://, hdfs://), the one
rule for datasets, checkpoints and run storage.

    fs, path = filesystem("s3://bucket/runs/r1")   # (pyarrow FileSystem, path inside it)
    kind("~/.densenet_ray/data/digits")             # 'file', 'directory' or 'missing'
    uri_of(path, like="s3://bucket/runs")           # back to what people and Ray Train pass around
    check("s3://bucket/runs", "--storage")          # StorageError unless its bucket answers, in seconds

Object stores take their endpoint and credentials from the environment, as the AWS SDKs do
(AWS_ENDPOINT_URL for MinIO, Ceph or any S3-compatible server, AWS_ACCESS_KEY_ID, ...): README
"Object storage". An error reaching one is a StorageError that names the location and those settings.
"""

from __future__ import annotations

import contextlib
import os

import pyarrow as pa
import pyarrow.fs as pafs


class StorageError(ValueError):
    """A location that no filesystem opens or reaches; the message names it and what is accepted."""


def settings(location) -> str:
    """The settings that decide where `location` is reached and as whom, as they are now, for messages."""
    if not str(location).startswith(("s3://", "s3a://")):
        return "the filesystem's credentials and endpoint"
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    key = "set" if os.environ.get("AWS_ACCESS_KEY_ID") else "unset: the SDK's other sources (~/.aws, an instance role)"
    return (f"the endpoint (AWS_ENDPOINT_URL: {endpoint or 'unset, i.e. AWS itself'}), the region (AWS_REGION: "
            f"{region or 'unset'}) and the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY: {key})")


@contextlib.contextmanager
def reaching(location):
    """An OSError from the filesystem of `location` (an endpoint that does not answer, a missing
    bucket, refused credentials) as a StorageError naming the location and the settings to check."""
    try:
        yield
    except OSError as e:
        if "://" not in str(location) or str(location).startswith("file://"):
            raise
        first = (str(e).splitlines() or [type(e).__name__])[0][:300]
        raise StorageError(f"{location}: cannot reach it ({first}); check {settings(location)}") from None


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
    with reaching(location):
        found = fs.get_file_info(path).type
    return {pafs.FileType.File: "file", pafs.FileType.Directory: "directory"}.get(found, "missing")


def check(location, flag: str) -> None:
    """StorageError, in seconds, unless the bucket of a URI (`flag` says which: --data, --storage)
    exists and answers with the settings in force: an object store lists a missing bucket as an
    empty folder, which would otherwise surface as "no dataset" or as a fresh run. Local paths, and
    filesystems without buckets (hdfs://), pass."""
    if not str(location).startswith(("s3://", "gs://", "gcs://")):
        return
    fs, path = filesystem(location)
    bucket = path.lstrip("/").split("/")[0]
    with reaching(location):
        found = fs.get_file_info(bucket).type
    if found != pafs.FileType.Directory:
        raise StorageError(f"{flag} {location}: no bucket {bucket!r} there; create it, or check the name and "
                           f"{settings(location)}")
