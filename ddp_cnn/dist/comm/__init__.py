"""Communicators: who am I, and how gradients and metrics are summed over ranks.

One interface (:class:`Communicator`), three transports: one process
(:class:`SingleComm`), MPI with host staging (:class:`MPIComm`), NCCL between
GPUs (:class:`NCCLComm`).  :func:`create` starts the world (single or MPI)
before any GPU is touched, since the node-local rank picks the GPU (what the
launcher says of this process: :mod:`ddp_cnn.dist.launcher`);
:func:`for_device` then chooses the gradient transport for the bound device
and says why.  No mpi4py call lives outside this package.
"""
from __future__ import annotations

from ddp_cnn.dist.comm.base import CollectiveTimeout, Communicator, DoneHandle, Handle
from ddp_cnn.dist.comm.single import SingleComm
from ddp_cnn.dist.launcher import die_with_launcher, hostname, launched_by_mpi, launcher_rank  # noqa: F401

KINDS = ("auto", "single", "mpi", "nccl")
_world: Communicator | None = None


def create(kind: str = "auto") -> Communicator:
    """The world communicator of this process: ``single`` (no MPI) or MPI.

    ``auto``, ``mpi`` and ``nccl`` start MPI when mpi4py imports; ``auto``
    falls back to one process when it does not and no launcher started us.
    """
    if kind not in KINDS:
        raise ValueError(f"--comm: expected one of {'|'.join(KINDS)}, got {kind!r}")
    global _world
    if kind == "single":
        return SingleComm()
    if _world is not None:  # MPI is started once per process: every caller shares its world
        return _world
    try:
        from mpi4py import MPI  # noqa: F401  (starts MPI)
    except ImportError as exc:
        if kind != "auto" or launched_by_mpi():
            raise RuntimeError(f"--comm {kind}: mpi4py with an MPI library is needed ({exc}); "
                               "install it with `pip install mpi4py mpich` or use --comm single") from exc
        return SingleComm()
    from ddp_cnn.dist.comm.mpi import MPIComm
    if launched_by_mpi():
        die_with_launcher()
    _world = MPIComm()
    return _world


def _have_nccl() -> bool:
    try:
        from cupy.cuda import nccl  # noqa: F401
        return True
    except Exception:
        return False


def for_device(world: Communicator, backend, kind: str = "auto") -> tuple[Communicator, str]:
    """Collective: the gradient transport for ``backend`` and the reason, as (communicator, reason).

    NCCL when every rank owns a distinct GPU and CuPy has NCCL (``auto`` or
    ``nccl``), else ``world`` (MPI, host-staged from a GPU); one rank needs
    no transport (``SingleComm``).
    Raises ValueError (on every rank alike) when ``kind`` cannot be had.
    """
    if kind == "single" and world.size > 1:
        raise ValueError(f"--comm single: {world.size} ranks need a transport (auto, mpi or nccl)")
    if world.size == 1 and kind != "nccl":
        return SingleComm(), "one process"
    if kind == "mpi" or not backend.is_gpu:
        if kind == "nccl":
            raise ValueError("--comm nccl: needs --device gpu (NCCL runs between GPUs)")
        return world, "MPI" if kind == "mpi" else "MPI (CPU ranks)"
    owners = world.allgather_obj((hostname(), backend.device_id))
    distinct, have_nccl = len(set(owners)) == len(owners), _have_nccl()
    why_not = "CuPy has no NCCL" if not have_nccl else "ranks share GPUs, which NCCL cannot pair"
    if not (distinct and have_nccl):
        if kind == "nccl":
            raise ValueError(f"--comm nccl: {why_not}")
        return world, f"MPI with host staging: {why_not}"
    from ddp_cnn.dist.comm.nccl import NCCLComm
    return NCCLComm(world), "NCCL: every rank owns a distinct GPU"


def __getattr__(name):  # MPIComm and NCCLComm import mpi4py / CuPy only when asked for
    if name == "MPIComm":
        from ddp_cnn.dist.comm.mpi import MPIComm
        return MPIComm
    if name == "NCCLComm":
        from ddp_cnn.dist.comm.nccl import NCCLComm
        return NCCLComm
    raise AttributeError(name)


__all__ = ["launcher_rank", "Communicator", "Handle", "DoneHandle", "CollectiveTimeout", "SingleComm", "MPIComm", "NCCLComm",
           "create", "for_device", "hostname", "launched_by_mpi", "KINDS"]
