"""One run's graph: which steps are ready, what a result or a timer changes, when it ends.

Pure: no I/O, no clock (every method takes `now`). The orchestrator feeds it claims, results
and timers, and drains `take_changes()` into a group commit. Everything needed to resume
after a crash is in `checkpoint()` plus the stored outputs of finished attempts.

How it moves: every entry point changes some nodes, and each node that finishes queues a
follow-up; `_drain` works the queue until nothing is left to decide. Follow-ups start the
dependents of a finished node, fail its list when it failed (unless `continue_on_failure`),
and hand a finished list to its owner: the run (top level), a condition (its branch) or a
parallel step (one branch, judged by the join policy). Control steps (condition, parallel,
delay, transform) run here, in the orchestrator; leaf steps are dispatched to workers.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from flowforge_orchestrator.changes import (
    CHECKPOINT_VERSION,
    AttemptFinished,
    AttemptStarted,
    Dispatch,
    Event,
    InlineResult,
    Limits,
    RunChanges,
    StepResult,
    json_size,
)
from flowforge_orchestrator.definitions import (
    ConditionStep,
    DelayStep,
    ParallelStep,
    TaskStep,
    TransformStep,
)
from flowforge_orchestrator.errors import ExpressionError, PayloadTooLarge, StepError
from flowforge_orchestrator.expressions import Expression, to_json_value
from flowforge_orchestrator.joins import JoinState, JoinVerdict, needed
from flowforge_orchestrator.nodes import (
    Frame,
    Node,
    Saved,
    Scope,
    StepsView,
    attempt_id,
    decode,
    encode,
    pack,
    packable,
    unpack,
)
from flowforge_orchestrator.plan import SECRET_ROOTS, CompiledWorkflow, ListPlan
from flowforge_orchestrator.retry import decide
from flowforge_orchestrator.state import RunStatus, StepStatus, check_run, check_step

__all__ = ["SECRET_ROOTS", "CompiledWorkflow", "RunState"]

_FAILED = (StepStatus.FAILED, StepStatus.TIMED_OUT)
_WITH_WORKER = (StepStatus.DISPATCHED, StepStatus.RUNNING)
_RUN_TIMER = ""  # the run's own deadline, among the step timers (no step key is empty)


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
    ) -> None:
        self.run_id = run_id
        self.workflow = workflow
        self.version = version
        self.input = input
        self.limits = limits
        self.status = status
        self.output: Any = None
        self.error: dict[str, Any] | None = None
        self._run_info = {
            "id": str(run_id),
            "workflow": workflow.definition.name,
            "version": version,
        }
        self._seq = 0
        self._generation = 0  # redrives so far: new attempts get fresh ids
        self._context_bytes = json_size(input)
        self._changes: RunChanges | None = None
        self._nodes: dict[str, Node] = {}
        self._timers: dict[str, datetime] = {}  # node key -> when its timer fires
        # Running fan-outs of one worker step: their elements are saved packed (nodes.pack).
        self._packed: dict[str, Node] = {}
        self._queue: deque[tuple[str, Any]] = deque()
        self._broken: list[tuple[Node, dict[str, Any]]] = []  # found unrestorable
        self._root = self._new_scope(workflow.root, Frame(None), None)
        if checkpoint:
            self._restore(checkpoint, results or {})

    # -- persistence -------------------------------------------------------------------

    def checkpoint(self) -> dict[str, Any]:
        """The graph state as stored in `runs.checkpoint` (outputs live in step_results)."""
        steps = {
            key: encode(node)
            for key, node in self._nodes.items()
            if (node.status is not StepStatus.PENDING or node.attempt)  # redriven: "p<n>"
            and not (node.packed and packable(node))
        }
        for key, fan_out in self._packed.items():
            saved_entry = encode(fan_out, full=True)
            assert isinstance(saved_entry, dict)
            saved_entry["i"], attempts = pack(fan_out)
            if attempts:
                saved_entry["na"] = attempts
            steps[key] = saved_entry
        saved: dict[str, Any] = {"v": CHECKPOINT_VERSION, "seq": self._seq, "steps": steps}
        if self._generation:
            saved["g"] = self._generation
        deadline = self._timers.get(_RUN_TIMER)
        if deadline is not None:
            saved["deadline"] = deadline.isoformat()
        return saved

    def take_changes(self) -> RunChanges | None:
        """Drain what happened since the last call, with a fresh checkpoint snapshot."""
        changes, self._changes = self._changes, None
        if changes is not None:
            changes.status = self.status
            changes.checkpoint = self.checkpoint()
            changes.output, changes.error = self.output, self.error
        return changes

    @property
    def seq(self) -> int:
        return self._seq

    def outstanding(self) -> list[UUID]:
        """Attempts handed to workers and not yet answered."""
        return [
            node.attempt_id
            for node in self._nodes.values()
            if node.attempt_id is not None
            and node.status in _WITH_WORKER
            and isinstance(node.step, TaskStep)
        ]

    def step_status(self, key: str) -> StepStatus:
        return self._nodes[key].status

    def step_type(self, key: str) -> str:
        """The type of the step at `key` ("?" once a finished fan-out forgot it)."""
        node = self._nodes.get(key)
        return node.step.type if node is not None else "?"

    def next_timer(self) -> datetime | None:
        """When `fire_timers` next has something to do (None: no timer is set)."""
        return min(self._timers.values(), default=None)

    # -- inputs from the orchestrator ----------------------------------------------------

    def start(self, now: datetime) -> None:
        """A claimed pending run begins."""
        check_run(self.status, RunStatus.RUNNING)
        self.status = RunStatus.RUNNING
        self._emit(
            now,
            "workflow.started",
            RunStatus.RUNNING,
            from_status=RunStatus.PENDING,
            data={"workflow": self.workflow.definition.name, "version": self.version}
            | ({"redrive": self._generation} if self._generation else {}),
        )
        self._pending().started_at = now
        timeout = self.workflow.definition.timeout
        if timeout is not None:
            self._timers[_RUN_TIMER] = now + timedelta(seconds=timeout)
        self._start_scope(self._root, now)
        self._drain(now)

    def resume(self, now: datetime) -> None:
        """An adopted run: hand outstanding attempts to the queue again (same ids)."""
        changes = self._pending()
        for node, error in self._broken:
            self._fail(node, error, now)
        self._broken.clear()
        for node in list(self._nodes.values()):
            if node.status is StepStatus.DISPATCHED and node.attempt_id is not None:
                dispatch = self._dispatch_for(node, now)
                if dispatch is not None:
                    changes.dispatches.append(dispatch)
                    self._set_deadline(node, dispatch, now)
        # Everything a commit decided was committed with it; this only re-checks, so that
        # a run is never left waiting on a follow-up that was lost.
        self._queue.extend(("check", scope) for scope in self._open_scopes())
        self._drain(now)

    def apply_result(self, result: StepResult, now: datetime) -> bool:
        """Apply a worker's result exactly once; False if it is stale or a duplicate."""
        if self.status is not RunStatus.RUNNING:
            return False
        node = self._nodes.get(result.step_id)
        if node is None or node.attempt_id != result.attempt_id:
            return False
        if node.status not in _WITH_WORKER:
            return False
        if node.status is StepStatus.DISPATCHED:
            self._to(
                node,
                StepStatus.RUNNING,
                result.started_at or result.finished_at,
                "step.started",
                data={"worker": result.worker} if result.worker else None,
            )
        if result.outcome == "succeeded":
            self._succeed(node, result.output, now)
        else:
            self._fail(node, result.error or {"message": "step failed"}, now)
        self._drain(now)
        return True

    def fire_timers(self, now: datetime) -> bool:
        """Fire every timer due at `now`; True if any fired."""
        due = sorted((when, key) for key, when in self._timers.items() if when <= now)
        for _, key in due:
            if self.status is not RunStatus.RUNNING or self._timers.pop(key, None) is None:
                continue
            if key == _RUN_TIMER:
                self._run_timed_out(now)
                continue
            node = self._nodes[key]
            node.fire_at = None
            if node.status is StepStatus.RETRYING:
                self._dispatch_new_attempt(node, now)
            elif node.status in _WITH_WORKER and isinstance(node.step, TaskStep):
                if node.probing:
                    assert node.attempt_id is not None
                    node.probing = False
                    timeout = self.workflow.definition.effective_timeout(
                        node.step, self.limits.default_timeout
                    )
                    self._set_timer(node, now + timedelta(seconds=timeout))
                    self._pending().probes.append((key, node.attempt_id, node.step.type))
                else:
                    self._attempt_timed_out(node, now)
            elif node.status is StepStatus.RUNNING and isinstance(node.step, DelayStep):
                self._succeed(node, {"waited_until": _iso(now)}, now)
        self._drain(now)
        return bool(due)

    def cancel(self, now: datetime, reason: str | None = None) -> bool:
        """Cancel the run: pending steps never start, running ones are aborted, every open
        step is recorded cancelled. False if the run had already finished."""
        if self.status.finished:
            return False
        self._cancel_scope(self._root, now)
        self._finish(RunStatus.CANCELLED, now, "workflow.cancelled", {"reason": reason})
        return True

    def fail_run(self, error: dict[str, Any], now: datetime) -> None:
        """End the run as failed: everything not finished is cancelled."""
        if self.status.finished:
            return
        self._cancel_scope(self._root, now)
        self.error = error
        self._finish(RunStatus.FAILED, now, "workflow.failed", {"error": error})

    # -- the follow-up queue -----------------------------------------------------------

    def _drain(self, now: datetime) -> None:
        while self._queue and self.status is RunStatus.RUNNING:
            kind, subject = self._queue.popleft()
            if kind == "finished":
                self._after_finish(subject, now)
            elif kind == "launch":
                self._launch(subject, now)
            else:
                self._check(subject, now)

    def _after_finish(self, node: Node, now: datetime) -> None:
        scope = node.scope
        if scope.closed:
            return
        if node.status in _FAILED and not node.step.continue_on_failure:
            self._fail_scope(scope, node, now)
            return
        for dependent in scope.plan.dependents[node.step.id]:
            self._maybe_start(scope.nodes[dependent], now)
        if _succeeded(scope):
            self._scope_done(scope, now)

    def _check(self, scope: Scope, now: datetime) -> None:
        if scope.closed:
            return
        for node in scope.nodes.values():
            self._maybe_start(node, now)
        if _succeeded(scope):
            self._scope_done(scope, now)

    def _maybe_start(self, node: Node, now: datetime) -> None:
        if node.status is not StepStatus.PENDING or node.scope.closed:
            return
        deps = [node.scope.nodes[d] for d in node.step.depends_on]
        if not all(d.status.finished for d in deps):
            return
        if any(d.status in _FAILED and not d.step.continue_on_failure for d in deps):
            return  # the failure closes the list; this guards a restored checkpoint
        if deps and all(d.status is StepStatus.SKIPPED for d in deps):
            self._skip(node, now)
        else:
            self._start_node(node, now)

    # -- lists ---------------------------------------------------------------------------

    def _new_scope(self, plan: ListPlan, frame: Frame, owner: Node | None) -> Scope:
        scope = Scope(plan, frame, owner)
        for step in plan.steps:
            node = Node(step.id + frame.suffix, step, scope)
            scope.nodes[step.id] = node
            frame.names[step.id] = node
            self._nodes[node.key] = node
            scope.open += 1
            if isinstance(step, ConditionStep) or (
                isinstance(step, ParallelStep) and step.for_each is None
            ):
                node.children = [
                    self._new_scope(child, frame, node) for child in self.workflow.children[step.id]
                ]
        return scope

    def _start_scope(self, scope: Scope, now: datetime) -> None:
        scope.started = True
        for node in scope.nodes.values():
            if not node.step.depends_on and node.status is StepStatus.PENDING:
                self._start_node(node, now)
        # Steps restored as finished (a redrive) count as done; the check starts what
        # they unblock and closes a list with nothing left to run, an empty one too.
        self._queue.append(("check", scope))

    def _scope_done(self, scope: Scope, now: datetime) -> None:
        """Every step of the list finished and none failed it."""
        scope.closed, scope.outcome = True, "succeeded"
        owner = scope.owner
        if owner is None:
            self._complete(now)
        elif isinstance(owner.step, ConditionStep):
            self._succeed(owner, {"branch": owner.branch, "output": _list_output(scope)}, now)
        else:
            self._branch_finished(owner, scope, now)

    def _fail_scope(self, scope: Scope, culprit: Node, now: datetime) -> None:
        error = culprit.error or {"message": f"step '{culprit.key}' failed"}
        scope.closed, scope.outcome, scope.failure = True, "failed", error
        for node in scope.nodes.values():
            self._cancel_node(node, now)
        owner = scope.owner
        if owner is None:
            self.fail_run({**error, "step_id": culprit.key}, now)
        elif isinstance(owner.step, ConditionStep):
            message = f"step '{culprit.key}' of its {owner.branch} branch failed"
            self._fail(owner, _nested_error(owner, message, culprit.key, error), now)
        else:
            self._branch_finished(owner, scope, now)

    def _skip_scope(self, scope: Scope, now: datetime) -> None:
        scope.closed, scope.outcome = True, "skipped"
        for node in scope.nodes.values():
            if node.status is StepStatus.PENDING:
                self._skip(node, now)

    def _cancel_scope(self, scope: Scope, now: datetime) -> None:
        if scope.outcome is None and _succeeded(scope):
            # It finished in the same move as what decided to cancel it; its follow-up
            # is still queued. It succeeded: say so.
            scope.outcome = "succeeded"
        scope.closed = True
        scope.outcome = scope.outcome or "cancelled"
        for node in scope.nodes.values():
            self._cancel_node(node, now)

    def _open_scopes(self) -> list[Scope]:
        scopes = [self._root] if self._root.started and not self._root.closed else []
        scopes += [
            child
            for node in self._nodes.values()
            if node.status is StepStatus.RUNNING
            for child in node.children
            if child.started and not child.closed
        ]
        return scopes

    # -- starting steps ------------------------------------------------------------------

    def _start_node(self, node: Node, now: datetime) -> None:
        step = node.step
        if isinstance(step, TaskStep):
            self._dispatch_new_attempt(node, now)
            return
        self._begin_inline(node)
        try:
            if isinstance(step, TransformStep):
                self._succeed(node, self.workflow.outputs[step.id].render(self._context(node)), now)
            elif isinstance(step, DelayStep):
                self._start_delay(node, step, now)
            elif isinstance(step, ConditionStep):
                self._start_condition(node, now)
            else:
                assert isinstance(step, ParallelStep)
                self._start_parallel(node, step, now)
        except ExpressionError as exc:
            self._fail(node, _expression_error(exc), now)

    def _begin_inline(self, node: Node) -> None:
        node.attempt += 1
        node.generation = self._generation
        node.attempt_id = attempt_id(self.run_id, node.key, node.attempt, node.generation)

    def _start_delay(self, node: Node, step: DelayStep, now: datetime) -> None:
        if step.duration is not None:
            fire_at = now + timedelta(seconds=step.duration)
        else:
            value = self._evaluate(node, "until")
            fire_at = _timestamp(value, self.workflow.expression(step.id, "until"))
        self._to(node, StepStatus.RUNNING, now, "step.started", data={"until": _iso(fire_at)})
        if fire_at <= now:
            self._succeed(node, {"waited_until": _iso(now)}, now)
        else:
            self._set_timer(node, fire_at)

    def _start_condition(self, node: Node, now: datetime) -> None:
        expression = self.workflow.expression(node.step.id, "if")
        value = self._evaluate(node, "if")
        if not isinstance(value, bool):
            raise expression.error(f"`if` must give true or false, got {_kind(value)}")
        node.branch = "then" if value else "else"
        chosen, other = node.children if value else reversed(node.children)
        self._to(node, StepStatus.RUNNING, now, "step.started", data={"branch": node.branch})
        self._skip_scope(other, now)
        self._start_scope(chosen, now)

    def _start_parallel(self, node: Node, step: ParallelStep, now: datetime) -> None:
        if step.for_each is not None:
            items = self._evaluate(node, "for_each")
            if not isinstance(items, list):
                expression = self.workflow.expression(step.id, "for_each")
                raise expression.error(f"`for_each` must give a list, got {_kind(items)}")
            self._expand(node, [to_json_value(item) for item in items])
        total = len(node.children)
        node.join = JoinState(total, needed(step.join, total), step.fail_fast)
        self._to(node, StepStatus.RUNNING, now, "step.started", data={"branches": total})
        if node.join.need > total:
            message = (
                f"step '{node.key}': the join needs {node.join.need} successful branches "
                f"but there are only {total}"
            )
            self._fail(
                node, StepError(message, category="join_failed", retryable=False).to_dict(), now
            )
            return
        self._judge(node, now)

    def _expand(self, node: Node, items: list[Any]) -> None:
        """One list instance per element, each with its own frame (`item`, `index`)."""
        node.items = items
        (template,) = self.workflow.children[node.step.id]
        outer = node.scope.frame
        node.children = [
            self._new_scope(
                template,
                Frame(outer, f"{outer.suffix}[{index}]", item=item, index=index),
                node,
            )
            for index, item in enumerate(items)
        ]
        if len(template.steps) == 1 and isinstance(template.steps[0], TaskStep):
            self._packed[node.key] = node
            for scope in node.children:
                for element in scope.nodes.values():
                    element.packed = True

    def _branch_finished(self, node: Node, scope: Scope, now: datetime) -> None:
        if node.status is not StepStatus.RUNNING or node.join is None:
            return
        if scope.outcome == "succeeded":
            node.join.succeeded += 1
        else:
            node.join.failed += 1
        self._judge(node, now)

    def _judge(self, node: Node, now: datetime) -> None:
        """Apply the join policy; start more branches while it waits."""
        assert node.join is not None
        verdict = node.join.verdict()
        if verdict is JoinVerdict.WAIT:
            self._launch(node, now)
            return
        self._cancel_children(node, now)
        output = [_branch_entry(scope) for scope in node.children]
        if verdict is JoinVerdict.SUCCEED:
            self._succeed(node, output, now)
            return
        failed = [s for s in node.children if s.outcome == "failed"]
        message = (
            f"step '{node.key}': {len(failed)} of {node.join.total} branches failed; "
            f"the join needs {node.join.need} to succeed"
        )
        details: dict[str, Any] = {"branches": output}
        if failed:
            details["first_error"] = failed[0].failure
        error = StepError(message, category="join_failed", retryable=False, details=details)
        self._fail(node, error.to_dict(), now)

    def _launch(self, node: Node, now: datetime) -> None:
        """Start the next branch if the limit allows; the rest follow through the queue, so
        a branch that finishes at once is judged before another is dispatched."""
        if node.status is not StepStatus.RUNNING or node.join is None:
            return
        limit = node.step.max_parallel or len(node.children)  # type: ignore[union-attr]
        if node.launched < len(node.children) and node.launched - node.join.finished < limit:
            scope = node.children[node.launched]
            node.launched += 1
            self._start_scope(scope, now)
            self._queue.append(("launch", node))

    # -- worker steps --------------------------------------------------------------------

    def _dispatch_new_attempt(self, node: Node, now: datetime) -> None:
        node.attempt += 1
        node.generation = self._generation
        node.attempt_id = attempt_id(self.run_id, node.key, node.attempt, node.generation)
        node.error = None
        dispatch = self._dispatch_for(node, now)
        if dispatch is None:  # the parameters could not be rendered: already failed
            return
        self._set_deadline(node, dispatch, now)
        self._to(
            node,
            StepStatus.DISPATCHED,
            now,
            "step.dispatched",
            data={"type": node.step.type, "attempt": node.attempt},
        )
        changes = self._pending()
        changes.attempts_started.append(
            AttemptStarted(node.attempt_id, node.key, node.attempt, node.step.type, now)
        )
        changes.dispatches.append(dispatch)

    def _set_deadline(self, node: Node, dispatch: Dispatch, now: datetime) -> None:
        """The worker ends an attempt at its timeout, counted from when it starts; this
        deadline is for the worker that died or never came: queue wait plus timeout. With
        `schedule_to_start`, the orchestrator first asks, at that time, whether a worker
        took the attempt (`probes`), and times it out at once if none did."""
        waiting = node.step.schedule_to_start
        node.probing = waiting is not None
        first = waiting if waiting is not None else 2 * dispatch.timeout
        self._set_timer(node, now + timedelta(seconds=first))

    def not_picked_up(self, key: str, attempt: UUID, now: datetime) -> bool:
        """No worker took the attempt within its schedule_to_start: it times out (and is
        retried per policy). False if the attempt is no longer current."""
        node = self._nodes.get(key)
        if node is None or node.attempt_id != attempt or node.status is not StepStatus.DISPATCHED:
            return False
        waited = node.step.schedule_to_start or 0
        error = StepError(
            f"step '{key}': no worker took attempt {node.attempt} within its "
            f"schedule_to_start of {waited:g}s (is a worker serving '{node.step.type}'?)",
            category="schedule_to_start_timeout",
            details={"schedule_to_start": waited},
        ).to_dict()
        self._pending().aborts.append(attempt)
        self._fail(node, error, now, status=StepStatus.TIMED_OUT)
        self._drain(now)
        return True

    def _dispatch_for(self, node: Node, now: datetime) -> Dispatch | None:
        step = node.step
        assert node.attempt_id is not None
        try:
            params = self.workflow.params[step.id].render(
                self._context(node), skip_roots=SECRET_ROOTS
            )
        except ExpressionError as exc:
            self._fail(node, _expression_error(exc), now)
            return None
        size = json_size(params)
        if size > self.limits.max_context_bytes:
            what = "the rendered parameters"
            error = PayloadTooLarge(
                step_id=node.key, what=what, size=size, limit=self.limits.max_context_bytes
            )
            self._fail(node, error.to_dict(), now)
            return None
        timeout = self.workflow.definition.effective_timeout(step, self.limits.default_timeout)
        return Dispatch(
            attempt_id=node.attempt_id,
            run_id=self.run_id,
            step_id=node.key,
            step_type=step.type,
            attempt=node.attempt,
            params=params,
            timeout=timeout,
            secret_paths=self.workflow.secret_paths.get(step.id, []),
        )

    # -- ending steps ----------------------------------------------------------------------

    def _succeed(self, node: Node, output: Any, now: datetime) -> None:
        """Succeed with `output`, or fail the step if the output breaks a byte limit."""
        size = json_size(output)
        error = self._limit_error(node.key, size)
        if error is not None:
            self._fail(node, error, now)
            return
        was_with_worker = node.status in _WITH_WORKER and isinstance(node.step, TaskStep)
        self._clear_timer(node)
        node.output = output
        self._context_bytes += size
        self._to(node, StepStatus.SUCCEEDED, now, "step.succeeded")
        assert node.attempt_id is not None
        if was_with_worker:
            self._pending().attempts_finished.append(
                AttemptFinished(node.attempt_id, StepStatus.SUCCEEDED, now, None)
            )
        else:
            self._pending().inline_results.append(
                InlineResult(node.attempt_id, node.key, "succeeded", output, None, now)
            )

    def _limit_error(self, key: str, size: int) -> dict[str, Any] | None:
        if size > self.limits.max_output_bytes:
            return PayloadTooLarge(
                step_id=key, what="the output", size=size, limit=self.limits.max_output_bytes
            ).to_dict()
        total = self._context_bytes + size
        if total > self.limits.max_context_bytes:
            return PayloadTooLarge(
                step_id=key,
                what="the run context with this output",
                size=total,
                limit=self.limits.max_context_bytes,
            ).to_dict()
        return None

    def _attempt_timed_out(self, node: Node, now: datetime) -> None:
        assert node.attempt_id is not None
        timeout = self.workflow.definition.effective_timeout(node.step, self.limits.default_timeout)
        waited = node.step.schedule_to_start or timeout
        error = StepError(
            f"step '{node.key}': attempt {node.attempt} had no result {waited + timeout:g}s "
            f"after it was dispatched (timeout {timeout:g}s plus {waited:g}s to be picked up;"
            " did its worker stop?)",
            category="timeout",
            details={"timeout": timeout, "schedule_to_start": waited},
        ).to_dict()
        self._pending().aborts.append(node.attempt_id)
        self._fail(node, error, now, status=StepStatus.TIMED_OUT)

    def _fail(
        self,
        node: Node,
        error: dict[str, Any],
        now: datetime,
        *,
        status: StepStatus = StepStatus.FAILED,
    ) -> None:
        """The attempt failed: retry it if its policy says so, else the step fails."""
        self._cancel_children(node, now)  # a control step that fails ends what it holds
        node.error = error
        with_worker = node.status in _WITH_WORKER and isinstance(node.step, TaskStep)
        self._clear_timer(node)
        if with_worker:
            assert node.attempt_id is not None
            self._pending().attempts_finished.append(
                AttemptFinished(node.attempt_id, status, now, error)
            )
            if self._retry(node, error, now):
                return
        event = "step.timed_out" if status is StepStatus.TIMED_OUT else "step.failed"
        self._to(node, status, now, event, data={"error": error})
        if node.attempt_id is not None and not isinstance(node.step, TaskStep):
            self._pending().inline_results.append(
                InlineResult(node.attempt_id, node.key, "failed", None, error, now)
            )

    def _retry(self, node: Node, error: dict[str, Any], now: datetime) -> bool:
        assert node.attempt_id is not None
        policy = self.workflow.definition.effective_retry(node.step)
        # The jitter comes from the attempt id: a replay after a crash waits the same.
        rand = node.attempt_id.int / 2**128
        decision = decide(policy, error, node.attempt, rand=rand, now=now)
        if not decision.retry:
            return False
        at = now + timedelta(seconds=decision.delay)
        data = {"error": error, "next_attempt": node.attempt + 1, "next_attempt_at": _iso(at)}
        self._to(node, StepStatus.RETRYING, now, "step.retrying", data=data)
        self._set_timer(node, at)
        return True

    def _set_timer(self, node: Node, at: datetime) -> None:
        node.fire_at = at
        self._timers[node.key] = at

    def _clear_timer(self, node: Node) -> None:
        node.fire_at, node.probing = None, False
        self._timers.pop(node.key, None)

    def _run_timed_out(self, now: datetime) -> None:
        timeout = self.workflow.definition.timeout or 0
        error = StepError(
            f"the run did not finish within its timeout of {timeout:g}s",
            category="run_timeout",
            retryable=False,
            details={"timeout": timeout},
        ).to_dict()
        self.fail_run(error, now)

    def _skip(self, node: Node, now: datetime) -> None:
        self._to(node, StepStatus.SKIPPED, now, "step.skipped")
        for child in node.children:
            self._skip_scope(child, now)

    def _cancel_node(self, node: Node, now: datetime) -> None:
        if node.status.finished:
            return
        self._cancel_children(node, now)
        self._clear_timer(node)
        with_worker = node.status in _WITH_WORKER and isinstance(node.step, TaskStep)
        self._to(node, StepStatus.CANCELLED, now, "step.cancelled")
        if with_worker and node.attempt_id is not None:
            changes = self._pending()
            changes.attempts_finished.append(
                AttemptFinished(node.attempt_id, StepStatus.CANCELLED, now, None)
            )
            changes.aborts.append(node.attempt_id)

    def _cancel_children(self, node: Node, now: datetime) -> None:
        for child in node.children:
            if not child.closed:
                self._cancel_scope(child, now)

    def _complete(self, now: datetime) -> None:
        template = self.workflow.run_output
        if template is not None:
            try:
                output = template.render(self._context(None))
            except ExpressionError as exc:
                self.fail_run(_expression_error(exc), now)
                return
        else:
            output = {sid: self._root.nodes[sid].output for sid in self._root.plan.sinks}
        self.output = output
        self._finish(RunStatus.COMPLETED, now, "workflow.completed", {"output": output})

    def _finish(self, status: RunStatus, now: datetime, event: str, data: dict[str, Any]) -> None:
        previous = self.status
        check_run(previous, status)
        self.status = status
        self._timers.clear()
        self._queue.clear()
        self._emit(now, event, status, from_status=previous, data=data)
        self._pending().finished_at = now

    # -- restoring ---------------------------------------------------------------------------

    def _restore(self, checkpoint: Mapping[str, Any], results: Mapping[UUID, StepResult]) -> None:
        self._seq = int(checkpoint.get("seq", 0))
        self._generation = int(checkpoint.get("g", 0))
        if checkpoint.get("deadline"):
            self._timers[_RUN_TIMER] = datetime.fromisoformat(checkpoint["deadline"])
        saved = {key: decode(value) for key, value in checkpoint.get("steps", {}).items()}
        scopes = [self._root]
        fan_outs: deque[Node] = deque()
        index = 0
        while index < len(scopes) or fan_outs:
            if index < len(scopes):
                scope = scopes[index]
                index += 1
                for node in scope.nodes.values():
                    entry = saved.get(node.key)
                    if entry is not None:
                        self._restore_node(node, entry, results)
                        if entry.items is not None:
                            fan_outs.append(node)
                    scopes.extend(node.children)
            else:
                node = fan_outs.popleft()
                self._restore_fan_out(node, saved[node.key], saved, results)
                scopes.extend(node.children)
        self._root.started = self.status is RunStatus.RUNNING
        for scope in reversed(scopes):  # children before their owners
            self._restore_scope_state(scope)

    def _restore_node(self, node: Node, entry: Saved, results: Mapping[UUID, StepResult]) -> None:
        node.status, node.attempt, node.error = entry.status, entry.attempt, entry.error
        node.fire_at, node.branch = entry.fire_at, entry.branch
        node.generation = entry.generation
        if entry.attempt_id is not None:
            node.attempt_id = entry.attempt_id
        elif node.attempt and node.status is not StepStatus.PENDING:
            node.attempt_id = attempt_id(self.run_id, node.key, node.attempt, node.generation)
        if node.status.finished:
            node.scope.open -= 1
        result = results.get(node.attempt_id) if node.attempt_id else None
        if result is not None and node.status is StepStatus.SUCCEEDED:
            node.output = result.output
            self._context_bytes += json_size(result.output)
        if not node.status.finished and node.fire_at is not None:
            self._timers[node.key] = node.fire_at

    def _unpack(
        self,
        node: Node,
        entry: Saved,
        saved: Mapping[str, Saved],
        results: Mapping[UUID, StepResult],
    ) -> None:
        """Element states saved packed in the fan-out's entry (those saved on their own, with
        an error or a retry timer, are restored with the rest)."""
        # A count that changed (see _restore_fan_out) restores what both sides have.
        pairs = zip(entry.elements or "", node.children, strict=False)
        for index, (letter, scope) in enumerate(pairs):
            (element,) = scope.nodes.values()
            if element.key in saved:
                continue
            attempt = entry.element_attempts.get(str(index))
            state = unpack(letter, attempt, node.generation)
            if state is not None:
                self._restore_node(element, state, results)

    def _restore_fan_out(
        self,
        node: Node,
        entry: Saved,
        saved: Mapping[str, Saved],
        results: Mapping[UUID, StepResult],
    ) -> None:
        """Re-evaluate `for_each` (its inputs are restored); the element count must agree."""
        try:
            items = self._evaluate(node, "for_each")
        except ExpressionError as exc:
            items, problem = None, str(exc)
        else:
            problem = f"it now gives {len(items)} elements" if isinstance(items, list) else ""
        if isinstance(items, list) and len(items) == entry.items:
            self._expand(node, [to_json_value(item) for item in items])
            self._unpack(node, entry, saved, results)
            return
        # The saved elements still exist (some may be with workers): restore them, to
        # cancel and abort them when the fan-out fails on resume.
        self._expand(node, [None] * (entry.items or 0))
        self._unpack(node, entry, saved, results)
        if not node.status.finished:
            message = (
                f"step '{node.key}': for_each gave {entry.items} elements when the step "
                f"started, but {problem or 'not a list'} on resume; it must read only the "
                "step's dependencies"
            )
            self._broken.append(
                (node, StepError(message, category="internal_error", retryable=False).to_dict())
            )

    def _restore_scope_state(self, scope: Scope) -> None:
        nodes = scope.nodes.values()
        if any(n.status is not StepStatus.PENDING for n in nodes):
            scope.started = True
        owner = scope.owner
        if owner is None and self.status is RunStatus.PENDING:
            return  # a redriven run: its top level opens when it starts again
        if owner is not None and owner.status.finished:
            scope.closed = True
            return
        if owner is not None and owner.status is StepStatus.PENDING:
            return
        culprit = next(
            (n for n in nodes if n.status in _FAILED and not n.step.continue_on_failure), None
        )
        if culprit is not None:
            scope.closed, scope.outcome, scope.failure = True, "failed", culprit.error
        elif scope.started and scope.done:
            scope.closed, scope.outcome = True, "succeeded"
        if owner is None:
            return
        if isinstance(owner.step, ConditionStep):
            if owner.branch is not None and scope is not owner.children[owner.branch == "else"]:
                scope.closed, scope.outcome = True, "skipped"
            return
        self._restore_join(owner, scope)

    def _restore_join(self, owner: Node, scope: Scope) -> None:
        """Count a restored branch into its parallel step's join."""
        if owner.join is None:
            step = owner.step
            assert isinstance(step, ParallelStep)
            total = len(owner.children)
            owner.join = JoinState(total, needed(step.join, total), step.fail_fast)
        if scope.started:
            owner.launched = max(owner.launched, owner.children.index(scope) + 1)
        if scope.outcome == "succeeded":
            owner.join.succeeded += 1
        elif scope.outcome == "failed":
            owner.join.failed += 1

    # -- helpers -----------------------------------------------------------------------------

    def _context(self, node: Node | None) -> dict[str, Any]:
        frame = node.scope.frame if node is not None else self._root.frame
        context: dict[str, Any] = {
            "input": self.input,
            "steps": StepsView(frame),
            "run": self._run_info,
        }
        element = frame.item_frame()
        if element is not None:
            context["item"], context["index"] = element.item, element.index
        return context

    def _evaluate(self, node: Node, field: str) -> Any:
        return self.workflow.expression(node.step.id, field).evaluate(self._context(node))

    def _pending(self) -> RunChanges:
        if self._changes is None:
            self._changes = RunChanges(self.run_id, self.status, {})
        return self._changes

    def _to(
        self,
        node: Node,
        target: StepStatus,
        at: datetime,
        event: str,
        *,
        data: dict[str, Any] | None = None,
    ) -> None:
        check_step(node.key, node.status, target)
        previous = node.status
        node.status = target
        payload: dict[str, Any] = {"step_id": node.key}
        if node.attempt:
            payload["attempt"] = node.attempt
        if data:
            payload.update(data)
        self._emit(
            at,
            event,
            target,
            from_status=previous,
            step_id=node.key,
            attempt_id=node.attempt_id,
            data=payload,
        )
        if target.finished:
            node.scope.open -= 1
            if not node.scope.closed:
                self._queue.append(("finished", node))
            if node.items is not None:
                self._forget_elements(node)

    def _forget_elements(self, node: Node) -> None:
        """A finished fan-out keeps only its own output: its elements leave memory and the
        checkpoint (their history stays in the transitions)."""
        stack = list(node.children)
        while stack:
            scope = stack.pop()
            for inner in scope.nodes.values():
                self._nodes.pop(inner.key, None)
                self._timers.pop(inner.key, None)
                if inner.status is StepStatus.SUCCEEDED:
                    self._context_bytes -= json_size(inner.output)
                stack.extend(inner.children)
        node.children, node.items = [], None
        self._packed.pop(node.key, None)

    def _emit(
        self,
        at: datetime,
        type_: str,
        to_status: str,
        *,
        from_status: str | None = None,
        step_id: str | None = None,
        attempt_id: UUID | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        self._seq += 1
        self._pending().events.append(
            Event(
                seq=self._seq,
                type=type_,
                at=at,
                to_status=str(to_status),
                from_status=str(from_status) if from_status is not None else None,
                step_id=step_id,
                attempt_id=attempt_id,
                data=data or {},
            )
        )


def _succeeded(scope: Scope) -> bool:
    """Every step of the open list finished, and no failure is still waiting in the queue
    to close it (a step started by the same follow-up may have failed at once)."""
    return (
        not scope.closed
        and scope.done
        and not any(
            n.status in _FAILED and not n.step.continue_on_failure for n in scope.nodes.values()
        )
    )


def _list_output(scope: Scope) -> Any:
    """A list's output: its one final step's, or its final steps' by id."""
    sinks = scope.plan.sinks
    if not sinks:
        return None
    if len(sinks) == 1:
        return scope.nodes[sinks[0]].output
    return {sid: scope.nodes[sid].output for sid in sinks}


def _branch_entry(scope: Scope) -> dict[str, Any]:
    entry: dict[str, Any] = {"status": scope.outcome or "cancelled", "output": None}
    if scope.outcome == "succeeded":
        entry["output"] = _list_output(scope)
    elif scope.outcome == "failed":
        entry["error"] = scope.failure
    return entry


def _nested_error(owner: Node, message: str, culprit: str, cause: dict[str, Any]) -> dict[str, Any]:
    return StepError(
        f"step '{owner.key}': {message}: {cause.get('message', 'no message')}",
        category="branch_failed",
        retryable=False,
        details={"failed_step": culprit, "cause": cause},
    ).to_dict()


def _expression_error(exc: ExpressionError) -> dict[str, Any]:
    return StepError(
        str(exc),
        category="expression_error",
        retryable=False,
        details={"expression": exc.expression, "field": exc.field},
    ).to_dict()


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _timestamp(value: Any, expression: Expression) -> datetime:
    """`until` gives a CEL timestamp or an RFC 3339 string; naive means UTC."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise expression.error(f"`until` gave {value!r}, not an RFC 3339 timestamp") from None
    if not isinstance(value, datetime):
        raise expression.error(f"`until` must give a timestamp, got {_kind(value)}")
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
