"""What the MPI launcher's environment says about this process, read before MPI starts (so that a
failure policy can ask it without importing a communicator)."""
from __future__ import annotations

import os
import socket
import sys

_MPI_ENV_VARS = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MPI_LOCALRANKID")


def hostname() -> str:
    """This node's name (ranks with the same name share a node and its GPUs)."""
    return socket.gethostname()


def launched_by_mpi() -> bool:
    """True when an MPI launcher started this process (even if mpi4py is missing)."""
    return any(v in os.environ for v in _MPI_ENV_VARS)


def die_with_launcher() -> None:
    """Linux: this process gets SIGKILL when its parent (the launcher's proxy) ends.

    After an abort the launcher sends SIGTERM, which a stopped (SIGSTOP) or
    wedged rank never acts on; without this it would outlive the job as an
    orphan.  SIGKILL is delivered even to a stopped process.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal
    try:
        if ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
            return  # not fatal: the launcher's own clean-up still applies
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the launcher's proxy died before we asked: nobody will send the signal
        os._exit(1)


def launcher_rank() -> int | None:
    """This process's rank as the MPI launcher set it in the environment (before MPI starts), or None."""
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return None
