"""Operating commands: `doctor`, `config`, `outbox tail|consumers|register|drop`."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

from redis.asyncio import Redis

from flowforge_orchestrator import store
from flowforge_orchestrator.cli.common import Subcommands, add_command, connection, run_id_arg
from flowforge_orchestrator.cli.config_view import (
    effective_settings,
    mask_url,
    replace_settings_table,
    settings_table,
)
from flowforge_orchestrator.config import Settings
from flowforge_orchestrator.core.definition.models import TaskStep
from flowforge_orchestrator.core.definition.parse import parse_definition
from flowforge_orchestrator.core.durations import format_duration
from flowforge_orchestrator.errors import ConfigError, FlowForgeError
from flowforge_orchestrator.queue.dispatch import queue_name
from flowforge_orchestrator.queue.presence import live_workers
from flowforge_orchestrator.store import reads
from flowforge_orchestrator.store.migrations import load_migrations

__all__ = ["Finding", "add_commands", "describe_event", "doctor", "report_bad_settings"]

# -- doctor ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    check: str
    status: str  # ok | warn | FAIL | skip
    detail: str


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text if text else type(exc).__name__


@dataclass
class _Doctor:
    settings: Settings
    timeout: float
    findings: list[Finding]
    migrated: bool = False
    # The workers serving each step type now (only types with some); None: Redis unknown.
    redis_live: dict[str, list[str]] | None = None

    def add(self, check: str, status: str, detail: str) -> None:
        self.findings.append(Finding(check, status, detail))

    async def guarded(
        self, check: str, probe: Callable[[], Awaitable[None]], where: str | None = None
    ) -> None:
        """Run one check under the timeout; an exception is the check's failure, in words
        (after `where`: the server it could not reach)."""
        prefix = f"{mask_url(where)}: " if where else ""
        try:
            async with asyncio.timeout(self.timeout):
                await probe()
        except TimeoutError:
            self.add(check, "FAIL", f"{prefix}no answer within {self.timeout:g}s")
        except Exception as exc:
            self.add(check, "FAIL", prefix + _reason(exc))

    async def run(self) -> None:
        names = {k.upper() for k in os.environ}
        count = sum(1 for name in Settings.model_fields if f"FLOWFORGE_{name.upper()}" in names)
        self.add("configuration", "ok", f"settings load ({count} set in the environment)")
        database = False
        if not self.settings.database_url:
            self.add("postgresql", "FAIL", "FLOWFORGE_DATABASE_URL is not set")
        else:
            await self.guarded("postgresql", self.postgresql, self.settings.database_url)
            database = self.findings[-1].status == "ok"
        await self.guarded("redis", self.redis, self.settings.redis_url)
        if not database:
            for check in ("migrations", "roles", "workers", "outbox"):
                self.add(check, "skip", "needs PostgreSQL")
            return
        await self.guarded("migrations", self.migrations)
        if not self.migrated:
            for check in ("roles", "workers", "outbox"):
                self.add(check, "skip", "needs the schema: run `flowforge-orchestrator migrate`")
            return
        await self.guarded("roles", self.roles)
        await self.guarded("workers", self.workers)
        await self.guarded("outbox", self.outbox)

    async def postgresql(self) -> None:
        dsn = self.settings.database_url or ""
        conn = await store.connect(dsn)
        try:
            user, version = await reads.server_version(conn)
        finally:
            await conn.close()
        self.add("postgresql", "ok", f"{mask_url(dsn)} answers: PostgreSQL {version}, as {user}")

    async def redis(self) -> None:
        url = self.settings.redis_url
        if not url:
            self.add("redis", "FAIL", "FLOWFORGE_REDIS_URL is not set")
            return
        client = Redis.from_url(url, socket_connect_timeout=self.timeout)
        try:
            await client.ping()
            self.redis_live = await self._live_types(client)
        finally:
            await client.aclose()
        self.add("redis", "ok", f"{mask_url(url)} answers PING")

    async def _live_types(self, client: Redis) -> dict[str, list[str]]:
        """The workers serving each registered step type now: those in its queue's presence
        set (refreshed while a worker polls, left when it stops, expired soon after a
        worker vanished)."""
        if not self.settings.database_url:
            return {}
        try:
            async with connection(self.settings) as conn:
                types = [r["name"] for r in await reads.step_type_registrations(conn)]
        except Exception:  # the postgresql and migrations checks say what is wrong
            return {}
        live = {t: await live_workers(client, queue_name(t)) for t in types}
        return {t: names for t, names in live.items() if names}

    async def migrations(self) -> None:
        pending = await store.pending_migrations(self.settings.database_url or "")
        known = load_migrations()
        self.migrated = len(pending) < len(known)
        if pending:
            names = ", ".join(f"{m.version:04d}_{m.name}" for m in pending)
            self.add(
                "migrations",
                "FAIL",
                f"{len(pending)} of {len(known)} not applied ({names}): "
                "run `flowforge-orchestrator migrate`",
            )
            return
        last = known[-1]
        self.add(
            "migrations", "ok", f"all {len(known)} applied (latest {last.version:04d}_{last.name})"
        )

    async def roles(self) -> None:
        names = list(store.ROLES.values())
        async with connection(self.settings) as conn:
            state = await reads.role_state(conn, names)
        missing = [n for n in names if n not in state.existing]
        apply = "apply sql/roles.sql as a superuser (README: Database roles)"
        if len(missing) == len(names):
            self.add(
                "roles",
                "warn",
                f"none of the least-privilege roles exist ({', '.join(names)}): every process "
                f"logs in with rights to everything; {apply}",
            )
        elif missing:
            self.add("roles", "FAIL", f"roles missing: {', '.join(missing)}; {apply}")
        elif state.not_owned:
            self.add(
                "roles",
                "FAIL",
                f"not handed to {names[0]}: {', '.join(state.not_owned)} (a migration ran "
                f"after sql/roles.sql); {apply} again",
            )
        elif not state.worker_inserts or not state.api_enqueues:
            self.add(
                "roles",
                "FAIL",
                f"the roles exist but have no grants in this database; {apply} on it",
            )
        else:
            self.add("roles", "ok", f"{', '.join(names)} exist and are granted here")

    async def outbox(self) -> None:
        """The feed's registered consumers, how far behind each is, and which are stuck:
        one retention deleted events from (past FLOWFORGE_OUTBOX_MAX_AGE), or will."""
        async with connection(self.settings) as conn:
            lags = await store.consumer_lags(conn)
        if not lags:
            self.add("outbox", "ok", "no registered consumers: retention waits for no relay")
            return
        max_age = self.settings.outbox_max_age
        for lag in lags:
            behind = f"{lag.events_behind} events"
            if lag.seconds_behind is not None:
                behind += f", {format_duration(round(lag.seconds_behind, 1))} behind"
            name = f"consumer '{lag.name}'"
            if lag.lost_events:
                self.add(
                    "outbox",
                    "warn",
                    f"{name} is stuck: retention deleted {lag.lost_events} events it had not "
                    f"read (last at {lag.lost_at:%Y-%m-%d %H:%M:%S}); {behind}; drop it if "
                    "it is gone (client.drop_consumer)",
                )
            elif lag.seconds_behind is not None and lag.seconds_behind > max_age:
                self.add(
                    "outbox",
                    "warn",
                    f"{name} is stuck: {behind}, more than FLOWFORGE_OUTBOX_MAX_AGE "
                    f"({format_duration(max_age)}): retention deletes what it has not read",
                )
            else:
                read = f"last read {lag.read_at:%Y-%m-%d %H:%M:%S}" if lag.read_at else "never read"
                self.add("outbox", "ok", f"{name}: {behind} ({read})")

    async def workers(self) -> None:
        async with connection(self.settings) as conn:
            registered = await reads.step_type_registrations(conn)
            specs = await reads.latest_specs(conn)
        served = {r["name"]: r["worker"] for r in registered}
        if not served:
            self.add(
                "workers",
                "FAIL",
                "no worker has ever registered: start `flowforge-orchestrator worker` (it "
                "registers the step types it serves)",
            )
            return
        unserved = _unserved_types(specs, served)
        for step_type, users in sorted(unserved.items()):
            self.add(
                "workers",
                "FAIL",
                f"step type '{step_type}' (used by {', '.join(users)}) is served by no "
                "registered worker: start a worker with the --types-module that provides it",
            )
        types = ", ".join(f"{name} ({worker})" for name, worker in sorted(served.items()))
        self.add("workers", "ok", f"registered step types: {types}")
        if self.redis_live is not None:
            live = self.redis_live
            if live:
                running = ", ".join(
                    f"{t} ({', '.join(names)})" for t, names in sorted(live.items())
                )
                self.add("workers", "ok", f"running now: {running}")
            idle = sorted(set(served) - set(live))
            if idle:
                # No worker running at all is as bad as none registered: nothing runs.
                self.add(
                    "workers",
                    "FAIL" if len(idle) == len(served) else "warn",
                    f"no running worker seen for: {', '.join(idle)} (none is in the presence "
                    "set of their queues in Redis)"
                    + (": nothing will run until one starts" if len(idle) == len(served) else ""),
                )


def _unserved_types(specs: Sequence[store.Record], served: dict[str, str]) -> dict[str, list[str]]:
    """Worker step types that the latest definitions use and no worker registered."""
    unserved: dict[str, list[str]] = {}
    for row in specs:
        label = f"{row['name']} v{row['version']}"
        try:
            definition = parse_definition(row["spec"], source=label)
        except FlowForgeError:
            continue  # the orchestrator fails its runs with the reason
        for step in definition.all_steps():
            if isinstance(step, TaskStep) and step.type not in served:
                users = unserved.setdefault(step.type, [])
                if label not in users:
                    users.append(label)
    return unserved


async def doctor(settings: Settings, *, timeout: float = 5.0) -> list[Finding]:
    """Every check, in order; a check that cannot run says what it needs."""
    state = _Doctor(settings, timeout, [])
    await state.run()
    return state.findings


def _print_findings(findings: list[Finding], strict: bool) -> int:
    width = max(len(f.check) for f in findings)
    for f in findings:
        print(f"{f.status:<4}  {f.check:<{width}}  {f.detail}")
    failed = [f for f in findings if f.status == "FAIL" or (strict and f.status == "warn")]
    warned = [f for f in findings if f.status == "warn"]
    if failed:
        print(f"\n{len(failed)} problem(s): fix the lines marked FAIL" + (" and warn" * strict))
        return 1
    print("\nall is well" + (f" ({len(warned)} warning(s))" if warned else ""))
    return 0


async def cmd_doctor(settings: Settings, args: argparse.Namespace) -> int:
    return _print_findings(await doctor(settings, timeout=args.timeout), args.strict)


def report_bad_settings(error: ConfigError, args: argparse.Namespace) -> int:
    """`doctor` when the settings do not even load: that is its first finding."""
    findings = [Finding("configuration", "FAIL", str(error))]
    findings += [
        Finding(check, "skip", "needs valid settings")
        for check in ("postgresql", "redis", "migrations", "roles", "workers")
    ]
    return _print_findings(findings, args.strict)


# -- config ----------------------------------------------------------------------------------


async def cmd_config(settings: Settings, args: argparse.Namespace) -> int:
    if args.markdown:
        print(settings_table(), end="")
        return 0
    if args.update_readme:
        path = Path(args.update_readme)
        try:
            text = path.read_text(encoding="utf-8")
            updated = replace_settings_table(text, settings_table())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: {exc}") from exc
        if updated != text:
            path.write_text(updated, encoding="utf-8")
        print(f"{path}: the settings table is {'updated' if updated != text else 'current'}")
        return 0
    values = effective_settings(settings, os.environ)
    if args.json:
        print(json.dumps({v.env: {"value": v.value, "source": v.source} for v in values}, indent=2))
        return 0
    width = max(len(f"{v.env}={v.value}") for v in values)
    for v in values:
        print(f"{f'{v.env}={v.value}':<{width}}  # {v.source}")
    return 0


# -- outbox consumers ------------------------------------------------------------------------


async def cmd_outbox_consumers(settings: Settings, args: argparse.Namespace) -> int:
    async with connection(settings) as conn:
        lags = await store.consumer_lags(conn)
    for lag in lags:
        behind = "-" if lag.seconds_behind is None else f"{lag.seconds_behind:.1f}s"
        read = f"{lag.read_at:%Y-%m-%d %H:%M:%S}" if lag.read_at else "never"
        print(
            f"{lag.name}  behind {lag.events_behind} events / {behind}  read {lag.events_read}"
            f" (last {read})  lost {lag.lost_events}"
        )
    return 0


async def cmd_outbox_register(settings: Settings, args: argparse.Namespace) -> int:
    try:
        async with connection(settings) as conn:
            created = await store.register_consumer(conn, args.name, from_now=args.from_now)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    print(f"consumer '{args.name}' " + ("registered" if created else "was already registered"))
    return 0


async def cmd_outbox_drop(settings: Settings, args: argparse.Namespace) -> int:
    async with connection(settings) as conn:
        dropped = await store.drop_consumer(conn, args.name)
    if not dropped:
        print(f"no consumer '{args.name}'", file=sys.stderr)
        return 2
    print(f"consumer '{args.name}' dropped: retention no longer waits for it")
    return 0


# -- outbox tail -----------------------------------------------------------------------------

_LOOKBACK = 1000  # positions re-read on each poll: an event may commit after a later one
_FINAL = ("workflow.completed", "workflow.failed", "workflow.cancelled")


def describe_event(event: dict[str, Any]) -> str:
    """`time  id  type  step (attempt n): error` for one CloudEvent."""
    data = event.get("data") or {}
    line = f"{event['time']}  {event['id']:<40}  {event['type']}"
    if "step_id" in data:
        line += f"  {data['step_id']}"
    if "attempt" in data:
        line += f" (attempt {data['attempt']})"
    error = data.get("error")
    if isinstance(error, dict) and error.get("message"):
        line += f": {error['message']}"
    return line


@dataclass
class _Tail:
    run_id: UUID | None
    as_json: bool
    printed: set[int]
    cursor: int = 0  # the highest position printed
    ended: bool = False  # the followed run reached a final event

    def show(self, rows: Sequence[store.Record]) -> None:
        for row in rows:
            position = row["position"]
            if position in self.printed:
                continue
            self.printed.add(position)
            self.cursor = max(self.cursor, position)
            event = row["event"]
            print(json.dumps(event) if self.as_json else describe_event(event), flush=True)
            if self.run_id is not None and event["type"] in _FINAL:
                self.ended = True
        low = self.cursor - _LOOKBACK
        self.printed = {p for p in self.printed if p > low}


async def _start_tail(conn: store.Connection, tail: _Tail, run_id: UUID | None, lines: int) -> None:
    """Print the latest `lines` events, and count every event of the window that following
    re-reads as seen: following prints only what is new, never the older events."""
    head = await reads.outbox_head(conn)
    window = await reads.outbox_events(
        conn, run_id=run_id, after=max(0, head - _LOOKBACK), limit=_LOOKBACK
    )
    latest = await reads.outbox_events(conn, run_id=run_id, limit=lines) if lines > 0 else []
    rows = sorted({row["position"]: row for row in [*latest, *window]}.items())
    shown = [row for _, row in rows[-lines:]] if lines > 0 else []
    tail.printed.update(position for position, _ in rows)
    tail.printed.difference_update(row["position"] for row in shown)
    tail.show(shown)
    tail.cursor = max(tail.cursor, head, *(position for position, _ in rows))


async def cmd_outbox_tail(settings: Settings, args: argparse.Namespace) -> int:
    tail = _Tail(args.run, args.json, set())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + args.timeout if args.timeout else None
    async with connection(settings) as conn:
        await _start_tail(conn, tail, args.run, args.lines)
        while args.follow and not tail.ended:
            if deadline is not None and loop.time() >= deadline:
                break
            await asyncio.sleep(args.interval)
            after = max(0, tail.cursor - _LOOKBACK)
            tail.show(await reads.outbox_events(conn, run_id=args.run, after=after))
    return 0


def add_commands(sub: Subcommands) -> None:
    doc = add_command(
        sub,
        "doctor",
        cmd_doctor,
        "check settings, PostgreSQL, Redis, migrations, roles and workers; exit 0 when well",
        on_bad_settings=report_bad_settings,
    )
    doc.add_argument("--timeout", type=float, default=5.0, help="per check, seconds")
    doc.add_argument("--strict", action="store_true", help="warnings fail too")

    cfg = add_command(sub, "config", cmd_config, "the effective settings, secrets masked")
    shape = cfg.add_mutually_exclusive_group()
    shape.add_argument("--json", action="store_true")
    shape.add_argument(
        "--markdown", action="store_true", help="the table of every setting (README)"
    )
    shape.add_argument(
        "--update-readme", metavar="FILE", help="replace the settings table in this file"
    )

    outbox = sub.add_parser("outbox", help="the outbox of lifecycle events").add_subparsers(
        dest="outbox_command", required=True
    )
    tail = add_command(
        outbox, "tail", cmd_outbox_tail, "the latest events (CloudEvents), and new ones as written"
    )
    tail.add_argument("-n", "--lines", type=int, default=10, help="latest events first shown")
    tail.add_argument("--run", type=run_id_arg, default=None, help="only this run's events")
    tail.add_argument(
        "-f", "--follow", action="store_true", help="keep printing (with --run: until it ends)"
    )
    tail.add_argument("--timeout", type=float, default=None, help="stop following after N s")
    tail.add_argument("--interval", type=float, default=0.5, help="poll interval, s")
    tail.add_argument("--json", action="store_true", help="one CloudEvent JSON per line")
    add_command(outbox, "consumers", cmd_outbox_consumers, "registered feed consumers and lag")
    register = add_command(
        outbox, "register", cmd_outbox_register, "register a feed consumer (retention waits for it)"
    )
    register.add_argument("name")
    register.add_argument(
        "--from-now", action="store_true", help="skip the events already committed"
    )
    drop = add_command(outbox, "drop", cmd_outbox_drop, "forget a feed consumer")
    drop.add_argument("name")
