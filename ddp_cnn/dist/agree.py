"""Start-up errors agreed by every rank: a check that fails on one rank raises :class:`SetupError` on all of
them at once, before the next collective, so that no rank is left waiting and the message is printed once."""
from __future__ import annotations

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
