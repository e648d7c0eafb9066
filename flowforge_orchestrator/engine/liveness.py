"""Fast failover: this orchestrator's node lock, and the other owners' locks watched.

This replica holds a session advisory lock named by its node id on a connection of its own
(`store.liveness`) for its whole life. Every `liveness_interval` it runs one statement on
that connection: it shows the session (and so the lock) is still there, and it ends the
leases of every owner whose lock no session holds, which wakes the claimers. A process that
dies loses its session at once (its socket is closed), so its runs are adopted within about
one interval instead of after their lease.

While this replica does not hold its lock it claims nothing (the others would take it
back). When its lock session drops (a database restart, a connection killed), it goes on
driving the runs it holds (every write is still fenced by its epoch: a run another replica
took meanwhile is dropped at its next commit or lease renewal), takes its lock again as
soon as it can, renews its leases at once to learn which runs it lost, claims again, and
judges the others only once it has held its lock again for `grace` seconds: after a
restart every replica has lost its lock, and the others need that time to take theirs
back. For the same reason no owner is judged while the server started less than `grace` ago.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from uuid import UUID

from flowforge_orchestrator import store
from flowforge_orchestrator.config import Settings
from flowforge_orchestrator.ops import metrics
from flowforge_orchestrator.store import liveness as store_liveness

__all__ = ["GRACE_INTERVALS", "Liveness"]

log = logging.getLogger("flowforge_orchestrator.engine.orchestrator")

GRACE_INTERVALS = 6  # intervals the lock must have been held again before others are judged
# Seconds; a lock session that answers no faster is given up. `asyncio.timeout`, not
# `wait_for`: on Python 3.11 `wait_for` can swallow a cancellation that arrives as its
# statement completes, and this loop would then outlive the shutdown that cancelled it.
_STATEMENT_TIMEOUT = 10.0


class Liveness:
    """Holds this node's lock; ends the leases of owners whose lock is free."""

    def __init__(
        self,
        settings: Settings,
        measures: metrics.OrchestratorMetrics,
        *,
        owned: Callable[[], list[UUID]],
        wake_claim: Callable[[], None],
        regained: Callable[[], Awaitable[None]],
    ) -> None:
        """`owned`: the runs this process holds; `regained`: called when the lock is
        held again after it was lost (the lease renewal, to learn which runs are still
        ours)."""
        assert settings.database_url is not None
        self.dsn = settings.database_url
        self.node = settings.node_id
        self.interval = settings.liveness_interval
        self.grace = GRACE_INTERVALS * settings.liveness_interval
        self.metrics = measures
        self._owned = owned
        self._wake_claim = wake_claim
        self._regained = regained
        self._conn: store.Connection | None = None
        self._held_since: float | None = None  # monotonic time the lock was (re)taken
        self._lost = False  # the lock was held once and lost since
        self._failures = 0

    @property
    def held(self) -> bool:
        return self._held_since is not None

    @property
    def watching(self) -> bool:
        """Whether other owners are judged now (the lock held, for `grace` after a loss)."""
        if self._held_since is None:
            return False
        return not self._lost or time.monotonic() - self._held_since >= self.grace

    async def start(self) -> None:
        """Take the lock before the first claim; then end the leases an earlier process
        of this node id left running. A failure is logged; `loop` tries again."""
        if await self._acquire():
            await self._release_leftovers()

    async def loop(self) -> None:
        """One statement per interval: hold the lock, or take it again; judge the others."""
        announced = False
        while True:
            await asyncio.sleep(self.interval if self._failures == 0 else self._backoff())
            if not self.held:
                first = not self._lost  # `start` could not take it: never held until now
                if await self._acquire():
                    if first:
                        await self._release_leftovers()
                    await self._regained()
                continue
            if not self.watching:
                await self._check_session()
                continue
            if not announced:
                log.info("orchestrator %s watching other orchestrators' liveness", self.node)
                announced = True
            await self._probe()

    async def close(self) -> None:
        """End the lock session (the lock goes with it): at shutdown, after the leases were
        released."""
        conn, self._conn, self._held_since = self._conn, None, None
        if conn is not None and not conn.is_closed():
            try:
                async with asyncio.timeout(2):
                    await conn.close()
            except Exception:
                conn.terminate()

    # -- the lock session -------------------------------------------------------------------

    def _backoff(self) -> float:
        return min(1.0, self.interval * 2.0 ** min(self._failures, 6))

    async def _acquire(self) -> bool:
        """Open the lock session if needed and take the lock; True when held."""
        try:
            async with asyncio.timeout(_STATEMENT_TIMEOUT):
                if self._conn is None or self._conn.is_closed():
                    self._conn = await store_liveness.connect_lock_session(self.dsn)
                taken = await store_liveness.try_lock_node(self._conn, self.node)
        except Exception as exc:
            self._failures += 1
            log.warning("could not take this orchestrator's liveness lock (%s); retrying", exc)
            await self._drop_session()
            return False
        if not taken:
            # An earlier process of this node id whose session the server has not closed
            # yet (its host vanished): its keepalive ends it within seconds.
            self._failures += 1
            if self._failures % 20 == 1:
                log.warning(
                    "liveness lock of %s is held by another session (an earlier process of "
                    "this node id?); retrying, and claiming nothing until it is free",
                    self.node,
                )
            return False
        self._failures = 0
        self._held_since = time.monotonic()
        if self._lost:
            log.warning("liveness lock of %s taken again", self.node)
        return True

    async def _release_leftovers(self) -> None:
        assert self._conn is not None
        try:
            async with asyncio.timeout(_STATEMENT_TIMEOUT):
                released = await store_liveness.release_leftovers(
                    self._conn, self.node, self._owned()
                )
        except Exception as exc:
            log.warning("could not release an earlier process's leases (%s)", exc)
            return
        if released:
            log.warning(
                "%d run(s) still leased to %s by an earlier process: released for adoption",
                released,
                self.node,
            )
            self.metrics.reconciled("released", released)
            self._wake_claim()

    async def _check_session(self) -> None:
        """While not judging others: only show the lock session is still there."""
        assert self._conn is not None
        try:
            async with asyncio.timeout(_STATEMENT_TIMEOUT):
                await store.ping(self._conn)
        except Exception as exc:
            await self._lose(exc)

    async def _probe(self) -> None:
        """Judge the others; a dead owner with many runs takes several statements, one
        right after the other (each bounded, so that none holds its rows for long)."""
        released: dict[str, int] = {}
        while self._conn is not None:
            try:
                async with asyncio.timeout(_STATEMENT_TIMEOUT):
                    dead = await store_liveness.expire_dead_owners(
                        self._conn, self.node, self.grace
                    )
            except Exception as exc:
                await self._lose(exc)
                break
            for owner, runs in dead.items():
                released[owner] = released.get(owner, 0) + runs
            if dead:
                self._wake_claim()  # the first leases are claimable while the rest are ended
            if sum(dead.values()) < store_liveness.EXPIRE_LIMIT:
                break
        for owner, runs in released.items():
            log.warning(
                "orchestrator %s is gone (its session ended): %d run(s) released for adoption",
                owner,
                runs,
            )
        self.metrics.reconciled("failed_over", sum(released.values()))

    async def _lose(self, exc: BaseException) -> None:
        log.warning(
            "the liveness lock session of %s dropped (%s); its runs stay fenced by their "
            "epochs; taking the lock again",
            self.node,
            exc,
        )
        self._lost = True
        self._failures = 1
        await self._drop_session()

    async def _drop_session(self) -> None:
        conn, self._conn, self._held_since = self._conn, None, None
        if conn is not None:
            conn.terminate()
