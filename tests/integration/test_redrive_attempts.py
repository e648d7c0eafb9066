"""After a redrive, the events, the tree and the attempts of `runs show` number a step's
attempts alike (a fan-out run again numbers its elements' attempts afresh)."""

from __future__ import annotations

import re

import httpx
import respx

from flowforge_orchestrator.client import redrive
from tests.integration.cli_helpers import Cli, cli
from tests.integration.conftest import Engine

__all__ = ["cli"]

FAN = """
name: fan
version: 1
steps:
  - {id: first, type: http, with: {url: "http://svc.test/first"}}
  - id: charge_all
    type: parallel
    depends_on: [first]
    for_each: "input.items"
    step: {id: charge, type: http, with: {url: "http://svc.test/charge"}}
"""


def _last_attempt(events: str, step: str) -> str:
    """The attempt number the last event of `step` says."""
    found = re.findall(rf"  step\.\w+ {re.escape(step)} \(attempt (\d+)\)", events)
    assert found, events
    return str(found[-1])


async def test_after_a_redrive_events_and_tree_say_the_same_attempt(
    engine: Engine, cli: Cli
) -> None:
    with respx.mock() as router:
        router.get("http://svc.test/first").mock(
            side_effect=[httpx.Response(500, text="down"), httpx.Response(200, json={})]
        )
        router.get("http://svc.test/charge").mock(
            side_effect=[httpx.Response(500, text="down"), httpx.Response(200, json={})]
        )
        await engine.register(FAN)
        run_id = await engine.submit("fan", {"items": [1]})
        assert (await engine.finished(run_id))["status"] == "failed"  # `first` failed
        await redrive(engine.conn, run_id)
        assert (await engine.finished(run_id))["status"] == "failed"  # `charge[0]` failed
        await redrive(engine.conn, run_id)
        assert (await engine.finished(run_id))["status"] == "completed"

    shown = await cli("runs", "show", str(run_id))
    watched = await cli("runs", "watch", str(run_id))

    assert shown.code == 0 and watched.code == 0, shown.err + watched.err
    tree = {
        m["key"]: m["attempt"]
        for m in re.finditer(
            r"^\W+(?P<key>[\w\[\]]+) +http +\w+ +attempt (?P<attempt>\d+)", shown.out, re.M
        )
    }
    assert tree == {"first": "2", "charge[0]": "1"}, shown.out
    for key, attempt in tree.items():
        assert _last_attempt(watched.out, key) == attempt, watched.out
    listed = re.findall(r"^  charge\[0\] +#(\d+) http +(\w+)", shown.out, re.M)
    assert listed == [("1", "failed"), ("1", "succeeded")], shown.out
