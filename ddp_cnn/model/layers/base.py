"""What every layer shares: the parameter declaration, shape bookkeeping, input checks, buffers.

Conventions (every layer):
- images are channels-last, (N, H, W, C); dense activations are (N, F);
- ``build(input_shape, backend)`` fixes shapes (batch axis excluded), picks
  the CPU or GPU implementation once (``self.gpu``, from ``backend.is_gpu``)
  and returns the output shape; ``param_specs()`` declares the parameters,
  which the model then allocates as views into its flat buffers;
- ``forward(x, train)`` keeps what backward needs; ``backward(dy, need_dx)``
  *overwrites* ``self.grads`` and returns dL/dx (or None when not needed);
- in train mode (and in backward) every working and output array comes from
  the layer's :class:`~ddp_cnn.model.kernels.Scratch` (:meth:`Layer.buffer`), so it
  is overwritten at the next training step; in eval mode arrays are fresh;
- a wrong input shape or dtype raises ValueError naming the layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ddp_cnn.model import init as initializers
from ddp_cnn.model import kernels


@dataclass
class ParamSpec:
    """One parameter a layer asks the model to allocate."""

    name: str
    shape: tuple
    init: str
    fan_in: int = 1
    fan_out: int = 1
    decay: bool = False  # weight decay / L2 applies (weights yes, biases and norms no)


class Layer:
    """Base class: shape bookkeeping, input checks and reused buffers."""

    def __init__(self, name: str | None = None):
        self.name = name or type(self).__name__.lower()
        self.params: dict = {}
        self.grads: dict = {}
        self.buffers: dict = {}  # non-trained state that checkpoints keep (BatchNorm statistics)
        self.input_shape: tuple | None = None
        self.output_shape: tuple | None = None
        self.config: dict = {"name": name}
        self.scratch = kernels.Scratch()

    def _remember(self, args: dict) -> None:
        """Keep the constructor arguments, so a model can be saved and rebuilt by name."""
        self.config = {k: v for k, v in args.items() if k not in ("self", "__class__")}

    def build(self, input_shape, backend) -> tuple:
        self.input_shape = tuple(int(s) for s in input_shape)
        self.backend = backend
        self.xp = backend.xp
        self.dtype = backend.dtype
        self.gpu = backend.is_gpu
        self.output_shape = tuple(self._build(self.input_shape))
        return self.output_shape

    def _build(self, input_shape) -> tuple:
        return input_shape

    def param_specs(self) -> list[ParamSpec]:
        return []

    def buffer(self, name: str, shape, dtype=None, reuse: bool = True):
        """An array of `shape` (contents undefined): this layer's reused one when
        `reuse` (train mode, backward), else a fresh one (eval mode)."""
        dtype = self.dtype if dtype is None else dtype
        if reuse:
            return self.scratch.get(name, shape, dtype, self.xp)
        return self.xp.empty(shape, dtype=dtype)

    def check_input(self, x) -> None:
        if tuple(x.shape[1:]) != self.input_shape or x.ndim != len(self.input_shape) + 1:
            raise ValueError(f"layer {self.name!r}: expected input of shape (batch, "
                             f"{', '.join(map(str, self.input_shape))}), got {tuple(x.shape)}")
        if x.dtype != self.dtype:
            raise ValueError(f"layer {self.name!r}: expected dtype {np.dtype(self.dtype).name}, got {x.dtype}")

    def forward(self, x, train: bool = False):
        raise NotImplementedError

    def backward(self, dy, need_dx: bool = True):
        raise NotImplementedError

    def flops(self) -> int:
        """Forward multiply-adds x2 per image (for the summary table)."""
        return 0

    def __repr__(self):
        return f"{type(self).__name__}(name={self.name!r}, in={self.input_shape}, out={self.output_shape})"


def init_name(init, default):
    """The initialiser's name (`default` when None), checked now so a typo fails early."""
    name = default if init is None else init
    initializers.get(name)
    return name


def image_input(layer, input_shape):
    """(H, W, C) of an image layer's input; ValueError naming the layer otherwise."""
    if len(input_shape) != 3:
        raise ValueError(f"layer {layer.name!r}: expects (H, W, C) images, got input shape {input_shape}")
    return input_shape
