"""Layers written from scratch: forward, backward, named parameters and gradients.

Conventions (every layer):
- images are channels-last, (N, H, W, C); dense activations are (N, F);
- ``build(input_shape, backend)`` fixes shapes (batch axis excluded) and
  returns the output shape; ``param_specs()`` declares the parameters, which
  the model then allocates as views into its flat buffers;
- ``forward(x, train)`` keeps what backward needs; ``backward(dy, need_dx)``
  *overwrites* ``self.grads`` and returns dL/dx (or None when not needed);
- a wrong input shape or dtype raises ValueError naming the layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import init as initializers
from . import blas, kernels, threads
from .backend import STREAM_DROPOUT


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
    """Base class: shape bookkeeping and input checks."""

    def __init__(self, name: str | None = None):
        self.name = name or type(self).__name__.lower()
        self.params: dict = {}
        self.grads: dict = {}
        self.buffers: dict = {}  # non-trained state that checkpoints keep (BatchNorm statistics)
        self.input_shape: tuple | None = None
        self.output_shape: tuple | None = None
        self.config: dict = {"name": name}
        self.scratch = kernels.Scratch()  # buffers reused across steps (kernels.Scratch)

    def _remember(self, args: dict) -> None:
        """Keep the constructor arguments, so a model can be saved and rebuilt by name."""
        self.config = {k: v for k, v in args.items() if k not in ("self", "__class__")}

    def build(self, input_shape, backend) -> tuple:
        self.input_shape = tuple(int(s) for s in input_shape)
        self.backend = backend
        self.xp = backend.xp
        self.dtype = backend.dtype
        self.output_shape = tuple(self._build(self.input_shape))
        return self.output_shape

    def _build(self, input_shape) -> tuple:
        return input_shape

    def param_specs(self) -> list[ParamSpec]:
        return []

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


def _init_name(init, default):
    name = default if init is None else init
    initializers.get(name)  # fail early on an unknown name
    return name


class Conv2D(Layer):
    """2-D convolution as im2col + one GEMM; weights (KH, KW, C_in, F), bias (F,)."""

    def __init__(self, filters: int, kernel_size=3, stride: int = 1, padding="valid", bias: bool = True,
                 init: str | None = None, name=None):
        super().__init__(name)
        self._remember(locals())
        if int(filters) < 1:
            raise ValueError(f"Conv2D: filters must be >= 1, got {filters}")
        self.filters = int(filters)
        self.kh, self.kw = (kernel_size, kernel_size) if np.isscalar(kernel_size) else tuple(kernel_size)
        if self.kh < 1 or self.kw < 1 or int(stride) < 1:
            raise ValueError(f"Conv2D: kernel_size and stride must be >= 1, got {kernel_size}, {stride}")
        self.stride = int(stride)
        self.padding = padding
        self.use_bias = bias
        self.init = _init_name(init, "he_normal")

    def _build(self, input_shape):
        if len(input_shape) != 3:
            raise ValueError(f"layer {self.name!r}: expects (H, W, C) images, got input shape {input_shape}")
        h, w, self.cin = input_shape
        self.pads = kernels.resolve_padding(self.padding, (h, w), (self.kh, self.kw), self.stride)
        (t, b), (l, r) = self.pads
        self.oh = kernels.conv_out_size(h, self.kh, self.stride, t, b)
        self.ow = kernels.conv_out_size(w, self.kw, self.stride, l, r)
        if self.oh < 1 or self.ow < 1:
            raise ValueError(f"layer {self.name!r}: a {self.kh}x{self.kw} kernel does not fit input {input_shape}")
        self.k = self.kh * self.kw * self.cin
        return (self.oh, self.ow, self.filters)

    def param_specs(self):
        specs = [ParamSpec("W", (self.kh, self.kw, self.cin, self.filters), self.init,
                           self.k, self.kh * self.kw * self.filters, decay=True)]
        if self.use_bias:
            specs.append(ParamSpec("b", (self.filters,), "zeros"))
        return specs

    def forward(self, x, train=False):
        self.check_input(x)
        xp = self.xp
        n = x.shape[0]
        if self.backend.is_gpu:
            return self._forward_gpu(x)
        xpad = kernels.pad_nhwc(x, self.pads)
        self.padded_shape = xpad.shape
        per = self.oh * self.ow
        w = self.params["W"].reshape(self.k, self.filters)
        y = self.scratch.output("y", (n * per, self.filters), x.dtype, xp) if train else \
            xp.empty((n * per, self.filters), dtype=x.dtype)
        if self.cin == 1:
            # One channel: build the rows transposed (kernels.im2col_t_into); cols is
            # then a transposed view, which both GEMMs take as is.
            shape = (self.k, n * per)
            cols_t = self.scratch.get("cols", shape, x.dtype, xp) if train else xp.empty(shape, dtype=x.dtype)
            taps = cols_t.reshape(self.kh, self.kw, 1, n, self.oh, self.ow)
            self.cols = cols_t.T

            def images_t(_, a, b):
                kernels.im2col_t_into(xpad[a:b], self.kh, self.kw, self.stride, self.oh, self.ow, taps[:, :, :, a:b])
                self._gemm_bias(self.cols[a * per:b * per], w, y[a * per:b * per])
            threads.parallel(n, images_t, self.cols.nbytes)
            return y.reshape(n, self.oh, self.ow, self.filters)
        shape = (n * per, self.k)
        # The rows live until backward: in training one buffer serves every step.
        self.cols = self.scratch.get("cols", shape, x.dtype, xp) if train else xp.empty(shape, dtype=x.dtype)

        # Each thread takes a share of the images, and works through it a few images
        # at a time: the GEMM reads rows im2col has just written, and the bias is
        # added while the outputs are still in cache.
        def images(_, start, stop):
            for a, b in kernels.batch_chunks(xp, stop - start, per * self.k * x.dtype.itemsize):
                a, b = a + start, b + start
                cols = kernels.im2col_into(xpad[a:b], self.kh, self.kw, self.stride, self.oh, self.ow,
                                           self.cols[a * per:b * per])
                self._gemm_bias(cols, w, y[a * per:b * per])
        threads.parallel(n, images, self.cols.nbytes)
        return y.reshape(n, self.oh, self.ow, self.filters)

    def _gemm_bias(self, cols, w, out):
        blas.matmul(cols, w, out)
        if self.use_bias:
            out += self.params["b"]

    def backward(self, dy, need_dx=True):
        xp = self.xp
        dy2 = dy.reshape(-1, self.filters)
        if self.backend.is_gpu:
            self._param_grads(0, 0, dy2.shape[0] // (self.oh * self.ow), dy2)
        else:
            self._param_grads_threads(dy2)
        self.cols = None
        if not need_dx:
            return None
        if self.backend.is_gpu:  # one GEMM, then one gathering col2im kernel
            from . import cuda_kernels
            dcols = xp.matmul(dy2, self.params["W"].reshape(self.k, self.filters).T)
            return cuda_kernels.col2im(dcols, (dy.shape[0],) + self.input_shape, self.kh, self.kw, self.stride,
                                       self.pads, self.oh, self.ow)
        # dcols tap by tap, (KH*KW, M, C), so each col2im add streams over
        # contiguous rows; a few images at a time, so the taps are still in
        # cache when they are added (2.2x faster than one dcols GEMM + col2im).
        # With stride 1 the dy rows are first padded with zeros to the padded
        # width, which makes each add one run per image (kernels.col2im_taps_wide).
        # (Tried: dx as a convolution of the zero-padded dy with the flipped kernel,
        # im2col + one GEMM: 1.2x slower on both of fmnist-cnn's convs.)
        kk, per = self.kh * self.kw, self.oh * self.ow
        n, _, wp, _ = self.padded_shape
        wide = self.stride == 1
        row = wp if wide else self.ow
        w_taps = xp.ascontiguousarray(self.params["W"].reshape(kk, self.cin, self.filters).transpose(0, 2, 1))
        dy4 = dy2.reshape(n, self.oh, self.ow, self.filters)
        dxpad = self.scratch.output("dx", self.padded_shape, dy2.dtype, xp)

        def images(part, start, stop):  # each thread: its share of the images, in cache-sized chunks
            dxpad[start:stop].fill(0)
            for a, b in kernels.batch_chunks(xp, stop - start, kk * self.oh * row * self.cin * dy2.dtype.itemsize):
                a, b = a + start, b + start
                rows = dy2[a * per:b * per]
                if wide:
                    dy_wide = self.scratch.get(f"dy_wide{part}", (b - a, self.oh, wp, self.filters), dy2.dtype, xp)
                    dy_wide[:, :, self.ow:, :] = 0
                    dy_wide[:, :, :self.ow, :] = dy4[a:b]
                    rows = dy_wide.reshape(-1, self.filters)
                taps = self.scratch.get(f"taps{part}", (kk, rows.shape[0], self.cin), dy2.dtype, xp)
                blas.matmul(rows, w_taps, taps)
                if wide:
                    kernels.col2im_taps_wide(taps, dxpad[a:b], self.kh, self.kw, self.oh)
                else:
                    kernels.col2im_taps(taps, (b - a,) + self.padded_shape[1:], self.kh, self.kw, self.stride,
                                        self.oh, self.ow, out=dxpad[a:b])
        threads.parallel(n, images, 2 * dxpad.nbytes)
        return kernels.unpad_nhwc(dxpad, self.pads)

    def _param_grads(self, part, start, stop, dy2, dw=None, db=None):
        """dW (and db) from the output rows of images start..stop: into the gradient
        buffers, or into `dw`/`db` (a thread's partial sums) when given."""
        xp, per = self.xp, self.oh * self.ow
        rows = slice(start * per, stop * per)
        dw = self.grads["W"].reshape(self.k, self.filters) if dw is None else dw
        # cols.T is a transposed view: BLAS reads it as is, no copy.
        blas.matmul(self.cols[rows].T, dy2[rows], dw)
        if self.use_bias:
            ones = self.scratch.ones(f"ones{part}", (stop - start) * per, dy2.dtype, xp)
            xp.matmul(ones, dy2[rows], out=self.grads["b"] if db is None else db)

    def _param_grads_threads(self, dy2):
        """:meth:`_param_grads` with the images split over the CPU threads: each
        thread sums its share into a buffer of its own, added in thread order."""
        xp, n = self.xp, dy2.shape[0] // (self.oh * self.ow)
        ranges = threads.plan(n, self.cols.nbytes)
        if len(ranges) == 1:
            self._param_grads(0, 0, n, dy2)
            return
        dws = [self.scratch.get(f"dw{i}", (self.k, self.filters), dy2.dtype, xp) for i in range(len(ranges))]
        dbs = [self.scratch.get(f"db{i}", (self.filters,), dy2.dtype, xp) for i in range(len(ranges))]
        threads.run(ranges, lambda i, a, b: self._param_grads(i, a, b, dy2, dws[i], dbs[i]))
        _sum_in_order(dws, self.grads["W"].reshape(self.k, self.filters))
        if self.use_bias:
            _sum_in_order(dbs, self.grads["b"])

    def _forward_gpu(self, x):
        """im2col as one kernel reading the unpadded input (cuda_kernels), then one GEMM."""
        from . import cuda_kernels
        self.cols = cuda_kernels.im2col(x, self.kh, self.kw, self.stride, self.pads, self.oh, self.ow)
        y = self.xp.matmul(self.cols, self.params["W"].reshape(self.k, self.filters))
        if self.use_bias:
            y += self.params["b"]
        return y.reshape(x.shape[0], self.oh, self.ow, self.filters)

    def flops(self):
        return 2 * self.oh * self.ow * self.k * self.filters


def _sum_in_order(parts, out):
    """out = parts[0] + parts[1] + ..., added in this order (the threads' partial sums)."""
    np.add(parts[0], parts[1], out=out)
    for extra in parts[2:]:
        out += extra


class Pool2D(Layer):
    """Max, average or min pooling over KxK windows (stride, padding).

    Padded cells never win a max/min (they hold -inf/+inf); average pooling
    divides by the full window size (padding counts as zeros, as PyTorch's
    default ``count_include_pad=True``).
    """

    MODES = ("max", "avg", "min")

    def __init__(self, pool_size=2, stride=None, padding=0, mode: str = "max", name=None):
        super().__init__(name)
        self._remember(locals())
        if mode not in self.MODES:
            raise ValueError(f"Pool2D: mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode
        self.kh, self.kw = (pool_size, pool_size) if np.isscalar(pool_size) else tuple(pool_size)
        self.stride = int(stride) if stride is not None else self.kh
        if self.kh < 1 or self.kw < 1 or self.stride < 1:
            raise ValueError(f"Pool2D: pool_size and stride must be >= 1, got {pool_size}, {stride}")
        self.padding = padding

    def _build(self, input_shape):
        if len(input_shape) != 3:
            raise ValueError(f"layer {self.name!r}: expects (H, W, C) images, got input shape {input_shape}")
        h, w, c = input_shape
        self.pads = kernels.resolve_padding(self.padding, (h, w), (self.kh, self.kw), self.stride)
        (t, b), (l, r) = self.pads
        self.oh = kernels.conv_out_size(h, self.kh, self.stride, t, b)
        self.ow = kernels.conv_out_size(w, self.kw, self.stride, l, r)
        if self.oh < 1 or self.ow < 1:
            raise ValueError(f"layer {self.name!r}: a {self.kh}x{self.kw} window does not fit input {input_shape}")
        # Non-overlapping windows that tile the input exactly: a reshape, no window copy.
        self.tiles = (self.stride == self.kh == self.kw and self.pads == ((0, 0), (0, 0))
                      and h % self.kh == 0 and w % self.kw == 0)
        return (self.oh, self.ow, c)

    def _windows(self, x):
        """(N, OH, OW, KH*KW, C) windows of x (a view when they tile, else one copy)."""
        n, h, w, c = x.shape
        if self.tiles:
            v = x.reshape(n, self.oh, self.kh, self.ow, self.kw, c).transpose(0, 1, 3, 2, 4, 5)
            return v.reshape(n, self.oh, self.ow, self.kh * self.kw, c)
        fill = {"max": -np.inf, "min": np.inf, "avg": 0.0}[self.mode]
        xpad = kernels.pad_nhwc(x, self.pads, fill)
        self.padded_shape = xpad.shape
        v = kernels.window_view(xpad, self.kh, self.kw, self.stride, self.oh, self.ow)
        return v.reshape(n, self.oh, self.ow, self.kh * self.kw, c)

    def _scatter(self, dwin):
        """Adjoint of :meth:`_windows` for a (N, OH, OW, KH*KW, C) gradient."""
        n, c = dwin.shape[0], dwin.shape[-1]
        if self.tiles:
            d = dwin.reshape(n, self.oh, self.ow, self.kh, self.kw, c).transpose(0, 1, 3, 2, 4, 5)
            return d.reshape((n,) + self.input_shape)
        d6 = dwin.reshape(n, self.oh, self.ow, self.kh, self.kw, c)
        dpad = kernels.scatter_windows(d6, self.padded_shape, self.kh, self.kw, self.stride, self.oh, self.ow)
        return kernels.unpad_nhwc(dpad, self.pads)

    def forward(self, x, train=False):
        self.check_input(x)
        xp = self.xp
        self.n = x.shape[0]
        if self.backend.is_gpu and self.mode == "max":  # one kernel, winner slot kept (cuda_kernels)
            from . import cuda_kernels
            y, self.arg = cuda_kernels.maxpool_forward(x, self.kh, self.kw, self.stride, self.pads, self.oh, self.ow)
            return y
        if self.tiles and self.mode != "avg":
            shape = (self.n,) + self.output_shape
            y = self.scratch.output("y", shape, x.dtype, xp) if train else None
            # arg is read by backward only, so the buffer may be the same from step to step.
            arg = self.scratch.get("arg", shape, np.uint8, xp) if train else None
            y, self.arg = kernels.pool_tiles_forward(x, self.kh, self.kw, self.mode, y, arg)
            return y
        win = self._windows(x)
        if self.mode == "avg":
            return win.mean(axis=3)
        arg = win.argmax(axis=3) if self.mode == "max" else win.argmin(axis=3)
        self.arg = arg.astype(np.uint8) if self.kh * self.kw < 256 else arg
        return xp.take_along_axis(win, arg[:, :, :, None, :], axis=3)[:, :, :, 0, :]

    def backward(self, dy, need_dx=True):
        if not need_dx:
            return None
        xp = self.xp
        kk = self.kh * self.kw
        if self.backend.is_gpu and self.mode == "max":
            from . import cuda_kernels
            dx = cuda_kernels.maxpool_backward(dy, self.arg, (dy.shape[0],) + self.input_shape, self.kh, self.kw,
                                               self.stride, self.pads, self.oh, self.ow)
            self.arg = None
            return dx
        if self.mode == "avg":
            dwin = xp.broadcast_to((dy / kk)[:, :, :, None, :], dy.shape[:3] + (kk, dy.shape[3]))
            if self.tiles:
                dwin = xp.ascontiguousarray(dwin)
        elif self.tiles:
            dx = self.scratch.output("dx", (dy.shape[0],) + self.input_shape, dy.dtype, xp)
            kernels.pool_tiles_backward(dy, self.arg, self.kh, self.kw, dx)
            self.arg = None
            return dx
        else:
            # One-hot of the winning position times dy; ties go to the first winner.
            slots = xp.arange(kk, dtype=self.arg.dtype)[None, None, None, :, None]
            dwin = (self.arg[:, :, :, None, :] == slots) * dy[:, :, :, None, :]
            self.arg = None
        return self._scatter(dwin)

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
        if len(input_shape) != 3:
            raise ValueError(f"layer {self.name!r}: expects (H, W, C) images, got input shape {input_shape}")
        return (input_shape[2],)

    def forward(self, x, train=False):
        self.check_input(x)
        return x.mean(axis=(1, 2))

    def backward(self, dy, need_dx=True):
        if not need_dx:
            return None
        h, w, c = self.input_shape
        return self.xp.broadcast_to((dy / (h * w))[:, None, None, :], (dy.shape[0], h, w, c)).copy()


class Flatten(Layer):
    def _build(self, input_shape):
        return (int(np.prod(input_shape)),)

    def forward(self, x, train=False):
        self.check_input(x)
        return x.reshape(x.shape[0], -1)

    def backward(self, dy, need_dx=True):
        return dy.reshape((dy.shape[0],) + self.input_shape) if need_dx else None


class Dense(Layer):
    """y = x @ W + b with W (in, out)."""

    def __init__(self, units: int, bias: bool = True, init: str | None = None, name=None):
        super().__init__(name)
        self._remember(locals())
        if int(units) < 1:
            raise ValueError(f"Dense: units must be >= 1, got {units}")
        self.units = int(units)
        self.use_bias = bias
        self.init = _init_name(init, "he_normal")

    def _build(self, input_shape):
        if len(input_shape) != 1:
            raise ValueError(f"layer {self.name!r}: expects flat (features,) input, got {input_shape}; "
                             "put a Flatten before it")
        self.fan_in = input_shape[0]
        return (self.units,)

    def param_specs(self):
        specs = [ParamSpec("W", (self.fan_in, self.units), self.init, self.fan_in, self.units, decay=True)]
        if self.use_bias:
            specs.append(ParamSpec("b", (self.units,), "zeros"))
        return specs

    # Each GEMM is split between the CPU threads where its output splits into
    # independent blocks: y and dx by rows (images), dW by rows (input features).

    def forward(self, x, train=False):
        self.check_input(x)
        self.x = x
        xp, w = self.xp, self.params["W"]
        y = xp.empty((x.shape[0], self.units), dtype=x.dtype)

        def rows(_, a, b):
            blas.matmul(x[a:b], w, y[a:b])
            if self.use_bias:
                y[a:b] += self.params["b"]
        kernels.split_batch(xp, x.shape[0], rows, x.nbytes + w.nbytes + y.nbytes)
        return y

    def backward(self, dy, need_dx=True):
        xp, x, w, dw = self.xp, self.x, self.params["W"], self.grads["W"]
        nbytes = x.nbytes + dy.nbytes + w.nbytes
        kernels.split_batch(xp, self.fan_in, lambda _, a, b: blas.matmul(x[:, a:b].T, dy, dw[a:b]), nbytes)
        if self.use_bias:
            dy.sum(axis=0, out=self.grads["b"])
        self.x = None
        if not need_dx:
            return None
        dx = xp.empty((dy.shape[0], self.fan_in), dtype=dy.dtype)
        kernels.split_batch(xp, dy.shape[0], lambda _, a, b: blas.matmul(dy[a:b], w.T, dx[a:b]), nbytes)
        return dx

    def flops(self):
        return 2 * self.fan_in * self.units


class Dropout(Layer):
    """Inverted dropout: scaled at train time, the identity at eval time.

    The mask comes from a key the model sets before each step
    (seed, rank, step, layer index), so runs and resumes are reproducible.
    """

    def __init__(self, rate: float, name=None):
        super().__init__(name)
        self._remember(locals())
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"Dropout: rate must be in [0, 1), got {rate}")
        self.rate = float(rate)
        self.key = (0, STREAM_DROPOUT, 0, 0, 0)
        self.first_image = 0  # which image of the whole batch x[0] is (the model's replicas set it)

    def forward(self, x, train=False):
        self.check_input(x)
        if not train or self.rate == 0.0:
            self.mask = None
            return x
        start = self.first_image * (x.size // max(x.shape[0], 1))
        self.mask = kernels.dropout_mask(x.shape, self.rate, self.key, self.xp, self.dtype, start)
        return kernels.multiply_into(x, self.mask, self.scratch.output("out", x.shape, x.dtype, self.xp))

    def backward(self, dy, need_dx=True):
        if not need_dx:
            return None
        if self.mask is None:
            return dy
        return kernels.multiply_into(dy, self.mask, self.scratch.output("out", dy.shape, dy.dtype, self.xp))


class BatchNorm(Layer):
    """Batch normalisation over every axis but the last (channels or features).

    Train mode normalises with the local batch statistics (no SyncBN: under
    data parallelism each rank uses its own batch, like PyTorch DDP) and
    updates running statistics; eval mode uses the running statistics.
    """

    def __init__(self, momentum: float = 0.1, eps: float = 1e-5, name=None):
        super().__init__(name)
        self._remember(locals())
        self.momentum = float(momentum)
        self.eps = float(eps)

    def _build(self, input_shape):
        self.c = input_shape[-1]
        self.buffers = {"running_mean": self.xp.zeros(self.c, self.dtype),
                        "running_var": self.xp.ones(self.c, self.dtype)}
        return input_shape

    def param_specs(self):
        return [ParamSpec("gamma", (self.c,), "ones"), ParamSpec("beta", (self.c,), "zeros")]

    def forward(self, x, train=False):
        self.check_input(x)
        if self.xp is np:
            return self._forward_cpu(x, train)
        # GPU: per-channel sums as GEMVs and fused passes (cuda_kernels).
        from . import cuda_kernels
        x2 = self.xp.ascontiguousarray(x).reshape(-1, self.c)
        ones = self.scratch.ones("ones", x2.shape[0], x2.dtype, self.xp)
        mean, var = self._statistics(train, x2.shape[0], lambda: cuda_kernels.batchnorm_statistics(x2, ones))
        self.batch_stats = train
        self.invstd = 1.0 / self.xp.sqrt(var + self.eps)
        self.xhat, y = cuda_kernels.batchnorm_normalise(x2, mean, self.invstd, self.params["gamma"],
                                                       self.params["beta"])
        return y.reshape(x.shape)

    def _statistics(self, train, m, batch_statistics):
        """(mean, var) to normalise with: in train mode the batch's, from
        batch_statistics(), folded into the running statistics; else the running ones."""
        rm, rv = self.buffers["running_mean"], self.buffers["running_var"]
        if not train or m == 0:  # an empty batch has no statistics
            return rm, rv
        mean, var = batch_statistics()
        rm *= 1 - self.momentum
        rm += self.momentum * mean
        rv *= 1 - self.momentum
        rv += self.momentum * var * (m / max(m - 1, 1))  # unbiased, as PyTorch keeps it
        return mean, var

    def backward(self, dy, need_dx=True):
        if self.xp is np:
            return self._backward_cpu(dy, need_dx)
        from . import cuda_kernels
        dy2 = self.xp.ascontiguousarray(dy).reshape(-1, self.c)
        m = dy2.shape[0]
        ones = self.scratch.ones("ones", m, dy2.dtype, self.xp)
        self.grads["beta"][...] = cuda_kernels.channel_sums(dy2, ones)
        self.grads["gamma"][...] = cuda_kernels.channel_sums(dy2 * self.xhat, ones)
        xhat, self.xhat = self.xhat, None
        if not need_dx:
            return None
        scale = self.params["gamma"] * self.invstd
        if not self.batch_stats:  # eval mode: statistics are constants
            return (dy2 * scale).reshape(dy.shape)
        # d/dx of (x - mean(x)) / std(x), with both statistics depending on x.
        dx = cuda_kernels.batchnorm_backward(dy2, xhat, scale, self.grads["beta"] / max(m, 1),
                                             self.grads["gamma"] / max(m, 1))
        return dx.reshape(dy.shape)

    # The CPU path: the same maths in a few passes over (pixels, channels) rows, each
    # split over the CPU threads in cache-sized chunks: per-channel sums as GEMVs
    # (ones @ rows), accumulated in float64 and added in thread order; then one pass
    # that writes xhat and y (forward) or dx (backward).  ~10 full-array NumPy
    # passes, each with a fresh temporary, become 2-3.

    def _channel_sums(self, rows, times=None, minus=None):
        """Per-channel float64 sums over `rows` of rows, (rows - minus)**2 or rows * times."""
        c = self.c
        if rows.shape[0] == 0:
            return np.zeros(c)
        ranges = threads.plan(rows.shape[0], 2 * rows.nbytes)
        partial = np.zeros((len(ranges), c))

        def part(i, start, stop):
            ones = np.ones(min(stop - start, max(1, kernels.L2_BYTES // (4 * c * rows.itemsize))), rows.dtype)
            tmp = np.empty((ones.size, c), rows.dtype)
            for a in range(start, stop, ones.size):
                b = min(stop, a + ones.size)
                block = rows[a:b]
                if minus is not None:
                    block = np.subtract(block, minus, out=tmp[:b - a])
                    block *= block
                elif times is not None:
                    block = np.multiply(block, times[a:b], out=tmp[:b - a])
                partial[i] += ones[:b - a] @ block
        threads.run(ranges, part)
        return partial.sum(axis=0)

    def _forward_cpu(self, x, train):
        x2 = x.reshape(-1, self.c)
        m = x2.shape[0]

        def batch_statistics():  # two passes: the variance about the mean, not E[x^2] - mean^2
            mean = self._channel_sums(x2) / m
            return mean, self._channel_sums(x2, minus=mean.astype(x.dtype)) / m
        mean, var = self._statistics(train, m, batch_statistics)
        self.batch_stats = train
        self.invstd = (1.0 / np.sqrt(var + self.eps)).astype(x.dtype)
        mean = np.asarray(mean, dtype=x.dtype)
        self.xhat = self.scratch.get("xhat", x2.shape, x.dtype, np) if train else np.empty_like(x2)
        # C-contiguous, so that y2 below is a view of y (empty_like would keep a transposed x's layout).
        y = self.scratch.output("y", x.shape, x.dtype, np) if train else np.empty(x.shape, x.dtype)
        y2, xhat, gamma, beta = y.reshape(-1, self.c), self.xhat, self.params["gamma"], self.params["beta"]

        def normalise(_, a, b):
            np.subtract(x2[a:b], mean, out=xhat[a:b])
            xhat[a:b] *= self.invstd
            np.multiply(xhat[a:b], gamma, out=y2[a:b])
            y2[a:b] += beta
        threads.parallel(m, normalise, 4 * x.nbytes)
        return y

    def _backward_cpu(self, dy, need_dx):
        dy2, xhat = dy.reshape(-1, self.c), self.xhat
        m = dy2.shape[0]
        dbeta, dgamma = self._channel_sums(dy2), self._channel_sums(dy2, times=xhat)
        self.grads["beta"][...] = dbeta
        self.grads["gamma"][...] = dgamma
        if not need_dx:
            self.xhat = None
            return None
        dtype = dy.dtype.type
        scale = self.params["gamma"] * self.invstd
        # d/dx of (x - mean(x)) / std(x), both statistics depending on x (train),
        # or constants (eval): gamma invstd (dy - mean(dy) - xhat mean(dy xhat)).
        shift, slope = (dtype(0), dtype(0)) if not self.batch_stats else \
            ((dbeta / max(m, 1)).astype(dtype), (dgamma / max(m, 1)).astype(dtype))
        dx = self.scratch.output("dx", dy.shape, dy.dtype, np)
        dx2 = dx.reshape(-1, self.c)

        def input_grad(_, a, b):
            np.multiply(xhat[a:b], slope, out=dx2[a:b])
            dx2[a:b] += shift
            np.subtract(dy2[a:b], dx2[a:b], out=dx2[a:b])
            dx2[a:b] *= scale
        threads.parallel(m, input_grad, 3 * dy.nbytes)
        self.xhat = None
        return dx


class ReLU(Layer):
    def forward(self, x, train=False):
        self.check_input(x)
        self.pos = x > 0
        return x * self.pos

    def backward(self, dy, need_dx=True):
        return dy * self.pos if need_dx else None


class LeakyReLU(Layer):
    def __init__(self, alpha: float = 0.01, name=None):
        super().__init__(name)
        self._remember(locals())
        self.alpha = float(alpha)

    def forward(self, x, train=False):
        self.check_input(x)
        xp = self.xp
        if not 0.0 <= self.alpha <= 1.0:
            self.slope = xp.where(x > 0, self.dtype(1.0), self.dtype(self.alpha))
            return x * self.slope
        if not train:
            y, self.slope = kernels.leaky_relu(x, self.alpha)
            return y
        # The slope is kept until backward only: one buffer serves every step.
        y, self.slope = kernels.leaky_relu(x, self.alpha, self.scratch.get("slope", x.shape, x.dtype, xp),
                                           self.scratch.output("out", x.shape, x.dtype, xp))
        return y

    def backward(self, dy, need_dx=True):
        if not need_dx:
            return None
        # Same shape as the forward output, which nobody holds by now: one buffer for both.
        return kernels.multiply_into(dy, self.slope, self.scratch.output("out", dy.shape, dy.dtype, self.xp))


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


class SoftmaxCrossEntropy:
    """Fused softmax + categorical cross-entropy on logits.

    ``forward(logits, labels)`` returns the mean loss over the batch as a 0-d
    device array (no host sync); ``backward()`` returns dL/dlogits =
    (softmax - target) / batch.  With label smoothing eps the target is
    (1 - eps) * one_hot + eps / classes.

    Knowledge distillation (Hinton et al. 2015): given ``teacher_logits``, the
    loss is (1 - w) * the above + w * T^2 * KL(softmax(teacher / T) ||
    softmax(logits / T)), w = ``distill_weight``, T = ``temperature``; the T^2
    keeps the soft term's gradient, w * T * (softmax(logits / T) -
    softmax(teacher / T)) / batch, on the scale of the hard one.
    """

    def __init__(self, label_smoothing: float = 0.0, distill_weight: float = 0.0, temperature: float = 1.0):
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if not 0.0 <= distill_weight <= 1.0:
            raise ValueError(f"distill_weight must be in [0, 1], got {distill_weight}")
        if not temperature > 0.0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.eps = float(label_smoothing)
        self.distill_weight = float(distill_weight)
        self.temperature = float(temperature)
        self.soft = None

    def forward(self, logits, labels, teacher_logits=None):
        xp = _xp_of(logits)
        if logits.ndim != 2:
            raise ValueError(f"SoftmaxCrossEntropy: expected logits of shape (batch, classes), got {logits.shape}")
        if labels.shape != (logits.shape[0],):
            raise ValueError(f"SoftmaxCrossEntropy: expected labels of shape ({logits.shape[0]},), got {labels.shape}")
        logp = _log_softmax(xp, logits)
        self.probs = xp.exp(logp)
        self.labels = labels
        picked = xp.take_along_axis(logp, labels[:, None].astype(np.int64), axis=1)[:, 0]
        nll = -picked
        if self.eps:
            nll = (1.0 - self.eps) * nll - self.eps * logp.mean(axis=1)
        self.soft = None
        if teacher_logits is None or not self.distill_weight:
            return nll.mean()
        if teacher_logits.shape != logits.shape:
            raise ValueError(f"SoftmaxCrossEntropy: teacher logits of shape {teacher_logits.shape}, "
                             f"expected {logits.shape}")
        t, w = self.temperature, self.distill_weight
        log_q = _log_softmax(xp, teacher_logits / t)
        log_p = _log_softmax(xp, logits / t)
        q = xp.exp(log_q)
        self.soft = (xp.exp(log_p), q)
        kl = (q * (log_q - log_p)).sum(axis=1)
        return (1.0 - w) * nll.mean() + (w * t * t) * kl.mean()

    def backward(self):
        xp = _xp_of(self.probs)
        n, k = self.probs.shape
        d = self.probs.copy()
        if self.eps:
            d -= self.eps / k
        rows = xp.arange(n)
        d[rows, self.labels] -= 1.0 - self.eps
        if self.soft is not None:
            p_t, q = self.soft
            d *= 1.0 - self.distill_weight
            d += (self.distill_weight * self.temperature) * (p_t - q)
        d /= n
        return d


def _log_softmax(xp, logits):
    shifted = logits - logits.max(axis=1, keepdims=True)  # exp never overflows
    return shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))


def _xp_of(a):
    from .backend import array_module
    return array_module(a)
