"""Rebuilding a trained model from a checkpoint (.h5) or an exported .npz; pixels to class probabilities.

``normalize`` (pixels to model input) is :func:`ddp_cnn.data.pixels.normalize`, the
data loader's own, re-exported here for users of a trained model.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from ddp_cnn.data.pixels import channel_stats
from ddp_cnn.data.pixels import normalize  # noqa: F401  (the README's `from ddp_cnn.inference.models import load, normalize, ...`)
from ddp_cnn.data.shards import DataError
from ddp_cnn.model import network as model_mod
from ddp_cnn.run import checkpoint as ckpt
from ddp_cnn.system.backend import get_backend, to_host
from ddp_cnn.system.memory import TooLarge


def model_from_state(source: str, desc, params, buffers: dict, backend):
    """The model of description ``desc`` on ``backend`` with ``params`` (flat) and ``buffers`` (by name) loaded.

    The one way a saved model is rebuilt (.h5 checkpoints and exported .npz
    alike).  ``source`` names the file in errors: every problem (no or a bad
    description, a parameter count or a buffer that does not fit it) is a
    CheckpointError "``source``: why".
    """
    if not isinstance(desc, dict) or "layers" not in desc or "input_shape" not in desc:
        raise ckpt.CheckpointError(f"{source}: holds no model description")
    try:
        model = model_mod.from_description(desc, backend)
    except TooLarge as exc:
        raise ckpt.CheckpointError(f"{source}: {exc}") from None
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        why = str(exc).removeprefix("model description: ") if isinstance(exc, ValueError) else \
            f"{type(exc).__name__}: {exc}"
        raise ckpt.CheckpointError(f"{source}: bad model description ({why})") from None
    if params.ndim != 1 or model.num_params != params.size:
        raise ckpt.CheckpointError(f"{source}: {params.size} parameters, but its model description has "
                                   f"{model.num_params}")
    model.params[...] = backend.xp.asarray(params, dtype=backend.dtype)
    for name, buf in model.named_buffers().items():
        if name not in buffers or buffers[name].shape != buf.shape:
            raise ckpt.CheckpointError(f"{source}: buffer {name!r} is missing or of the wrong shape "
                                       f"(expected {tuple(buf.shape)})")
        buf[...] = backend.xp.asarray(buffers[name], dtype=backend.dtype)
    return model


def _backend_for(params, device: str, dtype: str | None):
    """The backend to rebuild on: the file's precision unless ``dtype`` says otherwise."""
    if dtype is None:
        dtype = "float64" if params.dtype.itemsize == 8 else "float32"
    return get_backend(device, dtype)


def load_model_from_checkpoint(path, device: str = "cpu", dtype: str | None = None, backend=None):
    """(model, meta) with the checkpoint's weights and BatchNorm statistics, ready for eval mode.

    The weights are the moving average when the run kept one (``--ema``), else the raw ones.
    `backend` (a training run's own) overrides device and dtype.
    """
    state = ckpt.load(path)
    meta = state["meta"]
    params = state["optim"]["ema"] if "ema" in state["optim"] else state["params"]
    if backend is None:
        backend = _backend_for(params, device, dtype)
    source = f"checkpoint {path}"
    return _named_classes(source, model_from_state(source, meta.get("model"), params, state["buffers"], backend),
                          meta), meta


def _named_classes(source: str, model, meta: dict):
    """``model``, once the file's class names (if it lists any) are no more than its logits (fewer: the
    rest are shown by index)."""
    names = meta.get("class_names")
    if names and (not isinstance(names, list) or len(names) > model.output_shape[-1]):
        count = f"{len(names):,} class names" if isinstance(names, list) else f"class names {str(names)[:40]!r}"
        raise ckpt.CheckpointError(f"{source}: lists {count} for a model of {model.output_shape[-1]} logits "
                                   "(a damaged or edited file)")
    return model


def resolve_checkpoint(path, name: str | None = None) -> Path:
    """``path`` itself, or for a run folder (or its checkpoints folder) the newest checkpoint in it.

    The one place a folder is turned into a checkpoint (``train --teacher``,
    and through :func:`load_model` ``evaluate``, ``predict`` and ``export``).  CheckpointError "``name``: no checkpoint ..."
    for a folder without one (``name`` defaults to the path).
    """
    path = Path(path)
    if not path.is_dir():
        return path
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = ckpt.list_checkpoints(folder)
    if not found:
        raise ckpt.CheckpointError(f"{name or path}: no checkpoint (ckpt-*.h5) in {folder}")
    return found[-1]


def load_teacher(path, backend, student, class_names, data_attrs):
    """The model of checkpoint `path` on `backend`, checked against the student and its data
    (knowledge distillation, ``train --teacher``).  `path` may also be a run folder (or its
    checkpoints folder): its newest checkpoint.  Raises CheckpointError naming the file;
    the teacher's ``source`` is the file read."""
    where = f"--teacher {path}"
    path = resolve_checkpoint(path, where)
    try:
        teacher, meta = load_model_from_checkpoint(path, backend=backend)
    except ckpt.CheckpointError as exc:  # "checkpoint PATH: why" -> "--teacher PATH: why"
        why = str(exc).removeprefix(f"checkpoint {path}: ")
        raise ckpt.CheckpointError(f"{where}: {why}") from None
    if tuple(teacher.input_shape) != tuple(student.input_shape):
        raise ckpt.CheckpointError(f"{where}: takes inputs of shape {tuple(teacher.input_shape)}, the data has "
                                   f"{tuple(student.input_shape)}")
    if tuple(teacher.output_shape) != tuple(student.output_shape):
        raise ckpt.CheckpointError(f"{where}: predicts {teacher.output_shape[0]} classes, the data has "
                                   f"{student.output_shape[0]}")
    if meta.get("class_names") and list(meta["class_names"]) != list(class_names):
        raise ckpt.CheckpointError(f"{where}: trained on classes {meta['class_names']}, the data has {class_names}")
    for key in ("mean", "std"):  # the loader normalises with the data's statistics, which the teacher must share
        theirs, ours = np.ravel(meta.get(key, data_attrs[key])), np.ravel(data_attrs[key])
        if theirs.shape != ours.shape or not np.allclose(theirs, ours, rtol=1e-6, atol=1e-9):
            raise ckpt.CheckpointError(f"{where}: trained on data with pixel {key} {_floats(theirs)}, --data "
                                       f"has {_floats(ours)} (another data set?)")
    teacher.source = str(path)
    teacher.digest = ckpt.params_digest(to_host(teacher.params))
    return teacher


def _floats(values) -> str:
    return ",".join(f"{float(v):.6g}" for v in values)


def pixel_stats_of(meta: dict, model, source) -> tuple[np.ndarray, np.ndarray]:
    """The training data's per-channel mean and std from a checkpoint's or .npz's ``meta``, one per
    input channel of ``model`` (old files hold one number each); CheckpointError naming ``source``."""
    try:
        return channel_stats(meta["mean"], meta["std"], model.input_shape[-1])
    except (KeyError, TypeError, ValueError, DataError) as exc:
        raise ckpt.CheckpointError(f"{source}: holds no usable pixel mean/std for its {model.input_shape[-1]}-channel "
                                   f"input ({type(exc).__name__}: {exc}); expected a checkpoint written by "
                                   "ddp_cnn.train") from None


# ---- portable .npz models (written by ``python -m ddp_cnn.export``) ---------
#
# A .npz holds ``params`` (the flat parameter buffer), ``buffers/<name>``
# (BatchNorm statistics) and ``meta``: a JSON string with the model
# description, class names, mean and std.  Reading one needs NumPy alone: no
# h5py, no MPI, and no pickle (np.load with allow_pickle=False).

NPZ_FORMAT = "ddp_cnn-npz"
NPZ_VERSION = 1
_ZIP_MAGIC = b"PK\x03\x04"
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def load(path, device: str = "cpu", dtype: str | None = None):
    """(model, meta) from a .npz written by ``python -m ddp_cnn.export``, ready for eval mode.

    meta holds "model" (the description), "class_names", "mean", "std" (one
    value per input channel; a number in files exported before) and "source".  Raises CheckpointError naming the file on anything wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise ckpt.CheckpointError(f"{path}: no such file" if not path.exists() else f"{path}: is not a file")
    try:
        z = np.load(path, allow_pickle=False)
        if not hasattr(z, "files"):
            raise ValueError("a single .npy array, not an .npz archive")
        with z:
            if "meta" not in z.files or "params" not in z.files:
                raise KeyError("'meta' or 'params' is missing")
            meta = json.loads(str(z["meta"][()]))
            params = z["params"]
            buffers = {k[len("buffers/"):]: z[k] for k in z.files if k.startswith("buffers/")}
        if params.dtype.kind != "f":
            raise ValueError(f"params of dtype {params.dtype}, expected floats")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise ckpt.CheckpointError(f"{path}: not a model exported by ddp_cnn.export "
                                   f"({type(exc).__name__}: {exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != NPZ_FORMAT:
        raise ckpt.CheckpointError(f"{path}: not a model exported by ddp_cnn.export (no '{NPZ_FORMAT}' marker)")
    if meta.get("format_version", 0) > NPZ_VERSION:
        raise ckpt.CheckpointError(f"{path}: format version {meta['format_version']} is newer than this "
                                   f"ddp_cnn reads ({NPZ_VERSION}); upgrade ddp_cnn")
    if ckpt.params_digest(params) != meta.get("params_sha256"):
        raise ckpt.CheckpointError(f"{path}: parameter checksum mismatch (corrupt file)")
    backend = _backend_for(params, device, dtype)
    return _named_classes(str(path), model_from_state(str(path), meta.get("model"), params, buffers, backend),
                          meta), meta


def load_model(path, device: str = "cpu", dtype: str | None = None):
    """(model, meta) from a training checkpoint (.h5) or an exported .npz, told apart by content,
    or from a run folder (or its checkpoints folder): its newest checkpoint."""
    path = resolve_checkpoint(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(_HDF5_MAGIC))
    except FileNotFoundError:
        raise ckpt.CheckpointError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ckpt.CheckpointError(f"{path}: is a folder, expected a checkpoint (.h5) or an exported .npz") from None
    except OSError as exc:
        raise ckpt.CheckpointError(f"{path}: cannot read ({exc.strerror})") from None
    if head.startswith(_ZIP_MAGIC):
        return load(path, device, dtype)
    if head != _HDF5_MAGIC:
        raise ckpt.CheckpointError(f"{path}: neither a checkpoint (.h5, from ddp_cnn.train) nor a model "
                                   "exported to .npz (by ddp_cnn.export)")
    try:
        import h5py  # noqa: F401  (checkpoint.load imports it lazily; say what is missing, and the way out)
    except ImportError:
        raise ckpt.CheckpointError(f"{path}: reading .h5 checkpoints needs h5py (pip install h5py); "
                                   "or export the model with python -m ddp_cnn.export and use the .npz") from None
    return load_model_from_checkpoint(path, device, dtype)


# ---- from pixels to class probabilities -------------------------------------

def probabilities(logits):
    """Softmax over the last axis, in float64 on the host."""
    z = np.asarray(to_host(logits), dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def top_k(probs, k: int):
    """Per row, the k (class index, probability) pairs of highest probability, highest first."""
    order = np.argsort(-probs, axis=-1, kind="stable")[..., :k]
    return [[(int(c), float(p[c])) for c in row] for p, row in zip(probs, order)]
