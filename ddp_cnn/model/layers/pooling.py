"""Max, average and min pooling over windows, and global average pooling."""
from __future__ import annotations

import numpy as np

from ddp_cnn.model import cpu_kernels, kernels
from ddp_cnn.model.layers.base import Layer, image_input


class Pool2D(Layer):
    """Max, average or min pooling over KHxKW windows (stride, padding).

    ``pool_size``, ``stride`` and an int ``padding`` each take an int (both
    axes) or a (height, width) pair; the stride defaults to the window, per
    axis, as in PyTorch and Keras.  Padding may be at most half the window
    on each axis (PyTorch's rule): more would let a window hold only
    padding, whose max is -inf.

    Padded cells never win a max/min (they hold -inf/+inf); average pooling
    divides by the full window size (padding counts as zeros, as PyTorch's
    default ``count_include_pad=True``).

    One of three implementations, chosen at build: max pooling on a GPU with
    one stride for both axes is one CUDA kernel each way (cuda_kernels takes
    a single stride; other strides take the generic path on the GPU too);
    max/min over windows that tile the input exactly is a running max over
    strided slices (kernels.pool_tiles_*, or their compiled twins in
    cpu_kernels, one pass on every core); anything else goes through a
    (N, OH, OW, KH*KW, C) window view.
    """

    MODES = ("max", "avg", "min")

    def __init__(self, pool_size=2, stride=None, padding=0, mode: str = "max", name=None):
        super().__init__(name)
        self._remember(locals())
        if mode not in self.MODES:
            raise ValueError(f"Pool2D: mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode
        self.kh, self.kw = kernels.pair(pool_size, "Pool2D: pool_size")
        self.sh, self.sw = (self.kh, self.kw) if stride is None else kernels.pair(stride, "Pool2D: stride")
        if min(self.kh, self.kw, self.sh, self.sw) < 1:
            raise ValueError(f"Pool2D: pool_size and stride must be >= 1, got {pool_size}, {stride}")
        self.padding = padding

    def _build(self, input_shape):
        h, w, c = image_input(self, input_shape)
        self.pads = kernels.resolve_padding(self.padding, (h, w), (self.kh, self.kw), (self.sh, self.sw))
        (t, b), (l, r) = self.pads
        if 2 * max(t, b) > self.kh or 2 * max(l, r) > self.kw:
            raise ValueError(f"layer {self.name!r}: padding {self.padding!r} is more than half the "
                             f"{self.kh}x{self.kw} window; some windows would hold only padding")
        self.oh = kernels.conv_out_size(h, self.kh, self.sh, t, b)
        self.ow = kernels.conv_out_size(w, self.kw, self.sw, l, r)
        if self.oh < 1 or self.ow < 1:
            raise ValueError(f"layer {self.name!r}: a {self.kh}x{self.kw} window does not fit input {input_shape}")
        # Non-overlapping windows that tile the input exactly: a reshape, no window copy.
        self.tiles = ((self.sh, self.sw) == (self.kh, self.kw) and self.pads == ((0, 0), (0, 0))
                      and h % self.kh == 0 and w % self.kw == 0)
        if self.gpu and self.mode == "max" and self.sh == self.sw:
            self._forward, self._backward = self._forward_gpu, self._backward_gpu
        elif self.tiles and self.mode != "avg":
            self._forward, self._backward = self._forward_tiles, self._backward_tiles
            self.tile_kernels = cpu_kernels if not self.gpu and cpu_kernels.active() else kernels
        else:
            self._forward, self._backward = self._forward_windows, self._backward_windows
        return (self.oh, self.ow, c)

    def forward(self, x, train=False):
        self.check_input(x)
        return self._forward(x, train)

    def backward(self, dy, need_dx=True):
        return self._backward(dy) if need_dx else None

    def _forward_gpu(self, x, train):
        """One kernel, the winner's slot kept (cuda_kernels)."""
        from ddp_cnn.model import cuda_kernels
        y, self.arg = cuda_kernels.maxpool_forward(x, self.kh, self.kw, self.sh, self.pads, self.oh, self.ow)
        return y

    def _backward_gpu(self, dy):
        from ddp_cnn.model import cuda_kernels
        dx = cuda_kernels.maxpool_backward(dy, self.arg, (dy.shape[0],) + self.input_shape, self.kh, self.kw,
                                           self.sh, self.pads, self.oh, self.ow)
        self.arg = None
        return dx

    def _forward_tiles(self, x, train):
        shape = (x.shape[0],) + self.output_shape
        y, self.arg = self.tile_kernels.pool_tiles_forward(x, self.kh, self.kw, self.mode,
                                                           self.buffer("y", shape, reuse=train),
                                                 self.buffer("arg", shape, np.uint8, reuse=train))
        return y

    def _backward_tiles(self, dy):
        dx = self.tile_kernels.pool_tiles_backward(dy, self.arg, self.kh, self.kw,
                                                   self.buffer("dx", (dy.shape[0],) + self.input_shape))
        self.arg = None
        return dx

    def _forward_windows(self, x, train):
        win = self._windows(x)
        if self.mode == "avg":
            return win.mean(axis=3)
        arg = win.argmax(axis=3) if self.mode == "max" else win.argmin(axis=3)
        self.arg = arg.astype(np.uint8) if self.kh * self.kw < 256 else arg
        return self.xp.take_along_axis(win, arg[:, :, :, None, :], axis=3)[:, :, :, 0, :]

    def _backward_windows(self, dy):
        xp, kk = self.xp, self.kh * self.kw
        if self.mode == "avg":
            dwin = xp.broadcast_to((dy / kk)[:, :, :, None, :], dy.shape[:3] + (kk, dy.shape[3]))
            if self.tiles:
                dwin = xp.ascontiguousarray(dwin)
        else:
            # One-hot of the winning position times dy; ties go to the first winner.
            slots = xp.arange(kk, dtype=self.arg.dtype)[None, None, None, :, None]
            dwin = (self.arg[:, :, :, None, :] == slots) * dy[:, :, :, None, :]
            self.arg = None
        return self._scatter(dwin)

    def _windows(self, x):
        """(N, OH, OW, KH*KW, C) windows of x (a view when they tile, else one copy)."""
        n, h, w, c = x.shape
        if self.tiles:
            v = x.reshape(n, self.oh, self.kh, self.ow, self.kw, c).transpose(0, 1, 3, 2, 4, 5)
            return v.reshape(n, self.oh, self.ow, self.kh * self.kw, c)
        fill = {"max": -np.inf, "min": np.inf, "avg": 0.0}[self.mode]
        xpad = kernels.pad_nhwc(x, self.pads, fill)
        self.padded_shape = xpad.shape
        v = kernels.window_view(xpad, self.kh, self.kw, (self.sh, self.sw), self.oh, self.ow)
        return v.reshape(n, self.oh, self.ow, self.kh * self.kw, c)

    def _scatter(self, dwin):
        """Adjoint of :meth:`_windows` for a (N, OH, OW, KH*KW, C) gradient."""
        n, c = dwin.shape[0], dwin.shape[-1]
        if self.tiles:
            d = dwin.reshape(n, self.oh, self.ow, self.kh, self.kw, c).transpose(0, 1, 3, 2, 4, 5)
            return d.reshape((n,) + self.input_shape)
        d6 = dwin.reshape(n, self.oh, self.ow, self.kh, self.kw, c)
        dpad = kernels.scatter_windows(d6, self.padded_shape, self.kh, self.kw, (self.sh, self.sw),
                                        self.oh, self.ow)
        return kernels.unpad_nhwc(dpad, self.pads)

    def flops(self):
        return self.oh * self.ow * self.output_shape[2] * self.kh * self.kw


def MaxPool2D(pool_size=2, stride=None, padding=0, name=None):
    return Pool2D(pool_size, stride, padding, "max", name or "maxpool2d")


def AvgPool2D(pool_size=2, stride=None, padding=0, name=None):
    return Pool2D(pool_size, stride, padding, "avg", name or "avgpool2d")


def MinPool2D(pool_size=2, stride=None, padding=0, name=None):
    return Pool2D(pool_size, stride, padding, "min", name or "minpool2d")


class GlobalAvgPool2D(Layer):
    """(N, H, W, C) -> (N, C): the mean of each channel."""

    def _build(self, input_shape):
        return (image_input(self, input_shape)[2],)

    def forward(self, x, train=False):
        self.check_input(x)
        return x.mean(axis=(1, 2))

    def backward(self, dy, need_dx=True):
        if not need_dx:
            return None
        h, w, c = self.input_shape
        return self.xp.broadcast_to((dy / (h * w))[:, None, None, :], (dy.shape[0], h, w, c)).copy()
