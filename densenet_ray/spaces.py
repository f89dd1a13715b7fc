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
import os
import random
import stat
from dataclasses import dataclass

import torch
import yaml

from densenet_ray import config as C
from densenet_ray import preflight
from densenet_ray.model import count_macs, from_config

SEARCHABLE = ("arch", "depth", "growth_rate", "compression", "bottleneck", "drop_rate", "lr", "weight_decay",
              "batch_size", "momentum", "warmup_epochs", "image_size", "memory_efficient")
DOMAINS = ("choice", "grid", "uniform", "loguniform", "randint")
SCHEDULERS = ("asha", "fifo", "grid")
TOP_LEVEL = ("preset", "fixed", "space", "scheduler", "num_samples", "max_concurrent", "resources", "seed",
             "name", "registered_model")
RESOURCES = ("workers", "cpus_per_worker", "gpus_per_worker")
ARCH_KEYS = ("arch", "depth", "growth_rate", "compression", "bottleneck")
MAX_BYTES = 64 * 1024  # a space file is a page of YAML; anything larger is not one
MAX_TRIALS = 1000  # trials one sweep may ask for (grid combinations x num_samples)
MAX_ENUMERATED = 4096  # sampled combinations counted one by one to know how many distinct trials there are


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
        skipped because they make no valid run, each with the reason. A space with fewer distinct
        valid samples than asked for gives each of them once (requested() says how many were asked)."""
        n = num_samples or self.num_samples
        gridded, sampled = self._split()
        finite = {k: _finite_values(d, v) for k, (d, v) in sampled.items()}
        enumerable = all(v is not None for v in finite.values()) and math.prod(map(len, finite.values())) \
            <= MAX_ENUMERATED
        rng = random.Random(self.seed)
        out, skipped, seen = [], [], set()
        for combo in itertools.product(*gridded.values()) if gridded else [()]:
            trial = dict(zip(gridded, combo))
            if enumerable:
                every = [{**trial, **dict(zip(finite, values))} for values in itertools.product(*finite.values())]
                valid = [c for c in every if trial_problem(self.base.replace(**c)) is None]
                if n >= len(valid):  # no sampling: each valid one once, the rest skipped with the reason
                    out += valid
                    skipped += [(c, trial_problem(self.base.replace(**c))) for c in every if c not in valid]
                    continue
            for _ in range(n):
                for _attempt in range(100):  # resample an invalid configuration or a repeat
                    candidate = {**trial, **{k: _sample(d, v, rng) for k, (d, v) in sampled.items()}}
                    reason = trial_problem(self.base.replace(**candidate))
                    key = tuple(sorted(candidate.items()))
                    if (reason is None and key not in seen) or not sampled:
                        break
                if reason is not None:
                    skipped.append((candidate, reason))
                elif key not in seen:
                    seen.add(key)
                    out.append(candidate)
        return out, skipped

    def requested(self, num_samples: int | None = None) -> int:
        """How many trials `num_samples` asks for: each grid combination times the samples."""
        gridded, _ = self._split()
        return math.prod(len(v) for v in gridded.values()) * (num_samples or self.num_samples)

    def _split(self) -> tuple[dict, dict]:
        """(grid field -> values, sampled field -> (domain, values)); every choice is grid under the grid scheduler."""
        grid_type = self.scheduler.type == "grid"
        gridded = {k: v for k, (d, v) in self.domains.items() if d == "grid" or (grid_type and d == "choice")}
        return gridded, {k: dv for k, dv in self.domains.items() if k not in gridded}


def _finite_values(domain: str, values) -> list | None:
    """Every value a sampled domain can take, or None for a continuous one (or too many to list)."""
    if domain == "choice":
        return list(dict.fromkeys(values))
    if domain == "randint" and values[1] - values[0] <= MAX_ENUMERATED:
        return list(range(values[0], values[1]))
    return None


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
    """Why this configuration's architecture cannot be built, or None (preflight's rule, the model's checks)."""
    return preflight.model_problem(cfg, None)


def trial_problem(cfg: C.TrainConfig) -> str | None:
    """Why one trial cannot run, or None: the checks `train` makes before a worker starts (field
    values, the model built and run at the image size), so a bad trial never reaches Ray Tune."""
    try:
        cfg.replace(run_name=cfg.run_name or "trial").validate()
    except ValueError as err:
        return str(err).replace("invalid training configuration:\n  ", "").replace("\n  ", "; ")
    return preflight.model_problem(cfg, cfg.image_size)


def describe(cfg: C.TrainConfig, num_classes: int, in_channels: int = 3) -> dict:
    """k, L, theta, params and GMACs at the run's input size, from the model module."""
    with torch.device("meta"):
        net = from_config(cfg, num_classes, in_channels)
    return {"k": net.growth_rate, "L": net.depth, "theta": net.compression, "bottleneck": net.bottleneck,
            "params": sum(p.numel() for p in net.parameters()),
            "gmacs": count_macs(net, cfg.image_size or net.input_size) / 1e9}


def load_space(path: str, **overrides) -> Space:
    """Read and validate a space file; `overrides` (TrainConfig fields) win over the file's `fixed`."""
    doc = read_yaml(path)
    where = path

    def fail(key, message: str):
        raise SpaceError(f"{where}: {key if isinstance(key, str) and len(key) <= 80 else C.shown(key)}: {message}")

    if not isinstance(doc, dict):
        fail("(top level)", "expected a mapping with preset, space, scheduler, ...")
    for key in doc:
        if key not in TOP_LEVEL:
            fail(key, f"unknown key; allowed: {', '.join(TOP_LEVEL)}")
    preset = doc.get("preset")
    if preset not in C.PRESETS:
        fail("preset", f"{C.shown(preset)} is not a preset; choose one of {', '.join(C.PRESETS)}")

    fields = {f.name for f in dataclasses.fields(C.TrainConfig)}
    fixed = doc.get("fixed") or {}
    if not isinstance(fixed, dict):
        fail("fixed", "expected a mapping of TrainConfig fields")
    for key, value in fixed.items():
        if key not in fields:
            fail(f"fixed.{key}", f"unknown field; TrainConfig has {', '.join(sorted(fields))}")
        fixed[key] = _coerce(key, value, lambda m, k=key: fail(f"fixed.{k}", m))

    resources = doc.get("resources") or {}
    if not isinstance(resources, dict):
        fail("resources", f"{C.shown(resources)}: expected a mapping of {', '.join(RESOURCES)}")
    for key, value in resources.items():
        if key not in RESOURCES:
            fail(f"resources.{key}", f"unknown key; allowed: {', '.join(RESOURCES)}")
        value = _coerce(key, value, lambda m, k=key: fail(f"resources.{k}", m))
        if value < 0:
            fail(f"resources.{key}", f"{C.shown(value)}: expected a non-negative number")
        resources[key] = value

    space = doc.get("space") or {}
    if not isinstance(space, dict) or not space:
        fail("space", "expected a mapping of TrainConfig fields to domains, e.g. growth_rate: {choice: [12, 24]}")
    domains = {}
    for key, spec in space.items():
        at = f"space.{key}"
        if key not in SEARCHABLE:
            fail(at, f"not searchable; searchable fields: {', '.join(SEARCHABLE)}")
        kind, _ = C.field_type(key)
        if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DOMAINS):
            fail(at, f"{C.shown(spec)}: expected one domain, one of {', '.join(DOMAINS)} (e.g. {{choice: [12, 24]}})")
        domain, values = next(iter(spec.items()))
        if not isinstance(values, list) or not values:
            fail(f"{at}.{domain}", f"{C.shown(values)}: expected a non-empty list")
        if domain in ("uniform", "loguniform", "randint"):
            if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) \
                    or values[0] >= values[1] or (domain == "loguniform" and values[0] <= 0):
                fail(f"{at}.{domain}", f"{C.shown(values)}: expected [low, high] with low < high"
                     + (" and low > 0" if domain == "loguniform" else ""))
            if kind not in (int, float) or (kind is int and domain != "randint"):
                fail(f"{at}.{domain}", f"{key} is {'an integer' if kind is int else 'not a number'}: expected "
                     + ("randint [low, high) or choice" if kind is int else "choice or grid"))
        values = [_coerce(key, value, lambda m, p=f"{at}.{domain}[{i}]": fail(p, m)) if domain in ("choice", "grid")
                  or i < 2 else value for i, value in enumerate(values)]
        domains[key] = (domain, values)

    scheduler_doc = doc.get("scheduler") or {}
    if not isinstance(scheduler_doc, dict):
        fail("scheduler", f"{C.shown(scheduler_doc)}: expected a mapping, e.g. {{type: asha, grace_period: 1}}")
    allowed = [f.name for f in dataclasses.fields(Scheduler)]
    for key in scheduler_doc:
        if key not in allowed:
            fail(f"scheduler.{key}", f"unknown key; allowed: {', '.join(allowed)}")
    scheduler = Scheduler(**scheduler_doc)
    for key in ("type", "metric", "mode"):
        if not isinstance(getattr(scheduler, key), str):
            fail(f"scheduler.{key}", f"{C.shown(getattr(scheduler, key))}: expected text")
    if scheduler.type not in SCHEDULERS:
        fail("scheduler.type", f"{C.shown(scheduler.type)}: expected one of {', '.join(SCHEDULERS)}")
    if scheduler.mode not in ("min", "max"):
        fail("scheduler.mode", f"{C.shown(scheduler.mode)}: expected min or max")
    for key in ("grace_period", "reduction_factor"):
        value = getattr(scheduler, key)
        if not isinstance(value, int) or value < (1 if key == "grace_period" else 2):
            fail(f"scheduler.{key}", f"{C.shown(value)}: expected an integer >= {1 if key == 'grace_period' else 2}")
    for key in ("num_samples", "max_concurrent", "seed"):
        value = doc.get(key, 0 if key == "seed" else 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "seed" else 1):
            fail(key, f"{C.shown(value)}: expected an integer >= {0 if key == 'seed' else 1}")

    for key in ("name", "registered_model"):
        value = doc.get(key)
        if value is not None and not (isinstance(value, str) and value.strip()):
            fail(key, f"{C.shown(value)}: expected a name (text)")
    if doc.get("name") is not None and (problem := C.path_component_problem(doc["name"])):
        fail("name", f"{C.shown(doc['name'])}: expected {problem}")
    if doc.get("registered_model") is not None:
        fixed["registered_model"] = doc["registered_model"]
    base = C.PRESETS[preset].replace(**fixed, **resources, **{k: v for k, v in overrides.items() if v is not None})
    try:
        base.replace(run_name=base.run_name or "sweep", registered_model=base.registered_model or "x").validate()
        problems = preflight.name_problems(base) + preflight.location_problems(base)
        if problems:
            raise ValueError("\n  ".join(problems))
    except ValueError as err:
        raise SpaceError(f"{where}: fixed/resources: {err}") from None
    if not base.val_split:
        fail("fixed.val_split", "a sweep chooses on validation error: give it a validation split, not none")
    if scheduler.metric.startswith("test_"):
        fail("scheduler.metric", f"{C.shown(scheduler.metric)}: the test split is never used to choose; use val_top1_err")
    _check_depths(base, domains, fail)
    _check_values(base, domains, fail)
    loaded = Space(path=path, base=base, domains=domains, scheduler=scheduler, num_samples=doc.get("num_samples", 1),
                 max_concurrent=doc.get("max_concurrent", 1), seed=doc.get("seed", 0), name=doc.get("name", ""))
    if loaded.requested() > MAX_TRIALS:
        fail("num_samples", f"the grid times num_samples asks for {loaded.requested()} trials; a sweep runs at most "
                            f"{MAX_TRIALS}: fewer grid values or samples")
    return loaded


class _NoAliases(yaml.SafeLoader):
    """PyYAML's safe loader without aliases: nine nested `*a` lists in a few hundred bytes describe
    a billion elements, which any message or loop over the value then expands."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a space file: "
                                              "write the values out", self.peek_event().start_mark)
        return super().compose_node(parent, index)


def read_yaml(path: str):
    """The YAML document at `path`, refused without being opened if it is no regular file (a FIFO
    would block) or larger than MAX_BYTES, and refused if it uses aliases or nests too deep."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise SpaceError(f"{path}: no such space file") from None
    except OSError as err:
        raise SpaceError(f"{path}: cannot be read ({err.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise SpaceError(f"{path}: not a regular file (a folder, pipe or device); expected a YAML space file")
    if info.st_size > MAX_BYTES:
        raise SpaceError(f"{path}: {info.st_size} bytes; a space file is at most {MAX_BYTES} bytes of YAML")
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_BYTES + 1)
        return yaml.load(text, Loader=_NoAliases)  # noqa: S506 - a SafeLoader, without aliases
    except OSError as err:
        raise SpaceError(f"{path}: cannot be read ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise SpaceError(f"{path}: not valid YAML ({str(err)[:500]})") from None  # its snippets are short
    except RecursionError:
        raise SpaceError(f"{path}: nested too deep to be a space file") from None


def _coerce(name: str, value, fail):
    """config.coerce, the rule command-line flags follow too, its message under the key path."""
    try:
        return C.coerce(name, value)
    except ValueError as err:
        fail(str(err))


def _check_values(base: C.TrainConfig, domains: dict, fail) -> None:
    """A value (or range end) that no trial could use, such as lr 0 or a batch size --workers does
    not divide, is an error at its key path, not a skipped trial. Architecture fields are checked
    in combination (_check_depths, then each trial)."""
    for key, (domain, values) in domains.items():
        if key in ARCH_KEYS or key == "image_size":
            continue
        for i, value in enumerate(values):
            try:
                base.replace(**{key: value}, run_name="sweep").validate()
            except ValueError as err:
                fail(f"space.{key}.{domain}[{i}]", f"{C.shown(value)}: " + str(err).split("expected ", 1)[-1])


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
