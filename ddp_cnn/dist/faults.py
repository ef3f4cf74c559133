"""Failure handling: one rank's exception ends the whole job; signals stop it cleanly.

Under plain ``mpirun python ...`` an uncaught exception on one rank leaves the
others blocked in their next collective forever.  :func:`install_abort_hook`
prints the traceback with the rank, then calls ``MPI_Abort`` so the launcher
kills every rank.

SIGTERM/SIGINT (what SLURM sends on preemption, what Ctrl-C sends) only set
a flag; the flag rides in the next step's gradient allreduce (see
:mod:`ddp_cnn.dist.reducer`), so every rank stops after the same step, rank 0
writes a checkpoint and the job exits with :data:`EXIT_PREEMPTED`.

The exit codes say what a supervisor (:mod:`ddp_cnn.cli.supervise`) may do
next: restart from the newest checkpoint after a lost rank, never after a
usage error, bad data or a divergence, which would only happen again.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback

EXIT_OK = 0
EXIT_FAILED = 1         # a rank raised (its traceback is printed): restartable, it may be transient
EXIT_USAGE = 2          # bad flags, config, data or checkpoint: nothing was trained; never retried
EXIT_DIVERGED = 65      # the loss or gradient became non-finite (EX_DATAERR): a retry would diverge again
EXIT_RANK_LOST = 69     # a rank did not reach a collective by its deadline (EX_UNAVAILABLE): restartable
EXIT_PREEMPTED = 75     # stopped by a signal after writing a checkpoint (EX_TEMPFAIL): resume with --resume latest
EXIT_BELOW_MIN_RANKS = 76  # a live recovery (--on-rank-loss shrink) left fewer than --min-ranks: the survivors
                           # wrote a checkpoint and ended cleanly; a supervisor restarts the job once ranks are back
EXIT_DISK_FULL = 74     # no space (or quota) for a checkpoint or the metrics while training (EX_IOERR): the
                        # earlier checkpoints are intact; free space, then --resume latest
NOT_RETRIED = {EXIT_OK: "completed", EXIT_USAGE: "a usage or data error", EXIT_DIVERGED: "diverged",
               EXIT_DISK_FULL: "disk full", EXIT_PREEMPTED: "stopped by a signal"}
ABORT_GRACE = 10.0      # seconds MPI_Abort gets to end this process before it ends itself
PARTIAL_FILES: set = set()  # files being written (a checkpoint's temp file): removed when the job aborts


class InjectedFault(RuntimeError):
    """Raised on purpose by --fail-at, to test that a failing rank ends the job."""


def install_abort_hook(comm) -> None:
    """Make an uncaught exception on any rank (main or worker thread) abort all ranks."""
    if comm.size == 1:
        return

    def hook(exc_type, exc, tb):
        text = "".join(traceback.format_exception(exc_type, exc, tb))
        abort_job(comm, f"[rank {comm.rank}] uncaught exception, aborting all {comm.size} ranks:\n{text}")

    sys.excepthook = hook
    threading.excepthook = lambda args: hook(args.exc_type, args.exc_value, args.exc_traceback)


def abort_job(comm, message: str | None, code: int = EXIT_FAILED) -> None:
    """Print ``message`` on stderr (None: nothing), then end every rank of the job (MPI_Abort) with ``code``.

    Never returns: on a host cut off from the launcher MPI_Abort returns or
    hangs, and the process would go on (spinning, holding its GPU), so it
    ends itself after :data:`ABORT_GRACE` seconds whatever MPI does.
    """
    if message:
        sys.stderr.write(message if message.endswith("\n") else message + "\n")
    sys.stderr.flush()
    sys.stdout.flush()
    exit_after(ABORT_GRACE + 1.0, code)
    remove_leftovers()
    # Give the launcher a moment to forward what we printed: MPICH's hydra tears the
    # job down on MPI_Abort and was seen to drop lines still in flight.
    time.sleep(1.0)
    try:
        comm.abort(code)
    finally:
        os._exit(code)


def exit_after(seconds: float, code: int) -> None:
    """End this process with ``code`` in ``seconds``, from a thread of its own, and with SIGALRM
    (the kernel's, whatever the interpreter does) a few seconds later."""
    def end():
        time.sleep(seconds)
        os._exit(code)
    threading.Thread(target=end, name="ddp_cnn-exit", daemon=True).start()
    if signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, None):
        signal.alarm(int(seconds) + 5)


def remove_leftovers() -> None:
    """What an abort would leave behind on this host: files half written by this process, the MPI
    shared-memory segments it maps (unlinking a name unmaps nothing: the job ends anyway) and the
    topology file of its MPICH launcher proxy.  launch/mpirun.sh sweeps what killed ranks leave."""
    for path in list(PARTIAL_FILES):
        try:
            os.unlink(path)
        except OSError:
            pass
    for path in own_ipc_files():
        try:
            os.unlink(path)
        except OSError:
            pass


def own_ipc_files() -> set:
    """/dev/shm/mpich_shm_* segments this process maps, and /tmp/hydra_hwloc_xmlfile_* its parent holds."""
    found = set()
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].startswith("/dev/shm/mpich_shm_") and "(deleted)" not in fields[5]:
                    found.add(fields[5].strip())
    except OSError:
        pass
    try:
        fd_dir = f"/proc/{os.getppid()}/fd"
        for fd in os.listdir(fd_dir):
            target = os.readlink(os.path.join(fd_dir, fd))
            if target.startswith("/tmp/hydra_hwloc_xmlfile_"):
                found.add(target)
    except OSError:
        pass
    return found


def census_grace(timeout: float) -> float:
    """How long the ranks whose deadline passed listen for one another: their deadlines differ by
    the time between their last agreement and the collective (a step, a checkpoint write)."""
    return min(max(3.0, timeout / 2), 15.0)


def abort_lost_rank(comm, what: str, timeout: float, step: int | None = None) -> None:
    """A collective passed its deadline: one line naming the rank(s) that did not reach it, then end the job.

    Every rank whose deadline passed tells the others where it waits and listens as long
    (``comm.census``); a rank that stays silent did not reach the collective: stopped, dead or
    cut off.  The lowest rank that answered prints the line and aborts the job with
    :data:`EXIT_RANK_LOST`; the others wait for that abort, and end themselves when none comes
    (a host cut off from the launcher).  Never returns.
    """
    at = f"global step {step}: " if step is not None else ""
    grace = census_grace(timeout)
    answered = comm.census({"step": step, "what": what}, grace)
    if answered is None:  # a transport that cannot ask: every waiting rank says what it knows
        abort_job(comm, f"error: [rank {comm.rank}] {at}{what} not complete after {timeout:g} s: a rank stalled, "
                        "died or lost its network link", EXIT_RANK_LOST)
    if comm.rank != min(answered):
        time.sleep(grace + 5.0)  # the printing rank's abort ends this process first
        abort_job(comm, None, EXIT_RANK_LOST)
    missing = [r for r in range(comm.size) if r not in answered]
    if missing:
        who = (f"rank {missing[0]}" if len(missing) == 1 else f"ranks {', '.join(map(str, missing))}")
        message = f"error: {at}{who} did not reach {what} within {timeout:g} s (stalled, dead or unreachable)"
    else:
        message = (f"error: {at}every rank reached {what}, which did not complete within {timeout:g} s "
                   "(a lost or slow network link)")
    abort_job(comm, message, EXIT_RANK_LOST)


class StopFlag:
    """Set by SIGTERM/SIGINT; read by the loop at step boundaries."""

    def __init__(self):
        self.signum = 0
        self.previous: dict = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signals reach the main thread only; a library user training elsewhere keeps theirs
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handler)

    def uninstall(self) -> None:
        """Give the handlers from before :meth:`install` back (the Trainer used as a library)."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def _handler(self, signum, frame):
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum != 0


def parse_fail_at(spec: str | None, env: str = "DDP_CNN_FAIL_AT", flag: str = "--fail-at"):
    """``RANK:STEP`` -> (rank, step), from the flag or the environment variable; None when unset."""
    spec = spec or os.environ.get(env)
    if not spec:
        return None
    try:
        rank, step = (int(v) for v in spec.split(":"))
    except ValueError:
        raise ValueError(f"{flag}: expected RANK:STEP (two integers), got {spec!r}") from None
    return rank, step


def maybe_fail(fail_at, rank: int, step: int) -> None:
    if fail_at is not None and fail_at == (rank, step):
        raise InjectedFault(f"injected failure on rank {rank} at step {step} (--fail-at)")
