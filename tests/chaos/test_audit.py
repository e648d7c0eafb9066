"""The chaos run's audit finds what it looks for: histories written by hand, one defect each."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

from flowforge_orchestrator import store
from tests.chaos.audit import audit
from tests.helpers import register_workflows

NOW = datetime(2026, 1, 1, tzinfo=UTC)
A1 = uuid4()

# (type, step key, attempt id, to_status)
GOOD: list[tuple[str, str | None, UUID | None, str]] = [
    ("workflow.started", None, None, "running"),
    ("step.dispatched", "a", A1, "dispatched"),
    ("step.started", "a", A1, "running"),
    ("step.succeeded", "a", A1, "succeeded"),
    ("workflow.completed", None, None, "completed"),
]


async def _run(
    conn: store.Connection,
    events: list[tuple[str, str | None, UUID | None, str]],
    *,
    status: str = "completed",
    seqs: list[int] | None = None,
) -> UUID:
    run_id = uuid4()
    seqs = seqs or list(range(1, len(events) + 1))
    # Runs are inserted pending (sql/0010_isolation.sql), of a registered workflow (0014);
    # the engine moves them on.
    await register_workflows(conn, "w")
    await conn.execute("INSERT INTO flowforge.runs (id, workflow_name) VALUES ($1, 'w')", run_id)
    await conn.execute(
        "UPDATE flowforge.runs SET status = $2, checkpoint = $3 WHERE id = $1",
        run_id,
        status,
        {"seq": max(seqs)},
    )
    for seq, (type_, step, attempt, to_status) in zip(seqs, events, strict=True):
        # One row per transition: the outbox is the history (sql/0006_history_in_outbox.sql).
        data: dict[str, Any] = {"step_id": step, "attempt": 1} if step else {}
        await conn.execute(
            "INSERT INTO flowforge.outbox"
            " (run_id, seq, type, time, data, step_id, attempt_id, to_status)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            run_id,
            seq,
            type_,
            NOW,
            data,
            step,
            attempt,
            to_status,
        )
    return run_id


async def test_the_audit_counts_each_kind_of_defect_once(db_url: str) -> None:
    conn = await store.connect(db_url)
    try:
        await _run(conn, GOOD)
        gap = await _run(conn, GOOD, seqs=[1, 2, 3, 4, 6])
        twice = await _run(conn, [*GOOD[:2], GOOD[1], *GOOD[2:]])
        ended_twice = await _run(conn, [*GOOD, GOOD[-1]])
        lost = await _run(conn, GOOD[:3], status="running")
        unended = await _run(conn, GOOD[:4])  # completed, without workflow.completed
        found = await audit(conn)
    finally:
        await conn.close()

    assert [r["id"] for r in found.lost] == [lost]
    assert found.duplicate_transitions == 2  # `twice` and `ended_twice`, one extra row each
    assert found.duplicate_events == 2
    assert {r["run_id"] for r in found.dup_transitions} == {twice, ended_twice}
    assert {r["run_id"] for r in found.gaps} == {gap}
    assert {r["run_id"] for r in found.ends} == {unended, ended_twice}
    assert found.broken_histories == 2  # gap, unended
