"""`events send`: deliver an event to one run or, by key, to every run that waits for it;
`events complete`: finish a step that handed its work to another system."""

from __future__ import annotations

import argparse
import json
from typing import Any

from flowforge_orchestrator.cli.common import add_command, connection, run_id_arg
from flowforge_orchestrator.client import complete_attempt, send_event
from flowforge_orchestrator.config import Settings
from flowforge_orchestrator.errors import ConfigError

__all__ = ["add_commands"]


def _json(option: str, text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{option} is not valid JSON: {exc}") from exc


async def cmd_send(settings: Settings, args: argparse.Namespace) -> int:
    if (args.run is None) == (args.key is None):
        raise ConfigError("events send: give --run RUN_ID or --key KEY (one of them)")
    payload = _json("--data", args.data)
    async with connection(settings) as conn:
        event_id = await send_event(conn, args.name, payload, run_id=args.run, key=args.key)
    print(f"event {event_id} sent")
    return 0


async def cmd_complete(settings: Settings, args: argparse.Namespace) -> int:
    output, error = _json("--output", args.output), _json("--error", args.error)
    if error is not None and not isinstance(error, dict):
        raise ConfigError('--error is a JSON object, e.g. {"message": "declined"}')
    async with connection(settings) as conn:
        completion = await complete_attempt(
            conn, args.attempt_id, args.token, output=output, error=error
        )
    print(f"completion {completion} stored")
    return 0


def add_commands(sub: Any) -> None:
    events = sub.add_parser("events", help="send events to waiting runs").add_subparsers(
        dest="events_command", required=True
    )
    send = add_command(events, "send", cmd_send, "send an event to a run or to a key")
    send.add_argument("name", help="the event's name, as a wait step names it")
    send.add_argument("--run", type=run_id_arg, default=None, help="to this run only")
    send.add_argument("--key", default=None, help="to every run waiting with this key")
    send.add_argument("--data", default="{}", help="the payload, as JSON")
    complete = add_command(
        events, "complete", cmd_complete, "finish a step handed to another system"
    )
    complete.add_argument("attempt_id", type=run_id_arg)
    complete.add_argument("token", help="the attempt's completion token (ctx.completion_token)")
    outcome = complete.add_mutually_exclusive_group(required=True)
    outcome.add_argument("--output", default=None, help="the step's output, as JSON")
    outcome.add_argument("--error", default=None, help="a JSON object with a message")
