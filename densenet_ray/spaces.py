"""Search spaces for Ray Tune as YAML files (`tune_spaces/*.yaml`): loaded, validated, expanded into trials.

    space = load_space("tune_spaces/cifar10_bc.yaml")
    trials, skipped = space.trials()      # TrainConfig overrides (seeded); (overrides, reason) left out

A space file:

    preset: cifar10                        # the TrainConfig preset every trial starts from
    fixed: {epochs: 300, workers: 1}       # TrainConfig fields set for every trial
    space:                                 # TrainConfig fields searched; each one domain:
      growth_rate: {choice: [12, 24, 40]}  #   choice (sampled), grid (every value, crossed),
      depth: {grid: [100, 190, 250]}       #   uniform / loguniform [low, high], randint [low, high)
      lr: {loguniform: [0.05, 0.2]}
    scheduler: {type: asha, metric: val_top1_err, mode: min, grace_period: 10, reduction_factor: 3}
    num_samples: 8                         # sampled configurations (the grid is crossed with them)
    max_concurrent: 2
    resources: {workers: 2, cpus_per_worker: 1, gpus_per_worker: 0}
    seed: 0

`scheduler.type`: `asha` (early stopping), `fifo` (every trial runs its epochs) or `grid` (every
combination of every `choice`, no sampling, no early stopping: num_samples repeats it). Depth,
growth rate, compression and bottleneck must make a valid DenseNet; a value that fits no variant is
an error naming its key path, a combination that does not fit is skipped with the reason.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from dataclasses import dataclass

import torch
import yaml

from densenet_ray import config as C
from densenet_ray.model import count_macs, from_config

SEARCHABLE = ("arch", "depth", "growth_rate", "compression", "bottleneck", "drop_rate", "lr", "weight_decay",
              "batch_size", "momentum", "warmup_epochs", "image_size", "memory_efficient")
DOMAINS = ("choice", "grid", "uniform", "loguniform", "randint")
SCHEDULERS = ("asha", "fifo", "grid")
TOP_LEVEL = ("preset", "fixed", "space", "scheduler", "num_samples", "max_concurrent", "resources", "seed",
             "name", "registered_model")
RESOURCES = ("workers", "cpus_per_worker", "gpus_per_worker")
ARCH_KEYS = ("arch", "depth", "growth_rate", "compression", "bottleneck")


class SpaceError(ValueError):
    """A space file that cannot run; the message names the file, the key path and what is allowed."""


@dataclass(frozen=True)
class Scheduler:
    type: str = "asha"
    metric: str = "val_top1_err"
    mode: str = "min"
    grace_period: int = 1  # epochs every trial gets before ASHA may stop it
    reduction_factor: int = 2


@dataclass(frozen=True)
class Space:
    path: str
    base: C.TrainConfig  # the preset with `fixed` and the resources applied
    domains: dict  # field -> (domain, values)
    scheduler: Scheduler
    num_samples: int = 1
    max_concurrent: int = 1
    seed: int = 0
    name: str = ""

    def trials(self, num_samples: int | None = None) -> tuple[list[dict], list[tuple[dict, str]]]:
        """The trials' TrainConfig overrides: the grid crossed with `num_samples` seeded samples of
        the rest (every choice becomes grid for the plain-grid scheduler); and the combinations
        skipped because they make no valid DenseNet, each with the reason."""
        n = num_samples or self.num_samples
        grid_type = self.scheduler.type == "grid"
        gridded = {k: v for k, (d, v) in self.domains.items() if d == "grid" or (grid_type and d == "choice")}
        sampled = {k: dv for k, dv in self.domains.items() if k not in gridded}
        rng = random.Random(self.seed)
        out, skipped, seen = [], [], set()
        for combo in itertools.product(*gridded.values()) if gridded else [()]:
            for _ in range(n):
                trial = dict(zip(gridded, combo))
                for _attempt in range(100):  # resample an invalid architecture or a repeat
                    candidate = {**trial, **{k: _sample(d, v, rng) for k, (d, v) in sampled.items()}}
                    reason = arch_problem(self.base.replace(**candidate))
                    key = tuple(sorted(candidate.items()))
                    if (reason is None and key not in seen) or not sampled:
                        break
                if reason is not None:
                    skipped.append((candidate, reason))
                elif key not in seen:  # a space smaller than num_samples runs each configuration once
                    seen.add(key)
                    out.append(candidate)
        return out, skipped


def _sample(domain: str, values, rng: random.Random):
    if domain == "choice":
        return rng.choice(values)
    low, high = values
    if domain == "uniform":
        return rng.uniform(low, high)
    if domain == "loguniform":
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    return rng.randrange(low, high)  # randint: [low, high)


def arch_problem(cfg: C.TrainConfig) -> str | None:
    """Why this configuration's architecture cannot be built, or None."""
    try:
        with torch.device("meta"):
            from_config(cfg, 10, 3)
    except ValueError as err:
        return str(err)
    return None


def describe(cfg: C.TrainConfig, num_classes: int, in_channels: int = 3) -> dict:
    """k, L, theta, params and GMACs at the run's input size, from the model module."""
    with torch.device("meta"):
        net = from_config(cfg, num_classes, in_channels)
    return {"k": net.growth_rate, "L": net.depth, "theta": net.compression, "bottleneck": net.bottleneck,
            "params": sum(p.numel() for p in net.parameters()),
            "gmacs": count_macs(net, cfg.image_size or net.input_size) / 1e9}


def load_space(path: str, **overrides) -> Space:
    """Read and validate a space file; `overrides` (TrainConfig fields) win over the file's `fixed`."""
    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
    except FileNotFoundError:
        raise SpaceError(f"{path}: no such space file") from None
    except yaml.YAMLError as err:
        raise SpaceError(f"{path}: not valid YAML ({err})") from None
    where = path

    def fail(key: str, message: str):
        raise SpaceError(f"{where}: {key}: {message}")

    if not isinstance(doc, dict):
        fail("(top level)", "expected a mapping with preset, space, scheduler, ...")
    for key in doc:
        if key not in TOP_LEVEL:
            fail(key, f"unknown key; allowed: {', '.join(TOP_LEVEL)}")
    preset = doc.get("preset")
    if preset not in C.PRESETS:
        fail("preset", f"{preset!r} is not a preset; choose one of {', '.join(C.PRESETS)}")

    fields = {f.name for f in dataclasses.fields(C.TrainConfig)}
    fixed = doc.get("fixed") or {}
    if not isinstance(fixed, dict):
        fail("fixed", "expected a mapping of TrainConfig fields")
    for key, value in fixed.items():
        if key not in fields:
            fail(f"fixed.{key}", f"unknown field; TrainConfig has {', '.join(sorted(fields))}")
        fixed[key] = _coerce(key, value, lambda m, k=key: fail(f"fixed.{k}", m))

    resources = doc.get("resources") or {}
    for key, value in resources.items():
        if key not in RESOURCES:
            fail(f"resources.{key}", f"unknown key; allowed: {', '.join(RESOURCES)}")
        value = _coerce(key, value, lambda m, k=key: fail(f"resources.{k}", m))
        if value < 0:
            fail(f"resources.{key}", f"{value!r}: expected a non-negative number")
        resources[key] = value

    space = doc.get("space") or {}
    if not isinstance(space, dict) or not space:
        fail("space", "expected a mapping of TrainConfig fields to domains, e.g. growth_rate: {choice: [12, 24]}")
    domains = {}
    for key, spec in space.items():
        at = f"space.{key}"
        if key not in SEARCHABLE:
            fail(at, f"not searchable; searchable fields: {', '.join(SEARCHABLE)}")
        if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DOMAINS):
            fail(at, f"{spec!r}: expected one domain, one of {', '.join(DOMAINS)} (e.g. {{choice: [12, 24]}})")
        domain, values = next(iter(spec.items()))
        if not isinstance(values, list) or not values:
            fail(f"{at}.{domain}", f"{values!r}: expected a non-empty list")
        if domain in ("uniform", "loguniform", "randint"):
            if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) \
                    or values[0] >= values[1] or (domain == "loguniform" and values[0] <= 0):
                fail(f"{at}.{domain}", f"{values!r}: expected [low, high] with low < high"
                     + (" and low > 0" if domain == "loguniform" else ""))
        values = [_coerce(key, value, lambda m, p=f"{at}.{domain}[{i}]": fail(p, m)) if domain in ("choice", "grid")
                  or i < 2 else value for i, value in enumerate(values)]
        domains[key] = (domain, values)

    scheduler_doc = doc.get("scheduler") or {}
    allowed = [f.name for f in dataclasses.fields(Scheduler)]
    for key in scheduler_doc:
        if key not in allowed:
            fail(f"scheduler.{key}", f"unknown key; allowed: {', '.join(allowed)}")
    scheduler = Scheduler(**scheduler_doc)
    if scheduler.type not in SCHEDULERS:
        fail("scheduler.type", f"{scheduler.type!r}: expected one of {', '.join(SCHEDULERS)}")
    if scheduler.mode not in ("min", "max"):
        fail("scheduler.mode", f"{scheduler.mode!r}: expected min or max")
    for key in ("grace_period", "reduction_factor"):
        value = getattr(scheduler, key)
        if not isinstance(value, int) or value < (1 if key == "grace_period" else 2):
            fail(f"scheduler.{key}", f"{value!r}: expected an integer >= {1 if key == 'grace_period' else 2}")
    for key in ("num_samples", "max_concurrent", "seed"):
        value = doc.get(key, 0 if key == "seed" else 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "seed" else 1):
            fail(key, f"{value!r}: expected an integer >= {0 if key == 'seed' else 1}")

    base = C.PRESETS[preset].replace(**fixed, **resources, **{k: v for k, v in overrides.items() if v is not None})
    try:
        base.replace(run_name=base.run_name or "sweep", registered_model=base.registered_model or "x").validate()
    except ValueError as err:
        raise SpaceError(f"{where}: fixed/resources: {err}") from None
    if not base.val_split:
        fail("fixed.val_split", "a sweep chooses on validation error: give it a validation split, not none")
    if scheduler.metric.startswith("test_"):
        fail("scheduler.metric", f"{scheduler.metric!r}: the test split is never used to choose; use val_top1_err")
    _check_depths(base, domains, fail)
    return Space(path=path, base=base, domains=domains, scheduler=scheduler, num_samples=doc.get("num_samples", 1),
                 max_concurrent=doc.get("max_concurrent", 1), seed=doc.get("seed", 0), name=doc.get("name", ""))


def _coerce(name: str, value, fail):
    """config.coerce, the rule command-line flags follow too, its message under the key path."""
    try:
        return C.coerce(name, value)
    except ValueError as err:
        fail(str(err))


def _check_depths(base: C.TrainConfig, domains: dict, fail) -> None:
    """A depth that no bottleneck choice in the space can build is an error, not a silent skip."""
    if "depth" not in domains or domains["depth"][0] not in ("choice", "grid"):
        return
    bottlenecks = domains.get("bottleneck", (None, [base.bottleneck]))[1]
    archs = domains.get("arch", (None, [base.arch]))[1]
    for i, depth in enumerate(domains["depth"][1]):
        reasons = []
        for arch, bottleneck in itertools.product(archs, bottlenecks):
            reason = arch_problem(base.replace(arch=arch, depth=depth, bottleneck=bottleneck, growth_rate=12))
            if reason is None:
                break
            reasons.append(reason)
        else:
            fail(f"space.depth.{domains['depth'][0]}[{i}]", f"{depth} fits no variant in this space: "
                 + "; ".join(dict.fromkeys(reasons)))
