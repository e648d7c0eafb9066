"""What a commit of a big fan-out asks of the graph costs what changed, not the number of
elements: whether an attempt is out, and when the next timer fires."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from flowforge_orchestrator.core.graph.timers import RUN_TIMER, Timers
from flowforge_orchestrator.core.state import RunStatus
from tests.unit.test_checkpoint_parts import fan_out
from tests.unit.test_graph import at, ok

T0 = datetime(2024, 5, 1, tzinfo=UTC)


def t(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_the_next_timer_skips_those_cleared_and_moved() -> None:
    timers = Timers()
    timers.put("a", t(10))
    timers.put("b", t(5))
    timers.put("c", t(7))
    assert timers.next() == t(5)
    assert timers.take("b")
    assert timers.next() == t(7)
    timers.put("c", t(20))  # moved later: it counts where it was moved to
    assert timers.next() == t(10)
    timers.put("c", t(1))  # and earlier
    assert timers.next() == t(1)
    timers.drop("c")
    assert timers.next() == t(10)
    timers.put(RUN_TIMER, t(30))
    assert timers.deadline == t(30)
    timers.reset()
    assert timers.next() is None


def test_due_timers_come_earliest_first_once_each_and_stay_until_taken() -> None:
    timers = Timers()
    timers.put("b", t(5))
    timers.put("a", t(5))
    timers.put("x", t(6))
    timers.put("x", t(9))
    timers.put("x", t(6))  # back where it was: one entry, not two
    timers.put("late", t(60))
    assert timers.due(t(10)) == ["a", "b", "x"]
    assert timers.due(t(10)) == ["a", "b", "x"]  # not taken yet
    assert timers.take("a") and not timers.take("a")
    assert timers.due(t(10)) == ["b", "x"]
    assert timers.next() == t(5)


def test_stale_entries_do_not_pile_up() -> None:
    timers = Timers()
    for i in range(10_000):
        timers.put(f"k{i}", t(i))
        timers.drop(f"k{i}")
    timers.put("kept", t(1))
    assert len(timers._heap) <= 2 * 1 + 64 + 1
    assert timers.next() == t(1)


def test_whether_an_attempt_is_out_is_answered_without_walking_the_elements() -> None:
    run, rec = fan_out(3000)
    assert run.has_outstanding()
    for dispatch in rec.dispatches[:-1]:  # in order: the first out is ever further on
        run.apply_result(ok(dispatch, None), at(1))
        assert run.has_outstanding()
    assert len(run._out) == 1  # the answered ones left it
    assert run.outstanding() == [rec.dispatches[-1].attempt_id]
    run.apply_result(ok(rec.dispatches[-1], None), at(1))
    assert not run.has_outstanding()
    assert run.status is RunStatus.COMPLETED
