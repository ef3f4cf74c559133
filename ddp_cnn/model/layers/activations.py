"""Elementwise activations: ReLU, LeakyReLU, PReLU, ELU, Tanh, Sigmoid.

ReLU and LeakyReLU (the built-in architectures' activations) write into
their reused buffers in train mode; each writes dx into its forward output's
buffer, whose last reader (the next layer's backward) has run by then.
from __future__ import annotations

With the compiled CPU kernels (cpu_kernels.active()) both are one pass each
way on every core, and keep their input x for backward instead of a mask:
x is the previous layer's output, which nothing overwrites before this
layer's backward has run.
"""
from ddp_cnn.model import cpu_kernels, kernels
from ddp_cnn.model.layers.base import Layer, ParamSpec


class _Compiled:
    """ReLU/LeakyReLU through cpu_kernels (chosen at build; ReLU is alpha = 0)."""

    def _build(self, input_shape):
        self.jit = not self.gpu and cpu_kernels.active()
        return input_shape

    def _forward_jit(self, x, train, alpha):
        self.x = self.xp.ascontiguousarray(x)
        return cpu_kernels.leaky_relu_forward(self.x, alpha, self.buffer("out", x.shape, reuse=train))

    def _backward_jit(self, dy, alpha):
        dx = cpu_kernels.leaky_relu_backward(self.x, self.xp.ascontiguousarray(dy), alpha,
                                             self.buffer("out", dy.shape))
        self.x = None
        return dx


class ReLU(_Compiled, Layer):
    def forward(self, x, train=False):
        self.check_input(x)
        if self.jit:
            return self._forward_jit(x, train, 0.0)
        self.pos = self.xp.greater(x, 0, out=self.buffer("pos", x.shape, bool, reuse=train))
        return self.xp.multiply(x, self.pos, out=self.buffer("out", x.shape, reuse=train))

    def backward(self, dy, need_dx=True):
        if not need_dx:
            return None
        if self.jit:
            return self._backward_jit(dy, 0.0)
        return self.xp.multiply(dy, self.pos, out=self.buffer("out", dy.shape))


class LeakyReLU(_Compiled, Layer):
    def __init__(self, alpha: float = 0.01, name=None):
        super().__init__(name)
        self._remember(locals())
        self.alpha = float(alpha)

    def forward(self, x, train=False):
        self.check_input(x)
        if self.jit:
            return self._forward_jit(x, train, self.alpha)
        xp = self.xp
        # The slope is kept until backward only.
        self.slope = self.buffer("slope", x.shape, reuse=train)
        y = self.buffer("out", x.shape, reuse=train)
        if 0.0 <= self.alpha <= 1.0:
            return kernels.leaky_relu(x, self.alpha, self.slope, y)[0]
        self.slope[...] = xp.where(x > 0, self.dtype(1.0), self.dtype(self.alpha))
        return xp.multiply(x, self.slope, out=y)

    def backward(self, dy, need_dx=True):
        if not need_dx:
            return None
        if self.jit:
            return self._backward_jit(dy, self.alpha)
        return self.xp.multiply(dy, self.slope, out=self.buffer("out", dy.shape))


class PReLU(Layer):
    """Leaky ReLU whose negative slope is learned, one per channel/feature."""

    def __init__(self, alpha_init: float = 0.25, name=None):
        super().__init__(name)
        self._remember(locals())
        self.alpha_init = float(alpha_init)

    def _build(self, input_shape):
        self.c = input_shape[-1]
        return input_shape

    def param_specs(self):
        return [ParamSpec("alpha", (self.c,), f"const:{self.alpha_init}")]

    def forward(self, x, train=False):
        self.check_input(x)
        self.x = x
        self.neg = x <= 0
        return self.xp.where(self.neg, x * self.params["alpha"], x)

    def backward(self, dy, need_dx=True):
        axes = tuple(range(dy.ndim - 1))
        (dy * self.x * self.neg).sum(axis=axes, out=self.grads["alpha"])
        self.x = None
        return self.xp.where(self.neg, dy * self.params["alpha"], dy) if need_dx else None


class Sigmoid(Layer):
    def forward(self, x, train=False):
        self.check_input(x)
        xp = self.xp
        # exp of a non-positive number only: no overflow for large |x|.
        e = xp.exp(-xp.abs(x))
        self.y = xp.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(x.dtype, copy=False)
        return self.y

    def backward(self, dy, need_dx=True):
        return dy * self.y * (1.0 - self.y) if need_dx else None


class Tanh(Layer):
    def forward(self, x, train=False):
        self.check_input(x)
        self.y = self.xp.tanh(x)
        return self.y

    def backward(self, dy, need_dx=True):
        return dy * (1.0 - self.y * self.y) if need_dx else None


class ELU(Layer):
    def __init__(self, alpha: float = 1.0, name=None):
        super().__init__(name)
        self._remember(locals())
        self.alpha = float(alpha)

    def forward(self, x, train=False):
        self.check_input(x)
        xp = self.xp
        self.pos = x > 0
        # expm1 of min(x, 0) only: no overflow warning on large positive x.
        self.neg_part = self.alpha * xp.expm1(xp.minimum(x, 0))
        return xp.where(self.pos, x, self.neg_part)

    def backward(self, dy, need_dx=True):
        if not need_dx:
            return None
        return self.xp.where(self.pos, dy, dy * (self.neg_part + self.alpha))
