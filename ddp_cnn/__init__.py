"""ddp_cnn: data-parallel CNN training with from-scratch layers on NumPy/CuPy over MPI."""
import os as _os
import sys as _sys

__version__ = "0.1.0"

_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
_LOCAL_SIZE_VARS = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "PMIX_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE")


def _default_blas_threads() -> None:
    """Split the node's cores between the ranks on it, unless the user chose.

    Each rank's BLAS otherwise starts one thread per core: 4 ranks on 2 cores
    then ran 10x slower (503 vs 5054 img/s, lenet).  Must run before NumPy
    is imported, which reads these variables once.
    """
    if "numpy" in _sys.modules or any(v in _os.environ for v in _THREAD_VARS):
        return
    for var in _LOCAL_SIZE_VARS:
        value = _os.environ.get(var, "").split("(")[0]
        if value.isdigit() and int(value) > 0:
            threads = str(max(1, (_os.cpu_count() or 1) // int(value)))
            for name in _THREAD_VARS:
                _os.environ[name] = threads
            return


_default_blas_threads()


def __getattr__(name):
    """``ddp_cnn.Trainer``, ``ddp_cnn.TrainConfig`` and the modules ``ddp_cnn.comm`` and ``ddp_cnn.layers``
    (``from ddp_cnn import comm, layers as L``), imported on first use (they bring NumPy and h5py)."""
    if name in ("comm", "layers"):
        import importlib
        return importlib.import_module({"comm": "ddp_cnn.dist.comm", "layers": "ddp_cnn.model.layers"}[name])
    if name == "Trainer":
        from ddp_cnn.run.trainer import Trainer
        return Trainer
    if name == "TrainConfig":
        from ddp_cnn.run.config import TrainConfig
        return TrainConfig
    raise AttributeError(f"module 'ddp_cnn' has no attribute {name!r}")
