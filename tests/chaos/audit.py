"""What the database says after the chaos: lost runs, duplicated or missing history.

The primary keys make a literal double write of (run, seq) impossible, so the audit looks
for what a double write would really look like:

* a run's transitions and outbox events are numbered 1..n without a gap, match row for row
  (same seq, same step; since sql/0006 `transitions` is a view over the outbox, so this
  checks that an event's columns agree with its `data`), and the checkpoint's `seq` is the
  last one written (`gaps`);
* no (run, step key, attempt, status) appears twice in the transitions, and no (run, step
  key, attempt, type) twice in the outbox: each is reported once per attempt
  (`dup_transitions`, `dup_events`: the extra rows);
* a finished run has one `workflow.started` and one terminal event, and the terminal event
  is its last (a doubled one is in `dup_events`; a missing or misplaced one breaks the
  history).

Each check returns the rows it found, for the report; the figures are their counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flowforge_orchestrator import store

__all__ = ["Audit", "audit", "histories"]

FINISHED = ("completed", "failed", "cancelled")

# Runs whose history is not 1..n, whose two logs differ, or whose checkpoint is behind.
_GAPS = """
WITH t AS (
    SELECT run_id, count(*) AS n, min(seq) AS lo, max(seq) AS hi
    FROM flowforge.transitions GROUP BY run_id
), o AS (
    SELECT run_id, count(*) AS n, min(seq) AS lo, max(seq) AS hi
    FROM flowforge.outbox GROUP BY run_id
), mismatched AS (
    SELECT coalesce(t.run_id, o.run_id) AS run_id, count(*) AS rows
    FROM flowforge.transitions t
    FULL JOIN flowforge.outbox o ON o.run_id = t.run_id AND o.seq = t.seq
    WHERE t.run_id IS NULL OR o.run_id IS NULL
       OR t.step_id IS DISTINCT FROM o.data->>'step_id'
    GROUP BY 1
)
SELECT r.id AS run_id, r.status,
       t.n AS transitions, t.lo AS t_lo, t.hi AS t_hi,
       o.n AS events, o.lo AS o_lo, o.hi AS o_hi,
       (r.checkpoint->>'seq')::int AS checkpoint_seq,
       coalesce(m.rows, 0) AS mismatched
FROM flowforge.runs r
LEFT JOIN t ON t.run_id = r.id
LEFT JOIN o ON o.run_id = r.id
LEFT JOIN mismatched m ON m.run_id = r.id
WHERE r.status <> 'pending' AND (
       t.n IS NULL OR o.n IS NULL
    OR t.lo <> 1 OR t.n <> t.hi OR o.lo <> 1 OR o.n <> o.hi
    OR m.rows IS NOT NULL
    OR (r.checkpoint->>'seq')::int IS DISTINCT FROM t.hi)
ORDER BY r.id
"""

_DUP_TRANSITIONS = """
SELECT run_id, step_id, attempt_id, to_status, count(*) AS n, array_agg(seq ORDER BY seq) AS seqs
FROM flowforge.transitions
GROUP BY run_id, step_id, attempt_id, to_status
HAVING count(*) > 1
ORDER BY run_id, min(seq)
"""

_DUP_EVENTS = """
SELECT run_id, data->>'step_id' AS step_id, data->>'attempt' AS attempt, type, count(*) AS n,
       array_agg(seq ORDER BY seq) AS seqs
FROM flowforge.outbox
GROUP BY run_id, data->>'step_id', data->>'attempt', type
HAVING count(*) > 1
ORDER BY run_id, min(seq)
"""

# Finished runs without exactly one start and one terminal event, or whose last event is
# not the terminal one.
_ENDS = """
SELECT r.id AS run_id, r.status,
       count(*) FILTER (WHERE o.type = 'workflow.started') AS started,
       count(*) FILTER (WHERE o.type = 'workflow.' || r.status) AS ended,
       max(o.seq) AS last_seq,
       max(o.seq) FILTER (WHERE o.type = 'workflow.' || r.status) AS end_seq
FROM flowforge.runs r JOIN flowforge.outbox o ON o.run_id = r.id
WHERE r.status = ANY($1::text[])
GROUP BY r.id, r.status
HAVING count(*) FILTER (WHERE o.type = 'workflow.started') <> 1
    OR count(*) FILTER (WHERE o.type = 'workflow.' || r.status) <> 1
    OR max(o.seq) IS DISTINCT FROM max(o.seq) FILTER (WHERE o.type = 'workflow.' || r.status)
"""

_RUNS = """
SELECT id, workflow_name, status, input, output, error, owner, epoch, lease_expires_at,
       created_at, finished_at
FROM flowforge.runs ORDER BY created_at
"""

_ATTEMPTS = """
SELECT id, run_id, step_id, attempt, status, dispatched_at FROM flowforge.step_attempts
"""


@dataclass
class Audit:
    """The rows each check found; the figures are their sizes."""

    runs: list[dict[str, Any]]
    attempts: list[dict[str, Any]]
    gaps: list[dict[str, Any]] = field(default_factory=list)
    dup_transitions: list[dict[str, Any]] = field(default_factory=list)
    dup_events: list[dict[str, Any]] = field(default_factory=list)
    ends: list[dict[str, Any]] = field(default_factory=list)

    @property
    def lost(self) -> list[dict[str, Any]]:
        return [r for r in self.runs if r["status"] not in FINISHED]

    @property
    def duplicate_transitions(self) -> int:
        return sum(int(r["n"]) - 1 for r in self.dup_transitions)

    @property
    def duplicate_events(self) -> int:
        # A doubled start or end is a (run, no step, no attempt, type) group of two here.
        return sum(int(r["n"]) - 1 for r in self.dup_events)

    @property
    def broken_histories(self) -> int:
        """Runs with a gap, a mismatch, a stale checkpoint, or a missing start or end."""
        missing = {r["run_id"] for r in self.ends if r["started"] == 0 or r["ended"] == 0}
        misplaced = {
            r["run_id"] for r in self.ends if r["ended"] == 1 and r["end_seq"] != r["last_seq"]
        }
        return len({r["run_id"] for r in self.gaps} | missing | misplaced)


async def audit(conn: store.Connection) -> Audit:
    """Run every check in one snapshot."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        result = Audit(
            runs=[dict(r) for r in await conn.fetch(_RUNS)],
            attempts=[dict(r) for r in await conn.fetch(_ATTEMPTS)],
        )
        result.gaps = [dict(r) for r in await conn.fetch(_GAPS)]
        result.dup_transitions = [dict(r) for r in await conn.fetch(_DUP_TRANSITIONS)]
        result.dup_events = [dict(r) for r in await conn.fetch(_DUP_EVENTS)]
        result.ends = [dict(r) for r in await conn.fetch(_ENDS, list(FINISHED))]
    return result


async def histories(conn: store.Connection, run_ids: list[Any]) -> list[dict[str, Any]]:
    """Everything the database holds about these runs, for a post-mortem (`findings.json`)."""
    out = []
    for run_id in run_ids:
        run = await conn.fetchrow("SELECT * FROM flowforge.runs WHERE id = $1", run_id)
        rows = {
            "transitions": "SELECT * FROM flowforge.transitions WHERE run_id = $1 ORDER BY seq",
            "outbox": "SELECT seq, type, time, data FROM flowforge.outbox WHERE run_id = $1"
            " ORDER BY seq",
            "attempts": "SELECT * FROM flowforge.step_attempts WHERE run_id = $1"
            " ORDER BY dispatched_at",
            "results": "SELECT attempt_id, step_id, outcome, error, worker, started_at,"
            " finished_at FROM flowforge.step_results WHERE run_id = $1 ORDER BY finished_at",
        }
        entry: dict[str, Any] = {"run": dict(run) if run else None}
        for name, sql in rows.items():
            entry[name] = [dict(r) for r in await conn.fetch(sql, run_id)]
        out.append(entry)
    return out
