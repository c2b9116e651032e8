"""The environment a model child process gets: ours, plus its own, less systemd's variables.

Here rather than in ``supervision/`` because the guard (``host/guard_client.py``) starts its
process with the same environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

__all__ = ["child_env"]

# Children must not talk to systemd as if they were us: no notify socket, none of our watchdog
# settings (WATCHDOG_USEC, WATCHDOG_PID, ...), none of our socket-activation fds.
_SCRUBBED_ENV = frozenset({"NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"})
_SCRUBBED_PREFIXES = ("WATCHDOG_",)


def _scrubbed(name: str) -> bool:
    return name in _SCRUBBED_ENV or name.startswith(_SCRUBBED_PREFIXES)


def child_env(extra: Mapping[str, str]) -> dict[str, str]:
    """Our environment plus ``extra``, without systemd's notify, watchdog and socket variables
    (also when ``extra`` names them: a child speaking for us to systemd is never right)."""
    env = {k: v for k, v in os.environ.items() if not _scrubbed(k)}
    env.update({k: v for k, v in extra.items() if not _scrubbed(k)})
    return env
