"""The client's exit codes, one per way a run can end for it (python -m client --help shows none of this:
scripts and container restart policies read them)."""

from __future__ import annotations

from client.connection import (ClientSetupError, CoordinatorGone, CorruptTask, InvalidTask, JoinRefused,
                               NotAuthenticated, RunChanged)

EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (ClientSetupError, 2),       # a token without TLS, unreadable certificate files
    (JoinRefused, 2),
    (CoordinatorGone, 3),
    (NotAuthenticated, 4),
    (RunChanged, 5),
    (InvalidTask, 6),            # never train on it: stop, the coordinator drops this client
    (CorruptTask, 6),
    (KeyboardInterrupt, 130),
)


def exit_code(error: BaseException) -> int:
    """The exit code for a client stopped by ``error``; 1 for anything unexpected."""
    return next((code for kind, code in EXIT_CODES if isinstance(error, kind)), 1)
