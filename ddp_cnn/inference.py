"""Rebuilding a trained model from a checkpoint, for evaluation and prediction."""
from __future__ import annotations

from . import checkpoint as ckpt
from . import model as model_mod
from .backend import get_backend


def load_model_from_checkpoint(path, device: str = "cpu", dtype: str | None = None):
    """(model, meta) with the checkpoint's weights and BatchNorm statistics, ready for eval mode."""
    state = ckpt.load(path)
    meta = state["meta"]
    if dtype is None:
        dtype = "float64" if state["params"].dtype.itemsize == 8 else "float32"
    backend = get_backend(device, dtype)
    model = model_mod.from_description(meta["model"], backend)
    if model.num_params != state["params"].size:
        raise ckpt.CheckpointError(f"checkpoint {path}: {state['params'].size} parameters, but its model "
                                   f"description has {model.num_params}")
    model.params[...] = backend.xp.asarray(state["params"], dtype=backend.dtype)
    for name, buf in model.named_buffers().items():
        buf[...] = backend.xp.asarray(state["buffers"][name], dtype=backend.dtype)
    return model, meta
