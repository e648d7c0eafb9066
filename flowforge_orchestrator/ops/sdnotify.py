"""The systemd notification protocol (`sd_notify(3)`), without a dependency.

A unit with `Type=notify` is "started" only when its main process sends `READY=1` to the
datagram socket named by `$NOTIFY_SOCKET`; dependent units wait for it. Outside systemd
(a terminal, a container, a test) the variable is unset and every call here does nothing.

This reads the process environment itself: these variables belong to the service manager's
protocol, not to FlowForge's settings, and systemd sets them per process.
"""

from __future__ import annotations

import logging
import os
import socket

__all__ = ["notify", "ready", "status", "stopping", "watchdog", "watchdog_interval"]

log = logging.getLogger(__name__)

# A notification is a few bytes; a blocked socket must never stall the event loop for long.
_SEND_TIMEOUT = 1.0


def _address(value: str) -> bytes | None:
    """A filesystem path, or `@name` for a socket in the abstract namespace (Linux)."""
    if value.startswith("/"):
        return os.fsencode(value)
    if value.startswith("@") and len(value) > 1:
        return b"\0" + os.fsencode(value[1:])
    return None  # e.g. systemd 253's `vsock:CID:PORT`, which we do not speak


def notify(state: str) -> bool:
    """Send `state` (newline-separated `KEY=value` assignments) to the service manager.

    Returns True if the datagram was sent. Returns False, doing nothing, when
    `$NOTIFY_SOCKET` is unset; also when it names an unsupported address or the send
    fails (logged), because a lost notification must not stop the daemon.
    """
    value = os.environ.get("NOTIFY_SOCKET")
    if not value:
        return False
    address = _address(value)
    if address is None:
        log.warning("NOTIFY_SOCKET=%r is not a path or an abstract socket; not notifying", value)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(_SEND_TIMEOUT)
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("could not notify the service manager (%s): %s", value, exc)
        return False
    return True


def _one_line(text: str) -> str:
    # A newline would start a new assignment: status text must not inject `READY=1`.
    return " ".join(text.splitlines())


def ready(status_text: str | None = None) -> bool:
    """The service is up: systemd finishes starting the unit and starts its dependents."""
    return notify("READY=1" if status_text is None else f"READY=1\nSTATUS={_one_line(status_text)}")


def stopping() -> bool:
    """The service began its graceful shutdown (send on SIGTERM, before draining)."""
    return notify("STOPPING=1")


def status(text: str) -> bool:
    """Free-form status shown by `systemctl status`."""
    return notify(f"STATUS={_one_line(text)}")


def watchdog() -> bool:
    """Keep-alive ping for `WatchdogSec=`: send it every `watchdog_interval()` seconds."""
    return notify("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings, or None when the unit has no watchdog for us.

    systemd sets `WATCHDOG_USEC` to the timeout; pinging at half of it leaves a margin, as
    `sd_watchdog_enabled(3)` advises. `WATCHDOG_PID`, when set, names the process meant.
    """
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    try:
        if pid and int(pid) != os.getpid():
            return None
        timeout = int(usec)
    except ValueError:
        return None
    if timeout <= 0:
        return None
    return timeout / 2 / 1_000_000
