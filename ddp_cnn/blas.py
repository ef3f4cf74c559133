"""Which BLAS runs the CPU GEMMs: NumPy's own (OpenBLAS in the PyPI wheels) or Intel MKL.

``--blas mkl`` sends the layers' float32/float64 GEMMs on NumPy arrays to
MKL's ``cblas_?gemm`` (the ``mkl`` wheel from PyPI, ``pip install
ddp_cnn[mkl]``), called through ctypes, which releases the GIL as NumPy does.
On the project's Intel VM a fmnist-cnn training step ran 1.07-1.16x faster
with it (bench/RESULTS.md): MKL runs the narrow convolution GEMMs (N = 64) at
1.1-1.4x OpenBLAS's rate.  MKL is set to its sequential layer: the cores are
used by ddp_cnn's own threads (:mod:`ddp_cnn.threads`), each GEMM runs in
the thread that calls it, and ``--threads 1`` means one core.  It is also
set to 32-bit integers (LP64, what the ctypes signatures say) and to
conditional numerical reproducibility (CBWR auto), so a result does not
depend on the operands' memory alignment and runs stay deterministic.

Anything MKL cannot take as is (CuPy arrays, other dtypes, a vector, a
layout BLAS cannot read without a copy, overlapping output) goes to
``np.matmul``, so the choice changes speed and rounding, never results'
shape or meaning.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata

import numpy as np

from .backend import array_module

CHOICES = ("numpy", "mkl")

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
_SEQUENTIAL, _LP64, _CBWR_AUTO, _CBWR_SUCCESS = 1, 0, 2, 0  # mkl_service.h
_INT_LIMIT = 2**31  # sizes and leading dimensions are C ints (LP64)

_gemm: dict = {}  # dtype -> cblas_?gemm of the loaded MKL; empty: NumPy's matmul for everything
_name = "numpy"


def find_mkl() -> str | None:
    """Path of libmkl_rt: from the installed ``mkl`` distribution, else the linker's search path."""
    try:
        for file in importlib.metadata.distribution("mkl").files or []:
            if file.name.startswith("libmkl_rt."):
                return str(file.locate())
    except importlib.metadata.PackageNotFoundError:
        pass
    return ctypes.util.find_library("mkl_rt")


def _load_mkl() -> dict:
    path = find_mkl()
    if path is None:
        raise RuntimeError("--blas mkl: libmkl_rt not found; install it with `pip install mkl` "
                           "(or ddp_cnn[mkl]), or use --blas numpy")
    try:
        lib = ctypes.CDLL(path)
        # Each setting is refused once MKL has run in this process (say, NumPy built on it).
        settings = {"LP64 interface": lib.MKL_Set_Interface_Layer(_LP64) == _LP64,
                    "sequential threading": lib.MKL_Set_Threading_Layer(_SEQUENTIAL) == _SEQUENTIAL,
                    "CBWR auto": lib.MKL_CBWR_Set(_CBWR_AUTO) == _CBWR_SUCCESS}
    except (OSError, AttributeError) as error:
        raise RuntimeError(f"--blas mkl: cannot load {path}: {error}") from None
    refused = [name for name, ok in settings.items() if not ok]
    if refused:
        raise RuntimeError(f"--blas mkl: {path} refused {', '.join(refused)} (MKL already in use in this "
                           "process?); use --blas numpy")
    gemms = {}
    for dtype, fn, scalar in ((np.float32, lib.cblas_sgemm, ctypes.c_float),
                              (np.float64, lib.cblas_dgemm, ctypes.c_double)):
        i, p = ctypes.c_int, ctypes.c_void_p
        fn.argtypes = [i, i, i, i, i, i, scalar, p, i, p, i, scalar, p, i]
        fn.restype = None
        gemms[np.dtype(dtype)] = fn
    return gemms


def use(name: str) -> None:
    """Select the BLAS for the CPU GEMMs: ``numpy`` or ``mkl`` (loaded on first use)."""
    global _gemm, _name
    if name not in CHOICES:
        raise ValueError(f"--blas: expected one of {'|'.join(CHOICES)}, got {name!r}")
    _gemm = _load_mkl() if name == "mkl" else {}
    _name = name


def current() -> str:
    return _name


def _operand(a: np.ndarray):
    """(transpose flag, leading dimension) for a 2-D array BLAS reads in place, else None."""
    size = a.itemsize
    (rows, cols), (s0, s1) = a.shape, a.strides
    if s1 == size and s0 % size == 0 and s0 >= cols * size:
        return _NO_TRANS, s0 // size
    if s0 == size and s1 % size == 0 and s1 >= rows * size:
        return _TRANS, s1 // size
    return None


def _mkl_2d(fn, a, b, out) -> bool:
    """out = a @ b through MKL when every operand's layout allows it; whether it did."""
    (m, k), n = a.shape, b.shape[1]
    size, ldc = out.itemsize, out.strides[0]
    if min(m, n, k) == 0 or out.strides[1] != size or ldc % size or ldc < n * size:
        return False
    layout_a, layout_b = _operand(a), _operand(b)
    if layout_a is None or layout_b is None or max(m, n, k, layout_a[1], layout_b[1], ldc // size) >= _INT_LIMIT:
        return False
    fn(_ROW_MAJOR, layout_a[0], layout_b[0], m, n, k, 1.0, a.ctypes.data, layout_a[1],
       b.ctypes.data, layout_b[1], 0.0, out.ctypes.data, ldc // size)
    return True


def matmul(a, b, out):
    """``np.matmul(a, b, out=out)``, by MKL where it applies; returns `out`.

    MKL takes 2-D @ 2-D, and 2-D @ 3-D (a stack of right-hand sides: one GEMM
    each), when all three arrays are NumPy arrays of one dtype.
    """
    fn = _gemm.get(out.dtype) if _gemm and type(out) is np.ndarray and out.flags.writeable else None
    if (fn is not None and type(a) is np.ndarray and type(b) is np.ndarray and a.dtype == b.dtype == out.dtype
            and a.ndim == 2 and out.shape == b.shape[:-2] + (a.shape[0], b.shape[-1]) and b.ndim in (2, 3)
            and a.shape[1] == b.shape[-2]
            and not np.may_share_memory(out, a) and not np.may_share_memory(out, b)):
        if b.ndim == 2 and _mkl_2d(fn, a, b, out):
            return out
        if b.ndim == 3:
            for i in range(b.shape[0]):
                if not _mkl_2d(fn, a, b[i], out[i]):
                    np.matmul(a, b[i], out=out[i])
            return out
    return array_module(a).matmul(a, b, out=out)
