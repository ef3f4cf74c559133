"""Communicators: who am I, and how gradients and metrics are summed over ranks.

One small interface, three implementations (single process, MPI with host
staging, NCCL), chosen by :func:`create`.  Every method documented as
"collective" must be called by every rank in the same order.
"""
from __future__ import annotations

import os
import socket

import numpy as np

_MPI_ENV_VARS = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MPI_LOCALRANKID")


def hostname() -> str:
    """This node's name (ranks with the same name share a node and its GPUs)."""
    return socket.gethostname()


def launched_by_mpi() -> bool:
    """True when an MPI launcher started this process (even if mpi4py is missing)."""
    return any(v in os.environ for v in _MPI_ENV_VARS)


def _mpi():
    from mpi4py import MPI
    return MPI


_OPS = {"sum": "SUM", "min": "MIN", "max": "MAX"}


class SingleComm:
    """The one-process communicator: every collective is the identity."""

    name = "single"
    rank = 0
    size = 1
    local_rank = 0
    local_size = 1

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def allreduce_scalar(self, value, op: str = "sum"):
        """Collective: reduce one Python number over ranks with op in sum|min|max."""
        if op not in _OPS:
            raise ValueError(f"allreduce_scalar: op must be one of {sorted(_OPS)}, got {op!r}")
        return value

    def allreduce_host(self, array: np.ndarray, op: str = "sum") -> np.ndarray:
        """Collective: reduce a small host array (metrics, confusion matrix); returns a new array."""
        return np.array(array, copy=True)

    def bcast_obj(self, obj, root: int = 0):
        """Collective: rank root's picklable object, on every rank."""
        return obj

    def allgather_obj(self, obj) -> list:
        """Collective: the list of every rank's object, in rank order."""
        return [obj]

    def bcast_host(self, array: np.ndarray, root: int = 0) -> None:
        """Collective: overwrite a host array in place with rank root's."""

    def barrier(self) -> None:
        """Collective: wait until every rank gets here."""

    def abort(self, code: int = 1) -> None:
        os._exit(code)


class MPIComm(SingleComm):
    """MPI over mpi4py; all buffers handed to MPI live in host memory."""

    name = "mpi"

    def __init__(self, mpi_comm=None):
        MPI = _mpi()
        self.MPI = MPI
        self.comm = mpi_comm if mpi_comm is not None else MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        # Node-local rank picks the GPU: ranks sharing memory share a node.
        self.local_comm = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank = self.local_comm.Get_rank()
        self.local_size = self.local_comm.Get_size()

    def _op(self, op):
        if op not in _OPS:
            raise ValueError(f"allreduce: op must be one of {sorted(_OPS)}, got {op!r}")
        return getattr(self.MPI, _OPS[op])

    def allreduce_scalar(self, value, op: str = "sum"):
        return self.comm.allreduce(value, op=self._op(op))

    def allreduce_host(self, array, op="sum"):
        src = np.ascontiguousarray(array)
        out = np.empty_like(src)
        self.comm.Allreduce(src, out, op=self._op(op))
        return out

    def bcast_obj(self, obj, root=0):
        return self.comm.bcast(obj, root=root)

    def allgather_obj(self, obj):
        return self.comm.allgather(obj)

    def bcast_host(self, array, root=0):
        if not array.flags.c_contiguous:
            raise ValueError("bcast_host: array must be C-contiguous")
        self.comm.Bcast(array, root=root)

    def barrier(self):
        self.comm.Barrier()

    def abort(self, code=1):
        self.comm.Abort(code)


def create(kind: str = "auto"):
    """The communicator for this process.

    kind: ``single`` (no MPI), ``mpi``, ``nccl`` or ``auto`` (MPI when launched
    by an MPI launcher or when mpi4py is importable; single otherwise).
    NCCL is attached later by :meth:`attach_device` once the GPU is bound.
    """
    if kind not in ("auto", "single", "mpi", "nccl"):
        raise ValueError(f"--comm: expected auto|single|mpi|nccl, got {kind!r}")
    if kind == "single":
        return SingleComm()
    try:
        _mpi()
    except ImportError as exc:
        if kind != "auto" or launched_by_mpi():
            raise RuntimeError(
                f"--comm {kind}: mpi4py with an MPI library is needed ({exc}); "
                "install it with `pip install mpi4py mpich` or use --comm single") from exc
        return SingleComm()
    comm = MPIComm()
    return comm
