"""The outbox's stored form (sql/0017_compact_outbox.sql): a commit's events of one run in one
row of `outbox_packed`, as compact text that the `flowforge.outbox` view unpacks.

One line per event, seven tab-separated fields: type, microseconds after the row's time,
step id, attempt id (base64 of its 16 bytes, unpadded), from status, to status, data (JSON;
empty for {}; `+` first when the step id was taken out of it). Frequent words are stored as
their number in `WORDS`, which must stay the list of `flowforge.outbox_word` (append only).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from uuid import UUID

from flowforge_orchestrator.core.records import Event
from flowforge_orchestrator.errors import StoreError

__all__ = ["MAX_EVENTS_PER_ROW", "WORDS", "PackedRow", "columns", "pack_events"]

# The words `flowforge.outbox_word` knows, numbered from 1 (its ARRAY, in order).
WORDS: tuple[str, ...] = (
    "step.dispatched",
    "step.started",
    "step.succeeded",
    "pending",
    "dispatched",
    "running",
    "succeeded",
    "workflow.started",
    "workflow.completed",
    "completed",
    "step.failed",
    "step.retrying",
    "step.timed_out",
    "step.skipped",
    "step.cancelled",
    "failed",
    "retrying",
    "timed_out",
    "skipped",
    "cancelled",
    "workflow.failed",
    "workflow.cancelled",
    "step.waiting",
    "step.event_received",
    "step.handed_off",
)
_CODES = {word: str(number) for number, word in enumerate(WORDS, 1)}

# A row's events take positions `position .. position + n - 1`; the identity moves by this.
MAX_EVENTS_PER_ROW = 1024

_MICROSECOND = timedelta(microseconds=1)
_SEPARATORS = ("\t", "\n")


@dataclass(frozen=True)
class PackedRow:
    """One row of `outbox_packed`: events `seq .. seq + n - 1` of a run, from `time` on."""

    run_id: UUID
    seq: int
    time: datetime
    traceparent: str | None
    events: str


def pack_events(run_id: UUID, traceparent: str | None, events: Sequence[Event]) -> list[PackedRow]:
    """A run's events of one commit as rows: one, unless they are more than
    `MAX_EVENTS_PER_ROW` or their numbers have a gap (each row's events follow each other)."""
    rows: list[PackedRow] = []
    start = 0
    for i in range(1, len(events) + 1):
        if (
            i == len(events)
            or i - start == MAX_EVENTS_PER_ROW
            or events[i].seq != events[i - 1].seq + 1
        ):
            rows.append(_row(run_id, traceparent, events[start:i]))
            start = i
    return rows


def _row(run_id: UUID, traceparent: str | None, events: Sequence[Event]) -> PackedRow:
    first = events[0].at
    lines = "\n".join(_line(run_id, first, event) for event in events)
    return PackedRow(run_id, events[0].seq, first, traceparent, lines)


def _line(run_id: UUID, first: datetime, event: Event) -> str:
    step_id = event.step_id or ""
    for name, value in (("type", event.type), ("step id", step_id)):
        if any(c in value for c in _SEPARATORS) or value[:1].isdigit():
            raise StoreError(
                f"event {event.seq} of run {run_id}: its {name} {value!r} cannot be stored"
                " (a tab, a newline, or a leading digit)"
            )
    return "\t".join(
        (
            _word(event.type),
            str((event.at - first) // _MICROSECOND),
            step_id,
            _uuid(event.attempt_id),
            _word(event.from_status) if event.from_status is not None else "",
            _word(event.to_status),
            _data(event.data, event.step_id),
        )
    )


def _word(word: str) -> str:
    return _CODES.get(word, word)


def _uuid(value: UUID | None) -> str:
    if value is None:
        return ""
    return base64.b64encode(value.bytes).decode("ascii").rstrip("=")


def _data(data: dict[str, object], step_id: str | None) -> str:
    if not data:
        return ""
    if step_id is not None and data.get("step_id") == step_id:
        rest = {k: v for k, v in data.items() if k != "step_id"}
        return "+" + _json(rest)
    return _json(data)


def _json(value: object) -> str:
    # Compact, and control characters escaped: no tab or newline in the text.
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def columns(
    rows: Iterable[PackedRow],
) -> tuple[list[UUID], list[int], list[datetime], list[str | None], list[str]]:
    """The rows as the parallel arrays of one INSERT ... unnest."""
    rows = list(rows)
    return (
        [r.run_id for r in rows],
        [r.seq for r in rows],
        [r.time for r in rows],
        [r.traceparent for r in rows],
        [r.events for r in rows],
    )
