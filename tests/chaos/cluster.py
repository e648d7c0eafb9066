"""What the chaos run breaks: private servers and the engine's processes, with their slots.

PostgreSQL is durable (fsync on) and keeps its data across its restart; Redis keeps nothing
(no append-only file, no snapshot), so its restart loses every queued job, as a lost Redis
would. Both keep their port across restarts, so the processes reconnect to the same URL.
Their data is temporary: it goes when the run ends (`findings.json` keeps what went wrong).

Each orchestrator and worker has a slot with a fixed node id (`o1`, `w1`, ...), reused by
every process that fills the slot, as a StatefulSet or a systemd unit on one host would
reuse it. A slot is either held down by a fault, or should be running: a process that exits
on its own is a crash, recorded with the end of its log, and replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from flowforge_orchestrator import store
from flowforge_orchestrator.local_services import LocalPostgres, LocalRedis
from tests.bench.cluster import REPO, _cli, _database
from tests.bench.processes import Proc, WorkloadFailed, start
from tests.helpers import free_port

__all__ = ["ChaosCluster", "Crash", "Slot"]

STEP_MODULE = "tests.chaos.steps"
_TERMINATE_ALL = """
SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'
"""
Kind = Literal["orchestrator", "worker"]


@dataclass
class Slot:
    """One orchestrator or worker position; `proc` is None while it is down."""

    kind: Kind
    node: str
    proc: Proc | None = None
    held: bool = False  # down on purpose, by a fault
    paused: bool = False  # SIGSTOPped: alive, but silent
    http_port: int = 0  # an orchestrator's /readyz (a worker's stays off)
    incarnation: int = 0
    retry_at: float = 0.0  # after a failed start, the supervisor waits until then
    failed_starts: int = 0  # in a row: the wait doubles with each, up to 30 s

    @property
    def ready_line(self) -> str:
        if self.kind == "orchestrator":
            return f"orchestrator {self.node} running"
        return f"worker {self.node} serving step types"


@dataclass(frozen=True)
class Crash:
    """A process that exited without being told to, or did not start."""

    node: str
    what: str
    log: Path


@dataclass
class ChaosCluster:
    """Servers, database, processes: `async with ChaosCluster.running(work, ...) as cluster`."""

    work: Path
    orchestrators: int
    workers: int
    lease_seconds: float
    hibernate_after: float
    note: Callable[[str], None]
    slots: list[Slot] = field(default_factory=list)
    crashes: list[Crash] = field(default_factory=list)
    unclean_stops: list[str] = field(default_factory=list)
    db_url: str = ""
    # Set while both servers run; processes are started only then.
    servers_up: asyncio.Event = field(default_factory=asyncio.Event)
    redis_losses: list[float] = field(default_factory=list)  # wall-clock times Redis went
    redis_starts: list[float] = field(default_factory=list)  # ... and came back
    _outages: int = 0  # server restarts begun so far
    _restarts: set[asyncio.Task[None]] = field(default_factory=set)
    job_key: str = field(default_factory=lambda: secrets.token_urlsafe(32))  # signs the jobs

    @classmethod
    @contextlib.asynccontextmanager
    async def running(cls, work: Path, **options: Any) -> AsyncIterator[ChaosCluster]:
        """Servers, database and slots ready (processes not started yet); all stopped at
        exit, processes first."""
        async with contextlib.AsyncExitStack() as stack:
            cluster = cls(work, **options)
            await cluster._start(stack)
            yield cluster

    async def _start(self, stack: contextlib.AsyncExitStack) -> None:
        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        # Temporary data (removed when they stop), kept across the outages below.
        self.postgres = LocalPostgres(durable=True)
        self.redis = LocalRedis(durable=False)
        stack.callback(self.postgres.stop)
        stack.callback(self.redis.stop)
        await asyncio.gather(
            asyncio.to_thread(self.postgres.start), asyncio.to_thread(self.redis.start)
        )
        self.servers_up.set()
        admin = await store.connect(self.postgres.url)
        try:
            await admin.execute("CREATE DATABASE chaos")
        finally:
            await admin.close()
        self.db_url = _database(self.postgres.url, "chaos")
        await store.apply_migrations(self.db_url)
        self.pool = await store.create_pool(self.db_url, size=4)
        stack.push_async_callback(self.pool.close)
        stack.push_async_callback(self.stop_processes)
        self.slots = [
            Slot("orchestrator", f"o{i + 1}", http_port=free_port())
            for i in range(self.orchestrators)
        ]
        self.slots += [Slot("worker", f"w{i + 1}") for i in range(self.workers)]

    @property
    def redis_url(self) -> str:
        return self.redis.url

    def of_kind(self, kind: Kind) -> list[Slot]:
        return [s for s in self.slots if s.kind == kind]

    # -- processes ---------------------------------------------------------------------------

    def env(self, node: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWFORGE_", "OTEL_"))}
        env.update(
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            FLOWFORGE_DATABASE_URL=self.db_url,
            FLOWFORGE_REDIS_URL=self.redis_url,
            FLOWFORGE_NODE_ID=node,
            FLOWFORGE_LEASE_SECONDS=repr(self.lease_seconds),
            FLOWFORGE_HIBERNATE_AFTER=repr(self.hibernate_after),
            FLOWFORGE_POLL_INTERVAL="1",
            FLOWFORGE_SHUTDOWN_TIMEOUT="5",
            FLOWFORGE_WORKER_MAX_JOBS="50",
            FLOWFORGE_WORKER_SHUTDOWN_GRACE="2",
            FLOWFORGE_HTTP_PORT="0",  # several processes share the host: ports are per slot
            FLOWFORGE_HTTP_ALLOW="127.0.0.0/8",  # the chaos HTTP server is on 127.0.0.1
            FLOWFORGE_JOB_KEY=self.job_key,
        )
        return env

    def readiness_ports(self) -> list[int]:
        """The /readyz ports of the orchestrators that run now, not paused."""
        return [s.http_port for s in self.live("orchestrator") if not s.paused]

    async def start_slot(self, slot: Slot) -> None:
        """Start the slot's process once the servers run, and wait until it serves.

        A failure is a crash, unless a server restart began meanwhile: a process that cannot
        start while its database is away may exit, and is simply started again.
        """
        await self.servers_up.wait()
        outages = self._outages
        slot.incarnation += 1
        log = self.work / "logs" / f"{slot.node}.{slot.incarnation}.log"
        command = [*_cli(), "run"]
        if slot.kind == "worker":
            command = [*_cli(), "worker", "--types-module", STEP_MODULE]
        line = slot.ready_line
        env = self.env(slot.node)
        if slot.http_port:
            env.update(FLOWFORGE_HTTP_PORT=str(slot.http_port), FLOWFORGE_HTTP_HOST="127.0.0.1")
        try:
            slot.proc = await start(
                slot.node,
                command,
                env=env,
                cwd=REPO,
                log=log,
                ready=lambda proc: line in proc.output(),
                timeout=60.0,
            )
        except WorkloadFailed as exc:
            slot.proc = None
            slot.failed_starts += 1
            slot.retry_at = time.monotonic() + min(30.0, 2.0 ** (slot.failed_starts - 1))
            if self._outages == outages and self.servers_up.is_set():
                self.crashes.append(Crash(slot.node, f"did not start: {exc}", log))
            self.note(f"{slot.node} did not start (see {log})")
            return
        slot.failed_starts = 0
        self.note(f"{slot.node} started (pid {slot.proc.pid})")

    async def start_all(self) -> None:
        """The first start: a process that cannot start then means the run cannot run."""
        await asyncio.gather(*(self.start_slot(s) for s in self.slots))
        if self.crashes:
            crash = self.crashes[0]
            tail = "\n".join(crash.log.read_text(errors="replace").splitlines()[-20:])
            raise WorkloadFailed(f"{crash.node} {crash.what}; its log ends:\n{tail}")

    def live(self, kind: Kind) -> list[Slot]:
        """Slots of `kind` whose process runs and that no fault or restart holds."""
        return [s for s in self.of_kind(kind) if s.proc is not None and not s.held]

    async def kill(self, slot: Slot) -> None:
        """SIGKILL, reaped; the slot stays down until `start_slot`."""
        proc, slot.proc = slot.proc, None
        if proc is None:
            return
        if proc.popen.poll() is None:
            proc.popen.send_signal(signal.SIGKILL)
        await asyncio.to_thread(proc.popen.wait)
        self.note(f"{slot.node} killed (pid {proc.pid})")

    async def terminate(self, slot: Slot) -> None:
        """SIGTERM, as a deployment would: the process must finish what it holds, release
        its leases and exit 0 (else an unclean stop); SIGKILL after a grace."""
        proc, slot.proc = slot.proc, None
        if proc is None:
            return
        began = time.monotonic()
        await proc.stop(grace=15.0)
        code = proc.popen.returncode
        if code != 0:
            self.unclean_stops.append(f"{slot.node} exited with {code} on SIGTERM (under load)")
        self.note(f"{slot.node} stopped ({code}) in {time.monotonic() - began:.1f}s")

    async def drop_connections(self) -> None:
        """Terminate every connection of the engine's processes (and of our own pool) to the
        database; the server stays up."""

        async def drop() -> int:
            async with self.pool.acquire() as conn:
                return int(await conn.fetchval(_TERMINATE_ALL))

        dropped = await store.retrying(drop, what="dropping connections")
        self.note(f"{dropped} connections terminated")

    async def pause(self, slot: Slot, seconds: float) -> None:
        """SIGSTOP, then SIGCONT after `seconds`: a process that stalls (GC, a full disk, a
        partition) and comes back believing it still owns what it owned."""
        proc = slot.proc
        if proc is None:
            return
        slot.paused = True
        proc.popen.send_signal(signal.SIGSTOP)
        self.note(f"{slot.node} paused (pid {proc.pid})")
        try:
            await asyncio.sleep(seconds)
        finally:
            proc.popen.send_signal(signal.SIGCONT)
            slot.paused = False
            self.note(f"{slot.node} resumed")

    async def supervise(self) -> None:
        """Replace processes that exited on their own, and slots that failed to start."""
        try:
            while True:
                await asyncio.sleep(0.2)
                for slot in self.slots:
                    if slot.held or time.monotonic() < slot.retry_at:
                        continue
                    proc = slot.proc
                    if proc is not None and proc.popen.poll() is None:
                        continue
                    if proc is not None:
                        what = f"exited by itself with code {proc.popen.returncode}"
                        self.crashes.append(Crash(slot.node, what, proc.log))
                        self.note(f"{slot.node} {what} (see {proc.log})")
                        slot.proc = None
                    slot.held = True
                    task = asyncio.create_task(self._restart(slot))
                    self._restarts.add(task)
                    task.add_done_callback(self._restarts.discard)
        finally:
            for task in self._restarts:
                task.cancel()
            await asyncio.gather(*self._restarts, return_exceptions=True)

    async def _restart(self, slot: Slot) -> None:
        try:
            await self.start_slot(slot)
        finally:
            slot.held = False

    async def stop_processes(self) -> None:
        """SIGTERM every process (SIGKILL after a grace); a non-zero exit is recorded."""
        running = [s for s in self.slots if s.proc is not None]

        async def stop(slot: Slot) -> None:
            assert slot.proc is not None
            began = time.monotonic()
            await slot.proc.stop(grace=15.0)
            code = slot.proc.popen.returncode
            if code != 0:
                self.unclean_stops.append(f"{slot.node} exited with {code} on SIGTERM")
            self.note(f"{slot.node} stopped ({code}) in {time.monotonic() - began:.1f}s")
            slot.proc = None

        await asyncio.gather(*(stop(s) for s in running))

    # -- servers -----------------------------------------------------------------------------

    async def restart_redis(self, downtime: float) -> None:
        """Stop Redis (its data is gone), wait, start it again on the same port."""
        await self._outage(self.redis, "Redis", downtime)

    async def restart_postgres(self, downtime: float) -> None:
        """Fast shutdown of PostgreSQL (every connection drops), wait, start it again."""
        await self._outage(self.postgres, "PostgreSQL", downtime)

    async def _outage(self, server: LocalPostgres | LocalRedis, name: str, downtime: float) -> None:
        self._outages += 1
        self.servers_up.clear()
        try:
            # `restart()` would keep it down for no time at all; `stop()` would drop the
            # temporary data. Stopping only the process keeps the data and the port.
            await asyncio.to_thread(server._stop_process)
            if server is self.redis:  # from now on, what Redis held is gone
                self.redis_losses.append(time.time())
            self.note(f"{name} stopped for {downtime:.1f}s")
            await asyncio.sleep(downtime)
            await asyncio.to_thread(server.start)
            if server is self.redis:
                self.redis_starts.append(time.time())
            self.note(f"{name} started")
        finally:
            if self.postgres.pid is not None and self.redis.pid is not None:
                self.servers_up.set()
