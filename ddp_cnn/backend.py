"""Which array library runs the math (NumPy or CuPy), on which GPU, in which dtype.

Layers never import numpy or cupy for computation: they use ``xp`` from the
backend, so CPU and GPU share one code path.  The few places where a GPU
kernel really differs live in :mod:`ddp_cnn.kernels`, beside their NumPy twins.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from . import threads as _threads

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
        return self.device_id is not None

    def asarray(self, a, dtype=None):
        """Host (or device) array to this backend's device, in `dtype` (default: the model dtype)."""
        return self.xp.asarray(a, dtype=self.dtype if dtype is None else dtype)

    def to_host(self, a) -> np.ndarray:
        """Any array to a NumPy array (a device-to-host copy on GPU)."""
        return to_host(a)

    def synchronize(self) -> None:
        if self.is_gpu:
            _cupy.cuda.get_current_stream().synchronize()


def to_host(a) -> np.ndarray:
    if _cupy is not None and isinstance(a, _cupy.ndarray):
        return _cupy.asnumpy(a)
    return np.asarray(a)


def array_module(a):
    """numpy or cupy, whichever owns `a`."""
    if _cupy is not None and isinstance(a, _cupy.ndarray):
        return _cupy
    return np


def get_backend(device: str = "auto", dtype: str = "float32", local_rank: int = 0,
                local_size: int = 1, threads: int | None = None) -> Backend:
    """Pick and bind the compute device.

    device: ``cpu``, ``gpu`` (error if none) or ``auto`` (GPU when CuPy sees one).
    A rank binds GPU ``local_rank % device_count`` *before* any other CUDA work,
    so that no rank creates a context on GPU 0 by accident.  More ranks than
    GPUs on a node share GPUs, with a warning.
    On the CPU, the layers split their work over `threads` threads (None: as
    configured before, else the cores of this rank; see :mod:`ddp_cnn.threads`).
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
        _threads.configure(threads)
        return Backend(np, DTYPES[dtype], None)
    device_id = local_rank % n_gpus
    if local_size > n_gpus and local_rank < n_gpus:
        warnings.warn(f"{local_size} ranks on this node share {n_gpus} GPU(s)", RuntimeWarning, stacklevel=2)
    _cupy.cuda.Device(device_id).use()
    return Backend(_cupy, DTYPES[dtype], device_id)


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
STREAM_DATA = 3
