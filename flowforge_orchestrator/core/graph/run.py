"""One run's graph: which steps are ready, what a result or a timer changes, when it ends.

Pure: no I/O, no clock (every method takes `now`). The orchestrator feeds it claims, results
and timers, and drains `take_changes()` into a group commit. Everything needed to resume
after a crash is in `checkpoint()` plus the stored outputs of finished attempts.

`RunState` holds the run's state and is its one public face. The rules are functions over
that state in the modules of this package, each declaring (as a `Protocol`) what it uses
of it, and each calling only those below it:

    run       RunState: the entry points, what the engine reads
    flow      the follow-up queue; lists and the run closing
    compensation  the run ending: at once, or after compensating (sagas)
    control   steps and lists starting; delay, wait, condition, switch, fail, transform,
              parallel (joins)
    attempts  worker attempts: dispatch, deadlines, schedule-to-start, timeouts
    ending    steps ending: succeed, fail (or retry), skip, cancel
    catching  a final failure handed to a `catch` handler
    moves     one step's move: the event, the follow-up; attempt ids
    tree      lists instantiated, fan-outs expanded and forgotten
    restore   the graph rebuilt from a checkpoint (read by `checkpoint`, written there too)
    context   what expressions see

How it moves: every entry point changes some nodes, and each node that finishes queues a
follow-up (`followups`); `flow.drain` works the queue until nothing is left to decide.
Control steps (condition, parallel, delay, wait, transform) run here, in the orchestrator; leaf
steps are dispatched to workers.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from flowforge_orchestrator.core.definition.models import DelayStep, WaitStep, WorkflowStep
from flowforge_orchestrator.core.definition.plan import SECRET_ROOTS, CompiledWorkflow
from flowforge_orchestrator.core.expressions.cost import Weight
from flowforge_orchestrator.core.expressions.templates import Evaluator
from flowforge_orchestrator.core.graph.attempts import (
    dispatch_of,
    hand_off,
    heartbeat_missed,
    not_picked_up,
    set_deadline,
    timer_fired,
)
from flowforge_orchestrator.core.graph.checkpoint import (
    carries_incarnation,
    read_checkpoint,
    write_checkpoint,
)
from flowforge_orchestrator.core.graph.children import child_timer
from flowforge_orchestrator.core.graph.compensation import Compensation, go_on
from flowforge_orchestrator.core.graph.control import start_scope
from flowforge_orchestrator.core.graph.ending import fail, succeed
from flowforge_orchestrator.core.graph.failures import run_timed_out
from flowforge_orchestrator.core.graph.flow import cancel_run, drain, fail_run, open_scopes
from flowforge_orchestrator.core.graph.followups import Check, FollowUps
from flowforge_orchestrator.core.graph.journal import Journal
from flowforge_orchestrator.core.graph.moves import to
from flowforge_orchestrator.core.graph.nodes import Frame, Node, weigh_capped
from flowforge_orchestrator.core.graph.packing import Packing
from flowforge_orchestrator.core.graph.restore import restore
from flowforge_orchestrator.core.graph.timers import RUN_TIMER, Timers, iso
from flowforge_orchestrator.core.graph.tree import new_scope
from flowforge_orchestrator.core.records import (
    EventTaken,
    Limits,
    RunChanges,
    StepResult,
    WaitStarted,
    json_size,
)
from flowforge_orchestrator.core.state import RunStatus, StepStatus, check_run
from flowforge_orchestrator.errors import StepError

__all__ = ["SECRET_ROOTS", "CompiledWorkflow", "RunState"]


class RunState:
    """The live state of one run, owned by exactly one orchestrator at a time."""

    def __init__(
        self,
        *,
        run_id: UUID,
        workflow: CompiledWorkflow,
        version: int,
        input: Any,
        limits: Limits,
        status: RunStatus = RunStatus.PENDING,
        checkpoint: Mapping[str, Any] | None = None,
        results: Mapping[UUID, StepResult] | None = None,
        incarnation: str | None = None,
        evaluator: Evaluator | None = None,
        depth: int = 0,
    ) -> None:
        """`incarnation`: when the run's row was created (see `nodes.attempt_id`); runs
        checkpointed before attempt ids carried it keep the ids they have. `evaluator`
        evaluates every expression of the run (the orchestrator's bounds them:
        `engine.sandbox`); None evaluates in process, unbounded. `depth`: how deep the run
        is nested as a child run (0: started on its own)."""
        self.run_id = run_id
        self.depth = depth
        self._incarnation = incarnation if carries_incarnation(checkpoint) else None
        self.workflow = workflow
        self.version = version
        self.input = input
        self.limits = limits
        self.status = status
        self.output: Any = None
        self.error: dict[str, Any] | None = None
        self._evaluator = evaluator
        self._input_weight: Weight | None = None
        self._run_info: dict[str, str | int] = {
            "id": str(run_id),
            "workflow": workflow.definition.name,
            "version": version,
        }
        self._generation = 0  # redrives so far: new attempts get fresh ids
        self._context_bytes = json_size(input)
        self._journal = Journal(run_id)
        self._timers = Timers()
        self._nodes: dict[str, Node] = {}
        self._packed: dict[str, Packing] = {}  # see tree.Growing
        self._out: deque[Node] = deque()  # see tree.Growing
        self._parts_dropped: list[str] = []
        self._saved_alone: dict[str, Node] = {}
        self._queue = FollowUps()
        self._broken: list[tuple[Node, dict[str, Any]]] = []  # found unrestorable
        self._completed: list[str] = []  # steps with a compensation, as they succeeded
        self._compensation: Compensation | None = None  # set while it compensates
        self._root = new_scope(self, workflow.root, Frame(None), None)
        if checkpoint:
            restore(self, read_checkpoint(checkpoint), results or {})

    # -- what the engine reads ---------------------------------------------------------

    def checkpoint(self) -> dict[str, Any]:
        """The graph state as the store gives it back (`runs.checkpoint` with its parts
        joined in: `checkpoint.with_parts`); outputs live in step_results. O(elements): a
        commit takes the stored form instead (`take_changes`)."""
        return self._write(parted=False)

    def take_changes(self) -> RunChanges | None:
        """Drain what happened since the last call, with a fresh checkpoint snapshot: the
        run row's form, and the parts of big fan-outs that changed since the last call."""
        changes = self._journal.take()
        if changes is not None:
            changes.status = self.status
            changes.checkpoint = self._write(parted=True)
            changes.parts = [p for f in self._packed.values() if f.parted for p in f.take_parts()]
            changes.parts_dropped, self._parts_dropped = self._parts_dropped, []
            changes.output, changes.error = self.output, self.error
        return changes

    def _write(self, *, parted: bool) -> dict[str, Any]:
        for fan_out in self._packed.values():
            fan_out.refresh()
        return write_checkpoint(
            nodes=self._saved_alone.values(),
            fan_outs=self._packed.values(),
            seq=self._journal.seq,
            generation=self._generation,
            deadline=self._timers.deadline,
            incarnation=self._incarnation is not None,
            completed=self._completed,
            compensation=self._compensation,
            parted=parted,
        )

    @property
    def seq(self) -> int:
        return self._journal.seq

    def outstanding(self) -> list[UUID]:
        """Attempts handed to workers and not yet answered (handed-off ones included: their
        completion is routed like a result), in the order they went out."""
        return [node.attempt_id for node in self._attempts_out() if node.attempt_id is not None]

    def has_outstanding(self) -> bool:
        """Whether any attempt is out: asked before every commit, so it drops the nodes that
        came back from the front of `_out` and stops at the first still out (amortised
        O(1), where walking the nodes took O(elements) in a big fan-out)."""
        out = self._out
        while out:
            node = out[0]
            if node.attempt_id is not None and node.with_worker:
                return True
            out.popleft()
        return False

    def handed_off(self) -> list[UUID]:
        """Attempts a worker handed to another system: none is sent to a worker again;
        each waits for its completion (or its deadline)."""
        return [
            node.attempt_id
            for node in self._attempts_out()
            if node.attempt_id is not None and node.handed_off
        ]

    def children_out(self) -> list[UUID]:
        """Attempts of workflow steps whose child run has not answered yet: outstanding,
        but with no worker job (nothing to deliver to Redis or look for there)."""
        return [
            node.attempt_id
            for node in self._attempts_out()
            if node.attempt_id is not None and isinstance(node.step, WorkflowStep)
        ]

    def _attempts_out(self) -> list[Node]:
        """The nodes whose attempt is out now; the others leave `_out`."""
        out = list(
            dict.fromkeys(n for n in self._out if n.attempt_id is not None and n.with_worker)
        )
        if len(out) < len(self._out):
            self._out = deque(out)
        return out

    def step_status(self, key: str) -> StepStatus:
        return self._nodes[key].status

    def step_type(self, key: str) -> str:
        """The type of the step at `key` ("?" once a finished fan-out forgot it)."""
        node = self._nodes.get(key)
        return node.step.type if node is not None else "?"

    def waiting(self) -> list[WaitStarted]:
        """The wait steps listening now: after a claim or an adoption, listen again."""
        return [
            WaitStarted(node.key, node.attempt_id, node.step.event, node.wait_key)
            for node in self._nodes.values()
            if node.attempt_id is not None and _is_waiting(node) and isinstance(node.step, WaitStep)
        ]

    def is_waiting(self, key: str, attempt_id: UUID) -> bool:
        """Whether the wait step at `key` still listens with this attempt."""
        node = self._nodes.get(key)
        return node is not None and node.attempt_id == attempt_id and _is_waiting(node)

    def next_timer(self) -> datetime | None:
        """When `fire_timers` next has something to do (None: no timer is set)."""
        return self._timers.next()

    # -- inputs from the orchestrator ----------------------------------------------------

    def start(self, now: datetime) -> None:
        """A claimed pending run begins."""
        check_run(self.status, RunStatus.RUNNING)
        self.status = RunStatus.RUNNING
        self._journal.emit(
            now,
            "workflow.started",
            RunStatus.RUNNING,
            from_status=RunStatus.PENDING,
            data={"workflow": self.workflow.definition.name, "version": self.version}
            | ({"redrive": self._generation} if self._generation else {}),
        )
        self._journal.changes().started_at = now
        timeout = self.workflow.definition.timeout
        if timeout is not None:
            self._timers.put(RUN_TIMER, now + timedelta(seconds=timeout))
        start_scope(self, self._root, now)
        drain(self, now)

    def resume(self, now: datetime) -> None:
        """An adopted run: hand outstanding attempts to the queue again (same ids)."""
        changes = self._journal.changes()
        for node, error in self._broken:
            fail(self, node, error, now)
        self._broken.clear()
        # A cancellation at the claim may have dispatched compensations already.
        sent = {d.attempt_id for d in changes.dispatches}
        for node in list(self._nodes.values()):
            if (
                node.status is StepStatus.DISPATCHED
                and node.attempt_id is not None
                and node.attempt_id not in sent
                and not isinstance(node.step, WorkflowStep)  # its child run exists already
            ):
                dispatch = dispatch_of(self, node, now)
                if dispatch is not None:
                    changes.dispatches.append(dispatch)
                    set_deadline(self, node, dispatch, now)
        # Everything a commit decided was committed with it; this only re-checks, so that
        # a run is never left waiting on a follow-up that was lost.
        self._queue.extend(Check(scope) for scope in open_scopes(self))
        if self._compensation is not None and self.status is RunStatus.RUNNING:
            go_on(self, now)  # the compensation in progress goes on; none: the next
        drain(self, now)

    def apply_result(self, result: StepResult, now: datetime) -> bool:
        """Apply a worker's result exactly once; False if it is stale or a duplicate."""
        if self.status is not RunStatus.RUNNING:
            return False
        node = self._nodes.get(result.step_id)
        if node is None or node.attempt_id != result.attempt_id:
            return False
        if not node.with_worker or (result.outcome == "handed_off" and node.handed_off):
            # (A caught step keeps its failed attempt's id while its handler runs.)
            return False
        if node.status is StepStatus.DISPATCHED:
            to(
                self,
                node,
                StepStatus.RUNNING,
                result.started_at or result.finished_at,
                "step.started",
                data={"worker": result.worker} if result.worker else None,
            )
        if result.outcome == "handed_off":
            hand_off(self, node, result.started_at or result.finished_at, now)
            return True
        if result.outcome == "succeeded":
            succeed(self, node, result.output, now)
        else:
            fail(self, node, result.error or {"message": "step failed"}, now)
        drain(self, now)
        return True

    def take_event(
        self, key: str, attempt_id: UUID, event_id: int, output: object, now: datetime
    ) -> bool:
        """The wait step at `key` takes event `event_id` (its `output`: name, key, payload,
        id, received_at): recorded as taken in this commit, and the step succeeds with it.
        False if the step no longer waits with that attempt (nothing is recorded)."""
        if self.status is not RunStatus.RUNNING or not self.is_waiting(key, attempt_id):
            return False
        node = self._nodes[key]
        self._journal.emit(
            now,
            "step.event_received",
            StepStatus.RUNNING,
            from_status=StepStatus.RUNNING,
            step_id=key,
            attempt_id=attempt_id,
            data={"step_id": key, "attempt": node.attempt, "event_id": event_id},
        )
        self._journal.changes().events_taken.append(EventTaken(event_id, key, attempt_id))
        succeed(self, node, output, now)
        drain(self, now)
        return True

    def fire_timers(self, now: datetime) -> bool:
        """Fire every timer due at `now`; True if any fired."""
        due = self._timers.due(now)
        for key in due:
            if self.status is not RunStatus.RUNNING or not self._timers.take(key):
                continue
            if key == RUN_TIMER:
                fail_run(self, run_timed_out(self.workflow.definition.timeout or 0), now)
                continue
            node = self._nodes[key]
            node.fire_at = None
            if isinstance(node.step, WorkflowStep) and not node.status.finished:
                child_timer(self, node, now)
            elif node.status is StepStatus.RETRYING or node.with_worker:
                timer_fired(self, node, now)
            elif node.status is StepStatus.RUNNING and isinstance(node.step, DelayStep):
                succeed(self, node, {"waited_until": iso(now)}, now)
            elif _is_waiting(node):
                fail(self, node, _event_timeout(node), now)
        drain(self, now)
        return bool(due)

    def not_picked_up(self, key: str, attempt: UUID, now: datetime) -> bool:
        """No worker took the attempt within its schedule_to_start: it times out (and is
        retried per policy). False if the attempt is no longer current."""
        if not not_picked_up(self, self._nodes.get(key), attempt, now):
            return False
        drain(self, now)
        return True

    def heartbeat_missed(self, key: str, attempt: UUID, silent: float, now: datetime) -> bool:
        """The attempt's worker stopped beating `silent` seconds ago, past the step's
        heartbeat_timeout: it times out (`heartbeat_timeout`, retried per policy). False if
        the attempt is no longer current."""
        if not heartbeat_missed(self, self._nodes.get(key), attempt, silent, now):
            return False
        drain(self, now)
        return True

    def cancel(self, now: datetime, reason: str | None = None) -> bool:
        """Cancel the run: pending steps never start, running ones are aborted, every open
        step is recorded cancelled; then its compensations run, if it has any. False if the
        run had already finished, or is compensating already."""
        if not cancel_run(self, now, reason):
            return False
        drain(self, now)  # compensations, if any, start
        return True

    def compensating(self) -> bool:
        """Whether the run is undoing its steps before it ends (it is still running)."""
        return self._compensation is not None and not self.status.finished

    def fail_run(self, error: dict[str, Any], now: datetime) -> None:
        """The run fails: everything not finished is cancelled; its compensations, if any,
        run before it ends."""
        fail_run(self, error, now)
        drain(self, now)

    def _weigh_input(self) -> Weight:
        """What the run's input weighs, for the evaluator's routing: weighed once, if asked."""
        if self._input_weight is None:
            self._input_weight = weigh_capped(self.input)
        return self._input_weight


def _is_waiting(node: Node) -> bool:
    return (
        node.status is StepStatus.RUNNING
        and isinstance(node.step, WaitStep)
        and node.caught is None
    )


def _event_timeout(node: Node) -> dict[str, Any]:
    step = node.step
    assert isinstance(step, WaitStep)
    return StepError(
        f"step '{node.key}': no event '{step.event}'"
        + (f" with key {node.wait_key!r}" if node.wait_key is not None else "")
        + f" arrived within its timeout of {step.timeout:g}s",
        category="event_timeout",
        retryable=False,
        details={"event": step.event, "key": node.wait_key, "timeout": step.timeout},
    ).to_dict()
