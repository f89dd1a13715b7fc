"""One frozen dataclass describes a training run; presets are named instances of it.

    from densenet_ray.config import PRESETS, from_args
    cfg = from_args(["imagenet", "--workers", "8", "--gpus-per-worker", "1"])
    cfg = PRESETS["cifar10"].replace(epochs=10)

Every field is a command-line flag (`--batch-size 512`, `--channels-last`, `--lr-milestones 0.5,0.75`),
generated from the dataclass and type-checked; `python -m densenet_ray.train PRESET --help` lists them
with the preset's values. Dataset differences live here, in the presets, not in the training loop.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import reprlib
import time
import types
import typing
from dataclasses import dataclass, field, fields

HOME = os.path.expanduser(os.environ.get("DENSENET_RAY_HOME", "~/.densenet_ray"))
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray placement-group strategies
SELECTIONS = ("last", "best")
ORDERS = ("rows", "row_groups")
NORMALIZATIONS = ("mean_std", "unit")
DECODES = ("pipeline", "device")
# data.device.DEVICE_TRANSFORMS (tests check the two agree): what a worker can crop, flip and colour itself.
DEVICE_TRANSFORMS = ("imagenet_train", "imagenet_train_crop_flip", "none")
# data.transforms.TRANSFORMS by use (tests check the two agree): ten crops give ten views of each
# image, which only evaluate.py averages; training's evaluation takes one view, without randomness.
TRAIN_TRANSFORMS = ("imagenet_train", "imagenet_train_crop_flip", "cifar_train", "imagenet_eval", "none")
EVAL_TRANSFORMS = ("imagenet_eval", "none")
MAX_DEPTH = 1000  # layers: past the deepest DenseNet anyone trained (264), a typo rather than a plan
MAX_IMAGE_SIZE = 4096  # pixels: each worker decodes batches of size x size images in memory
NAME_MAX = 200  # characters of a run or sweep name: one folder under --storage (file systems stop at 255 bytes)
MIN_BN_BATCH = 16  # images per worker below which BatchNorm's batch statistics get noisy
_BOOL_WORDS = ("1", "true", "yes", "on", "0", "false", "no", "off")
# (classes, channels) of the datasets the presets are for: what `tune --dry-run` sizes models with
# before the data exists. "custom": a dataset of your own (imagefolder), sized from its manifest.
DATASETS = {"imagenet": (1000, 3), "cifar10": (10, 3), "cifar100": (100, 3), "svhn": (10, 3), "digits": (10, 1),
            "custom": None}


def _f(default, help: str):
    """A field with its --help text: every parameter is typed, documented and validated here."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    """A training run. Paper recipe (section 4.2): SGD, Nesterov momentum 0.9 without dampening,
    weight decay 1e-4, lr 0.1 divided by 10 at the milestones."""

    preset: str = _f("imagenet", "the recipe these values came from")
    dataset: str = _f("imagenet", "what --data holds: " + ", ".join(DATASETS) + " (digits converts itself on first use)")
    # data: a dataset folder made by `python -m densenet_ray.data convert ...`
    data: str = _f(os.path.join(HOME, "data", "imagenet"), "dataset folder or URI (s3://, file://)")
    train_split: str = _f("train", "split to train on; 'a+b' joins splits (mixed, not concatenated)")
    val_split: str | None = _f("val", "split evaluated after every epoch; it chooses (ASHA, --select best, the "
                               "champion); none: no validation (a final run on train+val)")
    test_split: str | None = _f(None, "split evaluated once, at the end, logged as test_*; never used to choose")
    select: str = _f("last", "the epoch a run registers: last, or best (lowest val_top1_err, the paper's SVHN protocol)")
    train_transform: str = _f("imagenet_train", "imagenet_train (the paper's), imagenet_train_crop_flip, cifar_train or none")
    eval_transform: str = _f("imagenet_eval", "imagenet_eval or none")
    normalize: str = _f("mean_std", "input scaling: mean_std (per channel, the training data's) or unit (pixels / 255 "
                        "only, the paper's SVHN)")
    image_size: int | None = _f(224, "pixels, the side the transforms produce; None: as stored")
    num_classes: int | None = _f(None, "None: from the dataset manifest; otherwise must match it")
    # model: an arch name (densenet121, densenet_bc100_k12, ...); the fields below override it
    arch: str = _f("densenet121", "densenet121/161/169/201/264, densenet_bc100_k12, ..., or densenet/densenet_bc with --depth and --growth-rate")
    depth: int | None = _f(None, "L, for CIFAR-style archs (three equal blocks)")
    growth_rate: int | None = _f(None, "k, feature maps each layer adds; None: the arch's")
    compression: float | None = _f(None, "theta in (0, 1] at transitions; None: the arch's")
    bottleneck: bool | None = _f(None, "DenseNet-B: 1x1 conv to 4k maps before each 3x3")
    drop_rate: float = _f(0.0, "dropout after each conv; the paper's 0.2 without augmentation")
    memory_efficient: bool = _f(False, "recompute concatenations and BN-ReLU in backward: memory linear in depth")
    # optimisation
    epochs: int = _f(90, "passes over the train split")
    batch_size: int = _f(256, "global, across all workers")
    lr: float = _f(0.1, "at reference_batch images; scaled linearly to batch_size (Goyal et al.)")
    reference_batch: int = _f(256, "the recipe's global batch")
    warmup_epochs: float = _f(5.0, "linear warm-up, only when batch_size > reference_batch")
    lr_milestones: tuple[float, ...] = _f((1 / 3, 2 / 3), "fractions of epochs where lr /= 10")
    momentum: float = _f(0.9, "Nesterov momentum, no dampening")
    weight_decay: float = _f(1e-4, "L2 penalty on every weight")
    # systems
    workers: int = _f(2, "data-parallel training workers (Ray actors)")
    cpus_per_worker: float = _f(1.0, "CPUs reserved by each worker")
    gpus_per_worker: float = _f(0.0, "GPUs per worker; 0 trains on CPUs (gloo), more on GPUs (NCCL)")
    placement_strategy: str = _f("PACK", "PACK workers onto few nodes, or SPREAD them one per node where possible")
    precision: str = _f("auto", "auto (bf16 autocast on GPUs that have bf16, fp16 on older GPUs, fp32 on CPUs), fp32, "
                        "bf16 or fp16 autocast (fp16 with a gradient scaler); the run's params record the resolved one")
    channels_last: bool | None = _f(None, "NHWC memory format (faster convolutions with AMP on GPUs); None: on when "
                                    "training in bf16 or fp16 on a GPU")
    compile: bool = _f(False, "torch.compile the model")
    shuffle: str = _f("row_groups", "train order, new every epoch from (seed, epoch): rows (a full permutation of "
                      "the split's rows: a per-epoch barrier that moves the encoded split through the object "
                      "store, the CIFAR/SVHN presets') or row_groups (row groups in random order + the local "
                      "buffer: streams; rows stored together stay near each other)")
    shuffle_buffer: int = _f(2048, "rows in each worker's local shuffle buffer (decoded images: 2,048 at 224 px "
                             "hold 300 MB); 0: none")
    decode: str = _f("pipeline", "where training images are decoded: pipeline (Ray Data's CPU tasks) or device (each "
                     "worker decodes JPEG rows with torchvision.io.decode_jpeg on its GPU, nvJPEG; other formats "
                     "still in the pipeline)")
    sync_bn: bool = _f(False, "SyncBatchNorm: batch statistics over every worker's images (for small per-worker batches)")
    seed: int = _f(0, "initial weights, the data order of every epoch, per-epoch dropout")
    # storage and tracking
    storage: str = _f(os.path.join(HOME, "runs"), "checkpoints; shared (s3://, NFS) on multi-node clusters")
    run_name: str | None = _f(None, "None: PRESET-ARCH-TIMESTAMP; the same name and storage resume a run")
    max_failures: int = _f(2, "worker/node failures survived, each resuming from the last checkpoint")
    checkpoint_every_steps: int = _f(0, "also checkpoint inside an epoch every N optimizer steps (a run resumes at "
                                     "the step, every image still used once an epoch); 0: at epoch ends only")
    checkpoint_every_min: float = _f(0.0, "also checkpoint inside an epoch every M minutes; 0: off. A SIGTERM to a "
                                     "worker or the driver always checkpoints at the next step")
    mlflow_tracking_uri: str | None = _f(None, "None: $MLFLOW_TRACKING_URI, else the embedded SQLite store")
    experiment: str = _f("densenet_ray", "MLflow experiment")
    registered_model: str | None = _f(None, "None: densenet-DATASET, after the dataset's name in its manifest")
    # console
    progress_s: float = _f(30.0, "seconds between progress lines inside an epoch (and step metrics in MLflow); 0: off")
    verbose: bool = _f(False, "show Ray's and MLflow's info lines (per-report dumps, checkpoint paths) on the console")

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    # Derived values: computed, never stored, so a config cannot contradict itself.
    @property
    def run_dir(self) -> str:
        """The run's folder under --storage (a path or URI): its checkpoints."""
        return f"{self.storage.rstrip('/')}/{self.run_name}"

    @property
    def lr_scaled(self) -> float:
        return self.lr * self.batch_size / self.reference_batch

    @property
    def warmup(self) -> float:
        return self.warmup_epochs if self.batch_size > self.reference_batch else 0.0

    def lr_at(self, epoch: float) -> float:
        """Learning rate at a fractional epoch: step decay at the milestones after a linear
        warm-up from the recipe's lr to the scaled one (only for batches past the recipe's)."""
        if epoch < self.warmup:
            return self.lr + (self.lr_scaled - self.lr) * epoch / self.warmup
        drops = sum(epoch >= round(f * self.epochs) for f in self.lr_milestones)
        return self.lr_scaled * 0.1 ** drops

    def for_device(self, gpu: bool, bf16: bool) -> TrainConfig:
        """The config with --precision auto and --channels-last none resolved for a worker's device:
        bf16 autocast on GPUs with native bf16 (Ampere and later), fp16 with a gradient scaler on older
        ones (tensor cores, as torchvision's reference --amp), fp32 on CPUs (CPU autocast speeds up
        little but bf16 matmuls on CPUs with AMX, and costs accuracy); channels_last with AMP on a GPU.
        What was asked explicitly stays."""
        precision = self.precision
        if precision == "auto":
            precision = ("bf16" if bf16 else "fp16") if gpu else "fp32"
        channels_last = self.channels_last if self.channels_last is not None else gpu and precision != "fp32"
        return self.replace(precision=precision, channels_last=channels_last)

    def model_overrides(self, *, inference: bool = False) -> dict:
        """Keyword arguments for model.build beyond the arch name (model.from_config); `inference`: without those
        that change nothing in eval mode (dropout, the memory-efficient backward)."""
        out = {} if inference else {"drop_rate": self.drop_rate, "memory_efficient": self.memory_efficient}
        for name in ("depth", "growth_rate", "compression", "bottleneck"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    def resolved(self) -> TrainConfig:
        """Fill the defaults that depend on other fields; validate."""
        cfg = self
        if not cfg.run_name:
            cfg = cfg.replace(run_name=f"{cfg.preset}-{cfg.arch}-{time.strftime('%Y%m%d-%H%M%S')}")
        cfg.validate()
        return cfg

    def validate(self) -> None:
        problems = []

        def need(ok: bool, name: str, accepted: str) -> None:
            if not ok:
                problems.append(f"--{name.replace('_', '-')} {shown(getattr(self, name))}: expected {accepted}")

        need(self.epochs >= 1, "epochs", "at least 1")
        need(self.workers >= 1, "workers", "at least 1")
        need(self.workers >= 1 and self.batch_size >= self.workers and self.batch_size % self.workers == 0,
             "batch_size", f"a positive multiple of --workers ({self.workers}): each worker takes batch_size / workers")
        need(self.lr > 0, "lr", "a positive number")
        need(self.reference_batch >= 1, "reference_batch", "a positive integer")
        need(all(0 < f < 1 for f in self.lr_milestones), "lr_milestones",
             "fractions of the epochs in (0, 1), comma separated, e.g. 0.5,0.75")
        need(0 <= self.momentum < 1, "momentum", "a number in [0, 1)")
        need(self.weight_decay >= 0, "weight_decay", "0 or more")
        need(self.warmup_epochs >= 0, "warmup_epochs", "0 or more")
        need(self.precision in PRECISIONS, "precision", " or ".join(PRECISIONS))
        need(self.placement_strategy in PLACEMENTS, "placement_strategy", " or ".join(PLACEMENTS))
        need(self.cpus_per_worker > 0, "cpus_per_worker", "a positive number")
        need(self.gpus_per_worker >= 0, "gpus_per_worker", "0 (CPU training) or more")
        need(self.max_failures >= -1, "max_failures", "-1 (retry forever), 0, or more")
        need(self.image_size is None or 8 <= self.image_size <= MAX_IMAGE_SIZE, "image_size",
             f"a size in pixels from 8 to {MAX_IMAGE_SIZE}, or none")
        need(self.num_classes is None or self.num_classes >= 2, "num_classes", "none (from the data) or 2 or more")
        need(0 <= self.drop_rate < 1, "drop_rate", "a probability in [0, 1)")
        need(self.compression is None or 0 < self.compression <= 1, "compression", "theta in (0, 1]")
        need(self.growth_rate is None or self.growth_rate >= 1, "growth_rate", "a positive integer")
        need(self.depth is None or 10 <= self.depth <= MAX_DEPTH, "depth",
             f"a total depth L such as 40, 100 or 190 (at most {MAX_DEPTH})")
        need(self.progress_s >= 0 and math.isfinite(self.progress_s), "progress_s", "seconds, 0 or more (0: no progress lines)")
        need(self.shuffle_buffer >= 0, "shuffle_buffer", "0 or more rows")
        need(self.checkpoint_every_steps >= 0, "checkpoint_every_steps", "0 (off) or a number of steps")
        need(self.checkpoint_every_min >= 0 and math.isfinite(self.checkpoint_every_min), "checkpoint_every_min",
             "0 (off) or minutes")
        need(path_component_problem(self.run_name) is None, "run_name", f"{path_component_problem(self.run_name)}")
        need(bool(self.experiment.strip()), "experiment", "an MLflow experiment name, not empty")
        need(bool(self.data.strip()), "data", "a dataset folder or URI, not empty")
        need(bool(self.storage.strip()), "storage", "a folder or URI for checkpoints, not empty")
        need(0 <= self.seed < 2 ** 32, "seed", "an integer from 0 to 2**32 - 1 (numpy seeds the data order with it)")
        need(self.train_transform in TRAIN_TRANSFORMS, "train_transform", " or ".join(TRAIN_TRANSFORMS))
        need(self.eval_transform in EVAL_TRANSFORMS, "eval_transform", " or ".join(EVAL_TRANSFORMS)
             + " (one view per image; the 10-crop test is python -m densenet_ray.evaluate MODEL --ten-crop)")
        need(self.dataset in DATASETS, "dataset", " or ".join(DATASETS))
        need(self.select in SELECTIONS, "select", " or ".join(SELECTIONS))
        need(self.select == "last" or self.val_split is not None, "select",
             "last when there is no --val-split: best needs validation to choose")
        need(self.shuffle in ORDERS, "shuffle", " or ".join(ORDERS))
        need(self.normalize in NORMALIZATIONS, "normalize", " or ".join(NORMALIZATIONS))
        need(self.decode in DECODES, "decode", " or ".join(DECODES))
        need(self.decode != "device" or self.train_transform in DEVICE_TRANSFORMS, "decode",
             f"pipeline with --train-transform {self.train_transform} (device decodes "
             + ", ".join(DEVICE_TRANSFORMS) + ")")
        need(not self.sync_bn or self.gpus_per_worker > 0, "sync_bn",
             "false on CPU workers: torch's SyncBatchNorm runs on GPUs only")
        need(not (self.sync_bn and self.memory_efficient), "sync_bn",
             "false with --memory-efficient (its BN-ReLU-Conv chains use plain BatchNorm statistics)")
        need(self.test_split is None or self.test_split not in (self.val_split, self.train_split), "test_split",
             "a split of its own, neither --train-split nor --val-split")
        if problems:
            raise ValueError("invalid training configuration:\n  " + "\n  ".join(problems))


def path_component_problem(name) -> str | None:
    """Why `name` cannot be a run or sweep name, or None: it names one folder under --storage (and
    Tune's storage), so it is a single path component that stays there: no '/', '\\', '.', '..'."""
    if not name or not name.strip():
        return "a name, not empty"
    if name in (".", "..") or any(c in name for c in "/\\\0"):
        return "a single folder name under --storage: no '/', '\\' or NUL, not '.' or '..'"
    if len(name) > NAME_MAX or name != name.strip():
        return f"at most {NAME_MAX} characters, without leading or trailing spaces"
    return None


_BASE = TrainConfig()
PRESETS: dict[str, TrainConfig] = {
    # Table 1 / Table 3: DenseNet-BC-121 on ILSVRC2012, 90 epochs, batch 256, lr /10 at 30 and 60.
    "imagenet": _BASE,
    # C10+/C100+: standard augmentation, 300 epochs, batch 64, lr /10 at 50% and 75%. Validation on the
    # 5,000 training images `convert --holdout 5000` sets aside; test once at the end. Table 2's figures
    # come from the final run on all 50,000: --train-split train+val --val-split none.
    "cifar10": _BASE.replace(
        preset="cifar10", dataset="cifar10", data=os.path.join(HOME, "data", "cifar10"), test_split="test",
        train_transform="cifar_train", eval_transform="none", image_size=32, arch="densenet_bc100_k12",
        epochs=300, batch_size=64, reference_batch=64, lr_milestones=(0.5, 0.75), shuffle="rows", shuffle_buffer=0),
}
PRESETS["cifar100"] = PRESETS["cifar10"].replace(preset="cifar100", dataset="cifar100", data=os.path.join(HOME, "data", "cifar100"))
# C10/C100 without augmentation: dropout 0.2 after each conv.
PRESETS["cifar10_noaug"] = PRESETS["cifar10"].replace(preset="cifar10_noaug", train_transform="none", drop_rate=0.2)
PRESETS["cifar100_noaug"] = PRESETS["cifar100"].replace(preset="cifar100_noaug", train_transform="none",
                                                        drop_rate=0.2)
# SVHN: train+extra less the 6,000 held out (`convert --holdout 6000`), no augmentation beyond /255,
# dropout 0.2, 40 epochs; the epoch with the lowest validation error is registered and tested.
PRESETS["svhn"] = PRESETS["cifar10_noaug"].replace(preset="svhn", dataset="svhn", data=os.path.join(HOME, "data", "svhn"),
                                                   train_split="train+extra", epochs=40, select="best",
                                                   normalize="unit")
# The offline demo: scikit-learn's 1,797 real 8x8 digits, upsampled to 16x16, minutes on a laptop CPU.
PRESETS["digits"] = PRESETS["cifar10"].replace(
    preset="digits", dataset="digits", data=os.path.join(HOME, "data", "digits"), test_split=None, train_transform="none",
    image_size=16, arch="densenet_bc22_k12", epochs=15, batch_size=64, reference_batch=64,
    lr=0.1, max_failures=1)


_FIELD_NAMES = [f.name for f in fields(TrainConfig)]


def field_type(name: str) -> tuple[type, bool]:
    """(the type of field `name`, whether it is optional): int | None -> (int, True)."""
    kind = typing.get_type_hints(TrainConfig)[name]
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        return next(a for a in typing.get_args(kind) if a is not type(None)), True
    return kind, False


_SHORT = reprlib.Repr()  # keyword arguments only from Python 3.12
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxdict = 2, 4, 4, 4
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 60, 60, 40


def shown(value) -> str:
    """repr(value) cut short for a message: a value from a file can be arbitrarily large, and
    printing it whole is how a small file runs a machine out of memory."""
    return _SHORT.repr(value)


def coerce(name: str, value):
    """`value` for field `name`, typed: the one rule for command-line text and YAML values.
    Text is parsed ("12", "true", "0.5,0.75", "none" for an optional field); a YAML value must
    already have the field's type (an int where a float goes is fine). ValueError says why."""
    if name not in _FIELD_NAMES:
        close = difflib.get_close_matches(name, _FIELD_NAMES, 1)
        raise ValueError(f"unknown field {shown(name)}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    kind, optional = field_type(name)
    text = isinstance(value, str)
    if optional and (value is None or (text and value.strip().lower() in ("none", ""))):
        return None
    if kind is bool:
        if text and value.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if text and value.strip().lower() in ("0", "false", "no", "off"):
            return False
        if isinstance(value, bool):
            return value
        raise ValueError(f"{shown(value)} is not a boolean: use true or false")
    if typing.get_origin(kind) is tuple:
        parts = [p for p in value.split(",") if p.strip()] if text else value
        try:
            if not isinstance(parts, (list, tuple)) or any(isinstance(p, bool) for p in parts):
                raise TypeError
            return tuple(float(p) for p in parts)
        except (TypeError, ValueError):
            raise ValueError(f"{shown(value)}: expected comma-separated numbers, e.g. 0.5,0.75") from None
    if kind in (int, float):
        wrong = f"{shown(value)} is not {'an integer' if kind is int else 'a number'}"
        if isinstance(value, bool) or not (text or isinstance(value, (int, float))):
            raise ValueError(wrong)
        if not text and kind is int and not isinstance(value, int):
            raise ValueError(wrong)
        try:
            number = kind(value)
        except ValueError:
            raise ValueError(wrong) from None
        if kind is float and not math.isfinite(number):
            raise ValueError(f"{shown(value)} is not a finite number")
        return number
    if not text:
        raise ValueError(f"{shown(value)} is not text")
    return value


def _flag_type(name: str):
    """argparse's type= for field `name`: coerce, with argparse's error class."""
    def parse(text: str):
        try:
            return coerce(name, text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse.__name__ = name
    return parse


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # Suggest the nearest field for a misspelt flag.
        if "unrecognized arguments" in message:
            flags = [a for a in message.split(":", 1)[1].split() if a.startswith("--")]
            known = [f"--{f.name.replace('_', '-')}" for f in fields(TrainConfig)]
            hints = [f"{a} -> {m[0]}?" for a in flags for m in [difflib.get_close_matches(a.split("=")[0], known, 1)]
                     if m]
            if hints:
                message += " (did you mean " + ", ".join(hints) + ")"
        super().error(message)


def parser(preset: TrainConfig = _BASE, prog: str = "python -m densenet_ray.train") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, allow_abbrev=False, description="Train a DenseNet on Ray Train, tracked in MLflow. "
                "Every field of the preset can be overridden; 'none' clears an optional field.",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("preset", choices=list(PRESETS), help="the paper's recipe to start from")
    for f in fields(TrainConfig):
        if f.name == "preset":
            continue
        kind, _ = field_type(f.name)
        if kind is bool:
            extra = {"nargs": "?", "const": True, "metavar": "BOOL"}
        elif typing.get_origin(kind) is tuple:
            extra = {"metavar": "F,F"}
        else:
            extra = {"metavar": kind.__name__.upper() if kind in (int, float) else "STR"}
        p.add_argument(f"--{f.name.replace('_', '-')}", type=_flag_type(f.name), default=getattr(preset, f.name),
                       help=f.metadata.get("help") or " ", **extra)
    return p


def from_args(argv: list[str]) -> TrainConfig:
    """The resolved config for `PRESET [--field value ...]`, the preset anywhere among the flags;
    argparse errors exit with a message."""
    preset_name, rest = _preset_among(argv)
    if preset_name is not None and preset_name not in PRESETS:
        close = difflib.get_close_matches(preset_name, PRESETS, 1)
        parser().error(f"unknown preset {preset_name!r}; choose one of {', '.join(PRESETS)}"
                       + (f" (did you mean {close[0]!r}?)" if close else ""))
    preset = PRESETS.get(preset_name, _BASE)
    args = vars(parser(preset).parse_args(([preset_name] if preset_name else []) + rest))
    cfg = preset.replace(**{k: v for k, v in args.items() if k != "preset"})
    try:
        return cfg.resolved()
    except ValueError as err:
        parser(preset).error(str(err))


def _preset_among(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the first word that is no flag's value, the other arguments): `--workers 4 cifar10` and
    `--channels-last cifar10` name the preset cifar10 (a BOOL flag takes the next word only when
    it is true/false/yes/no/on/off/1/0)."""
    takes = {f"--{f.name.replace('_', '-')}": field_type(f.name)[0] is not bool for f in fields(TrainConfig)}
    preset, rest, i = None, [], 0
    while i < len(argv):
        word = argv[i]
        if word.startswith("-") and word != "-":
            rest.append(word)
            flag, has_value = word.split("=", 1)[0], "=" in word
            if not has_value and i + 1 < len(argv) and flag in takes and (
                    takes[flag] or argv[i + 1].strip().lower() in _BOOL_WORDS):
                rest.append(argv[i + 1])
                i += 1
        elif preset is None:
            preset = word
        else:
            rest.append(word)  # a second positional: argparse names it
        i += 1
    return preset, rest


def to_dict(cfg: TrainConfig) -> dict:
    return {f.name: (list(v) if isinstance(v := getattr(cfg, f.name), tuple) else v) for f in fields(cfg)}


def from_dict(values: dict) -> TrainConfig:
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in known})


