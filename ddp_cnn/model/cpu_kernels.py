"""Compiled CPU twins of the memory-bound passes (Numba), beside the NumPy reference.

Why: on the CPU a step is the convolutions' GEMMs (BLAS, on every core) plus
a dozen memory-bound passes that NumPy runs one operation at a time on one
core: LeakyReLU, max pooling, dropout, im2col, col2im, Adam.  Each kernel
here does one such pass in one sweep over memory, split over the cores
(``prange`` over images or over slices of the flat buffer).  The convolution's
and Dense's compiled twins, GEMMs one per core, are :mod:`ddp_cnn.model.cpu_gemm`.

The elementwise kernels compute the same IEEE operations in the same order
as their NumPy twins (no fastmath, no reassociation), so their results are
bitwise equal.  tests/test_cpu_kernels.py checks each pair in float64 and
float32.

Which path runs: ``DDP_CNN_CPU_KERNELS=jit`` (the default when Numba is
installed) or ``numpy`` (the reference, and what runs without Numba).
Layers ask :func:`active` once, when they are built.  Compiled code is
cached on disk (``cache=True``): the first step of the first run pays the
compilation, later runs load it.
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ddp_cnn.model import kernels
from ddp_cnn.system.backend import CPU_KERNELS_ENV as ENV
from ddp_cnn.system.backend import CPU_KERNEL_CHOICES as CHOICES  # noqa: F401
from ddp_cnn.system.backend import cpu_kernel_mode as mode

try:  # Numba compiles the kernels; its np.dot calls SciPy's BLAS; threadpoolctl sizes that BLAS.
    import numba
    import scipy.linalg.cython_blas  # noqa: F401
    import threadpoolctl
    from numba import njit, prange
except ImportError:  # the NumPy path runs
    numba = None


_warned = False


def active() -> bool:
    """Whether the layers' CPU paths use the compiled kernels (asked once per layer, at build)."""
    global _warned
    if mode() == "numpy":
        return False
    if numba is None:
        if not _warned and ENV in os.environ:
            warnings.warn(f"{ENV}=jit but numba, scipy or threadpoolctl is missing: the NumPy kernels run",
                          RuntimeWarning,
                          stacklevel=2)
            _warned = True
        return False
    return True


def _threads() -> int:
    """The rank's share of the cores, as ddp_cnn/__init__ gave BLAS (OMP_NUM_THREADS), else every core."""
    for var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return os.cpu_count() or 1


def _one_thread_for_scipy_blas() -> None:
    """The GEMMs inside the kernels run one per thread: SciPy's BLAS (which numba's np.dot
    calls) must not start threads of its own under them.  NumPy's BLAS, when it is
    another library, keeps its threads for the NumPy code that calls it (BatchNorm's sums,
    the NumPy path); when SciPy shares NumPy's BLAS it is left alone."""
    controller = threadpoolctl.ThreadpoolController()
    scipy_libs = [lib.filepath for lib in controller.lib_controllers
                  if lib.user_api == "blas" and ("scipy.libs" in lib.filepath or "/scipy/" in lib.filepath)]
    if scipy_libs:
        controller.select(filepath=scipy_libs).limit(limits=1)


# Below this many elements an elementwise pass runs on the calling thread:
# waking the other threads would cost more than the pass.
PARALLEL_MIN = 1 << 17

if numba is not None:
    numba.set_num_threads(max(1, min(_threads(), numba.config.NUMBA_NUM_THREADS)))
    _one_thread_for_scipy_blas()
    _jit = njit(cache=True, nogil=True, parallel=True)

    # ---- activations -----------------------------------------------------------

    @_jit
    def _leaky_forward(x, alpha, y):
        if x.size < PARALLEL_MIN:
            for i in range(x.size):
                y[i] = x[i] if x[i] > 0 else x[i] * alpha
            return
        for i in prange(x.size):
            y[i] = x[i] if x[i] > 0 else x[i] * alpha

    @_jit
    def _leaky_backward(x, dy, alpha, dx):
        if x.size < PARALLEL_MIN:
            for i in range(x.size):
                dx[i] = dy[i] if x[i] > 0 else dy[i] * alpha
            return
        for i in prange(x.size):
            dx[i] = dy[i] if x[i] > 0 else dy[i] * alpha

    # ---- dropout ----------------------------------------------------------------

    @_jit
    def _dropout_apply(x, u, keep, scale, y):
        zero = scale - scale
        if x.size < PARALLEL_MIN:
            for i in range(x.size):
                y[i] = x[i] * (scale if u[i] < keep else zero)
            return
        for i in prange(x.size):
            y[i] = x[i] * (scale if u[i] < keep else zero)

    # ---- max/min pooling over exact tiles ---------------------------------------

    @_jit
    def _pool_tiles_forward(x, kh, kw, is_max, y, arg):
        n, oh, ow, c = y.shape
        for b in prange(n):
            for i in range(oh):
                for j in range(ow):
                    # Window position by position, channels innermost: contiguous runs that vectorise.
                    for ch in range(c):
                        y[b, i, j, ch] = x[b, i * kh, j * kw, ch]
                        arg[b, i, j, ch] = 0
                    for k in range(1, kh * kw):
                        p, q = i * kh + k // kw, j * kw + k % kw
                        for ch in range(c):
                            v = x[b, p, q, ch]
                            if (v > y[b, i, j, ch]) if is_max else (v < y[b, i, j, ch]):
                                y[b, i, j, ch] = v
                                arg[b, i, j, ch] = k

    @_jit
    def _pool_tiles_backward(dy, arg, kh, kw, one, zero, dx):
        n, oh, ow, c = dy.shape
        for b in prange(n):
            for i in range(oh):
                for p in range(kh):
                    for j in range(ow):
                        for q in range(kw):
                            k = p * kw + q
                            for ch in range(c):
                                hit = one if arg[b, i, j, ch] == k else zero
                                dx[b, i * kh + p, j * kw + q, ch] = dy[b, i, j, ch] * hit

    # ---- Adam ---------------------------------------------------------------------

    @_jit
    def _adam(p, g, m, v, b1, c1, b2, c2, step, eps_hat):
        for i in prange(p.size):
            gi = g[i]
            mi = m[i] * b1 + gi * c1
            vi = v[i] * b2 + (gi * gi) * c2
            m[i] = mi
            v[i] = vi
            p[i] -= (mi / (np.sqrt(vi) + eps_hat)) * step


def _flat(a):
    """A 1-D view of a C-contiguous array (never a copy: the kernels write through it)."""
    if not a.flags.c_contiguous:
        raise ValueError("cpu_kernels: expected a C-contiguous array")
    return a.reshape(-1)


def leaky_relu_forward(x, alpha: float, y):
    """y = x where x > 0, else alpha * x (any alpha); into `y`, returns it.
    Twin: kernels.leaky_relu (whose y is x * slope, slope exactly 1 or alpha)."""
    _leaky_forward(_flat(x), x.dtype.type(alpha), _flat(y))
    return y


def leaky_relu_backward(x, dy, alpha: float, dx):
    """dx = dy where x > 0, else alpha * dy; into `dx`, returns it (twin: dy * slope)."""
    _leaky_backward(_flat(x), _flat(dy), dy.dtype.type(alpha), _flat(dx))
    return dx


def dropout_apply(x, uniform, keep: float, y):
    """y = x * (1/keep if uniform < keep else 0), into `y`; the mask is never stored.

    Twin: kernels.dropout_mask's ``less(uniform, keep) * scale`` times x.  The
    comparison is in float32, as NumPy makes it (the Python float `keep`
    becomes a float32, as NEP 50 casts a weak scalar to the array's type).
    """
    scale = x.dtype.type(1.0 / keep)
    _dropout_apply(_flat(x), _flat(uniform), np.float32(keep), scale, _flat(y))
    return y


_draw_pool = None


def uniform_draw(shape, key: tuple, offset: int, out):
    """kernels.uniform_draw split over the cores, into `out`: part i continues the one stream
    at its own offset (PCG64 jumps ahead), so the values are bitwise those of a single draw;
    NumPy fills each part without holding the GIL."""
    global _draw_pool
    threads = numba.get_num_threads()
    flat = out.reshape(-1)
    if threads < 2 or flat.size < PARALLEL_MIN:
        return kernels.uniform_draw(shape, key, offset, out)
    if _draw_pool is None:
        _draw_pool = ThreadPoolExecutor(numba.config.NUMBA_NUM_THREADS, thread_name_prefix="ddp_cnn-draw")
    cuts = [flat.size * i // threads for i in range(threads + 1)]

    def part(i):
        a, b = cuts[i], cuts[i + 1]
        kernels.uniform_draw(b - a, key, offset + a, flat[a:b])

    list(_draw_pool.map(part, range(threads)))
    return out


def pool_tiles_forward(x, kh: int, kw: int, mode: str, y, arg):
    """Twin of kernels.pool_tiles_forward (ties keep the earlier position); returns (y, arg)."""
    _pool_tiles_forward(x, kh, kw, mode == "max", y, arg)
    return y, arg


def pool_tiles_backward(dy, arg, kh: int, kw: int, dx):
    """Twin of kernels.pool_tiles_backward: every element of `dx` written once; returns dx."""
    t = dy.dtype.type
    _pool_tiles_backward(dy, arg, kh, kw, t(1), t(0), dx)
    return dx


def adam_update(params, grads, m, v, beta1, beta2, step, eps_hat):
    """One pass of Adam over the flat buffers, in place: the operations of optim.Adam._adam_cpu."""
    t = params.dtype.type
    _adam(_flat(params), _flat(grads), _flat(m), _flat(v), t(beta1), t(1 - beta1), t(beta2), t(1 - beta2),
          t(step), t(eps_hat))
