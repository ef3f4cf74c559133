"""The system's Open MPI (Debian's openmpi-bin and libopenmpi-dev) for the tests that run on it.

mpi4py's PyPI wheel carries extensions for both MPICH's and Open MPI's ABI and loads whichever
libmpi it finds first.  A venv does not keep the `mpich` wheel's away: mpi4py also searches the base
interpreter's lib/, where that wheel put its libmpi.so.  MPI4PY_LIBMPI names the library to load,
so the ranks run on Open MPI whatever else is installed; each test checks the library it got.
Also: what a job left in /dev/shm, for the tests that look for leftovers."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

MPIRUN = "/usr/bin/mpirun.openmpi"  # /usr/bin/mpirun is an alternative that may name another MPI
LIBMPI = "libmpi.so.40"             # Open MPI 4.x's soname, found through the system's linker path


def why_not() -> str | None:
    """The reason the system Open MPI cannot be used here, or None."""
    if not os.access(MPIRUN, os.X_OK):
        return f"needs the system Open MPI ({MPIRUN} missing): apt-get install openmpi-bin libopenmpi-dev"
    try:
        listed = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        listed = ""
    if LIBMPI not in listed:
        return f"needs Open MPI's {LIBMPI} (apt-get install libopenmpi-dev openmpi-bin)"
    return None


def env(**extra) -> dict:
    """The environment for ranks on the system Open MPI: this interpreter first on PATH, this checkout
    importable, mpi4py pointed at Open MPI's library."""
    repo = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    pythonpath = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PATH": path, "PYTHONPATH": pythonpath, "MPI4PY_LIBMPI": LIBMPI, **extra}


SHM = Path("/dev/shm")
OPEN_MPI_SHM = ("sm_segment.", "vader_segment.")  # Open MPI 4's shared-memory segments
MPICH_SHM = ("mpich_shm_",)


def shm_entries() -> set[str]:
    return {p.name for p in SHM.iterdir()} if SHM.is_dir() else set()


def orphaned_shm(before: set[str], prefixes: tuple[str, ...]) -> list[str]:
    """Shared-memory segments of an MPI (named by ``prefixes``) made since ``before`` that no live
    process maps or holds open: what a job left behind."""
    new = [name for name in shm_entries() - before if name.startswith(prefixes)]
    if not new:
        return []
    held = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            held.update(name for name in new if name in (proc / "maps").read_text())
            held.update(name for fd in (proc / "fd").iterdir() for name in new if name in os.readlink(fd))
        except OSError:
            pass
    return sorted(set(new) - held)
