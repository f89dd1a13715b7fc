"""Export a trained DenseNet for serving without Python pickles, with a JSON sidecar that says how to feed it.

    python -m densenet_ray.export models:/densenet-digits@champion --format exported-program
    python -m densenet_ray.export ~/.densenet_ray/runs/cifar10-r1 --format safetensors --out cifar10.safetensors
    python -m densenet_ray.export models:/densenet-imagenet/3 --format torchscript --out densenet121.ts.pt

    from densenet_ray.export import load
    net = load("densenet-digits-v1.pt2")       # any of the three formats, through its sidecar
    probs = net(x).softmax(1)                   # x: float32 NCHW, normalised as the sidecar says

Formats:
    exported-program  torch.export archive (.pt2): graph and weights, no pickle; torch.export.load in
                      Python, AOTInductor or ExecuTorch elsewhere. What the registry stores too.
    torchscript       torch.jit.trace archive (.pt) for libtorch (C++); torch.jit is deprecated in
                      favour of torch.export, so prefer exported-program where you can.
    safetensors       the weights only, in the safetensors format (written here, no extra package),
                      loaded into densenet_ray.model.build(**sidecar["build"]); the sidecar is also
                      in the file's __metadata__.
The batch size is free; channels and image size are the training run's. Each export is read back
and checked against the original on random input (max |difference| <= 1e-5) before it is kept.

The sidecar OUT.json: the architecture (`build`), `classes`, `wnids`, `input` (shape, mean/std per
channel on the 0..1 scale, the eval transform and size), the source model and its run.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import sys
import warnings

import torch

from densenet_ray import cli, trained
from densenet_ray.data import load_manifest
from densenet_ray.config import to_dict
from densenet_ray.model import build

FORMATS = {"exported-program": ".pt2", "torchscript": ".ts.pt", "safetensors": ".safetensors"}
TOLERANCE = 1e-5

# safetensors: https://github.com/huggingface/safetensors#format. 8 bytes: N, little-endian u64; N bytes
# of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}},
# offsets into the byte buffer that follows, which they cover exactly; tensors little-endian, row-major.
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
_ST_TORCH = {v: k for k, v in _ST_DTYPES.items()}


def save_safetensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (and string `metadata`) to `path` in the safetensors format."""
    if sys.byteorder != "little":
        raise RuntimeError("safetensors stores little-endian bytes; this writer runs on little-endian machines only")
    header, chunks, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    # The reference implementation's order (widest dtype first, then by name): the same bytes as its files.
    for name in sorted(tensors, key=lambda n: (-tensors[n].element_size(), n)):
        t = tensors[name].detach().cpu().contiguous()
        if t.dtype not in _ST_DTYPES:
            raise ValueError(f"tensor {name!r}: dtype {t.dtype} has no safetensors code; known: "
                             f"{', '.join(map(str, _ST_DTYPES))}")
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # pad the header so the tensor bytes start 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for data in chunks:
            f.write(data)


def load_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; a malformed file is a ValueError naming what is wrong."""
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise ValueError(f"{path}: {len(raw)} bytes, too short for a safetensors file (8-byte header length first)")
    n = struct.unpack("<Q", raw[:8])[0]
    if n > len(raw) - 8:
        raise ValueError(f"{path}: header length {n} runs past the end of the file ({len(raw)} bytes)")
    try:
        header = json.loads(raw[8:8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: header is not JSON: {e}") from None
    metadata = header.pop("__metadata__", None) or {}
    buffer, tensors, spans = memoryview(raw)[8 + n:], {}, []
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = _ST_TORCH[info["dtype"]], list(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: tensor {name!r} has header {info!r}; expected {{dtype: one of "
                             f"{', '.join(_ST_TORCH)}, shape: [...], data_offsets: [begin, end]}}") from None
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if not (0 <= begin <= end <= len(buffer)) or end - begin != size:
            raise ValueError(f"{path}: tensor {name!r} data_offsets [{begin}, {end}] do not hold {shape} of "
                             f"{info['dtype']} ({size} bytes) inside the {len(buffer)}-byte buffer")
        data = bytearray(buffer[begin:end])
        tensors[name] = (torch.frombuffer(data, dtype=dtype) if size else torch.empty(0, dtype=dtype)).reshape(shape)
        spans.append((begin, end))
    covered = 0
    for begin, end in sorted(spans):
        if begin != covered:
            raise ValueError(f"{path}: tensor bytes overlap or leave a hole at byte {covered}")
        covered = end
    if covered != len(buffer):
        raise ValueError(f"{path}: {len(buffer) - covered} bytes after the last tensor")
    return tensors, metadata


def sidecar(model: trained.Model, fmt: str, file: str, mean, std) -> dict:
    """How to rebuild and feed an exported model, as plain JSON."""
    return {
        "format": fmt, "file": os.path.basename(file), "model": model.name, "source": model.source,
        "run_id": model.run_id, "logged": model.logged,
        "build": {"arch": model.config.arch, "num_classes": model.num_classes, "in_channels": model.channels,
                  **model.config.model_overrides(inference=True)},
        "input": {"shape": ["batch", model.channels, model.image_size, model.image_size], "dtype": "float32",
                  "layout": "NCHW", "mode": model.mode, "mean": list(mean), "std": list(std),
                  "normalise": "x = (pixels / 255 - mean) / std, per channel, pixels 0..255 after the transform",
                  "transform": model.config.eval_transform, "image_size": model.image_size},
        "output": "logits, one per class in the order of classes; softmax gives probabilities",
        "classes": list(model.classes), "wnids": list(model.wnids), "config": to_dict(model.config),
    }


def export(model: trained.Model, fmt: str, out: str, mean, std) -> float:
    """Write `model` in format `fmt` to `out` and its sidecar to `out`.json; read it back and return the
    max |difference| of its outputs from the original's (ValueError past TOLERANCE, nothing kept)."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    net = model.net.eval()
    size = model.image_size
    example = torch.randn(2, model.channels, size, size, generator=torch.Generator().manual_seed(0))
    info = sidecar(model, fmt, out, mean, std)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")  # deprecated, still asked for
        if fmt == "exported-program":
            program = torch.export.export(net, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
            with open(out, "wb") as f:  # a file object: torch wants a .pt2 name otherwise
                torch.export.save(program, f)
        elif fmt == "torchscript":
            torch.jit.save(torch.jit.trace(net, example), out)
        else:
            save_safetensors(net.state_dict(), out, {"format": "pt", "densenet_ray": json.dumps(info)})
    with open(out + ".json", "w") as f:
        json.dump(info, f, indent=2)
    check = torch.randn(3, model.channels, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (load(out)(check) - net(check)).abs().max().item()
    if not diff <= TOLERANCE:
        os.remove(out)
        os.remove(out + ".json")
        raise ValueError(f"{out}: the exported model's outputs differ from the original's by {diff:.3g} "
                         f"(more than {TOLERANCE:g}); nothing kept")
    return diff


def load(path: str) -> torch.nn.Module:
    """An exported model (any of FORMATS), through its sidecar PATH.json, ready for normalised input."""
    try:
        with open(path + ".json") as f:
            info = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}.json: the sidecar written beside {path} by densenet_ray.export is "
                                "missing; it says which format and architecture the file holds") from None
    fmt = info.get("format")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        if fmt == "exported-program":
            with open(path, "rb") as f:
                return torch.export.load(f).module()
        if fmt == "torchscript":
            return torch.jit.load(path, map_location="cpu").eval()
    if fmt == "safetensors":
        kwargs = dict(info["build"])
        net = build(kwargs.pop("arch"), **kwargs)
        net.load_state_dict(load_safetensors(path)[0])
        return net.eval()
    raise ValueError(f"{path}.json: field format is {fmt!r}; expected one of {', '.join(FORMATS)}")


def check_out(out: str, overwrite: bool) -> None:
    """ModelError unless `out` and its sidecar can be written: not a folder, not there (or `overwrite`)."""
    for path in (out, out + ".json"):
        if os.path.isdir(path):
            raise cli.ModelError(f"--out {out}: {path} is a folder; expected a file name, e.g. {out.rstrip('/')}/model"
                                 ".pt2")
        if os.path.lexists(path) and not overwrite:
            raise cli.ModelError(f"--out {out}: {path} exists; pass --overwrite to replace it, or choose another name")


def default_out(model: trained.Model, fmt: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", model.name).strip("-") + FORMATS[fmt]


def main(argv: list[str] | None = None) -> int:
    p = cli.model_parser("export", __doc__, logs=False)
    p.add_argument("--format", required=True, choices=list(FORMATS), help="see the module docstring")
    p.add_argument("--out", metavar="FILE", help="default: the model's name with .pt2, .ts.pt or .safetensors; "
                   "the sidecar is FILE.json")
    p.add_argument("--stats", metavar="DATASET", help="dataset whose mean/std go into the sidecar (default: the "
                   "training data's, read from the run's config)")
    p.add_argument("--overwrite", action="store_true", help="replace FILE and FILE.json when they exist")
    args = p.parse_args(argv)
    try:
        if args.out:  # before the model loads: seconds, not minutes, to learn the name is taken
            check_out(args.out, args.overwrite)
        model = trained.load(args.model, tracking_uri=args.mlflow_tracking_uri, trust_pickle=args.trust_pickle)
        mean, std, where = trained.normalization(model, given=load_manifest(args.stats) if args.stats else None)
        out = args.out or default_out(model, args.format)
        check_out(out, args.overwrite)
        diff = export(model, args.format, out, mean, std)
    except (*cli.ERRORS, ValueError) as err:
        return cli.error(err)
    except OSError as err:  # a folder we may not write to, a full disk: the path and the reason
        return cli.error(f"--out {out}: {err.strerror or err}")
    print(f"[densenet_ray] {model.name} -> {out} ({args.format}) and {out}.json (architecture, classes, "
          f"mean/std of {where}); read back: max |output difference| {diff:.2g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
