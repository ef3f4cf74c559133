"""Inverted dropout with masks keyed by (seed, stream, rank, step, layer)."""
from __future__ import annotations

import numpy as np

from ddp_cnn.model import cpu_kernels, kernels
from ddp_cnn.model.layers.base import Layer
from ddp_cnn.system.backend import STREAM_DROPOUT


class Dropout(Layer):
    """Inverted dropout: scaled at train time, the identity at eval time.

    The mask comes from a key the model sets before each step
    (seed, stream, rank, step, layer index), so runs and resumes are
    reproducible: on the CPU one draw of ``default_rng(key)`` over the whole
    batch, on a GPU a counter-based hash (kernels.dropout_mask).  A batch
    that is part of a bigger one (``first_row`` > 0: a micro-batch, a rank's
    share of a global batch) continues that draw where its rows begin, so
    on the CPU each row gets the mask it would get in the whole batch.
    With the compiled CPU kernels the uniform draw is the same; the mask is
    then never stored: forward and backward each compare the draw with the
    keep probability as they multiply (cpu_kernels.dropout_apply).
    """

    def __init__(self, rate: float, name=None):
        super().__init__(name)
        self._remember(locals())
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"Dropout: rate must be in [0, 1), got {rate}")
        self.rate = float(rate)
        self.key = (0, STREAM_DROPOUT, 0, 0, 0)
        self.first_row = 0

    def _build(self, input_shape):
        self.jit = not self.gpu and cpu_kernels.active()
        return input_shape

    def forward(self, x, train=False):
        self.check_input(x)
        if not train or self.rate == 0.0:
            self.mask = None
            return x
        offset = self.first_row * (x.size // max(x.shape[0], 1))  # values drawn for the rows before
        if self.gpu:
            self.mask = kernels.dropout_mask(x.shape, self.rate, self.key, self.xp, self.dtype, offset=offset)
        elif self.jit:  # the mask stays implicit in the draw (self.mask: the uniform draw)
            self.mask = cpu_kernels.uniform_draw(x.shape, self.key, offset,
                                                 self.buffer("uniform", x.shape, np.float32))
            return cpu_kernels.dropout_apply(self.xp.ascontiguousarray(x), self.mask, 1.0 - self.rate,
                                             self.buffer("out", x.shape))
        else:
            self.mask = kernels.dropout_mask(x.shape, self.rate, self.key, self.xp, self.dtype,
                                             self.buffer("mask", x.shape), self.buffer("uniform", x.shape, np.float32),
                                             offset=offset)
        return self.xp.multiply(x, self.mask, out=self.buffer("out", x.shape))

    def backward(self, dy, need_dx=True):
        if not need_dx:
            return None
        if self.mask is None:
            return dy
        if self.jit:
            return cpu_kernels.dropout_apply(self.xp.ascontiguousarray(dy), self.mask, 1.0 - self.rate,
                                             self.buffer("out", dy.shape))
        # The forward output's buffer: the next layer's backward, the last reader of it, has run.
        return self.xp.multiply(dy, self.mask, out=self.buffer("out", dy.shape))
