"""The index of wait steps: an event concerns exactly the waits it may wake, and the index
stays consistent whatever order waits start, end and runs go (a hypothesis state machine)."""

from __future__ import annotations

import uuid
from uuid import UUID

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from flowforge_orchestrator.engine.waits import Wait, Waits

RUNS = [uuid.UUID(int=i) for i in range(1, 4)]


def _wait(run: UUID, step: str, name: str, key: str | None) -> Wait:
    return Wait(run, step, uuid.uuid4(), name, key)


def test_an_event_concerns_its_runs_waits_of_that_name_or_the_waits_on_its_key() -> None:
    a, b = RUNS[0], RUNS[1]
    waits = Waits()
    approve = _wait(a, "approve", "approved", None)
    paid_a = _wait(a, "paid", "paid", "order-1")
    paid_b = _wait(b, "paid", "paid", "order-1")
    other = _wait(b, "other", "paid", "order-2")
    for w in (approve, paid_a, paid_b, other):
        waits.add(w)
    assert waits.concerned(a, "approved", None) == [approve]
    assert waits.concerned(a, "paid", None) == [paid_a]  # by run id: the key is not asked
    assert waits.concerned(b, "approved", None) == []
    assert sorted(w.step for w in waits.concerned(None, "paid", "order-1")) == ["paid", "paid"]
    assert waits.concerned(None, "paid", "order-3") == []
    assert waits.concerned(None, "paid", None) == []
    assert len(waits) == 4

    assert waits.remove(a, "paid") == paid_a
    assert waits.concerned(None, "paid", "order-1") == [paid_b]
    assert waits.remove(a, "paid") is None
    assert waits.drop_run(b) == [paid_b, other]
    assert list(waits) == [approve]


def test_a_wait_added_again_replaces_itself() -> None:
    waits = Waits()
    waits.add(_wait(RUNS[0], "w", "e", "k1"))
    again = _wait(RUNS[0], "w", "e", "k2")
    waits.add(again)
    assert waits.concerned(None, "e", "k1") == []
    assert waits.concerned(None, "e", "k2") == [again]
    assert waits.get(RUNS[0], "w") == again and len(waits) == 1


def test_held_events_are_per_run_until_released() -> None:
    waits = Waits()
    a, b = RUNS[0], RUNS[1]
    waits.hold(a, 7)
    waits.hold(a, 8)
    waits.hold(b, 9)
    assert waits.held([a]) == {7, 8} and waits.held([a, b]) == {7, 8, 9}
    waits.release(a, [7])
    assert waits.held([a]) == {8}
    waits.release(a, [8])
    waits.release(RUNS[2], [1])  # nothing held: nothing to do
    assert waits.held([a]) == set()
    waits.drop_run(b)
    assert waits.held([b]) == set()


class WaitsMachine(RuleBasedStateMachine):
    """Against a plain list of waits: what `concerned` answers and what is listed."""

    def __init__(self) -> None:
        super().__init__()
        self.waits = Waits()
        self.model: dict[tuple[UUID, str], Wait] = {}

    @rule(
        run=st.sampled_from(RUNS),
        step=st.sampled_from(["a", "b", "c[0]"]),
        name=st.sampled_from(["x", "y"]),
        key=st.sampled_from([None, "k1", "k2"]),
    )
    def add(self, run: UUID, step: str, name: str, key: str | None) -> None:
        wait = _wait(run, step, name, key)
        self.waits.add(wait)
        self.model[(run, step)] = wait

    @rule(run=st.sampled_from(RUNS), step=st.sampled_from(["a", "b", "c[0]"]))
    def remove(self, run: UUID, step: str) -> None:
        assert self.waits.remove(run, step) == self.model.pop((run, step), None)

    @rule(run=st.sampled_from(RUNS))
    def drop(self, run: UUID) -> None:
        dropped = self.waits.drop_run(run)
        expected = [w for (r, _), w in self.model.items() if r == run]
        assert sorted(dropped, key=lambda w: w.step) == sorted(expected, key=lambda w: w.step)
        for wait in expected:
            del self.model[(run, wait.step)]

    @invariant()
    def answers_match_the_model(self) -> None:
        assert len(self.waits) == len(self.model)
        assert set(self.waits) == set(self.model.values())
        for run in RUNS:
            for name in ("x", "y"):
                expected = {w for w in self.model.values() if w.run_id == run and w.name == name}
                assert set(self.waits.concerned(run, name, None)) == expected
        for name in ("x", "y"):
            for key in ("k1", "k2"):
                expected = {w for w in self.model.values() if w.name == name and w.key == key}
                assert set(self.waits.concerned(None, name, key)) == expected


TestWaitsMachine = WaitsMachine.TestCase
