"""The checkpoint format, its only home: what a training run saves after every epoch, where, and how
it is found and loaded. No Ray, no MLflow, no model: the training loop, the driver, Tune and the
trained-model loader (trained.py, which turns a state back into a network) all call these.

    STORAGE/RUN_NAME/epoch_0007/state.pt       # Ray Train's checkpoint folder for epoch 7 (0-based)

    save(state, folder)                        # state.pt into a folder Ray Train then registers
    newest(storage_uri + "/" + run_name)       # the newest epoch folder's state.pt, or None
    state, file = load(source)                 # a run folder (newest epoch), an epoch folder, or state.pt

`state` is a dict: model, optimizer, scaler (state dicts), epoch, history (the per-epoch metrics
dicts), config (config.to_dict), classes, mean, std, run_id (MLflow), example (two normalised
inputs: the registered model's signature), rng. It loads with torch.load(weights_only=True):
nothing in it needs pickle.
"""

from __future__ import annotations

import io
import os
import pickle
import posixpath
import re

import pyarrow.fs as pafs
import torch

from densenet_ray import storage

STATE_FILE = "state.pt"
_EPOCH = re.compile(r"epoch_\d+")
ACCEPTED = (f"a checkpoint: STORAGE/RUN_NAME (its newest epoch), STORAGE/RUN_NAME/epoch_NNNN or .../{STATE_FILE}")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


def folder_name(epoch: int) -> str:
    """The checkpoint folder of `epoch` (0-based) inside the run's storage folder."""
    return f"epoch_{epoch:04d}"


def save(state: dict, folder: str) -> None:
    """`state` as `folder`/state.pt. The folder is fresh and Ray Train registers it only after
    copying all of it, so a crash mid-write leaves no checkpoint behind, not a torn one."""
    torch.save(state, os.path.join(folder, STATE_FILE))


def newest(run_dir: str) -> str | None:
    """The state.pt of the newest epoch folder in `run_dir` (a path or URI), None when it has none."""
    fs, path = storage.filesystem(run_dir)
    with storage.reaching(run_dir):
        found = _newest_file(fs, path)
    return storage.uri_of(found, like=str(run_dir)) if found else None


def next_epoch(run_dir: str) -> int:
    """The epoch a run resumes with: one past its newest checkpoint's (from the folder name), else 0."""
    found = newest(run_dir)
    return int(posixpath.basename(posixpath.dirname(found)).split("_")[1]) + 1 if found else 0


def _newest_file(fs, path: str) -> str | None:
    folders = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    epochs = sorted(i.base_name for i in folders if i.type == pafs.FileType.Directory and _EPOCH.fullmatch(i.base_name))
    for name in reversed(epochs):  # an epoch folder without state.pt was being copied when the job died
        file = posixpath.join(path, name, STATE_FILE)
        if fs.get_file_info(file).type == pafs.FileType.File:
            return file
    return None


def _find(fs, path: str, source: str) -> str:
    """state.pt itself, an epoch folder's, or the newest epoch folder's of a run folder."""
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return path
    if info.type != pafs.FileType.Directory:
        raise CheckpointError(f"{source!r}: no such file or folder; expected {ACCEPTED}")
    if fs.get_file_info(posixpath.join(path, STATE_FILE)).type == pafs.FileType.File:
        return posixpath.join(path, STATE_FILE)
    if found := _newest_file(fs, path):
        return found
    raise CheckpointError(f"{source!r}: a folder without {STATE_FILE} or epoch_NNNN/{STATE_FILE}; expected {ACCEPTED}")


def load(source: str, *, trust_pickle: bool = False) -> tuple[dict, str]:
    """(state, the file it came from) for `source`: a run folder, an epoch folder or a state.pt,
    local or a URI. Nothing is unpickled unless `trust_pickle`."""
    try:
        fs, path = storage.filesystem(source)
    except storage.StorageError as e:
        raise CheckpointError(f"{e}; expected {ACCEPTED}") from None
    try:
        with storage.reaching(source):
            file = _find(fs, path, str(source))
            with fs.open_input_file(file) as f:
                raw = f.read()
    except storage.StorageError as e:
        raise CheckpointError(str(e)) from None
    try:
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{source}: {file} needs pickle to load, which can run any code its author put in it "
                              f"({str(e).splitlines()[0][:200]}); pass --trust-pickle (trust_pickle=True) only if "
                              "you trust who wrote it") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{source}: {file} is not a readable checkpoint: {e}") from None
    if not isinstance(state, dict) or not {"model", "config"} <= state.keys():
        found = sorted(map(str, state))[:8] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{source}: {file} is not a densenet_ray checkpoint: expected a dict with 'model' and "
                              f"'config' (what densenet_ray.train writes), found {found}")
    if not isinstance(state["config"], dict) or not isinstance(state["model"], dict):
        raise CheckpointError(f"{source}: {file} is not a densenet_ray checkpoint: fields config and model must be "
                              f"dicts, found {type(state['config']).__name__} and {type(state['model']).__name__}")
    return state, storage.uri_of(file, like=str(source))


# What a run resumes with, beyond the weights and config every loader needs: name -> accepted types.
TRAINING_FIELDS = {"optimizer": dict, "scaler": dict, "epoch": int, "history": list, "classes": (list, tuple)}


def check_training_state(state: dict, file: str) -> None:
    """CheckpointError naming `file` unless `state` (from load) holds every field a resumed run reads,
    of the right kind: a checkpoint edited by hand or written by something else is refused on the
    driver, not found wanting by a worker halfway through restoring it."""
    problems = [f"{name} is missing" if name not in state else f"{name} is a {type(state[name]).__name__}"
                for name, kind in TRAINING_FIELDS.items() if not isinstance(state.get(name), kind)
                or isinstance(state.get(name), bool)]
    if not problems and (state["epoch"] < 0 or len(state["history"]) != state["epoch"] + 1
                         or not all(isinstance(m, dict) and m.get("epoch") == i for i, m in enumerate(state["history"]))):
        problems.append(f"epoch {state['epoch']} and history ({len(state['history'])} epochs) disagree: expected one "
                        "metrics dict per epoch 0..epoch, each with its epoch")
    if problems:
        raise CheckpointError(f"{file} is not a checkpoint a run can resume from: {'; '.join(problems)}; expected "
                              "what densenet_ray.train writes (" + ", ".join(TRAINING_FIELDS) + ", model, config)")
