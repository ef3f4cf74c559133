"""Sequential models over ONE flat parameter buffer and ONE flat gradient buffer.

Every layer's parameters and gradients are views into ``model.params`` and
``model.grads``.  The allreduce, the optimizer, the broadcast and the
checkpoint each handle one array, never a list of tensors.

``model.grads`` is ``model.grad_buffer[:num_params]``: the gradient storage
has one spare element after the gradients, which carries the step's flags
(a stop request, a non-finite gradient) through the same allreduce as the
gradients, so a step needs no collective of its own for them.

Parameters are laid out in *reverse* layer order: backward produces the last
layer's gradients first, so the gradient buffer fills from its start, and a
bucket ``grads[a:b]`` is complete as soon as backward has passed the layer
that owns offset ``a``.
"""
from __future__ import annotations

import numpy as np

from ddp_cnn.model import init as initializers
from ddp_cnn.model import layers as L
from ddp_cnn.system import memory
from ddp_cnn.system.backend import STREAM_DROPOUT, STREAM_INIT, Backend, get_backend, host_rng


class Sequential:
    """A stack of layers, built for an input shape (H, W, C) or (F,), on a backend."""

    def __init__(self, layers, input_shape, backend: Backend | None = None, seed: int = 0,
                 name: str = "custom", arch_kwargs: dict | None = None):
        self.backend = backend or get_backend("cpu")
        self.xp = self.backend.xp
        self.layers = list(layers)
        self.name = name
        self.arch_kwargs = dict(arch_kwargs or {})
        self.input_shape = tuple(int(s) for s in input_shape)
        self.seed = int(seed)
        self.rank = 0
        _unique_names(self.layers)
        shape = self.input_shape
        for layer in self.layers:
            shape = layer.build(shape, self.backend)
        self.output_shape = shape
        memory.check_model(self.name, self.layers, self.backend)  # shapes only so far: refuse before allocating
        self._allocate_and_init()

    # ---- flat buffers -------------------------------------------------
    def _allocate_and_init(self):
        xp, dtype = self.xp, self.backend.dtype
        self.entries = []  # (layer index, ParamSpec, offset) in buffer order
        offset = 0
        self.layer_offsets = [0] * len(self.layers)  # first offset of each layer's params
        for i in reversed(range(len(self.layers))):
            self.layer_offsets[i] = offset
            for spec in self.layers[i].param_specs():
                self.entries.append((i, spec, offset))
                offset += int(np.prod(spec.shape))
        self.num_params = offset
        self.layer_ends = [self.layer_offsets[i] + sum(int(np.prod(s.shape)) for s in self.layers[i].param_specs())
                           for i in range(len(self.layers))]
        host = np.zeros(offset, dtype=np.float64)
        # Initialise in forward order, whatever the layout, with one generator.
        rng = host_rng(self.seed, STREAM_INIT)
        for i, spec, off in sorted(self.entries, key=lambda e: (e[0], e[2])):
            fn = initializers.get(spec.init)
            host[off:off + int(np.prod(spec.shape))] = fn(rng, spec.shape, spec.fan_in, spec.fan_out).ravel()
        self.grad_buffer = xp.zeros(offset + 1, dtype=dtype)  # + the flags element (module docstring)
        self._bind(xp.asarray(host.astype(dtype)), self.grad_buffer[:offset])
        self.decay_ranges = _merge_ranges(
            [(off, off + int(np.prod(spec.shape))) for _, spec, off in self.entries if spec.decay])

    def _bind(self, params, grads) -> None:
        """Make every layer's parameters and gradients views into these flat buffers."""
        self.params, self.grads = params, grads
        for i, spec, off in self.entries:
            size = int(np.prod(spec.shape))
            layer = self.layers[i]
            layer.params[spec.name] = self.params[off:off + size].reshape(spec.shape)
            layer.grads[spec.name] = self.grads[off:off + size].reshape(spec.shape)

    def param_names(self) -> list[str]:
        """Names in buffer order, e.g. ``conv2d.W``."""
        return [f"{self.layers[i].name}.{spec.name}" for i, spec, _ in self.entries]

    def named_params(self) -> dict:
        return {f"{self.layers[i].name}.{spec.name}": self.layers[i].params[spec.name] for i, spec, _ in self.entries}

    def named_buffers(self) -> dict:
        """Non-trained state (BatchNorm running statistics), by name."""
        return {f"{layer.name}.{k}": v for layer in self.layers for k, v in layer.buffers.items()}

    # ---- compute ------------------------------------------------------
    def check_input(self, x) -> None:
        if x.ndim != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"model {self.name!r}: expected input of shape (batch, "
                             f"{', '.join(map(str, self.input_shape))}), got {tuple(x.shape)}")
        if x.dtype != self.backend.dtype:
            raise ValueError(f"model {self.name!r}: expected input dtype {np.dtype(self.backend.dtype).name}, "
                             f"got {x.dtype}")

    def forward(self, x, train: bool = False, step: int = 0, first_row: int = 0):
        """Logits for a batch.  `step` keys the dropout masks (with seed and rank); `first_row`: the
        batch's first row within the step's batch (a micro-batch, or this rank's share of a global
        batch), so that on the CPU a row's mask does not depend on how the batch was cut.

        In train mode every layer works in buffers it reuses from step to step,
        so the logits returned are valid until the next training forward (copy
        them to keep them); eval mode allocates fresh arrays.
        """
        self.check_input(x)
        for i, layer in enumerate(self.layers):
            if isinstance(layer, L.Dropout):
                layer.key = (self.seed, STREAM_DROPOUT, self.rank, step, i)
                layer.first_row = first_row
            x = layer.forward(x, train)
        return x

    def backward(self, dlogits, on_layer_done=None) -> None:
        """Fill ``self.grads``.  ``on_layer_done(i)`` runs after layer i's backward,
        in reverse layer order, when grads[:layer_ends[i]] is final (the reducer
        starts buckets there)."""
        dy = dlogits
        for i in reversed(range(len(self.layers))):
            dy = self.layers[i].backward(dy, need_dx=i > 0)
            if on_layer_done is not None:
                on_layer_done(i)

    def check_trainable(self, image_shape, num_classes: int, local_batch: int, source: str,
                        batch_setting: str | None = None) -> None:
        """ValueError (one line) unless this model trains on ``source``'s images of ``image_shape``
        ((H, W) grayscale or (H, W, C)) and ``num_classes`` classes, ``local_batch`` images per rank
        (and per micro-batch); ``batch_setting`` names the flags that made that number."""
        shape = tuple(int(v) for v in image_shape)
        shape = shape + (1,) if len(shape) == 2 else shape
        if tuple(self.input_shape) != shape:
            raise ValueError(f"model {self.name!r} takes inputs of shape {tuple(self.input_shape)}, "
                             f"{source} holds images of shape {shape}")
        if self.output_shape[-1] != num_classes:
            raise ValueError(f"model {self.name!r} predicts {self.output_shape[-1]} classes, {source} has "
                             f"{num_classes}")
        for layer in self.layers:  # training needs two values per channel (BatchNorm's variance)
            if isinstance(layer, L.BatchNorm) and local_batch * int(np.prod(layer.input_shape[:-1])) < 2:
                raise ValueError(f"{batch_setting or f'--local-batch-size {local_batch}'}: layer {layer.name!r} "
                                 "would train on one value per channel; use 2 or more images per rank")

    def predict(self, x, batch_size: int = 1024):
        """Eval-mode logits for any number of samples, in batches."""
        outs = [self.forward(x[i:i + batch_size], train=False) for i in range(0, x.shape[0], batch_size)]
        return self.xp.concatenate(outs) if outs else self.xp.zeros((0,) + self.output_shape, self.backend.dtype)

    # ---- description --------------------------------------------------
    def describe(self) -> dict:
        """Everything needed to rebuild this architecture (not the weights)."""
        return _json_values({"name": self.name, "input_shape": list(self.input_shape), "arch_kwargs": self.arch_kwargs,
                             "layers": [{"type": type(l).__name__, **l.config} for l in self.layers]})

    def summary_rows(self):
        """(name, type, output shape, params, forward MFLOP per image) per layer."""
        rows = []
        for layer in self.layers:
            n = sum(int(np.prod(s.shape)) for s in layer.param_specs())
            rows.append((layer.name, type(layer).__name__, layer.output_shape, n, layer.flops() / 1e6))
        return rows


def _unique_names(layers) -> None:
    """Give repeated default names a number (conv2d, conv2d_1, ...) so names are keys."""
    seen: dict = {}
    for layer in layers:
        base = layer.name
        if base in seen:
            seen[base] += 1
            layer.name = f"{base}_{seen[base]}"
        else:
            seen[base] = 0


def _json_values(value):
    """Tuples as lists, all the way down: a description equals itself read back from JSON
    (a checkpoint's), so a resume can compare the two."""
    if isinstance(value, dict):
        return {k: _json_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_values(v) for v in value]
    return value


def _merge_ranges(ranges):
    merged = []
    for a, b in sorted(ranges):
        if merged and merged[-1][1] == a:
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    return merged


# ---- named architectures ----------------------------------------------
# Every one ends in Dense(num_classes, init="classifier"): logits near zero at
# the start, so the first loss is about ln(num_classes) (init.classifier says why).
# Dropout defaults to on in all four: what ``python -m ddp_cnn.train`` has always
# trained (it has ``--no-dropout``), so the CLI and ``build(name)`` give the same network.

def _act(kind: str, alpha: float):
    return {"relu": lambda: L.ReLU(), "leaky_relu": lambda: L.LeakyReLU(alpha), "prelu": lambda: L.PReLU(),
            "elu": lambda: L.ELU(), "tanh": lambda: L.Tanh(), "sigmoid": lambda: L.Sigmoid()}[kind]()


def fmnist_cnn(num_classes=10, dropout=True, batchnorm=False, activation="leaky_relu", alpha=0.1):
    """Seed 002's network: conv3x3-32, conv3x3-64, pool, conv3x3-128, pool, dense 3200->512->10.

    The max-pools run before the activation that precedes them in seed 002:
    max-pooling commutes with a non-decreasing activation (values and the
    winner that takes the gradient), and the activation then touches a
    quarter of the pixels (4% of a CPU step).  PReLU's learned slope may
    turn negative, and so may a leaky ReLU's fixed one, so they keep the seed's order.
    """
    pool_first = activation != "prelu" and not (activation == "leaky_relu" and alpha < 0)

    def block(filters, pool=False):
        out = [L.Conv2D(filters, 3, bias=not batchnorm)] + ([L.BatchNorm()] if batchnorm else [])
        if pool and pool_first:
            return out + [L.MaxPool2D(2), _act(activation, alpha)]
        return out + [_act(activation, alpha)] + ([L.MaxPool2D(2)] if pool else [])

    drop = (lambda r: [L.Dropout(r)]) if dropout else (lambda r: [])
    return (block(32) + block(64, pool=True) + drop(0.25) + block(128, pool=True) + drop(0.25)
            + [L.Flatten(), L.Dense(512)] + ([L.BatchNorm()] if batchnorm else []) + [_act(activation, alpha)]
            + drop(0.5) + [L.Dense(num_classes, init="classifier")])


def fmnist_vgg(num_classes=10, dropout=True, activation="relu", alpha=0.1, width=64):
    """A VGG-style stack with batch norm: 2x(conv-bn-act) per stage, 3 stages, global average pool."""
    layers = []
    for stage, filters in enumerate((width, 2 * width, 4 * width)):
        for _ in range(2):
            layers += [L.Conv2D(filters, 3, padding="same", bias=False), L.BatchNorm(), _act(activation, alpha)]
        if stage < 2:
            layers.append(L.MaxPool2D(2))
            if dropout:
                layers.append(L.Dropout(0.1 * (stage + 1)))
    layers += [L.GlobalAvgPool2D(), L.Dense(num_classes, init="classifier")]
    return layers


def lenet(num_classes=10, dropout=True, activation="relu", alpha=0.1):
    """A small, fast CNN for CI: conv5x5-6, pool, conv5x5-16, pool, dense 120-84-10."""
    return [L.Conv2D(6, 5, padding="same"), _act(activation, alpha), L.MaxPool2D(2),
            L.Conv2D(16, 5), _act(activation, alpha), L.MaxPool2D(2),
            L.Flatten(), L.Dense(120), _act(activation, alpha)] + ([L.Dropout(0.25)] if dropout else []) + [
            L.Dense(84), _act(activation, alpha), L.Dense(num_classes, init="classifier")]


def mlp(num_classes=10, dropout=True, batchnorm=False, activation="relu", alpha=0.1, hidden=(128, 64)):
    """784 -> 128 -> 64 -> 10 (the seeds' MLP), optionally with batch norm after each hidden layer."""
    layers = [L.Flatten()]
    for h in hidden:
        layers += [L.Dense(h, bias=not batchnorm)] + ([L.BatchNorm()] if batchnorm else [])
        layers += [_act(activation, alpha)] + ([L.Dropout(0.2)] if dropout else [])
    return layers + [L.Dense(num_classes, init="classifier")]


ARCHITECTURES = {"fmnist-cnn": fmnist_cnn, "fmnist-vgg": fmnist_vgg, "lenet": lenet, "mlp": mlp}


def build(name: str, backend: Backend | None = None, seed: int = 0, input_shape=(28, 28, 1), num_classes=10,
          **arch_kwargs) -> Sequential:
    """A named architecture (see ARCHITECTURES) for images of `input_shape`, initialised from `seed`.

    Every one takes any (H, W, C) its convolutions and pools fit (its Flatten
    and Dense size themselves at build); a smaller image is a one-line
    ValueError naming the model, the shape and the smallest side it takes.
    """
    if name not in ARCHITECTURES:
        raise ValueError(f"--model: unknown architecture {name!r}; expected one of {sorted(ARCHITECTURES)}")
    try:
        return Sequential(_arch_layers(name, num_classes, arch_kwargs), input_shape, backend, seed, name=name,
                          arch_kwargs=arch_kwargs)
    except memory.TooLarge:
        raise
    except ValueError as exc:
        shape = tuple(int(v) for v in input_shape)
        side = _smallest_side(name, shape, num_classes, arch_kwargs)
        hint = f" (too small: each side must be at least {side})" if side and min(shape[:2]) < side else ""
        raise ValueError(f"model {name!r} does not fit images of shape {shape}{hint}: {exc}") from None


def _arch_layers(name: str, num_classes: int, arch_kwargs: dict) -> list:
    arch = {k: v for k, v in arch_kwargs.items() if k != "dropout_rate"}
    layers = ARCHITECTURES[name](num_classes=num_classes, **arch)
    if arch_kwargs.get("dropout_rate") is not None:  # one rate for every dropout layer
        layers = [L.Dropout(arch_kwargs["dropout_rate"]) if isinstance(layer, L.Dropout) else layer
                  for layer in layers]
    return layers


def _smallest_side(name: str, shape: tuple, num_classes: int, arch_kwargs: dict) -> int | None:
    """The smallest square image, of `shape`'s channels, that architecture `name` takes (None: none
    up to 1024, or `shape` is no image).  Shapes only: nothing is allocated but BatchNorm's statistics."""
    if len(shape) != 3:
        return None
    backend = get_backend("cpu")
    for side in range(1, 1025):
        try:
            out = (side, side, shape[2])
            for layer in _arch_layers(name, num_classes, arch_kwargs):
                out = layer.build(out, backend)
            return side
        except ValueError:
            continue
    return None


LAYER_TYPES = {cls.__name__: cls for cls in (
    L.Conv2D, L.Pool2D, L.GlobalAvgPool2D, L.Flatten, L.Dense, L.Dropout, L.BatchNorm, L.ReLU, L.LeakyReLU,
    L.PReLU, L.Sigmoid, L.Tanh, L.ELU)}


def from_description(desc: dict, backend: Backend | None = None, seed: int = 0) -> Sequential:
    """Rebuild a model from :meth:`Sequential.describe` (weights are loaded separately)."""
    layers = []
    for i, spec in enumerate(desc["layers"], 1):
        spec = dict(spec)
        kind = spec.pop("type", None)
        if kind not in LAYER_TYPES:
            raise ValueError(f"model description: layer {i}: unknown layer type {kind!r}")
        try:  # a stored argument of the wrong type ("init": {...}) is a bad description, not a crash
            layers.append(LAYER_TYPES[kind](**spec))
        except (TypeError, AttributeError, ValueError) as exc:
            raise ValueError(f"model description: layer {i} ({kind}): {type(exc).__name__}: {exc}") from None
    try:
        return Sequential(layers, desc["input_shape"], backend, seed, name=desc.get("name", "custom"),
                          arch_kwargs=desc.get("arch_kwargs"))
    except (TypeError, AttributeError) as exc:
        raise ValueError(f"model description: {type(exc).__name__}: {exc}") from None


def format_summary(model) -> str:
    """A table of the model's layers and the totals (forward MFLOP per image)."""
    rows = model.summary_rows()
    lines = [f"{'layer':<16}{'type':<16}{'output shape':<18}{'params':>12}{'MFLOP':>10}"]
    lines.append("-" * len(lines[0]))
    for name, kind, shape, n, mflop in rows:
        lines.append(f"{name:<16}{kind:<16}{str(tuple(shape)):<18}{n:>12,}{mflop:>10.3f}")
    lines.append("-" * len(lines[0]))
    total_params = sum(r[3] for r in rows)
    total_mflop = sum(r[4] for r in rows)
    lines.append(f"{'total':<50}{total_params:>12,}{total_mflop:>10.3f}")
    lines.append(f"input {tuple(model.input_shape)}; forward+backward is about 3x the forward MFLOP")
    return "\n".join(lines)
