"""The registry of owned runs: its index from attempt to run holds exactly the owned runs'
outstanding attempts, whatever happens (adopt, dispatch, answer, commit, finish, drop);
what waits to be done (commits, fetches, deliveries, releases) is only ever handed back
for what is still owned and outstanding."""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import UUID, uuid4

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    rule,
)
from opentelemetry import trace

from flowforge_orchestrator.core.definition.parse import parse_definition
from flowforge_orchestrator.core.graph.run import CompiledWorkflow, RunState
from flowforge_orchestrator.core.records import (
    AttemptFinished,
    ChildStart,
    Dispatch,
    Limits,
    RunChanges,
)
from flowforge_orchestrator.core.state import RunStatus, StepStatus
from flowforge_orchestrator.engine.owned import Owned, OwnedRuns

T0 = datetime(2024, 1, 1, tzinfo=UTC)
LIMITS = Limits(max_output_bytes=10_000, max_context_bytes=100_000, default_timeout=30.0)
WORKFLOW = CompiledWorkflow(
    parse_definition(
        {
            "name": "wf",
            "version": 1,
            "steps": [{"id": "s", "type": "http", "with": {"url": "https://svc.test/"}}],
        }
    )
)


def owned(run_id: UUID, *, traceparent: str | None = None) -> Owned:
    state = RunState(run_id=run_id, workflow=WORKFLOW, version=1, input={}, limits=LIMITS)
    return Owned(state, epoch=1, span=trace.INVALID_SPAN, traceparent=traceparent)


def dispatch(run_id: UUID, attempt_id: UUID | None = None) -> Dispatch:
    return Dispatch(attempt_id or uuid4(), run_id, "s", "http", 1, {}, 30.0)


def changes(
    run_id: UUID,
    *,
    ended: list[UUID] | None = None,
    dispatches: list[Dispatch] | None = None,
    status: RunStatus = RunStatus.RUNNING,
) -> RunChanges:
    finished = [AttemptFinished(a, StepStatus.SUCCEEDED, T0, None) for a in ended or []]
    return RunChanges(run_id, status, {}, attempts_finished=finished, dispatches=dispatches or [])


def index_is_the_union_of_outstanding_attempts(runs: OwnedRuns) -> bool:
    return runs.outstanding() == {a: r for r in runs.ids() for a in runs.attempts_of(r)}


def test_a_commit_makes_its_dispatches_outstanding_and_routes_their_results() -> None:
    runs = OwnedRuns()
    run_id, other = uuid4(), uuid4()
    first, second = dispatch(run_id), dispatch(run_id)
    mine = owned(run_id)

    assert runs.committed(mine, changes(run_id, dispatches=[first, second]))

    assert runs.get(run_id) is mine
    assert runs.run_of(first.attempt_id) == run_id
    assert runs.answered(other, first.attempt_id) is None  # not that run's attempt
    assert runs.answered(run_id, first.attempt_id) is mine
    assert runs.outstanding() == {second.attempt_id: run_id}
    assert index_is_the_union_of_outstanding_attempts(runs)


def test_a_commit_that_ends_attempts_or_the_run_forgets_them() -> None:
    runs = OwnedRuns()
    run_id = uuid4()
    mine = owned(run_id)
    first, second = dispatch(run_id), dispatch(run_id)
    runs.committed(mine, changes(run_id, dispatches=[first, second]))

    runs.committed(mine, changes(run_id, ended=[first.attempt_id]))
    assert runs.attempts_of(run_id) == [second.attempt_id]

    assert not runs.committed(mine, changes(run_id, status=RunStatus.COMPLETED))
    assert run_id not in runs
    assert runs.outstanding() == {}
    assert runs.take_undelivered() == []  # nothing of a finished run is sent


def test_dispatches_are_delivered_once_unless_answered_already() -> None:
    runs = OwnedRuns()
    run_id = uuid4()
    sent, answered = dispatch(run_id), dispatch(run_id)
    runs.committed(
        owned(run_id, traceparent="00-tp"),
        changes(run_id, dispatches=[sent, answered]),
        answered={answered.attempt_id},
    )

    assert runs.take_undelivered() == [(sent, "00-tp")]
    assert runs.take_undelivered() == []
    runs.deliver_again([sent.attempt_id, uuid4()])  # Redis refused it; an unknown is ignored
    runs.answered(run_id, sent.attempt_id)
    assert runs.take_undelivered() == []  # answered meanwhile: not sent again


def test_attempts_dispatched_before_a_moment_are_the_ones_to_check() -> None:
    clock = [10.0]
    runs = OwnedRuns(monotonic=lambda: clock[0])
    run_id = uuid4()
    runs.adopt(run_id, owned(run_id))
    early = dispatch(run_id)
    runs.dispatched(run_id, [early])
    clock[0] = 20.0
    runs.dispatched(run_id, [dispatch(run_id)])

    assert list(runs.sent_before(15.0)) == [early.attempt_id]


def test_a_run_not_owned_keeps_no_attempt() -> None:
    runs = OwnedRuns()
    stranger = uuid4()
    runs.dispatched(stranger, [dispatch(stranger)])
    runs.mark_dirty(stranger)

    assert runs.outstanding() == {}
    assert not runs.has_dirty


def test_a_run_given_back_counts_a_strike_and_waits_for_its_release() -> None:
    runs = OwnedRuns()
    run_id = uuid4()
    for strike in (1, 2):
        runs.committed(owned(run_id), changes(run_id, dispatches=[dispatch(run_id)]))
        runs.mark_dirty(run_id)
        assert runs.drop(run_id, give_back=True) is not None
        assert runs.strikes(run_id) == strike

    assert runs.to_release() == [run_id]
    assert runs.outstanding() == {}
    assert runs.take_dirty() == []
    runs.released([run_id])
    assert runs.to_release() == []
    runs.drop(run_id)  # not owned: nothing to count
    assert runs.strikes(run_id) == 2


def test_notifications_are_kept_only_for_outstanding_attempts() -> None:
    runs = OwnedRuns()
    run_id = uuid4()
    attempt = dispatch(run_id)
    runs.committed(owned(run_id), changes(run_id, dispatches=[attempt]))

    assert not runs.notify([uuid4()])
    assert runs.take_notified() == []
    assert runs.notify([attempt.attempt_id, uuid4()])
    runs.drop(run_id)
    assert runs.take_notified() == []  # the run left meanwhile


class RegistryMachine(RuleBasedStateMachine):
    """The registry against a model: each owned run's outstanding attempts, and what waits
    to be done, under random sequences of every operation."""

    run_ids = Bundle("run_ids")
    attempts = Bundle("attempts")

    def __init__(self) -> None:
        super().__init__()
        self.clock = 0.0
        self.runs = OwnedRuns(monotonic=lambda: self.clock)
        self.model: dict[UUID, set[UUID]] = {}
        self.dirty: set[UUID] = set()
        self.notified: set[UUID] = set()
        self.undelivered: set[UUID] = set()
        self.strikes: dict[UUID, int] = {}
        self.to_release: set[UUID] = set()

    def outstanding(self) -> set[UUID]:
        return {a for attempts in self.model.values() for a in attempts}

    def forget_run(self, run_id: UUID) -> None:
        self.model.pop(run_id, None)
        self.dirty.discard(run_id)

    @initialize(target=run_ids)
    def some_runs(self) -> object:
        return multiple(*(uuid4() for _ in range(3)))

    @initialize(target=attempts)
    def a_stray_attempt(self) -> UUID:
        return uuid4()  # of no run: its results and notifications are ignored

    @rule(target=run_ids)
    def new_run_id(self) -> UUID:
        return uuid4()

    @rule(run_id=run_ids)
    def adopt(self, run_id: UUID) -> None:
        self.runs.adopt(run_id, self.runs.get(run_id) or owned(run_id))
        self.model.setdefault(run_id, set())

    @rule(target=attempts, run_id=run_ids, answered=st.booleans())
    def dispatch(self, run_id: UUID, answered: bool) -> UUID:
        attempt = dispatch(run_id)
        done = {attempt.attempt_id} if answered else set()
        self.runs.dispatched(run_id, [attempt], answered=done)
        if run_id in self.model:
            self.model[run_id].add(attempt.attempt_id)
            if not answered:
                self.undelivered.add(attempt.attempt_id)
        return attempt.attempt_id

    @rule(run_id=run_ids, attempt=attempts)
    def answer(self, run_id: UUID, attempt: UUID) -> None:
        found = self.runs.answered(run_id, attempt)
        assert (found is not None) == (run_id in self.model)
        self.model.get(run_id, set()).discard(attempt)

    @rule(
        run_id=run_ids,
        ended=st.lists(attempts, max_size=3),
        new=st.integers(0, 3),
        finish=st.booleans(),
    )
    def commit(self, run_id: UUID, ended: list[UUID], new: int, finish: bool) -> None:
        dispatches = [dispatch(run_id) for _ in range(new)]
        status = RunStatus.COMPLETED if finish else RunStatus.RUNNING
        mine = self.runs.get(run_id) or owned(run_id)
        going_on = self.runs.committed(
            mine, changes(run_id, ended=ended, dispatches=dispatches, status=status)
        )
        assert going_on is not finish
        if finish:
            self.forget_run(run_id)
            return
        attempts = self.model.setdefault(run_id, set())
        attempts.difference_update(ended)
        attempts.update(d.attempt_id for d in dispatches)
        self.undelivered.update(d.attempt_id for d in dispatches)

    @rule(run_id=run_ids, give_back=st.booleans())
    def drop(self, run_id: UUID, give_back: bool) -> None:
        found = self.runs.drop(run_id, give_back=give_back)
        assert (found is not None) == (run_id in self.model)
        if give_back:
            self.strikes[run_id] = self.strikes.get(run_id, 0) + 1
            self.to_release.add(run_id)
        self.forget_run(run_id)

    @rule(run_id=run_ids)
    def mark_dirty(self, run_id: UUID) -> None:
        found = self.runs.get(run_id)
        if found is not None:
            found.unwritten = changes(run_id)
            self.dirty.add(run_id)
        self.runs.mark_dirty(run_id)

    @rule()
    def take_dirty(self) -> None:
        taken = self.runs.take_dirty()
        assert sorted(c.run_id for _, c in taken) == sorted(self.dirty)
        self.dirty.clear()

    @rule(attempts=st.lists(attempts, max_size=4), everything=st.booleans())
    def notify(self, attempts: list[UUID], everything: bool) -> None:
        outstanding = self.outstanding()
        if everything:
            self.runs.notify_all()
            self.notified |= outstanding
        else:
            assert self.runs.notify(attempts) == bool(set(attempts) & outstanding)
            self.notified |= set(attempts) & outstanding

    @rule()
    def take_notified(self) -> None:
        assert set(self.runs.take_notified()) == self.notified & self.outstanding()
        self.notified.clear()

    @rule()
    def take_undelivered(self) -> None:
        taken = self.runs.take_undelivered()
        assert {d.attempt_id for d, _ in taken} == self.undelivered & self.outstanding()
        assert all(self.runs.run_of(d.attempt_id) == d.run_id for d, _ in taken)
        self.undelivered.clear()

    @rule(attempts=st.lists(attempts, max_size=4))
    def deliver_again(self, attempts: list[UUID]) -> None:
        self.runs.deliver_again(attempts)
        self.undelivered |= set(attempts) & self.outstanding()

    @rule()
    def release(self) -> None:
        self.runs.released(self.runs.to_release())
        self.to_release.clear()

    @rule(seconds=st.floats(0, 5))
    def tick(self, seconds: float) -> None:
        self.clock += seconds

    @invariant()
    def the_index_is_the_union_of_the_owned_runs_attempts(self) -> None:
        assert index_is_the_union_of_outstanding_attempts(self.runs)
        assert sorted(self.runs.ids()) == sorted(self.model)
        for run_id, attempts in self.model.items():
            assert set(self.runs.attempts_of(run_id)) == attempts
        assert set(self.runs.outstanding()) == self.outstanding()
        assert set(self.runs.sent_before(self.clock + 1)) == self.outstanding()
        assert self.runs.has_dirty == bool(self.dirty)

    @invariant()
    def strikes_and_releases_agree(self) -> None:
        assert set(self.runs.to_release()) == self.to_release
        for run_id, count in self.strikes.items():
            assert self.runs.strikes(run_id) == count


RegistryMachine.TestCase.settings = settings(
    database=None, derandomize=True, deadline=None, max_examples=150, stateful_step_count=50
)
test_the_registry_agrees_with_a_model = RegistryMachine.TestCase


def test_a_handed_off_attempt_stays_routed_but_is_never_delivered_or_reconciled() -> None:
    runs = OwnedRuns(monotonic=lambda: 100.0)
    run_id = uuid4()
    first = dispatch(run_id)
    assert runs.committed(owned(run_id), changes(run_id, dispatches=[first]))
    runs.handed_off(run_id, [first.attempt_id])
    runs.handed_off(uuid4(), [uuid4()])  # a run not owned keeps nothing

    assert runs.is_handed_off(first.attempt_id)
    assert runs.run_of(first.attempt_id) == run_id and index_is_the_union_of_outstanding_attempts(
        runs
    )
    assert runs.take_undelivered() == [] and runs.sent_before(200.0) == {}
    assert runs.notify([first.attempt_id]) and runs.take_notified() == [first.attempt_id]

    assert runs.answered(run_id, first.attempt_id) is not None  # its completion applied
    assert not runs.is_handed_off(first.attempt_id) and runs.outstanding() == {}
    runs.handed_off(run_id, [first.attempt_id])
    runs.finished(run_id)
    assert runs.outstanding() == {} and index_is_the_union_of_outstanding_attempts(runs)


def test_an_attempt_waiting_for_its_child_run_is_routed_but_never_delivered() -> None:
    runs = OwnedRuns(monotonic=lambda: 100.0)
    run_id = uuid4()
    attempt, ended = uuid4(), uuid4()
    started = [
        ChildStart(uuid4(), "call", attempt, "child", None, {}, 1),
        ChildStart(uuid4(), "gone", ended, "child", None, {}, 1),  # ended in the same commit
    ]
    commit = changes(run_id, ended=[ended])
    commit.children = started
    assert runs.committed(owned(run_id), commit)

    assert runs.attempts_of(run_id) == [attempt]
    assert index_is_the_union_of_outstanding_attempts(runs)
    assert not runs.is_handed_off(attempt)  # no completion from outside to read for it
    assert runs.take_undelivered() == [] and runs.sent_before(200.0) == {}
    assert runs.notify([attempt]) and runs.take_notified() == [attempt]
    assert runs.answered(run_id, attempt) is not None  # the child's result applied
    assert runs.outstanding() == {}

    runs.awaiting_children(run_id, [attempt])  # adopted again, still waiting
    runs.awaiting_children(uuid4(), [uuid4()])  # a run not owned keeps nothing
    assert runs.outstanding() == {attempt: run_id}
    runs.finished(run_id)
    assert runs.outstanding() == {} and index_is_the_union_of_outstanding_attempts(runs)
