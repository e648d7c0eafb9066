"""The timer heap: runs come due in order, once, at the timer they have last; a timer moved
earlier or later counts where it was moved to; stale entries never fire nor pile up."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import UUID, uuid4

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from flowforge_orchestrator.engine.timers import SLACK, TimerHeap

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_runs_come_due_earliest_first_and_only_when_due() -> None:
    heap = TimerHeap()
    a, b, c = uuid4(), uuid4(), uuid4()
    heap.set(b, at(20))
    heap.set(a, at(10))
    heap.set(c, at(30))

    assert heap.pop_due(at(9)) == []
    assert heap.next_due() == at(10)
    assert heap.pop_due(at(25)) == [a, b]
    assert heap.pop_due(at(25)) == []  # each comes due once
    assert heap.next_due() == at(30)
    assert heap.pop_due(at(30)) == [c]
    assert heap.next_due() is None
    assert len(heap) == 0


def test_timers_due_at_the_same_time_come_in_the_order_they_were_set() -> None:
    heap = TimerHeap()
    runs = [uuid4() for _ in range(20)]
    for run_id in runs:
        heap.set(run_id, at(5))
    assert heap.pop_due(at(5)) == runs


def test_a_timer_moved_later_fires_at_its_new_time_only() -> None:
    heap = TimerHeap()
    run_id = uuid4()
    heap.set(run_id, at(10))
    heap.set(run_id, at(40))

    assert heap.next_due() == at(40)  # the stale entry at 10 is skipped
    assert heap.pop_due(at(39)) == []
    assert heap.pop_due(at(40)) == [run_id]
    assert heap.pop_due(at(100)) == []


def test_a_timer_moved_earlier_fires_once_at_its_new_time() -> None:
    heap = TimerHeap()
    run_id = uuid4()
    heap.set(run_id, at(40))
    heap.set(run_id, at(10))

    assert heap.pop_due(at(10)) == [run_id]
    assert heap.pop_due(at(40)) == []  # the entry at 40 went stale


def test_a_timer_moved_away_and_back_fires_once() -> None:
    heap = TimerHeap()
    run_id = uuid4()
    heap.set(run_id, at(10))
    heap.set(run_id, at(20))
    heap.set(run_id, at(10))

    assert heap.pop_due(at(30)) == [run_id]


def test_a_run_without_a_timer_or_discarded_never_comes_due() -> None:
    heap = TimerHeap()
    cleared, discarded, kept = uuid4(), uuid4(), uuid4()
    for run_id in (cleared, discarded, kept):
        heap.set(run_id, at(10))
    heap.set(cleared, None)
    heap.discard(discarded)

    assert heap.timer_of(cleared) is None
    assert heap.pop_due(at(10)) == [kept]


def test_set_says_when_the_earliest_timer_moved_earlier() -> None:
    heap = TimerHeap()
    a, b = uuid4(), uuid4()
    assert heap.set(a, at(10)) is True  # the first: the loop must wake
    assert heap.set(b, at(20)) is False  # later than the earliest: the loop sleeps on
    assert heap.set(b, at(5)) is True  # now the earliest
    assert heap.set(b, at(5)) is False  # unchanged
    assert heap.set(a, None) is False


def test_stale_entries_do_not_pile_up() -> None:
    """One run whose timer moves later at every step, as an attempt's deadline does."""
    heap = TimerHeap()
    run_id, other = uuid4(), uuid4()
    heap.set(other, at(10**6))
    for step in range(10 * SLACK):
        heap.set(run_id, at(100 + step))

    assert len(heap._heap) <= 2 * len(heap) + SLACK + 1
    assert heap.pop_due(at(100 + 10 * SLACK)) == [run_id]
    assert heap.pop_due(at(10**6)) == [other]


class HeapMachine(RuleBasedStateMachine):
    """Against a model (each run's timer and when it was set), under random sets, moves,
    clears, discards and advances of the clock."""

    def __init__(self) -> None:
        super().__init__()
        self.heap = TimerHeap()
        self.model: dict[UUID, tuple[datetime, int]] = {}
        self.runs = [uuid4() for _ in range(6)]
        self.now = at(0)
        self.order = 0

    @rule(index=st.integers(0, 5), offset=st.integers(-5, 30))
    def set_timer(self, index: int, offset: int) -> None:
        run_id = self.runs[index]
        when = self.now + timedelta(seconds=offset)
        woke = self.heap.set(run_id, when)
        if self.model.get(run_id, (None, 0))[0] != when:
            self.order += 1
            self.model[run_id] = (when, self.order)
            # The loop wakes exactly when the new timer is the first to serve.
            first = min(self.model.items(), key=lambda item: item[1])[0]
            assert woke == (first == run_id)
        else:
            assert woke is False

    @rule(index=st.integers(0, 5), clear=st.booleans())
    def remove_timer(self, index: int, clear: bool) -> None:
        run_id = self.runs[index]
        if clear:
            self.heap.set(run_id, None)
        else:
            self.heap.discard(run_id)
        self.model.pop(run_id, None)

    @rule(seconds=st.integers(0, 20))
    def advance(self, seconds: int) -> None:
        self.now += timedelta(seconds=seconds)
        due = self.heap.pop_due(self.now)
        expected = sorted(
            (item for item in self.model.items() if item[1][0] <= self.now),
            key=lambda item: item[1],
        )
        assert due == [run_id for run_id, _ in expected]
        for run_id in due:
            del self.model[run_id]

    @invariant()
    def agrees_with_the_model(self) -> None:
        assert len(self.heap) == len(self.model)
        assert self.heap.next_due() == min((w for w, _ in self.model.values()), default=None)
        for run_id in self.runs:
            assert self.heap.timer_of(run_id) == (
                self.model[run_id][0] if run_id in self.model else None
            )


HeapMachine.TestCase.settings = settings(
    database=None, derandomize=True, deadline=None, max_examples=200, stateful_step_count=40
)
test_timer_heap_agrees_with_a_model = HeapMachine.TestCase
