"""`runs export` (finished runs, one JSON line each with their history, read back equal to
what the database holds) and `doctor`'s outbox consumers, their lag and the stuck ones."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from flowforge_orchestrator import store
from flowforge_orchestrator.client import read_outbox, register_consumer
from flowforge_orchestrator.config import Settings
from tests.integration.cli_helpers import Cli, cli
from tests.integration.conftest import Engine
from tests.integration.test_cli_ops import lines_of
from tests.integration.test_cli_runs import SLOW, completed_tree_run

__all__ = ["cli"]  # the fixture


def _lines(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("name", ["runs.jsonl", "runs.jsonl.gz"])
async def test_export_round_trips_a_runs_history(
    steps_engine: Engine, cli: Cli, tmp_path: Path, name: str
) -> None:
    engine = steps_engine
    done = await completed_tree_run(engine)
    await engine.register(SLOW)
    open_run = await engine.submit("slow")  # running: held, never exported
    target = tmp_path / name

    result = await cli("runs", "export", "--before", "0s", "--to", str(target))

    assert result.code == 0, result.err
    assert "exported 1 runs" in result.out
    assert not (tmp_path / f"{name}.partial").exists()
    [line] = _lines(target)
    assert line["id"] == str(done) and line["id"] != str(open_run)
    run = await engine.run(done)
    assert line["status"] == "completed" and line["workflow_name"] == "tree"
    assert line["input"] == run["input"] and line["output"] == run["output"]
    assert line["finished_at"] == run["finished_at"].isoformat()
    events = await engine.conn.fetch(
        "SELECT event FROM flowforge.outbox_cloudevents WHERE run_id = $1 ORDER BY seq", done
    )
    assert line["events"] == [r["event"] for r in events]
    assert [int(e["sequence"]) for e in line["events"]] == list(range(1, len(events) + 1))
    results = await engine.conn.fetch(
        "SELECT attempt_id::text, step_id, outcome, output FROM flowforge.step_results"
        " WHERE run_id = $1",
        done,
    )
    assert sorted((r["attempt_id"], r["step_id"], r["outcome"]) for r in results) == sorted(
        (x["attempt_id"], x["step_id"], x["outcome"]) for x in line["results"]
    )
    assert all("token" not in x for x in line["results"])
    by_step = {x["step_id"]: x["output"] for x in line["results"]}
    assert by_step["fetch"] == {"items": [1, 2, 3], "total": 5}


async def test_export_before_a_time_leaves_later_runs_out(
    steps_engine: Engine, cli: Cli, tmp_path: Path
) -> None:
    await completed_tree_run(steps_engine)
    target = tmp_path / "old.jsonl"
    result = await cli("runs", "export", "--before", "2000-01-01T00:00:00Z", "--to", str(target))
    assert result.code == 0, result.err
    assert "exported 0 runs" in result.out
    assert _lines(target) == []
    bad = await cli("runs", "export", "--before", "yesterday-ish", "--to", str(target))
    assert bad.code == 2


async def test_doctor_shows_consumers_their_lag_and_the_stuck_ones(
    settings: Settings, cli: Cli
) -> None:
    conn = await store.connect(settings.database_url or "")
    try:
        assert lines_of((await cli("doctor")).out)["outbox"] == [
            ("ok", "no registered consumers: retention waits for no relay")
        ]
        for name in ("current", "behind", "stuck", "old"):
            await register_consumer(conn, name)
        await conn.execute(
            "INSERT INTO flowforge.outbox (run_id, seq, type, time, data, to_status)"
            " SELECT gen_random_uuid(), 1, 'workflow.started', now() - interval '8 days',"
            " '{}', 'started' FROM generate_series(1, 3)"
        )
        await read_outbox(conn, "current", 10)
        await read_outbox(conn, "behind", 1)
        await conn.execute(
            "UPDATE flowforge.outbox_consumers SET lost_events = 5, lost_at = now()"
            " WHERE name = 'stuck'"
        )
        result = await cli("doctor")
    finally:
        await conn.close()
    found = dict(
        (detail.split("'")[1], (status, detail))
        for status, detail in lines_of(result.out)["outbox"]
    )
    assert found["current"][0] == "ok" and "0 events (last read" in found["current"][1]
    assert found["behind"][0] == "warn" and "2 events, 8d" in found["behind"][1]
    assert "more than FLOWFORGE_OUTBOX_MAX_AGE (7d)" in found["behind"][1]
    assert found["stuck"][0] == "warn"
    assert "retention deleted 5 events it had not read" in found["stuck"][1]
    assert found["old"][0] == "warn" and "3 events" in found["old"][1]


async def test_outbox_consumers_are_registered_listed_and_dropped(cli: Cli) -> None:
    assert (await cli("outbox", "register", "billing")).out.strip() == (
        "consumer 'billing' registered"
    )
    again = await cli("outbox", "register", "billing", "--from-now")
    assert again.code == 0 and "was already registered" in again.out
    bad = await cli("outbox", "register", "no spaces")
    assert bad.code == 2 and "consumer name 'no spaces'" in bad.err
    listed = await cli("outbox", "consumers")
    assert listed.code == 0
    assert listed.out.startswith("billing  behind 0 events / -  read 0 (last never)  lost 0")
    assert (await cli("outbox", "drop", "billing")).code == 0
    gone = await cli("outbox", "drop", "billing")
    assert gone.code == 2 and "no consumer 'billing'" in gone.err
    assert (await cli("outbox", "consumers")).out == ""
