"""Dense (fully connected) and Flatten."""
from __future__ import annotations

import numpy as np

from ddp_cnn.model import cpu_gemm, cpu_kernels
from ddp_cnn.model.layers.base import Layer, ParamSpec, init_name


class Flatten(Layer):
    def _build(self, input_shape):
        return (int(np.prod(input_shape)),)

    def forward(self, x, train=False):
        self.check_input(x)
        return x.reshape(x.shape[0], -1)

    def backward(self, dy, need_dx=True):
        return dy.reshape((dy.shape[0],) + self.input_shape) if need_dx else None


class Dense(Layer):
    """y = x @ W + b with W (in, out): one GEMM each for y, dW and dx (BLAS's threads); with the
    compiled CPU kernels, GEMMs on blocks, one per core (cpu_gemm.dense_*)."""

    def __init__(self, units: int, bias: bool = True, init: str | None = None, name=None):
        super().__init__(name)
        self._remember(locals())
        if int(units) < 1:
            raise ValueError(f"Dense: units must be >= 1, got {units}")
        self.units = int(units)
        self.use_bias = bias
        self.init = init_name(init, "he_normal")

    def _build(self, input_shape):
        if len(input_shape) != 1:
            raise ValueError(f"layer {self.name!r}: expects flat (features,) input, got {input_shape}; "
                             "put a Flatten before it")
        self.fan_in = input_shape[0]
        self.jit = not self.gpu and cpu_kernels.active()
        return (self.units,)

    def param_specs(self):
        specs = [ParamSpec("W", (self.fan_in, self.units), self.init, self.fan_in, self.units, decay=True)]
        if self.use_bias:
            specs.append(ParamSpec("b", (self.units,), "zeros"))
        return specs

    def forward(self, x, train=False):
        self.check_input(x)
        self.x = x
        if self.jit:
            self.x = np.ascontiguousarray(x)
            return cpu_gemm.dense_forward(self.x, self.params["W"], self.params["b"] if self.use_bias else None,
                                             self.buffer("y", (x.shape[0], self.units), reuse=train))
        y = self.xp.matmul(x, self.params["W"], out=self.buffer("y", (x.shape[0], self.units), reuse=train))
        if self.use_bias:
            y += self.params["b"]
        return y

    def backward(self, dy, need_dx=True):
        xp = self.xp
        if self.jit:
            dx = self.buffer("dx", (dy.shape[0], self.fan_in)) if need_dx else None
            cpu_gemm.dense_backward(self.x, np.ascontiguousarray(dy), self.params["W"], self.grads["W"],
                                       self.grads["b"] if self.use_bias else None, dx)
            self.x = None
            return dx
        xp.matmul(self.x.T, dy, out=self.grads["W"])
        if self.use_bias:
            dy.sum(axis=0, out=self.grads["b"])
        self.x = None
        if not need_dx:
            return None
        return xp.matmul(dy, self.params["W"].T, out=self.buffer("dx", (dy.shape[0], self.fan_in)))

    def flops(self):
        return 2 * self.fan_in * self.units
