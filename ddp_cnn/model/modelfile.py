"""A network from a TOML file: ``ddp_cnn.train --model net.toml``, ``ddp_cnn.summary --model net.toml``.

The file lists the layers in order, one ``[[layers]]`` table each: ``type`` is
a layer of :mod:`ddp_cnn.model.layers` and the other keys are that layer's Python
arguments, by the same names::

    [[layers]]
    type = "Conv2D"
    filters = 8
    kernel_size = 3
    padding = "same"

The input shape is not in the file: it comes from the data (or summary's
``--input-shape``), so one file serves every image size its layers fit.
A Dense layer's ``units = "classes"`` gives one output per class of the data
(10 where there is none, as for ``summary`` without ``--classes``), so one
file serves every data set.  Every mistake is a ValueError of one line
naming the file and the layer's position (from 1): an unknown type or argument, a missing or mistyped one, a
value the layer refuses, a shape that does not fit, a last layer that does
not give one logit per class.

The model is a plain :class:`~ddp_cnn.model.Sequential` named after the
file's stem; its checkpoints hold its description, so evaluating,
predicting, exporting and resuming need no file.
"""
from __future__ import annotations

import inspect
import re
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from ddp_cnn.model import layers as L
from ddp_cnn.model.network import LAYER_TYPES, Sequential
from ddp_cnn.system.backend import Backend, get_backend
from ddp_cnn.system.memory import TooLarge

# What a file may name: the layers a description rebuilds, and the pooling shorthands of the Python API.
TYPES = {**LAYER_TYPES, "MaxPool2D": L.MaxPool2D, "AvgPool2D": L.AvgPool2D, "MinPool2D": L.MinPool2D}

# An argument's annotation -> (does a TOML value fit, what the message says it must be).  Arguments
# without one (kernel_size, padding, pool_size, ...) take several forms, which the layer checks itself.
_KINDS = {
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "float": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "str | None": (lambda v: isinstance(v, str), "a string"),
}


def is_model_file(model: str | None) -> bool:
    """Whether ``--model`` names a file rather than an architecture."""
    return model is not None and model.endswith(".toml")


def read(path, num_classes: int | None = None) -> list:
    """The file's layers as (type as written, layer), constructed but not built (shapes depend on the input).

    ``units = "classes"`` becomes ``num_classes`` (default 10).  ValueError
    (one line naming ``path`` and the layer's position) on the first mistake
    that does not depend on the input shape.
    """
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ValueError(f"--model {path}: no such file") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"--model {path}: not a readable TOML file ({exc})") from None
    unknown = sorted(set(raw) - {"layers"})
    if unknown:
        raise ValueError(f"{path}: unknown key {unknown[0]!r}; a model file holds only [[layers]] tables")
    specs = raw.get("layers")
    if not isinstance(specs, list) or not specs:
        raise ValueError(f"{path}: no layers; expected one [[layers]] table per layer, each with a type")
    return [_layer(path, i, spec, 10 if num_classes is None else num_classes) for i, spec in enumerate(specs, 1)]


def _layer(path, i: int, spec, num_classes: int):
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: layer {i}: expected a table with a type, got {spec!r}")
    kind = spec.get("type")
    if not isinstance(kind, str) or kind not in TYPES:
        what = "no type" if kind is None else f"unknown type {kind!r}"
        raise ValueError(f"{path}: layer {i}: {what}; expected one of {', '.join(sorted(TYPES))}")
    where = f"{path}: layer {i} ({kind})"
    params = dict(inspect.signature(TYPES[kind]).parameters)
    args = {k: v for k, v in spec.items() if k != "type"}
    if kind == "Dense" and args.get("units") == "classes":  # one logit per class of the data
        args["units"] = num_classes
    for name, value in args.items():
        if name not in params:
            raise ValueError(f"{where}: unknown argument {name!r}; expected one of {', '.join(params) or 'none'}")
        fits, must = _KINDS.get("str" if name == "name" else _annotation(params[name]), (None, None))
        if fits is not None and not fits(value):
            must += ' or "classes" (one per class of the data)' if (kind, name) == ("Dense", "units") else ""
            raise ValueError(f"{where}: {name} must be {must}, got {value!r}")
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in args]
    if missing:
        raise ValueError(f"{where}: missing argument {missing[0]!r}")
    try:
        return kind, TYPES[kind](**args)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{where}: {_reason(exc)}") from None


def _annotation(param) -> str:
    """The annotation as written (a string under ``from __future__ import annotations``, else a type)."""
    ann = param.annotation
    return ann if isinstance(ann, str) else getattr(ann, "__name__", "")


def load(path, input_shape, backend: Backend | None = None, seed: int = 0, num_classes: int | None = None):
    """The file's network for inputs of ``input_shape``, initialised from ``seed`` like any Sequential.

    With ``num_classes``, its last layer must give that many logits.
    ValueError (one line naming ``path``, the layer's position, and the
    image shape when it is the shape that does not fit) otherwise.
    """
    kinds, layers = zip(*read(path, num_classes))
    backend = backend or get_backend("cpu")
    shape = out = tuple(int(v) for v in input_shape)
    for i, (kind, layer) in enumerate(zip(kinds, layers), 1):  # shapes first, so an error can name the position
        try:
            out = layer.build(out, backend)
        except ValueError as exc:
            raise ValueError(f"{path}: layer {i} ({kind}): {_reason(exc)} (for inputs of shape {shape})") from None
    last = f"layer {len(layers)} ({kinds[-1]})"
    if len(out) != 1:
        raise ValueError(f"{path}: the last layer, {last}, gives outputs of shape {out}; a classifier ends "
                         "in one logit per class (Flatten or GlobalAvgPool2D, then Dense)")
    if num_classes is not None and out[0] != num_classes:
        raise ValueError(f"{path}: the last layer, {last}, gives {out[0]} outputs, the data has {num_classes} "
                         f"classes")
    # Sequential builds the layers again (shapes only, cheap), checks they fit in memory, lays out their parameters.
    try:
        return Sequential(list(layers), shape, backend, seed, name=Path(path).stem)
    except TooLarge as exc:
        raise TooLarge(f"{path}: {exc}") from None


def _reason(exc) -> str:
    """A layer's message without the prefix a file's error already says: ``Conv2D: ``, ``layer 'dense': ``."""
    return re.sub(r"^(?:layer '[^']*'|[A-Z]\w*): ", "", str(exc))
