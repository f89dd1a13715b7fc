"""A converted dataset damaged afterwards (the manifest, a shard's footer, schema, labels or bytes):
`data.check` and `verify` name the file and field and what is accepted, before a run starts; and
convert will not write over a dataset unless told to."""

import hashlib
import json
import re

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
import pytest

from densenet_ray import data
from densenet_ray.data.__main__ import main

pytestmark = pytest.mark.usefixtures("ray_local")


def run(*argv):
    return main([str(a) for a in argv])


@pytest.fixture()
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "ds"
    assert run("convert", "digits", out) == 0
    return out


def shard_path(root, i=0):
    return root / data.load_manifest(root).splits["train"].shards[i].file


@pytest.mark.parametrize("damage, message", [
    (lambda root: (root / "dataset.json").unlink(), "dataset.json: no manifest"),
    (lambda root: (root / "dataset.json").write_text((root / "dataset.json").read_text().replace('"channels": 1', '"channels": 4')),
     "field channels is 4; expected 1 (grayscale) or 3 (RGB)"),
    (lambda root: (root / "dataset.json").write_text("{"), "not valid JSON"),
    (lambda root: shard_path(root).unlink(), "train-00000.parquet: shard listed in dataset.json is missing"),
    (lambda root: shard_path(root).write_bytes(shard_path(root).read_bytes()[:-4] + b"XXXX"), "broken footer"),
])
def test_check_names_the_file_and_field(digits, damage, message):
    damage(digits)
    with pytest.raises(data.DataError, match=re.escape(message)):
        data.check(digits)


def replace_shard(root, table, i=0):
    """Rewrite train shard i as `table` (same rows) and make dataset.json agree on its bytes, row
    groups and sha256, as a tool other than our converter would."""
    path = shard_path(root, i)
    pq.write_table(table, path)
    doc = json.loads((root / "dataset.json").read_text())
    doc["splits"]["train"]["shards"][i].update(bytes=path.stat().st_size, row_groups=pq.ParquetFile(path).num_row_groups,
                                               sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    (root / "dataset.json").write_text(json.dumps(doc))


def test_check_finds_a_wrong_schema(digits):
    t = pq.read_table(shard_path(digits))
    replace_shard(digits, t.set_column(1, "label", t["label"].cast(pa.int32())))
    with pytest.raises(data.DataError, match="train-00000.parquet: column 'label' is int32; expected int64"):
        data.check(digits)


def test_check_finds_labels_out_of_range(digits):
    t = pq.read_table(shard_path(digits))
    replace_shard(digits, t.set_column(1, "label", pa.compute.add(t["label"], 5)))
    with pytest.raises(data.DataError, match="train-00000.parquet: field label spans 5..14 in row group 0; "
                                             "expected 0..9"):
        data.check(digits)


def test_verify_reports_a_changed_byte(digits, capsys):
    path = shard_path(digits)
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert run("verify", digits) == 1
    assert "train-00000.parquet: sha256" in capsys.readouterr().err


def test_refuses_to_overwrite(digits, capsys):
    assert run("convert", "digits", digits) == 2
    assert "a dataset is already here; pass --overwrite" in capsys.readouterr().err
    assert run("convert", "digits", digits, "--overwrite") == 0
