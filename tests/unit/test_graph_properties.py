"""Properties of the run graph over random definitions, outcomes, orders and restores.

A definition is drawn as nested step lists (sequences, diamonds, random DAGs) of http,
transform, delay, condition, switch, fail, parallel and for_each steps, some with `catch`
handlers and `compensate` lists; a driver answers the outstanding
attempts in a random order (each failing or not by a fixed draw), fires timers, re-delivers
stale results, and now and then hands the run to a new RunState built from its checkpoint.
The same run is also played without restores: the two must be indistinguishable.
"""

from __future__ import annotations

import itertools
import random
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

from hypothesis import given, settings
from hypothesis import strategies as st

from flowforge_orchestrator.core.graph.run import CompiledWorkflow, RunState
from flowforge_orchestrator.core.records import Dispatch, Event, Limits, RunChanges
from flowforge_orchestrator.core.state import RunStatus, StepStatus
from tests.unit.test_graph import Recorder, at, failed, new_run, ok, workflow

# No example database: nothing is written to the working tree, and every run is the same.
properties = settings(database=None, derandomize=True, deadline=None, max_examples=150)

MAX_DEPTH = 2
# Worker attempts get deadlines (timeout plus time to be picked up) that start afresh when
# a run is adopted, by design; far beyond every delay, they never fire here.
LONG = Limits(max_output_bytes=10_000, max_context_bytes=1_000_000, default_timeout=10**6)
HORIZON = at(10**5)
TERMINAL = {s.value for s in StepStatus if s.finished}
STARTS = {"step.dispatched", "step.started", "step.succeeded", "step.failed"}

# -- random definitions ------------------------------------------------------------------------


@st.composite
def step_list(draw: st.DrawFn, depth: int, ids: Iterator[int], in_for_each: bool) -> list[Any]:
    n = draw(st.integers(1, 4 if depth == 0 else 3))
    steps = [draw(one_step(depth, ids, in_for_each)) for _ in range(n)]
    shape = draw(st.sampled_from(["flat", "sequence", "diamond", "random"]))
    for i, step in enumerate(steps):
        earlier = [s["id"] for s in steps[:i]]
        if shape == "sequence" or (shape == "diamond" and n < 3):
            deps = earlier[-1:]
        elif shape == "diamond":
            deps = [] if i == 0 else earlier[:1] if i < n - 1 else earlier[1:]
        elif shape == "random":
            deps = [d for d in earlier if draw(st.booleans())]
        else:
            deps = []
        step["depends_on"] = deps
        if step["type"] == "http":
            step["with"]["json"] = {d: f"${{{{ steps.{d}.output }}}}" for d in deps}
        elif deps and step["type"] == "condition" and draw(st.booleans()):
            step["if"] = f"steps.{deps[0]}.status == 'succeeded'"
        elif deps and "for_each" in step and draw(st.booleans()):
            # A worker's output carries a list; other steps' outputs (or a failed step's
            # null) make this a run-time expression error.
            step["for_each"] = f"steps.{deps[0]}.output.xs"
    return steps


@st.composite
def failure_handling(draw: st.DrawFn, ids: Iterator[int], in_for_each: bool) -> dict[str, Any]:
    """Now and then a catch handler (of all errors or some), and a compensation (outside
    a for_each, where none is allowed); both run http or transform steps."""
    extra: dict[str, Any] = {}
    if draw(st.integers(0, 3)) == 0:
        errors = draw(st.sampled_from([None, ["join_failed", "branch_failed"], ["Invalid"]]))
        handler: list[dict[str, Any]] = [
            {"id": f"s{next(ids)}", "type": "transform", "output": "${{ error.category }}"}
            if draw(st.booleans())
            else {"id": f"s{next(ids)}", "type": "http", "with": {"url": "https://svc.test/h"}}
        ]
        if draw(st.booleans()):  # a second step, after the first
            url = "https://svc.test/h2"
            after = {"id": f"s{next(ids)}", "type": "http", "with": {"url": url}}
            handler.append(after | {"depends_on": [handler[0]["id"]]})
        extra["catch"] = [{"steps": handler} | ({"errors": errors} if errors else {})]
    if not in_for_each and draw(st.integers(0, 2)) == 0:
        undo_id = f"s{next(ids)}"
        url = f"https://svc.test/undo/{undo_id}"
        extra["compensate"] = [{"id": undo_id, "type": "http", "with": {"url": url}}]
    return extra


@st.composite
def choice(draw: st.DrawFn, depth: int, ids: Iterator[int], in_for_each: bool) -> dict[str, Any]:
    """A condition, or a switch of two cases and a default."""
    if_ = draw(st.sampled_from(["input.n > 1", "input.n % 2 == 0", "true", "false"]))
    if in_for_each and draw(st.booleans()):
        if_ = "index % 2 == 0"
    if draw(st.booleans()):
        return {
            "type": "condition",
            "if": if_,
            "then": draw(step_list(depth + 1, ids, in_for_each)),
            "else": draw(st.just([]) | step_list(depth + 1, ids, in_for_each)),
        }
    return {
        "type": "switch",
        "default": draw(st.just([]) | step_list(depth + 1, ids, in_for_each)),
        "cases": [
            {"when": when, "steps": draw(step_list(depth + 1, ids, in_for_each))}
            for when in (if_, "input.n == 0")
        ],
    }


@st.composite
def one_step(draw: st.DrawFn, depth: int, ids: Iterator[int], in_for_each: bool) -> Any:
    step_id = f"s{next(ids)}"
    kinds = ["http", "http", "transform", "delay"]
    if depth < MAX_DEPTH:
        kinds += ["condition", "parallel", "for_each"]
    kind = draw(st.sampled_from([*kinds, "fail"]))
    step: dict[str, Any] = {"id": step_id}
    if draw(st.integers(0, 4)) == 0:
        step["continue_on_failure"] = True
    step |= draw(failure_handling(ids, in_for_each))
    if kind == "fail":
        category = draw(st.sampled_from(["Invalid", "Other"]))
        step |= {"type": "fail", "error": {"message": "no ${{ input.n }}", "category": category}}
    elif kind == "http":
        url = f"https://svc.test/{step_id}" + ("/${{ index }}" if in_for_each else "")
        step |= {"type": "http", "with": {"url": url}}
    elif kind == "transform":
        value = "${{ item }}" if in_for_each else "${{ input.n }}"
        step |= {"type": "transform", "output": {"v": value, "run": "${{ run.version }}"}}
    elif kind == "delay":
        if draw(st.booleans()):
            step |= {"type": "delay", "duration": draw(st.integers(1, 5))}
        else:
            step |= {
                "type": "delay",
                "until": f"timestamp('{at(draw(st.integers(-2, 5))).isoformat()}')",
            }
    elif kind == "condition":
        step |= draw(choice(depth, ids, in_for_each))
    else:
        step |= {"type": "parallel", "fail_fast": draw(st.booleans())}
        if draw(st.booleans()):
            step["max_parallel"] = draw(st.integers(1, 2))
        if kind == "parallel":
            branches = [
                draw(step_list(depth + 1, ids, in_for_each)) for _ in range(draw(st.integers(1, 3)))
            ]
            step["branches"] = branches
            at_most = len(branches)
        else:
            step["for_each"] = f"input.lists[{draw(st.integers(0, 2))}]"
            step["step"] = draw(one_step(depth + 1, ids, True))
            at_most = 3
        step["join"] = draw(
            st.sampled_from(["all", "any"])
            | st.builds(lambda k: {"at_least": k}, st.integers(1, at_most))
        )
    return step


@st.composite
def definitions(draw: st.DrawFn) -> CompiledWorkflow:
    return workflow(*draw(step_list(0, itertools.count(), False)))


inputs = st.fixed_dictionaries(
    {
        "n": st.integers(0, 3),
        "lists": st.lists(st.lists(st.integers(0, 9), max_size=3), min_size=3, max_size=3),
    }
)


# -- a driver ----------------------------------------------------------------------------------


@dataclass
class Trace:
    """What one drive saw: the store's view plus what the properties need."""

    rec: Recorder = field(default_factory=Recorder)
    sent: list[Dispatch] = field(default_factory=list)  # first dispatches, not re-dispatches
    applied: set[UUID] = field(default_factory=set)
    aborted: list[UUID] = field(default_factory=list)
    restores: int = 0
    final: RunState | None = None

    def take(self, run: RunState) -> RunChanges | None:
        changes = self.rec.drain(run)
        if changes is not None:
            self.sent += changes.dispatches
            self.aborted += changes.aborts
        return changes


def fails(key: str, salt: int, rate: int) -> bool:
    return zlib.crc32(f"{salt}/{key}".encode()) % 100 < rate


def next_timer(run: RunState) -> datetime | None:
    """The next delay (or retry) timer, leaving out worker deadlines."""
    timer = run.next_timer()
    return timer if timer is not None and timer < HORIZON else None


def adopt(run: RunState, trace: Trace, now: float) -> RunState:
    sent = {d.attempt_id for d in trace.sent}
    outstanding = sorted(a for a in run.outstanding() if a in sent)
    checkpoint, timer, seq = trace.rec.checkpoint, next_timer(run), run.seq
    adopted = trace.rec.restore(run)
    assert adopted.seq == seq
    adopted.resume(at(now))
    changes = adopted.take_changes()
    assert changes is not None
    # Nothing new happened: the outstanding attempts go to the queue again, same ids.
    assert changes.events == []
    assert sorted(d.attempt_id for d in changes.dispatches) == outstanding
    assert changes.checkpoint == checkpoint
    assert next_timer(adopted) == timer
    trace.restores += 1
    return adopted


def drive(
    wf: CompiledWorkflow,
    input: Any,
    *,
    order: int,
    salt: int,
    rate: int,
    restores: int | None,
    cancel_at: int | None = None,
) -> Trace:
    """Play a run to its end. `order` seeds which attempt is answered next, `restores` (if
    not None) seeds when the run is adopted; restores draw from their own generator, so a
    run with restores takes exactly the same decisions as the run without."""
    pick, adopt_now = random.Random(order), random.Random(restores)
    trace = Trace()
    run = new_run(wf, input, limits=LONG)
    run.start(at(0))
    trace.take(run)
    now = 0.0
    for step in range(400):
        if run.status is not RunStatus.RUNNING:
            break
        if restores is not None and adopt_now.random() < 0.4:
            run = adopt(run, trace, now)
        if step == cancel_at:
            # Cancelled mid-way: it compensates first, and a second request changes nothing.
            already = run.compensating()
            assert run.cancel(at(now), "asked") is not already
            trace.take(run)
            assert run.cancel(at(now), "again") is False
            continue
        by_id = {d.attempt_id: d for d in trace.sent}
        outstanding = sorted(
            (by_id[a] for a in run.outstanding() if a in by_id), key=lambda d: d.step_id
        )
        timer = next_timer(run)
        choice = pick.random()
        if choice < 0.1 and trace.sent:
            # A late or repeated delivery of some earlier attempt: applied at most once.
            stale = pick.choice(trace.sent)
            if stale.attempt_id in trace.applied or stale.attempt_id in trace.aborted:
                assert run.apply_result(ok(stale, "again"), at(now)) is False
                assert run.take_changes() is None
            continue
        if outstanding and (timer is None or choice < 0.8):
            d = pick.choice(outstanding)
            now += 1
            if fails(d.step_id, salt, rate):
                result = failed(d, {"message": f"{d.step_id} broke"}, finished=now)
            else:
                xs = list(range(zlib.crc32(d.step_id.encode()) % 3))
                result = ok(d, {"key": d.step_id, "xs": xs}, started=now, finished=now)
            trace.rec.results[result.attempt_id] = result
            assert run.apply_result(result, at(now)) is True
            trace.applied.add(d.attempt_id)
            trace.take(run)
        else:
            assert timer is not None, "a running run waits on nothing"
            due = (timer - at(0)).total_seconds()
            if due > now:
                assert run.fire_timers(at(due - 0.5)) is False
                assert run.take_changes() is None
            now = max(now, due)
            assert run.fire_timers(at(now)) is True
            trace.take(run)
    trace.final = run
    return trace


# -- the properties ----------------------------------------------------------------------------


def check_trace(wf: CompiledWorkflow, trace: Trace) -> None:
    run, events = trace.final, trace.rec.events
    assert run is not None

    # Every run ends, and leaves nothing behind: no attempt on a worker, no timer.
    assert run.status in (RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED)
    assert trace.rec.status is run.status
    run_events = [e.type for e in events if e.step_id is None]
    assert run_events in (
        ["workflow.started", f"workflow.{run.status.value}"],
        ["workflow.started", "workflow.compensating", f"workflow.{run.status.value}"],
    )
    assert events[-1].step_id is None
    assert run.next_timer() is None

    # Sequence numbers are 1..n without gaps, across every commit and every adoption.
    assert [e.seq for e in events] == list(range(1, len(events) + 1))

    # No event twice: each (type, key, attempt) happens once at most.
    seen = [(e.type, e.step_id, e.data.get("attempt"), e.data.get("caught")) for e in events]
    assert len(seen) == len(set(seen)), "an event was emitted twice"

    # No attempt is dispatched twice (re-dispatches after adoption are not in `sent`).
    ids = [d.attempt_id for d in trace.sent]
    assert len(ids) == len(set(ids))
    assert sorted(ids) == sorted(
        e.attempt_id for e in events if e.type == "step.dispatched" and e.attempt_id
    )

    # Every attempt handed to a worker was answered or aborted, never both.
    aborted = set(trace.aborted)
    assert len(aborted) == len(trace.aborted)
    assert set(ids) == trace.applied | aborted
    assert not trace.applied & aborted

    # Every step key that got an event ends in a terminal status.
    last: dict[str, Event] = {}
    for e in events:
        if e.step_id is not None:
            last[e.step_id] = e
    for key, e in last.items():
        assert e.to_status in TERMINAL, f"{key} ended {e.to_status}"

    # Finished fan-outs leave nothing of their elements in the checkpoint.
    assert not [key for key in trace.rec.checkpoint["steps"] if "[" in key]

    check_dependencies(wf, events)
    check_compensations(wf, run, events)


COMPENSATION_EVENTS = {"step.compensating", "step.compensated", "step.compensation_failed"}


def check_compensations(wf: CompiledWorkflow, run: RunState, events: list[Event]) -> None:
    """Only steps that succeeded (not caught) are compensated, all of them when the run
    failed, in reverse order of completion, one at a time, each once."""
    caught = {e.step_id for e in events if e.type == "step.caught"}
    done = [
        e.step_id
        for e in events
        if e.type == "step.succeeded"
        and e.step_id is not None
        and e.step_id not in caught
        and wf.definition.step(e.step_id.split("[", 1)[0]).compensate
    ]
    undone = [e.step_id for e in events if e.type == "step.compensating"]
    if run.status in (RunStatus.FAILED, RunStatus.CANCELLED):
        assert undone == list(reversed(done))
    else:
        assert undone == []
    ended = [e.step_id for e in events if e.type in COMPENSATION_EVENTS - {"step.compensating"}]
    assert ended == undone  # each ended before the next began, once
    current: str | None = None
    for e in events:
        if e.type == "step.compensating":
            assert current is None, "two compensations at once"
            current = e.step_id
        elif e.type in ("step.compensated", "step.compensation_failed"):
            assert e.step_id == current
            current = None
    assert current is None


def check_dependencies(wf: CompiledWorkflow, events: list[Event]) -> None:
    """No step starts before all its dependencies finished (none failed without
    continue_on_failure), and no step changes after it finished."""
    finished: dict[str, str] = {}
    for e in events:
        key = e.step_id
        if key is None:
            continue
        if e.type in COMPENSATION_EVENTS:
            assert finished.get(key) == "succeeded", f"{key} compensated, not succeeded"
            continue
        if e.type == "step.caught":
            continue
        assert key not in finished, f"{key} changed after it {finished[key]}"
        if e.from_status == "pending" and e.type in STARTS:
            step_id = key.split("[", 1)[0]
            suffix = key[len(step_id) :]
            for dep in wf.definition.step(step_id).depends_on:
                assert dep + suffix in finished, f"{key} started before {dep + suffix} ended"
                if finished[dep + suffix] in ("failed", "timed_out"):
                    assert wf.definition.step(dep).continue_on_failure
        if e.to_status in TERMINAL and not e.data.get("caught"):
            finished[key] = e.to_status


@properties
@given(
    wf=definitions(),
    input=inputs,
    order=st.integers(0, 2**16),
    restores=st.integers(0, 2**16),
    salt=st.integers(0, 2**16),
    rate=st.sampled_from([0, 15, 40]),
    cancel_at=st.none() | st.integers(0, 12),
)
def test_random_runs_end_cleanly_and_restores_are_invisible(
    wf: CompiledWorkflow,
    input: Any,
    order: int,
    restores: int,
    salt: int,
    rate: int,
    cancel_at: int | None,
) -> None:
    plain = drive(wf, input, order=order, salt=salt, rate=rate, restores=None, cancel_at=cancel_at)
    check_trace(wf, plain)
    adopted = drive(
        wf, input, order=order, salt=salt, rate=rate, restores=restores, cancel_at=cancel_at
    )
    check_trace(wf, adopted)
    assert adopted.rec.events == plain.rec.events
    assert adopted.rec.output == plain.rec.output
    if plain.rec.status is RunStatus.COMPLETED:
        assert set(plain.rec.output) == set(wf.root.sinks)
