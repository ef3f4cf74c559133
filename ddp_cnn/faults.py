"""Failure handling: one rank's exception ends the whole job; signals stop it cleanly.

Under plain ``mpirun python ...`` an uncaught exception on one rank leaves the
others blocked in their next collective forever.  :func:`install_abort_hook`
prints the traceback with the rank, then calls ``MPI_Abort`` so the launcher
kills every rank.

SIGTERM/SIGINT (what SLURM sends on preemption, what Ctrl-C sends) only set
a flag; the flag rides in the next step's gradient allreduce (see
:mod:`ddp_cnn.reducer`), so every rank stops after the same step, rank 0
writes a checkpoint and the job exits with :data:`EXIT_PREEMPTED`.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
import traceback

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2          # bad flags, config, data or checkpoint: nothing was trained
EXIT_PREEMPTED = 75     # stopped by a signal after writing a checkpoint (EX_TEMPFAIL): resume with --resume latest
EXIT_DISK_FULL = 74     # no space (or quota) for a checkpoint or the metrics while training (EX_IOERR): the
                        # earlier checkpoints are intact; free space, then --resume latest


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


def abort_job(comm, message: str, code: int = EXIT_FAILED) -> None:
    """Print ``message`` on stderr, then end every rank of the job (MPI_Abort) with ``code``."""
    sys.stderr.write(message if message.endswith("\n") else message + "\n")
    sys.stderr.flush()
    sys.stdout.flush()
    # Give the launcher a moment to forward what we printed: MPICH's hydra tears the
    # job down on MPI_Abort and was seen to drop lines still in flight.
    time.sleep(1.0)
    comm.abort(code)


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


SETUP_ERRORS = (ValueError, RuntimeError, OSError)  # DataError and CheckpointError are ValueErrors


class SetupError(ValueError):
    """A start-up problem, raised on every rank at once (the ranks agreed on it)."""


def agreed(comm, fn):
    """Collective: ``fn()``'s result, or SetupError on every rank when it raised on any.

    The first failing rank's message wins, naming that rank unless every rank
    failed with the same message.  Every rank reaches the same
    collective whether its own ``fn`` failed or not, so a rank that fails
    never leaves the others waiting.
    """
    try:
        result, error = fn(), None
    except SETUP_ERRORS as exc:
        result, error = None, str(exc)
    errors = comm.allgather_obj(error)
    failed = [(rank, err) for rank, err in enumerate(errors) if err is not None]
    if failed:
        rank, err = failed[0]
        same_everywhere = len(failed) == comm.size and len({e for _, e in failed}) == 1
        raise SetupError(err if same_everywhere else f"{err} (rank {rank})")
    return result


def require_same(comm, ident: dict, what: dict) -> None:
    """Collective: SetupError on every rank when any value of ``ident`` differs between ranks.

    ``what`` names each key for the message, which lists every rank's value.
    """
    everyone = comm.allgather_obj(ident)
    for key in ident:
        values = [e[key] for e in everyone]
        if len(set(map(str, values))) > 1:
            raise SetupError(f"ranks disagree on the {what[key]}: "
                             + ", ".join(f"rank {r}: {str(v)[:12]}" for r, v in enumerate(values)))


class RankZeroParser(argparse.ArgumentParser):
    """Usage errors printed once: by rank 0 only when an MPI launcher started every rank (exit 2 everywhere)."""

    def error(self, message):
        from .comm import launcher_rank
        if launcher_rank() not in (None, 0):
            self.exit(2)
        super().error(message)
