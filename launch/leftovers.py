"""What an MPI job that ended abnormally leaves on this host, and its removal (run by launch/mpirun.sh).

MPICH's ranks map shared-memory segments ``/dev/shm/mpich_shm_*`` and its
hydra proxies hold a topology file ``/tmp/hydra_hwloc_xmlfile_*``; a normal
exit removes both, an abort or a killed rank does not.  A leftover is a file
that appeared while the job ran (not in the list taken before it) and that
no process holds open or mapped: a live job's segments and files are always
held, so another job's are never touched.  Standard library only.

    python leftovers.py list    the candidates present now, one a line
    python leftovers.py clean   remove the new, unheld ones; stdin: what `list` printed before the job
"""
import fnmatch
import glob
import os
import sys

PATTERNS = ("/dev/shm/mpich_shm_*", "/tmp/hydra_hwloc_xmlfile_*")


def present() -> set:
    return {path for pattern in PATTERNS for path in glob.glob(pattern)}


def held() -> set:
    """Every file any process of this host has open or mapped (those it may see)."""
    paths = set()
    for proc in glob.glob("/proc/[0-9]*"):
        try:
            for fd in os.listdir(f"{proc}/fd"):
                try:
                    paths.add(os.readlink(f"{proc}/fd/{fd}"))
                except OSError:
                    pass
            with open(f"{proc}/maps") as fh:
                for line in fh:
                    fields = line.split(maxsplit=5)
                    if len(fields) == 6:
                        paths.add(fields[5].strip())
        except OSError:
            continue  # ended meanwhile, or not ours to read
    return paths


def held_by(pids) -> set:
    """The candidate files that these processes map or hold open, or their parents (MPICH's launcher
    proxies) hold: what a test watches a job of its own by, while other jobs run beside it."""
    found = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                parent = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        for proc in (f"/proc/{pid}", f"/proc/{parent}"):
            try:
                names = [os.readlink(f"{proc}/fd/{fd}") for fd in os.listdir(f"{proc}/fd")]
                with open(f"{proc}/maps") as fh:
                    names += [line.split(maxsplit=5)[5].strip() for line in fh if len(line.split(maxsplit=5)) == 6]
            except OSError:
                continue
            found.update(n for n in names if any(fnmatch.fnmatch(n, pattern) for pattern in PATTERNS))
    return found


def clean(before: set) -> list:
    new = present() - before
    if not new:
        return []
    removed = []
    for path in sorted(new - held()):
        try:
            os.unlink(path)
            removed.append(path)
        except OSError:
            pass
    return removed


def main(argv) -> int:
    if argv[:1] == ["list"]:
        print("\n".join(sorted(present())))
        return 0
    if argv[:1] == ["clean"]:
        clean({line.strip() for line in sys.stdin if line.strip()})
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
