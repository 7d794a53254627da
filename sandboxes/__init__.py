"""Where untrusted tool calls run: the in-sandbox runner and the backends that start it.

Must never import torch or the trainer (`agent_spo`); the trainer depends on this package,
never the reverse. Importing the package is cheap (the runner imports it inside the jail);
backends load on first use.

What the code did comes back as an :class:`ExecResult`; a backend's own failures raise
:class:`SandboxError` (`sandboxes.errors`); any other exception out of a backend is a bug.
"""

from sandboxes.errors import SandboxClosed, SandboxError, SandboxUnavailable
from sandboxes.result import INFRA_STATUSES, STATUSES, ExecResult, Status

__all__ = [
    "INFRA_STATUSES",
    "STATUSES",
    "ExecResult",
    "Limits",
    "LocalSandbox",
    "LocalSession",
    "SandboxClosed",
    "SandboxError",
    "SandboxUnavailable",
    "Status",
]


def __getattr__(name: str):
    if name in ("LocalSandbox", "LocalSession", "Limits"):
        from sandboxes import local

        return getattr(local, name)
    raise AttributeError(name)
