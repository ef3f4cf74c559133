"""Checkpoints: one HDF5 file per save, written by rank 0 alone, atomically.

A save goes to ``<name>.tmp-<pid>``, is fsynced, renamed into place, and the
folder is fsynced, so a crash (even ``kill -9``) leaves either the previous
checkpoint or the new one, never a torn file.  Each file carries a sha256 of
its parameters and one of its optimizer state (which holds the moving
average of the weights under ``--ema``); a file that does not open or whose hash disagrees is
reported by name and skipped by ``--resume latest``; ``--keep`` counts only
files that verify and moves a corrupt one aside (``<name>.corrupt``).

Contents: ``params`` (flat), ``optim/<name>`` (flat optimizer state),
``buffers/<name>`` (BatchNorm statistics), and attributes: model description,
training config, epoch, step within the epoch, global step, optimizer step
count, seed, world size, dataset identity, class names, normalisation.
Everything is loaded to host memory first; the caller moves it to its device.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from data_tools.atomic import AtomicOutput, fsync_dir, fsync_file, temp_path

from ddp_cnn.dist.faults import PARTIAL_FILES
from ddp_cnn.system.nospace import naming

NAME_RE = re.compile(r"^ckpt-(\d{8})\.h5$")
BEST_NAME = "best.h5"  # the checkpoint with the best validation accuracy (outside the --keep rotation)


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable, corrupt or of another model."""


def checkpoint_path(directory, global_step: int) -> Path:
    return Path(directory) / f"ckpt-{global_step:08d}.h5"


def params_digest(params: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(params).tobytes()).hexdigest()


def optim_digest(optim_state: dict) -> str:
    """sha256 over the optimizer's arrays (names and bytes, in name order): the moving
    average of the weights (--ema), which evaluate and export serve, lives there."""
    digest = hashlib.sha256()
    for name in sorted(optim_state):
        if np.ndim(optim_state[name]):
            digest.update(name.encode() + b"\0" + np.ascontiguousarray(optim_state[name]).tobytes())
    return digest.hexdigest()


def save(directory, global_step: int, params: np.ndarray, optim_state: dict, buffers: dict, meta: dict,
         keep: int = 0, warn=print) -> Path:
    """Write one checkpoint atomically (rank 0 only); keep the newest `keep` that verify (0: all; see
    :func:`prune`)."""
    import h5py
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(directory, global_step)
    tmp = temp_path(final)
    PARTIAL_FILES.add(tmp)  # an abort meanwhile (another rank failed) removes it: no partial checkpoint
    with naming(final):  # no space: DiskFull naming the checkpoint, the partial file removed
        try:
            with h5py.File(tmp, "w") as f:
                f.create_dataset("params", data=params)
                for name, value in optim_state.items():
                    if np.ndim(value) == 0:
                        f.attrs[f"optim.{name}"] = value
                    else:
                        f.create_dataset(f"optim/{name}", data=value)
                for name, value in buffers.items():
                    f.create_dataset(f"buffers/{name}", data=value)
                for key, value in meta.items():
                    f.attrs[key] = json.dumps(value)
                f.attrs["params_sha256"] = params_digest(params)
                f.attrs["optim_sha256"] = optim_digest(optim_state)
            fsync_file(tmp)
            os.replace(tmp, final)
            fsync_dir(directory)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            PARTIAL_FILES.discard(tmp)
    _verified[final] = _identity(final)  # written from these very arrays: no need to read it back
    if keep > 0:
        prune(directory, keep, warn=warn)
    return final


CORRUPT_SUFFIX = ".corrupt"  # a checkpoint that failed to verify, moved aside by prune()
_verified: dict = {}  # path -> (inode, size, mtime) of a file that loaded with matching checksums


def _identity(path: Path):
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def verify(path) -> None:
    """CheckpointError unless ``path`` loads with matching checksums; a file seen to verify before,
    and unchanged since, is not read again."""
    path = Path(path)
    try:
        if _verified.get(path) == _identity(path):
            return
    except OSError:
        pass
    load(path)
    _verified[path] = _identity(path)


def prune(directory, keep: int, warn=print) -> list[Path]:
    """Keep the newest ``keep`` checkpoints that verify; delete older ones.  One that does not verify
    is never counted: it is renamed ``<name>.corrupt`` (named via ``warn``), so it neither takes a
    valid file's place nor is resumed from.  Returns the files moved aside."""
    kept, moved = 0, []
    for path in reversed(list_checkpoints(directory)):
        try:
            verify(path)
        except CheckpointError as exc:
            aside = path.with_name(path.name + CORRUPT_SUFFIX)
            os.replace(path, aside)
            moved.append(aside)
            warn(f"warning: {exc}; moved aside to {aside}, not counted by --keep")
            continue
        if kept < keep:
            kept += 1
        else:
            path.unlink(missing_ok=True)
            _verified.pop(path, None)
    return moved


def list_checkpoints(directory) -> list[Path]:
    """Checkpoint files in `directory`, oldest first (temporary files excluded)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if NAME_RE.match(p.name))


def load(path) -> dict:
    """Read a checkpoint fully into host memory and check its parameter hash.

    Returns {"params", "optim", "buffers", "meta"}; CheckpointError naming the
    file on anything wrong.
    """
    import h5py
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        with h5py.File(path, "r") as f:
            params = f["params"][...]
            optim = {k: f["optim"][k][...] for k in f["optim"]} if "optim" in f else {}
            optim.update({k[len("optim."):]: f.attrs[k].item() for k in f.attrs if k.startswith("optim.")})
            buffers = {k: f["buffers"][k][...] for k in f["buffers"]} if "buffers" in f else {}
            meta = {k: json.loads(f.attrs[k]) for k in f.attrs
                    if not k.startswith("optim.") and k not in ("params_sha256", "optim_sha256")}
            digest = f.attrs["params_sha256"]
            optim_sha = f.attrs.get("optim_sha256")  # absent in checkpoints written before it existed
    except CheckpointError:
        raise
    except Exception as exc:  # OSError from a truncated file, KeyError from a foreign one
        raise CheckpointError(f"checkpoint {path}: unreadable or incomplete ({type(exc).__name__}: {exc})") from None
    if params_digest(params) != digest:
        raise CheckpointError(f"checkpoint {path}: parameter checksum mismatch (corrupt file)")
    if optim_sha is not None and optim_digest(optim) != optim_sha:
        raise CheckpointError(f"checkpoint {path}: optimizer state checksum mismatch (corrupt file)")
    return {"params": params, "optim": optim, "buffers": buffers, "meta": meta, "path": str(path)}


def load_latest(directory, warn=print):
    """The newest checkpoint in `directory` that loads, or None; bad ones are reported via `warn`."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return load(path)
        except CheckpointError as exc:
            warn(f"warning: skipping {exc}")
    return None


def _architecture(description: dict) -> dict:
    """What a resume must match: the layers and their arguments, not how they were initialised
    (the named models' last layer changed its init on 2026-11-30; older checkpoints still resume)."""
    return {**description, "layers": [{k: v for k, v in layer.items() if k != "init"}
                                      for layer in description.get("layers", [])]}


# What a resume must keep, with the flag that sets it: the position in the epoch counts batches of the
# global batch over these shards, and the optimizer's state is its own.
RESUME_MUST_MATCH = {"global_batch": "--batch-size (global)", "optimizer": "--optimizer",
                     "sharding_id": "shards (sharding_id of --data)", "val_fraction": "--val-fraction",
                     "data_order": "--data-order", "shuffle_window": "--shuffle-window",
                     "data_in_memory": "--data-in-memory"}
# What a checkpoint from before a setting existed was trained with (None: not checked).
RESUME_DEFAULTS = {"data_order": "shard", "shuffle_window": None, "data_in_memory": None}
# --resume values that mean the newest valid checkpoint of the run; "auto" is for requeue scripts: it
# also starts a run that has nothing yet, where "latest" refuses a run dir that does not exist (a typo).
NEWEST = ("latest", "auto")


def load_for_resume(spec: str, directory, model_description: dict, teacher: dict | None, run: dict,
                    warn=print):
    """The checkpoint a run resumes from (``spec``: a file, or "latest"/"auto": the newest valid one
    in ``directory``), or None.

    Refuses (CheckpointError, one line) a checkpoint of another architecture
    or one whose RESUME_MUST_MATCH settings differ from ``run``'s; warns when
    it was trained with another teacher (``teacher``: the run's distillation
    record, or None) than the run goes on with.
    """
    if spec in NEWEST:
        state = load_latest(directory, warn=warn)
        if state is None:
            warn(f"--resume auto: nothing to resume in {directory} yet; starting a new run" if spec == "auto"
                 else f"--resume latest: no valid checkpoint in {directory}; starting from scratch")
            return None
    else:
        state = load(spec)
    saved = state["meta"]["model"]
    if _architecture(saved) != _architecture(model_description):
        name = model_description["name"]
        hint = ("; fmnist-cnn checkpoints from before its max-pools moved ahead of the activations "
                "evaluate, predict and export, but do not resume" if name == "fmnist-cnn" else "")
        raise CheckpointError(f"checkpoint {state['path']}: holds a {saved['name']} model that differs from "
                              f"--model {name} with these flags{hint}")
    meta = state["meta"]
    saved_run = {"global_batch": meta.get("global_batch"), "sharding_id": meta.get("sharding_id"),
                 **{k: (meta.get("config") or {}).get(k, RESUME_DEFAULTS.get(k))
                    for k in ("optimizer", "val_fraction", *RESUME_DEFAULTS)}}
    def same(a, b):  # numbers by value (0 and 0.0 are one setting), names by text
        return float(a) == float(b) if isinstance(a, (int, float)) and isinstance(b, (int, float)) else str(a) == str(b)
    for key, what in RESUME_MUST_MATCH.items():
        if saved_run[key] is not None and not same(saved_run[key], run[key]):
            raise CheckpointError(f"checkpoint {state['path']}: trained with {what} {saved_run[key]}, this run has "
                                  f"{run[key]}; resume with the same, or start a new run (--overwrite)")
    before = meta.get("teacher") or {}
    if before.get("sha256") != (teacher or {}).get("sha256"):
        warn(f"warning: the checkpoint was trained with teacher {before.get('source', 'none')}; the run goes on "
             f"with {teacher['source'] if teacher else 'none'}")
    return state


def keep_as_best(path) -> Path:
    """Copy checkpoint ``path`` to best.h5 beside it, atomically; ``--keep`` never removes it."""
    import shutil
    best = Path(path).with_name(BEST_NAME)
    with naming(best), AtomicOutput(best.parent) as out:  # temp file, fsync, rename, fsync the folder
        shutil.copyfile(path, out.temp(BEST_NAME))
    return best
