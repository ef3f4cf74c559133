"""Conv2D: im2col + one GEMM forward; dW as one GEMM over the rows; dx by taps + col2im."""
from __future__ import annotations

import numpy as np

from ddp_cnn.model import cpu_gemm, cpu_kernels, kernels
from ddp_cnn.model.layers.base import Layer, ParamSpec, image_input, init_name


JIT_CHUNK_IMAGES = 8


class Conv2D(Layer):
    """2-D convolution as im2col + one GEMM; weights (KH, KW, C_in, F), bias (F,).

    CPU: im2col a cache-sized chunk of images at a time into one rows buffer
    kept for backward; dx tap by tap (one GEMM per kernel tap) and col2im.
    CPU with the compiled kernels (cpu_kernels.active()): the same chunks, each
    one task of im2col + GEMM + bias on one core, all cores at once.
    GPU: im2col and col2im are one CUDA kernel each (cuda_kernels).
    """

    def __init__(self, filters: int, kernel_size=3, stride: int = 1, padding="valid", bias: bool = True,
                 init: str | None = None, name=None):
        super().__init__(name)
        self._remember(locals())
        if int(filters) < 1:
            raise ValueError(f"Conv2D: filters must be >= 1, got {filters}")
        self.filters = int(filters)
        self.kh, self.kw = kernels.pair(kernel_size, "Conv2D: kernel_size")
        if self.kh < 1 or self.kw < 1 or int(stride) < 1:
            raise ValueError(f"Conv2D: kernel_size and stride must be >= 1, got {kernel_size}, {stride}")
        self.stride = int(stride)
        self.padding = padding
        self.use_bias = bias
        self.init = init_name(init, "he_normal")

    def _build(self, input_shape):
        h, w, self.cin = image_input(self, input_shape)
        self.pads = kernels.resolve_padding(self.padding, (h, w), (self.kh, self.kw), self.stride)
        (t, b), (l, r) = self.pads
        self.oh = kernels.conv_out_size(h, self.kh, self.stride, t, b)
        self.ow = kernels.conv_out_size(w, self.kw, self.stride, l, r)
        if self.oh < 1 or self.ow < 1:
            raise ValueError(f"layer {self.name!r}: a {self.kh}x{self.kw} kernel does not fit input {input_shape}")
        self.k = self.kh * self.kw * self.cin
        self.jit = not self.gpu and cpu_kernels.active()
        self._forward = self._forward_gpu if self.gpu else self._forward_jit if self.jit else self._forward_cpu
        self._input_grad = self._input_grad_gpu if self.gpu else self._input_grad_cpu
        return (self.oh, self.ow, self.filters)

    def param_specs(self):
        specs = [ParamSpec("W", (self.kh, self.kw, self.cin, self.filters), self.init,
                           self.k, self.kh * self.kw * self.filters, decay=True)]
        if self.use_bias:
            specs.append(ParamSpec("b", (self.filters,), "zeros"))
        return specs

    def forward(self, x, train=False):
        self.check_input(x)
        y = self._forward(x, train)
        return y.reshape(x.shape[0], self.oh, self.ow, self.filters)

    def _forward_cpu(self, x, train):
        """(N*OH*OW, F) outputs; self.cols keeps the im2col rows until backward."""
        n, per = x.shape[0], self.oh * self.ow
        xpad = x if self.pads == ((0, 0), (0, 0)) else \
            kernels.pad_nhwc(x, self.pads, out=self.buffer("xpad", self._padded(n), reuse=train))
        self.padded_shape = xpad.shape
        w = self.params["W"].reshape(self.k, self.filters)
        y = self.buffer("y", (n * per, self.filters), reuse=train)
        if self.cin == 1:
            # One channel: the rows are built transposed (kernels.im2col_t_into); cols
            # is then a transposed view, which both GEMMs take as is.
            cols_t = self.buffer("cols", (self.k, n * per), reuse=train)
            taps = cols_t.reshape(self.kh, self.kw, 1, n, self.oh, self.ow)
            self.cols = cols_t.T
        else:
            self.cols = self.buffer("cols", (n * per, self.k), reuse=train)
        # A few images at a time: the GEMM reads rows im2col has just written, and
        # the bias is added while the outputs are still in cache.
        for a, b in kernels.batch_chunks(n, per * self.k * x.dtype.itemsize):
            rows = slice(a * per, b * per)
            if self.cin == 1:
                kernels.im2col_t_into(xpad[a:b], self.kh, self.kw, self.stride, self.oh, self.ow, taps[:, :, :, a:b])
            else:
                kernels.im2col_into(xpad[a:b], self.kh, self.kw, self.stride, self.oh, self.ow, self.cols[rows])
            np.matmul(self.cols[rows], w, out=y[rows])
            if self.use_bias:
                y[rows] += self.params["b"]
        return y

    def _forward_jit(self, x, train):
        """cpu_gemm.conv_forward.  Keeps x (the previous layer's output, which nothing
        overwrites before this layer's backward), not the im2col rows: backward builds a
        chunk's rows again while they fit in cache, instead of reading them back from memory."""
        n, per = x.shape[0], self.oh * self.ow
        self.chunk = self._chunk(n)
        self.x = np.ascontiguousarray(x)
        y = self.buffer("y", (n * per, self.filters), reuse=train)
        cpu_gemm.conv_forward(self.x, self.params["W"].reshape(self.k, self.filters),
                                 self.params["b"] if self.use_bias else None, self.kh, self.kw, self.stride,
                                 self.pads, self.oh, self.ow, self.chunk, y)
        return y

    def _backward_jit(self, dy2, need_dx):
        """cpu_gemm.conv_backward: dW, db and dx chunk by chunk, on every core."""
        n = dy2.shape[0] // (self.oh * self.ow)
        w_t = self.buffer("w_t", (self.filters, self.k))
        w_t[...] = self.params["W"].reshape(self.k, self.filters).T
        dx = self.buffer("dx", (n,) + self.input_shape) if need_dx else None
        cpu_gemm.conv_backward(self.x, self.xp.ascontiguousarray(dy2), w_t, self.kh, self.kw, self.stride,
                                  self.pads, self.oh, self.ow, self.chunk,
                                  self.grads["W"].reshape(self.k, self.filters),
                                  self.grads["b"] if self.use_bias else None, dx)
        self.x = None
        return dx

    def _chunk(self, n):
        """Images per task: as many as keep a task's rows in cache, at most JIT_CHUNK_IMAGES so
        that small batches still make a task per core (fixed by the shapes, not by the thread
        count, so the per-chunk sums of dW are the same on any machine)."""
        a, b = kernels.batch_chunks(n, self.oh * self.ow * self.k * np.dtype(self.dtype).itemsize)[0]
        return min(b - a, JIT_CHUNK_IMAGES)

    def _padded(self, n):
        (t, b), (l, r) = self.pads
        h, w, c = self.input_shape
        return (n, h + t + b, w + l + r, c)

    def _forward_gpu(self, x, train):
        """im2col as one kernel reading the unpadded input (cuda_kernels), then one GEMM."""
        from ddp_cnn.model import cuda_kernels
        self.cols = cuda_kernels.im2col(x, self.kh, self.kw, self.stride, self.pads, self.oh, self.ow)
        y = self.xp.matmul(self.cols, self.params["W"].reshape(self.k, self.filters))
        if self.use_bias:
            y += self.params["b"]
        return y

    def backward(self, dy, need_dx=True):
        xp = self.xp
        dy2 = dy.reshape(-1, self.filters)
        if self.jit:
            return self._backward_jit(dy2, need_dx)
        # cols.T is a transposed view: BLAS reads it as is, no copy.
        xp.matmul(self.cols.T, dy2, out=self.grads["W"].reshape(self.k, self.filters))
        if self.use_bias:
            xp.matmul(self.scratch.ones("ones", dy2.shape[0], dy2.dtype, xp), dy2, out=self.grads["b"])
        self.cols = None
        return self._input_grad(dy2) if need_dx else None

    def _input_grad_gpu(self, dy2):
        """One GEMM, then one gathering col2im kernel."""
        from ddp_cnn.model import cuda_kernels
        dcols = self.xp.matmul(dy2, self.params["W"].reshape(self.k, self.filters).T)
        n = dy2.shape[0] // (self.oh * self.ow)
        return cuda_kernels.col2im(dcols, (n,) + self.input_shape, self.kh, self.kw, self.stride, self.pads,
                                   self.oh, self.ow)

    def _input_grad_cpu(self, dy2):
        """dcols tap by tap, (KH*KW, M, C), so each col2im add streams over contiguous
        rows; a few images at a time, so the taps are still in cache when they are
        added (2.2x faster than one dcols GEMM + col2im).  With stride 1 the dy rows
        are first padded with zeros to the padded width, which makes each add one
        run per image (kernels.col2im_taps_wide).  (Tried: dx as a convolution of the
        zero-padded dy with the flipped kernel, im2col + one GEMM: 1.2x slower on
        both of fmnist-cnn's convs.)"""
        kk, per, itemsize = self.kh * self.kw, self.oh * self.ow, dy2.dtype.itemsize
        n, _, wp, _ = self.padded_shape
        wide = self.stride == 1
        w_taps = self.buffer("w_taps", (kk, self.filters, self.cin))
        w_taps[...] = self.params["W"].reshape(kk, self.cin, self.filters).transpose(0, 2, 1)
        dy4 = dy2.reshape(n, self.oh, self.ow, self.filters)
        dxpad = self.buffer("dx", self.padded_shape)
        dxpad.fill(0)
        for a, b in kernels.batch_chunks(n, kk * self.oh * (wp if wide else self.ow) * self.cin * itemsize):
            rows = dy2[a * per:b * per]
            if wide:
                dy_wide = self.buffer("dy_wide", (b - a, self.oh, wp, self.filters))
                dy_wide[:, :, self.ow:, :] = 0
                dy_wide[:, :, :self.ow, :] = dy4[a:b]
                rows = dy_wide.reshape(-1, self.filters)
            taps = np.matmul(rows, w_taps, out=self.buffer("taps", (kk, rows.shape[0], self.cin)))
            if wide:
                kernels.col2im_taps_wide(taps, dxpad[a:b], self.kh, self.kw, self.oh)
            else:
                kernels.col2im_taps(taps, (b - a,) + self.padded_shape[1:], self.kh, self.kw, self.stride,
                                    self.oh, self.ow, out=dxpad[a:b])
        return kernels.unpad_nhwc(dxpad, self.pads)

    def flops(self):
        return 2 * self.oh * self.ow * self.k * self.filters
