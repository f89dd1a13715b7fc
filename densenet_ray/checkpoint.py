"""The checkpoint format, its only home: what a training run saves after every epoch, where, and how
it is found and loaded. No Ray, no MLflow, no model: the training loop, the driver, Tune and the
trained-model loader (trained.py, which turns a state back into a network) all call these.

    STORAGE/RUN_NAME/epoch_0007/state.pt       # Ray Train's checkpoint folder for epoch 7 (0-based)
    STORAGE/RUN_NAME/epoch_0008_step_000120/   # inside epoch 8, after its step 120: state.pt, rows.npy

    save(state, folder)                        # state.pt into a folder Ray Train then registers
    save_inside(run_dir, state, rows)          # a checkpoint inside an epoch, written by rank 0 itself
    newest(storage_uri + "/" + run_name)       # the newest checkpoint's state.pt, or None
    state, file = load(source)                 # a run folder (newest), a checkpoint folder, or state.pt

Checkpoints inside an epoch (--checkpoint-every-steps/-min, SIGTERM) do not go through Ray Train's
report, whose num_to_keep would count them against the epoch ones: rank 0 writes them into the
run folder (rows.npy first, state.pt last, so a folder with state.pt is whole) and keeps only the
newest (`prune`). Their state has `step` (the optimizer steps of that epoch done) and `history`
up to the epoch before; rows.npy holds the ids (data.row_id) of the rows those steps trained on,
which the resumed epoch leaves out (`consumed_rows`). Newest means the largest (epoch, step), an
epoch's end after all its steps.

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

import numpy as np
import pyarrow.fs as pafs
import torch

from densenet_ray import storage

STATE_FILE = "state.pt"
ROWS_FILE = "rows.npy"
_EPOCH = re.compile(r"epoch_(\d+)(?:_step_(\d+))?")
ACCEPTED = (f"a checkpoint: STORAGE/RUN_NAME (its newest), STORAGE/RUN_NAME/epoch_NNNN[_step_NNNNNN] or "
            f".../{STATE_FILE}")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


def folder_name(epoch: int, step: int = 0) -> str:
    """The checkpoint folder of `epoch` (0-based) inside the run's storage folder: its end, or after
    `step` optimizer steps of it."""
    return f"epoch_{epoch:04d}" + (f"_step_{step:06d}" if step else "")


def _position(name: str) -> tuple[int, float] | None:
    """(epoch, step) of a checkpoint folder's name, an epoch's end as step infinity; None: not one."""
    found = _EPOCH.fullmatch(name)
    return (int(found[1]), int(found[2]) if found[2] else float("inf")) if found else None


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
    """The epoch a run resumes with (from the newest checkpoint's folder name): the one it stopped
    inside, one past the one it finished, else 0."""
    found = newest(run_dir)
    if not found:
        return 0
    epoch, step = _saved_at(found)
    return epoch if step != float("inf") else epoch + 1


def consumed_rows(run_dir: str, epoch: int) -> np.ndarray | None:
    """The row ids trained on before the run stopped inside `epoch` (its newest checkpoint is inside
    that epoch), else None: what read_split(consumed=...) leaves out of a resumed epoch."""
    found = newest(run_dir)
    return rows_of(found) if found and _saved_at(found)[0] == epoch and _saved_at(found)[1] != float("inf") \
        else None


def rows_of(state_file: str) -> np.ndarray:
    """The row ids saved beside a checkpoint inside an epoch (its state.pt, a path or URI)."""
    fs, path = storage.filesystem(state_file)
    with storage.reaching(state_file), fs.open_input_file(posixpath.join(posixpath.dirname(path), ROWS_FILE)) as f:
        return np.load(io.BytesIO(f.read()))


def _saved_at(state_file: str) -> tuple[int, float]:
    """(epoch, step) of the checkpoint folder holding `state_file` (an epoch's end: step infinity)."""
    return _position(posixpath.basename(posixpath.dirname(state_file)))


def save_inside(run_dir: str, state: dict, rows: np.ndarray) -> str:
    """A checkpoint inside epoch state["epoch"] after state["step"] steps, written into `run_dir`
    (a path or URI) by the caller itself; then every older checkpoint inside an epoch is deleted.
    Returns the folder's URI."""
    name = folder_name(state["epoch"], state["step"])
    fs, path = storage.filesystem(run_dir)
    folder = posixpath.join(path, name)
    with storage.reaching(run_dir):
        fs.create_dir(folder)
        _write(fs, posixpath.join(folder, ROWS_FILE), _npy(rows))
        raw = io.BytesIO()
        torch.save(state, raw)
        _write(fs, posixpath.join(folder, STATE_FILE), raw.getvalue())
    prune(run_dir)
    return storage.uri_of(folder, like=str(run_dir))


def prune(run_dir: str) -> None:
    """Delete the checkpoints inside an epoch that the newest checkpoint supersedes (bounded storage:
    the newest one inside an epoch, and the epoch ends Ray Train keeps)."""
    fs, path = storage.filesystem(run_dir)
    with storage.reaching(run_dir):
        found = _newest_file(fs, path)
        if found is None:
            return
        last = _saved_at(found)
        for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
            at = _position(info.base_name)
            if at and at[1] != float("inf") and at < last and info.type == pafs.FileType.Directory:
                fs.delete_dir(info.path)


def _npy(rows: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, np.asarray(rows, np.int64))
    return out.getvalue()


def _write(fs, path: str, payload: bytes) -> None:
    """`payload` as `path`, appearing whole: written beside it, then moved into place."""
    with fs.open_output_stream(path + ".partial") as f:
        f.write(payload)
    fs.move(path + ".partial", path)


def _newest_file(fs, path: str) -> str | None:
    folders = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    found = sorted((_position(i.base_name), i.base_name) for i in folders
                   if i.type == pafs.FileType.Directory and _position(i.base_name))
    for _, name in reversed(found):  # a folder without state.pt was being written when the job died
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
    raise CheckpointError(f"{source!r}: a folder without {STATE_FILE} or epoch_NNNN[_step_NNNNNN]/{STATE_FILE}; "
                          f"expected {ACCEPTED}")


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


def inside_epoch(state: dict) -> bool:
    """Whether `state` was saved inside its epoch (after state["step"] steps), not at its end."""
    return bool(state.get("step"))


def check_training_state(state: dict, file: str) -> None:
    """CheckpointError naming `file` unless `state` (from load) holds every field a resumed run reads,
    of the right kind: a checkpoint edited by hand or written by something else is refused on the
    driver, not found wanting by a worker halfway through restoring it."""
    problems = [f"{name} is missing" if name not in state else f"{name} is a {type(state[name]).__name__}"
                for name, kind in TRAINING_FIELDS.items() if not isinstance(state.get(name), kind)
                or isinstance(state.get(name), bool)]
    if not problems and not isinstance(state.get("step", 0), int):
        problems.append(f"step is a {type(state['step']).__name__}")
    done = state["epoch"] + (0 if inside_epoch(state) else 1) if not problems else 0
    if not problems and (state["epoch"] < 0 or len(state["history"]) != done
                         or not all(isinstance(m, dict) and m.get("epoch") == i for i, m in enumerate(state["history"]))):
        problems.append(f"epoch {state['epoch']} and history ({len(state['history'])} epochs) disagree: expected one "
                        "metrics dict per epoch finished (0..epoch, or 0..epoch-1 inside an epoch), each with its epoch")
    if problems:
        raise CheckpointError(f"{file} is not a checkpoint a run can resume from: {'; '.join(problems)}; expected "
                              "what densenet_ray.train writes (" + ", ".join(TRAINING_FIELDS) + ", model, config)")
