"""The outbox's packed rows (store/outbox_packing.py): how a commit's events of one run are
split into rows and written as text; the SQL side that reads them back is tested against
PostgreSQL in tests/integration/test_compact_outbox.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import UUID, uuid4

import pytest

from flowforge_orchestrator.core.records import Event
from flowforge_orchestrator.errors import StoreError
from flowforge_orchestrator.store.outbox_packing import (
    MAX_EVENTS_PER_ROW,
    WORDS,
    columns,
    pack_events,
)

T0 = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
RUN = UUID("00000000-0000-4000-8000-000000000001")
ATTEMPT = UUID("8c1e0a4e-3b7e-4a4c-9a6f-0f7b2f1f6c11")


def _event(seq: int, **fields: object) -> Event:
    base: dict[str, object] = {"seq": seq, "type": "step.succeeded", "at": T0, "to_status": "x"}
    return Event(**(base | fields))  # type: ignore[arg-type]


def test_one_row_per_commit_of_a_run() -> None:
    events = [_event(seq, at=T0 + timedelta(microseconds=seq)) for seq in (4, 5, 6)]
    [row] = pack_events(RUN, "tp", events)
    assert (row.run_id, row.seq, row.time, row.traceparent) == (RUN, 4, events[0].at, "tp")
    assert [line.split("\t")[1] for line in row.events.split("\n")] == ["0", "1", "2"]


def test_a_gap_in_seq_or_a_full_block_starts_a_new_row() -> None:
    gap = pack_events(RUN, None, [_event(1), _event(2), _event(5)])
    assert [(r.seq, r.events.count("\n") + 1) for r in gap] == [(1, 2), (5, 1)]
    many = pack_events(RUN, None, [_event(s) for s in range(1, MAX_EVENTS_PER_ROW + 3)])
    assert [(r.seq, r.events.count("\n") + 1) for r in many] == [
        (1, MAX_EVENTS_PER_ROW),
        (MAX_EVENTS_PER_ROW + 1, 2),
    ]
    assert pack_events(RUN, None, []) == []


def test_fields_frequent_words_and_the_step_id_taken_out_of_data() -> None:
    [row] = pack_events(
        RUN,
        None,
        [
            _event(
                1,
                type="step.dispatched",
                from_status="pending",
                to_status="dispatched",
                step_id="charge",
                attempt_id=ATTEMPT,
                data={"step_id": "charge", "attempt": 1, "note": "tab\there"},
            ),
            _event(2, type="custom.kind", to_status="odd", data={"step_id": "other"}),
            _event(3, at=T0 - timedelta(seconds=1), data={}),
        ],
    )
    first, second, third = (line.split("\t") for line in row.events.split("\n"))
    assert first == [
        str(WORDS.index("step.dispatched") + 1),
        "0",
        "charge",
        "jB4KTjt+Skyabw97Lx9sEQ",
        str(WORDS.index("pending") + 1),
        str(WORDS.index("dispatched") + 1),
        '+{"attempt":1,"note":"tab\\there"}',
    ]
    # unknown words stay text; data naming another step (or none) is kept whole
    assert second == ["custom.kind", "0", "", "", "", "odd", '{"step_id":"other"}']
    assert third[1] == "-1000000" and third[6] == ""


def test_a_field_that_would_break_the_format_is_refused_with_its_run_and_seq() -> None:
    run = uuid4()
    with pytest.raises(StoreError, match=rf"event 7 of run {run}: its step id 'a\\tb'"):
        pack_events(run, None, [_event(7, step_id="a\tb")])
    with pytest.raises(StoreError, match="its type '3x'"):
        pack_events(run, None, [_event(7, type="3x")])


def test_columns_are_the_parallel_arrays_of_the_insert() -> None:
    rows = pack_events(RUN, "tp", [_event(1), _event(3)])
    ids, seqs, times, traceparents, texts = columns(rows)
    assert (ids, seqs, times, traceparents) == ([RUN, RUN], [1, 3], [T0, T0], ["tp", "tp"])
    assert texts == [r.events for r in rows]
