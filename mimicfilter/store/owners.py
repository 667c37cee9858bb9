"""Who made a leftover file: the host (and PID namespace) and process named in its name, and whether
that process still runs — so a run cleans up only what killed runs of its own host left behind."""

from __future__ import annotations

import os
import re
import socket


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (this process included; another user's counts)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def host_tag() -> str:
    """The host name, and the PID namespace where there is one: containers sharing a host name and a
    directory do not see each other's processes, so each owns only its own leftovers."""
    try:
        namespace = "." + re.sub(r"\D", "", os.readlink("/proc/self/ns/pid"))
    except OSError:
        namespace = ""
    return (re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host") + namespace


def owner_tag() -> str:
    """``PID@HOST``: this process, as named in the leftovers it may leave."""
    return f"{os.getpid()}@{host_tag()}"


# ``PID@HOST`` in a name (HOST as host_tag() writes it); the group names are pid and host.
OWNER_PATTERN = r"(?P<pid>\d+)@(?P<host>[A-Za-z0-9._]+)"


def leftover_name(name: str, token: str) -> str:
    """``.NAME.PID@HOST-TOKEN.tmp``: the hidden name of a temp file or staging folder beside ``NAME``
    that names the process making it, so that the next run can remove it if that process was killed."""
    return f".{name}.{owner_tag()}-{token}.tmp"


_LEFTOVER = re.compile(rf"^\..+\.{OWNER_PATTERN}-[A-Za-z0-9_]+\.tmp$")


def stale_leftover(name: str) -> bool:
    """Whether ``name`` is a :func:`leftover_name` of a process of this host that no longer runs."""
    match = _LEFTOVER.match(name)
    return match is not None and left_by_dead_process(int(match["pid"]), match["host"])


def left_by_dead_process(pid: int, host: str | None) -> bool:
    """Whether a leftover named after ``pid`` on ``host`` is stale: made on this host (None: a name without
    a host, as older versions wrote) by a process that no longer runs. Another host's is never stale here."""
    return (host is None or host == host_tag()) and not process_alive(pid)
