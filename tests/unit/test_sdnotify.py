"""sd_notify: datagrams reach a real AF_UNIX socket, as systemd would receive them."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowforge_orchestrator.ops import sdnotify


@pytest.fixture
def receiver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket on a filesystem path, named by NOTIFY_SOCKET."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


def _received(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_unset_socket_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    assert sdnotify.ready() is False
    assert sdnotify.stopping() is False
    assert sdnotify.status("x") is False


def test_empty_socket_variable_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert sdnotify.notify("READY=1") is False


def test_notify_sends_the_state_verbatim(receiver: socket.socket) -> None:
    assert sdnotify.notify("READY=1\nSTATUS=up") is True
    assert _received(receiver) == "READY=1\nSTATUS=up"


def test_helpers_send_their_assignments(receiver: socket.socket) -> None:
    assert sdnotify.ready()
    assert _received(receiver) == "READY=1"
    assert sdnotify.ready("holding 3 runs")
    assert _received(receiver) == "READY=1\nSTATUS=holding 3 runs"
    assert sdnotify.status("draining")
    assert _received(receiver) == "STATUS=draining"
    assert sdnotify.stopping()
    assert _received(receiver) == "STOPPING=1"
    assert sdnotify.watchdog()
    assert _received(receiver) == "WATCHDOG=1"


def test_status_text_cannot_inject_assignments(receiver: socket.socket) -> None:
    assert sdnotify.status("db down\nREADY=1")
    assert _received(receiver) == "STATUS=db down READY=1"


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"flowforge-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.ready() is True
        assert _received(sock) == "READY=1"


def test_nobody_listening_returns_false(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert sdnotify.ready() is False


@pytest.mark.parametrize("value", ["relative.sock", "@", "vsock:2:1234"])
def test_unsupported_addresses_return_false(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert sdnotify.notify("READY=1") is False


def test_watchdog_interval_is_half_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert sdnotify.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 15.0


@pytest.mark.parametrize(
    ("usec", "pid"),
    [(None, None), ("", None), ("0", None), ("soon", None), ("30000000", "other"), ("1", "x")],
)
def test_no_watchdog(monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None) -> None:
    if pid == "other":  # the watchdog is meant for another process
        pid = str(os.getpid() + 1)
    for key, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    assert sdnotify.watchdog_interval() is None
