"""Export: each format reads back to the same outputs (within 1e-5) through its sidecar, and the
safetensors writer and reader follow the format byte for byte."""

import json
import struct

import pytest
import torch

from densenet_ray import export, trained
from densenet_ray.config import PRESETS
from densenet_ray.model import build

# What the reference implementation (safetensors 0.8.0, safetensors.numpy.save) writes for
# {"weight": float32 [[1.5, -2.0]], "steps": int64 3, "mask": uint8 [1, 0, 1]}, metadata {"format": "pt"}.
REFERENCE = bytes.fromhex(
    "d0000000000000007b225f5f6d657461646174615f5f223a7b22666f726d6174223a227074227d2c227374657073223a7b2264"
    "74797065223a22493634222c227368617065223a5b5d2c22646174615f6f666673657473223a5b302c385d7d2c227765696768"
    "74223a7b226474797065223a22463332222c227368617065223a5b312c325d2c22646174615f6f666673657473223a5b382c31"
    "365d7d2c226d61736b223a7b226474797065223a225538222c227368617065223a5b335d2c22646174615f6f66667365747322"
    "3a5b31362c31395d7d7d202003000000000000000000c03f000000c0010001")


def tiny_model() -> trained.Model:
    """The digits demo's architecture with random weights and BatchNorm statistics off 0 and 1."""
    torch.manual_seed(0)
    cfg = PRESETS["digits"].replace(run_name="tiny", data="/nowhere")
    net = build(cfg.arch, num_classes=10, in_channels=1, **cfg.model_overrides())
    net.train()(torch.randn(32, 1, 16, 16) * 2 + 1)
    classes = [str(i) for i in range(10)]
    return trained.Model(net.eval(), cfg, classes, classes, source="tiny", name="tiny")


def test_safetensors_bytes_are_the_reference_implementations(tmp_path):
    tensors = {"weight": torch.tensor([[1.5, -2.0]]), "steps": torch.tensor(3),
               "mask": torch.tensor([1, 0, 1], dtype=torch.uint8)}
    export.save_safetensors(tensors, str(tmp_path / "ours.safetensors"), {"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == REFERENCE
    (tmp_path / "theirs.safetensors").write_bytes(REFERENCE)
    loaded, metadata = export.load_safetensors(str(tmp_path / "theirs.safetensors"))
    assert metadata == {"format": "pt"}
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t)


def test_safetensors_round_trip_every_dtype_and_shape(tmp_path):
    tensors = {"f64": torch.randn(2, 3, dtype=torch.float64), "bf16": torch.randn(4).bfloat16(),
               "f16": torch.randn(1, 2, 2).half(), "i32": torch.arange(6, dtype=torch.int32).view(2, 3),
               "i8": torch.tensor([-1, 2], dtype=torch.int8), "bool": torch.tensor([True, False]),
               "scalar": torch.tensor(7), "empty": torch.zeros(0, 3), "strided": torch.randn(3, 4).t()}
    path = str(tmp_path / "all.safetensors")
    export.save_safetensors(tensors, path)
    header_len = struct.unpack("<Q", open(path, "rb").read(8))[0]
    assert header_len % 8 == 0  # tensor bytes start aligned
    loaded, metadata = export.load_safetensors(path)
    assert metadata == {} and loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name


@pytest.mark.parametrize("damage, message", [
    (lambda raw: raw[:5], "too short"),
    (lambda raw: struct.pack("<Q", 10 ** 6) + raw[8:], "runs past the end"),
    (lambda raw: raw[:8] + raw[8:].replace(b'"F32"', b'"F99"'), "expected {dtype"),
    (lambda raw: raw + b"\0\0", "bytes after the last tensor"),
    (lambda raw: raw[:8] + raw[8:].replace(b"[0,8]", b"[0,4]"), "do not hold"),
])
def test_malformed_safetensors_are_refused_with_the_reason(tmp_path, damage, message):
    path = tmp_path / "bad.safetensors"
    export.save_safetensors({"a": torch.zeros(2)}, str(path))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=message):
        export.load_safetensors(str(path))


@pytest.mark.parametrize("fmt", list(export.FORMATS))
def test_each_format_gives_the_originals_outputs(tmp_path, fmt):
    model = tiny_model()
    out = str(tmp_path / f"tiny{export.FORMATS[fmt]}")
    assert export.export(model, fmt, out, mean=(0.3,), std=(0.4,)) <= export.TOLERANCE
    loaded = export.load(out)
    for batch in (1, 5):  # batch sizes other than the export's example
        x = torch.randn(batch, 1, 16, 16)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model.net(x), atol=1e-5, rtol=0)
    info = json.load(open(out + ".json"))
    assert info["format"] == fmt and info["classes"] == model.classes
    assert info["build"] == {"arch": "densenet_bc22_k12", "num_classes": 10, "in_channels": 1}
    assert info["input"]["shape"] == ["batch", 1, 16, 16] and info["input"]["mean"] == [0.3]
    if fmt == "safetensors":  # the sidecar travels inside the file too
        assert json.loads(export.load_safetensors(out)[1]["densenet_ray"]) == info

