"""A full disk (or a quota reached) while a run writes: one line naming the file, not a traceback.

Every writer of the run (checkpoints, best.h5, metrics.jsonl, the lock file,
the trace) wraps its write in :func:`naming`, which turns "no space" into
:class:`DiskFull` carrying the file it could not write; the writer has removed
or rolled back its partial output by then, so nothing half-written stays.
"""
from __future__ import annotations

import contextlib
import errno

NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


class DiskFull(OSError):
    """No space left (or over quota) writing ``path``."""

    def __init__(self, path, reason: str):
        super().__init__(errno.ENOSPC, reason)
        self.path, self.reason = path, reason

    def __str__(self) -> str:
        return f"{self.path}: cannot be written ({self.reason})"


def no_space(exc: BaseException | None) -> bool:
    """Whether ``exc``, or an error it was raised while handling (h5py's close after a failed write),
    is "no space"."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in NO_SPACE:
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


@contextlib.contextmanager
def naming(path):
    """Re-raise a "no space" OSError inside the block as :class:`DiskFull` naming ``path``."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as exc:
        if not no_space(exc):
            raise
        quota = any(getattr(e, "errno", None) == errno.EDQUOT for e in (exc, exc.__context__))
        raise DiskFull(path, "disk quota exceeded" if quota else "no space left on device") from None
