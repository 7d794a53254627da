"""The sandbox's own failures: one exception family that every backend raises.

A backend raises :class:`SandboxError` (or a subclass) when *it* failed, not the code it
ran: a worker that could not be started, a pool used before `start()` or after
`close()`, a server that cannot be reached. Transport and OS errors (pipes, sockets,
HTTP, the Docker SDK) are converted to it where a backend meets them, so a caller
catches exactly this type, and anything else that comes out of a backend is a bug.

The code's own failures are never raised: they come back as an
:class:`~sandboxes.result.ExecResult`, and a failure around one call (a worker that died
mid-call, a lost session, a full queue) as a result with an infrastructure status.
"""

from __future__ import annotations


class SandboxError(RuntimeError):
    """The sandbox failed (not the code it ran): drop the episode, do not score it."""


class SandboxUnavailable(SandboxError):
    """Isolation cannot be set up, a worker cannot be started, or no session can be had;
    the message says what is missing."""


class SandboxCheckFailed(SandboxUnavailable):
    """The sandbox failed the check a job runs before it starts (health, one smoke call):
    nothing ran on it yet."""


class SandboxClosed(SandboxError):
    """The sandbox is not started or already closed, or the session was closed."""


__all__ = ["SandboxCheckFailed", "SandboxClosed", "SandboxError", "SandboxUnavailable"]
