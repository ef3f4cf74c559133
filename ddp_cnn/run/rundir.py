"""A run's folder: never another run's by accident, writable before any work is done, and its metrics log."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from data_tools.atomic import AtomicOutput

from ddp_cnn.run.checkpoint import BEST_NAME, CORRUPT_SUFFIX, list_checkpoints
from ddp_cnn.system.nospace import naming


def prepare(metrics_path: Path, checkpoint_dir: Path, run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Rank 0: refuse a run dir that holds another run unless resuming or overwriting (ValueError,
    one line) and folders that cannot be made or written; creates and removes nothing (see
    :func:`clear`)."""
    old = list_checkpoints(checkpoint_dir)
    holds = [metrics_path.name] if metrics_path.is_file() and metrics_path.stat().st_size else []
    holds += [f"{len(old)} checkpoint(s)"] if old else []
    holds += [BEST_NAME] if (checkpoint_dir / BEST_NAME).exists() else []
    if holds and not resume and not overwrite:
        raise ValueError(f"--run-dir {run_dir}: holds a run ({', '.join(holds)}); continue it with "
                         "--resume latest, replace it with --overwrite, or choose another --run-dir")
    for folder in (metrics_path.parent, checkpoint_dir):
        check_writable(folder)


def check_resumable(run_dir: Path, checkpoint_dir: Path, checkpoint_dir_given: bool) -> None:
    """``--resume latest``: ValueError (one line) when the folder it would search does not exist, most
    likely a typo that would otherwise start the whole training again; ``--resume auto`` starts anew."""
    flag, folder = ("--checkpoint-dir", checkpoint_dir) if checkpoint_dir_given else ("--run-dir", run_dir)
    if not folder.exists():
        raise ValueError(f"--resume latest: {flag} {folder} does not exist, so there is nothing to resume; check "
                         "the name, or use --resume auto to start a new run when there is nothing yet")


def clear(checkpoint_dir: Path) -> None:
    """Rank 0, ``--overwrite``, once every start-up check has passed: the old run's checkpoints go
    (with those that failed to verify and were moved aside)."""
    aside = sorted(checkpoint_dir.glob(f"ckpt-*.h5{CORRUPT_SUFFIX}")) if checkpoint_dir.is_dir() else []
    for path in list_checkpoints(checkpoint_dir) + aside + [checkpoint_dir / BEST_NAME]:
        path.unlink(missing_ok=True)


def check_writable(folder: Path) -> None:
    """ValueError (one line) unless ``folder`` is, or can be made as, a writable folder."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{folder}: cannot be a folder, {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{folder}: cannot write in {existing} (permission denied)")


class MetricsLog:
    """The run's ``metrics.jsonl``: rank 0 appends one JSON record per line, each stamped with the
    time (Unix seconds); other ranks' calls do nothing."""

    def __init__(self, path: Path, is_root: bool):
        self.path, self.is_root = Path(path), is_root

    def start(self) -> None:
        """A new run: an empty file."""
        if self.is_root:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")

    def write(self, record: dict) -> None:
        """Append one line, whole or not at all: a write cut short (no space) is rolled back."""
        if not self.is_root:
            return
        line = (json.dumps({**record, "time": round(time.time(), 3)}) + "\n").encode()
        with naming(self.path), open(self.path, "ab", buffering=0) as fh:
            size = fh.seek(0, os.SEEK_END)
            try:
                done = 0
                while done < len(line):
                    done += fh.write(line[done:])
            except OSError:
                os.ftruncate(fh.fileno(), size)
                raise

    def truncate_after(self, step: int) -> None:
        """On resume, drop what the interrupted run logged after its checkpoint (no duplicate steps)."""
        if not self.is_root or not self.path.exists():
            return
        records = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        kept = [r for r in records  # a test record ends a run: the resumed run scores its own
                if r.get("step", 0) <= step and r.get("kind") != "test"]
        with naming(self.path), AtomicOutput(self.path.parent) as out:  # the old log stays until the new is whole
            out.temp(self.path.name).write_text("".join(json.dumps(r) + "\n" for r in kept))


class RunLock:
    """One job per run dir: a POSIX lock on ``RUN_DIR/.lock`` (lockf, which NFS honours across hosts),
    released by the kernel when the holder dies, so a killed job never leaves a stale lock.
    The file names the holder (host, pid) for the message a second job gets."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.fd: int | None = None

    def acquire(self, warn=print) -> None:
        """ValueError (one line) naming the holder when another job holds the run dir.  On a file
        system without POSIX locks (``warn``-ed) the run goes on unguarded rather than never."""
        import errno
        import fcntl
        import socket
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):  # ENOLCK, ENOSYS, EOPNOTSUPP: no locks here
                os.close(fd)
                warn(f"warning: {self.path}: no lock on this file system ({exc.strerror}); a second job on this "
                     "run dir is not prevented")
                return
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another job"
            os.close(fd)
            raise ValueError(f"--run-dir {self.path.parent}: in use by {holder} (lock {self.path}); wait for that "
                             "job to end, or choose another --run-dir (on NFS a node that crashed holds it until "
                             "the server's lease ends)") from None
        os.ftruncate(fd, 0)
        try:
            with naming(self.path):
                os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        except OSError:
            os.close(fd)
            raise
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # the file stays, naming nobody
            os.close(self.fd)  # closing drops the lock
            self.fd = None


def remove_dead_temps(checkpoint_dir: Path) -> list[Path]:
    """Temporary checkpoint files (``*.tmp-PID``) of writers that died (no such process on this host)."""
    removed = []
    for path in Path(checkpoint_dir).glob("*.tmp-*") if Path(checkpoint_dir).is_dir() else []:
        pid = path.name.rsplit(".tmp-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
