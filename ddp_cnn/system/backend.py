"""Which array library runs the math (NumPy or CuPy), on which GPU, in which dtype.

Layers never import numpy or cupy for computation: they use ``xp`` from the
backend, so CPU and GPU share one code path.  Where a kernel really differs it
has twins: NumPy in :mod:`ddp_cnn.model.kernels`, CUDA in :mod:`ddp_cnn.model.cuda_kernels`, compiled
CPU in :mod:`ddp_cnn.model.cpu_kernels` and :mod:`ddp_cnn.model.cpu_gemm`.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np

try:  # CuPy is optional: CPU-only machines import everything without it.
    import cupy as _cupy
except Exception:  # ImportError, or a CUDA library that fails to load
    _cupy = None

DTYPES = {"float32": np.float32, "float64": np.float64}


def gpu_count() -> int:
    """Number of CUDA devices CuPy can see (0 without CuPy or a driver)."""
    if _cupy is None:
        return 0
    try:
        return _cupy.cuda.runtime.getDeviceCount()
    except Exception:
        return 0


def gpu_available() -> bool:
    return gpu_count() > 0


@dataclass
class Backend:
    """The array module, the device it computes on, and the float dtype."""

    xp: object
    dtype: type
    device_id: int | None = None  # CUDA device index, None on CPU

    @property
    def name(self) -> str:
        return "cpu" if self.device_id is None else f"gpu:{self.device_id}"

    @property
    def is_gpu(self) -> bool:
        """The one question layers ask to pick their CPU or GPU implementation (once, at build)."""
        return self.device_id is not None


def on_gpu(a) -> bool:
    """Whether `a`, an array or an array module, is CuPy's: the same question as
    :attr:`Backend.is_gpu`, for helpers that see only arrays."""
    return _cupy is not None and (a is _cupy or isinstance(a, _cupy.ndarray))


def to_host(a) -> np.ndarray:
    """Any array as a NumPy array (a device-to-host copy for a CuPy one)."""
    return _cupy.asnumpy(a) if on_gpu(a) else np.asarray(a)


def array_module(a):
    """numpy or cupy, whichever owns `a`."""
    return _cupy if on_gpu(a) else np


def get_backend(device: str = "auto", dtype: str = "float32", local_rank: int = 0,
                local_size: int = 1) -> Backend:
    """Pick and bind the compute device.

    device: ``cpu``, ``gpu`` (error if none) or ``auto`` (GPU when CuPy sees one).
    A rank binds GPU ``local_rank % device_count`` *before* any other CUDA work,
    so that no rank creates a context on GPU 0 by accident.  More ranks than
    GPUs on a node share GPUs, with a warning.  On the CPU, one process uses
    every core through the compiled kernels (cpu_kernels; ``DDP_CNN_CPU_KERNELS``
    is checked here) or BLAS's own threads on the NumPy path; ddp_cnn/__init__
    gives each rank of a node its share of the cores under mpirun.
    """
    if device not in ("auto", "cpu", "gpu"):
        raise ValueError(f"--device: expected auto|cpu|gpu, got {device!r}")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    n_gpus = 0 if device == "cpu" else gpu_count()
    if device == "gpu" and n_gpus == 0:
        reason = "CuPy is not installed" if _cupy is None else "CuPy sees no CUDA device"
        raise RuntimeError(f"--device gpu: {reason}; install cupy-cuda12x/cupy-cuda13x or use --device cpu")
    if n_gpus == 0:
        cpu_kernel_mode()  # a bad DDP_CNN_CPU_KERNELS is refused now, naming the variable
        return Backend(np, DTYPES[dtype], None)
    device_id = local_rank % n_gpus
    if local_size > n_gpus and local_rank < n_gpus:
        warnings.warn(f"{local_size} ranks on this node share {n_gpus} GPU(s)", RuntimeWarning, stacklevel=2)
    _cupy.cuda.Device(device_id).use()
    return Backend(_cupy, DTYPES[dtype], device_id)


CPU_KERNELS_ENV = "DDP_CNN_CPU_KERNELS"
CPU_KERNEL_CHOICES = ("jit", "numpy")


def cpu_kernel_mode() -> str:
    """``jit`` or ``numpy``: what the environment asks of the CPU kernels (ValueError on anything else).

    Read here, where the backend is chosen, so that a bad value is refused before anything runs."""
    value = os.environ.get(CPU_KERNELS_ENV, "jit").strip().lower() or "jit"
    if value not in CPU_KERNEL_CHOICES:
        raise ValueError(f"{CPU_KERNELS_ENV}: expected one of {'|'.join(CPU_KERNEL_CHOICES)}, got {value!r}")
    return value


def host_rng(*key: int) -> np.random.Generator:
    """A NumPy generator for one named stream, e.g. ``host_rng(seed, STREAM_INIT)``.

    Streams are derived from integer keys rather than carried as state, so a
    resumed run re-derives exactly the generator an uninterrupted run used.
    """
    return np.random.default_rng([int(k) for k in key])


# Stream identifiers: one per consumer of randomness, so no two consumers
# ever draw from the same sequence.
STREAM_INIT = 1
STREAM_DROPOUT = 2
