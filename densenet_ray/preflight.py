"""What the training and tuning commands refuse on the driver, in seconds, before Ray starts a worker:
a configuration that cannot run would otherwise fail inside every worker, be retried as if a node
had died (forever under --max-failures -1), or fail only after the whole training.

    cfg, notes = absolute_paths(cfg)       # relative --data / --storage against the working directory
    check_config(cfg)                      # names, locations, the model's shapes at the image size
    model_problem(cfg, image_size=16)      # why this arch cannot run on 16x16 images, or None

The cluster's side (GPUs, nodes, the largest node) is runtime.require_placement.
"""

from __future__ import annotations

import functools
import os

import pyarrow.fs as pafs
import torch

from densenet_ray import config as C
from densenet_ray import storage
from densenet_ray.model import from_config


def absolute_paths(cfg: C.TrainConfig) -> tuple[C.TrainConfig, list[str]]:
    """`cfg` with a relative local --data and --storage made absolute (Ray Train and the workers run
    in other folders; Ray refuses a relative storage path), and a note for each one changed."""
    changes, notes = {}, []
    for name in ("data", "storage"):
        value = getattr(cfg, name)
        if "://" in value:
            continue
        full = os.path.abspath(os.path.expanduser(value))
        if full != value:
            changes[name] = full
            if not os.path.isabs(os.path.expanduser(value)):
                notes.append(f"--{name} {value} is relative: using {full}")
    return cfg.replace(**changes), notes


def check_config(cfg: C.TrainConfig) -> None:
    """Everything about `cfg` itself that cannot work, as one ValueError: the model (built once on
    the meta device and run at the image size), MLflow names, local locations."""
    problems = []
    if cfg.image_size is not None and (reason := model_problem(cfg, cfg.image_size)):
        flags = [f"--arch {cfg.arch}"] + [f"--{k.replace('_', '-')} {v}" for k, v in
                                          cfg.model_overrides(inference=True).items()]
        problems.append(f"{' '.join(flags)}: {reason}")
    problems += name_problems(cfg) + location_problems(cfg)
    if not problems and (reason := builtin_target_problem(cfg)):
        problems.append(reason)
    if problems:
        raise ValueError("invalid training configuration:\n  " + "\n  ".join(problems))


def model_problem(cfg: C.TrainConfig, image_size: int | None) -> str | None:
    """Why the model `cfg` describes cannot be built or cannot run on image_size x image_size
    images (None: at its native size), or None. The model's own checks decide; a meta-device
    build and forward allocate nothing, so this takes well under a second even for ImageNet archs."""
    return _model_problem(cfg.arch, tuple(sorted(cfg.model_overrides(inference=True).items())), image_size)


@functools.lru_cache(maxsize=512)  # a sweep asks again for every sample of the same architecture
def _model_problem(arch: str, overrides: tuple, image_size: int | None) -> str | None:
    try:
        with torch.device("meta"):
            net = from_config(C.TrainConfig(arch=arch, **dict(overrides)), 10, 3, inference=True)
    except ValueError as err:
        return str(err)
    size = image_size or net.input_size
    if _runs_at(net, size):
        return None
    # Its downsampling factor, seen at its native size (224 -> 7: 32), rather than the arithmetic again.
    native = net.input_size
    with torch.no_grad():
        factor = native // net.features(torch.empty(1, net.in_channels, native, native, device="meta")).shape[-1]
    return (f"cannot run on {size}x{size} images: it shrinks images {factor}x before its last layers, "
            f"which leaves no pixels; use --image-size {factor} or more, or a CIFAR-style arch "
            f"(densenet_bc100_k12, densenet_bc with --depth) for small images")


def _runs_at(net: torch.nn.Module, size: int) -> bool:
    x = torch.empty(1, net.in_channels, size, size, device="meta")
    try:
        with torch.no_grad():
            net.eval()(x)
    except RuntimeError:  # "Output size is too small", a 0-sized kernel input, ...
        return False
    return True


def name_problems(cfg: C.TrainConfig) -> list[str]:
    """--registered-model and --experiment against MLflow's own rules (MLflow checks the model name
    only when it registers, after the whole training)."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_experiment_name, _validate_model_name

    problems = []
    for flag, value, rule in (("--registered-model", cfg.registered_model, _validate_model_name),
                              ("--experiment", cfg.experiment, _validate_experiment_name)):
        if value is None:
            continue
        try:
            rule(value)
        except MlflowException as err:
            problems.append(f"{flag} {C.shown(value)}: MLflow refuses it ({err.message})")
    return problems


def location_problems(cfg: C.TrainConfig) -> list[str]:
    """Local --data and --storage that are files, or a --storage that cannot be made under a file or
    in a folder this user cannot write. URIs are left to their filesystems (no network here)."""
    problems = []
    if "://" not in cfg.data and os.path.exists(cfg.data) and not os.path.isdir(cfg.data):
        problems.append(f"--data {cfg.data}: is a file; expected a dataset folder (made by "
                        "python -m densenet_ray.data convert) or a URI")
    if "://" not in cfg.storage:
        existing = cfg.storage
        while not os.path.exists(existing) and os.path.dirname(existing) != existing:
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            problems.append(f"--storage {cfg.storage}: {existing} is a file; expected a folder for checkpoints "
                            "(made if missing) or a URI such as s3://bucket/runs")
        elif not os.access(existing, os.W_OK | os.X_OK):
            problems.append(f"--storage {cfg.storage}: {existing} is not writable by this user; choose a "
                            "folder you can write")
    return problems


def builtin_target_problem(cfg: C.TrainConfig) -> str | None:
    """Why a built-in dataset (digits) must not be converted into --data, which has no manifest, or
    None: converting on first use writes only into an empty or missing folder, never beside a
    person's own files."""
    from densenet_ray.data import MANIFEST, sources

    if cfg.dataset not in sources.BUILTIN or storage.kind(f"{cfg.data}/{MANIFEST}") != "missing":
        return None
    fs, path = storage.filesystem(cfg.data)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return None
    if info.type != pafs.FileType.Directory:
        return f"--data {cfg.data}: is not a folder; {cfg.dataset} converts itself only into an empty or missing folder"
    entries = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    if not entries:
        return None
    names = sorted(os.path.basename(e.path.rstrip("/")) for e in entries)
    return (f"--data {cfg.data}: has no dataset.json but holds {len(names)} entries ({', '.join(names[:3])}"
            f"{', ...' if len(names) > 3 else ''}); {cfg.dataset} converts itself only into an empty or missing "
            f"folder. Pass --data a new folder for {cfg.dataset}. To train on your own images (SPLIT/CLASS/*), "
            f"convert them first (python -m densenet_ray.data convert imagefolder {cfg.data} OUT) and train "
            f"with --dataset custom --data OUT. An interrupted conversion leaves such a folder too: delete it")
