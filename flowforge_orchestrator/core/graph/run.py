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

from flowforge_orchestrator.core.definition.models import (
    ConditionStep,
    DelayStep,
    ParallelStep,
    TaskStep,
    TransformStep,
)
from flowforge_orchestrator.core.definition.plan import SECRET_ROOTS, CompiledWorkflow, ListPlan
from flowforge_orchestrator.core.expressions.cost import Weight
from flowforge_orchestrator.core.expressions.templates import (
    Context,
    Evaluator,
    Expression,
    build_context,
)
from flowforge_orchestrator.core.graph.attempts import (
    Attempts,
    expression_error,
    invalid_output,
    iso,
    measure,
)
from flowforge_orchestrator.core.graph.nodes import (
    FAILED,
    Frame,
    FrameWeigher,
    Node,
    Scope,
    StepsView,
    attempt_id,
    encode,
    kind_of,
    list_output,
    pack,
    weigh_capped,
)
from flowforge_orchestrator.core.graph.parallel import Fanning
from flowforge_orchestrator.core.graph.restore import RUN_TIMER, Restoring
from flowforge_orchestrator.core.records import (
    CHECKPOINT_VERSION,
    AttemptFinished,
    Event,
    InlineResult,
    Limits,
    RunChanges,
    StepResult,
    json_size,
)
from flowforge_orchestrator.core.state import RunStatus, StepStatus, check_run, check_step
from flowforge_orchestrator.errors import ExpressionError, PayloadTooLarge, StepError

__all__ = ["SECRET_ROOTS", "CompiledWorkflow", "RunState"]

_WITH_WORKER = (StepStatus.DISPATCHED, StepStatus.RUNNING)


class RunState(Fanning, Attempts, Restoring):
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
    ) -> None:
        """`incarnation`: when the run's row was created (see `nodes.attempt_id`); runs
        checkpointed before attempt ids carried it keep the ids they have. `evaluator`
        evaluates every expression of the run (the orchestrator's bounds them:
        `engine.sandbox`); None evaluates in process, unbounded."""
        self.run_id = run_id
        started_with_it = not checkpoint or int(checkpoint.get("v", 0)) >= CHECKPOINT_VERSION
        self._incarnation = incarnation if started_with_it else None
        self.workflow = workflow
        self.version = version
        self.input = input
        self.limits = limits
        self.status = status
        self.output: Any = None
        self.error: dict[str, Any] | None = None
        self._evaluator = evaluator
        self._input_weight: Weight | None = None
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
        # The nodes the checkpoint saves one by one: all but the packed fan-out elements
        # (so a checkpoint does not even visit those).
        self._saved_alone: dict[str, Node] = {}
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
            for key, node in self._saved_alone.items()
            if node.status is not StepStatus.PENDING or node.attempt  # redriven: "p<n>"
        }
        for key, fan_out in self._packed.items():
            saved_entry = encode(fan_out, full=True)
            assert isinstance(saved_entry, dict)
            saved_entry["i"], attempts, alone = pack(fan_out)
            if attempts:
                saved_entry["na"] = attempts
            steps[key] = saved_entry
            steps.update(alone)
        # A run that started with attempt ids of the old form keeps them: version 2.
        version = CHECKPOINT_VERSION if self._incarnation is not None else 2
        saved: dict[str, Any] = {"v": version, "seq": self._seq, "steps": steps}
        if self._generation:
            saved["g"] = self._generation
        deadline = self._timers.get(RUN_TIMER)
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
            self._timers[RUN_TIMER] = now + timedelta(seconds=timeout)
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
            if key == RUN_TIMER:
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
                self._succeed(node, {"waited_until": iso(now)}, now)
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
        if node.status in FAILED and not node.step.continue_on_failure:
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
        if any(d.status in FAILED and not d.step.continue_on_failure for d in deps):
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
            self._saved_alone[node.key] = node
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
            self._succeed(owner, {"branch": owner.branch, "output": list_output(scope)}, now)
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
                output = self.workflow.outputs[step.id].render(
                    self._context(node), evaluator=self._evaluator
                )
                self._succeed(node, output, now, computed=True)
            elif isinstance(step, DelayStep):
                self._start_delay(node, step, now)
            elif isinstance(step, ConditionStep):
                self._start_condition(node, now)
            else:
                assert isinstance(step, ParallelStep)
                self._start_parallel(node, step, now)
        except ExpressionError as exc:
            self._fail(node, expression_error(exc), now)

    def _begin_inline(self, node: Node) -> None:
        node.attempt += 1
        node.generation = self._generation
        node.attempt_id = self._attempt_id(node)

    def _start_delay(self, node: Node, step: DelayStep, now: datetime) -> None:
        if step.duration is not None:
            fire_at = now + timedelta(seconds=step.duration)
        else:
            value = self._evaluate(node, "until")
            fire_at = _timestamp(value, self.workflow.expression(step.id, "until"))
        self._to(node, StepStatus.RUNNING, now, "step.started", data={"until": iso(fire_at)})
        if fire_at <= now:
            self._succeed(node, {"waited_until": iso(now)}, now)
        else:
            self._set_timer(node, fire_at)

    def _start_condition(self, node: Node, now: datetime) -> None:
        expression = self.workflow.expression(node.step.id, "if")
        value = self._evaluate(node, "if")
        if not isinstance(value, bool):
            raise expression.error(f"`if` must give true or false, got {kind_of(value)}")
        node.branch = "then" if value else "else"
        chosen, other = node.children if value else reversed(node.children)
        self._to(node, StepStatus.RUNNING, now, "step.started", data={"branch": node.branch})
        self._skip_scope(other, now)
        self._start_scope(chosen, now)

    # -- ending steps ----------------------------------------------------------------------

    def _succeed(self, node: Node, output: Any, now: datetime, *, computed: bool = False) -> None:
        """Succeed with `output`, or fail the step if the output breaks a byte limit.
        `computed`: the orchestrator made it (a transform), so it is also checked for what
        PostgreSQL cannot store (a NUL, a lone surrogate, nesting past jsonb.MAX_DEPTH)."""
        if computed:
            size, problem = measure(output)
            error = invalid_output(node.key, "the output", problem) if problem else None
        else:
            size, error = json_size(output), None
        error = error or self._limit_error(node.key, size)
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
            if self._retry(node, error, now, status):
                return
        event = "step.timed_out" if status is StepStatus.TIMED_OUT else "step.failed"
        self._to(node, status, now, event, data={"error": error})
        if node.attempt_id is not None and not isinstance(node.step, TaskStep):
            self._pending().inline_results.append(
                InlineResult(node.attempt_id, node.key, "failed", None, error, now)
            )

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
                output = template.render(self._context(None), evaluator=self._evaluator)
            except ExpressionError as exc:
                self.fail_run(expression_error(exc), now)
                return
            problem = measure(output)[1]
            if problem is not None:
                self.fail_run(invalid_output(None, "the run output", problem), now)
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

    # -- helpers -----------------------------------------------------------------------------

    def _context(self, node: Node | None) -> Context:
        frame = node.scope.frame if node is not None else self._root.frame
        element = frame.item_frame()
        # The weights are for the evaluator's routing; without one, nobody asks.
        weigher = FrameWeigher(frame, self._weigh_input) if self._evaluator else None
        if element is None:
            return build_context(self.input, StepsView(frame), self._run_info, weigher=weigher)
        return build_context(
            self.input,
            StepsView(frame),
            self._run_info,
            item=element.item,
            index=element.index,
            weigher=weigher,
        )

    def _weigh_input(self) -> Weight:
        if self._input_weight is None:
            self._input_weight = weigh_capped(self.input)
        return self._input_weight

    def _evaluate(self, node: Node, field: str) -> Any:
        expression = self.workflow.expression(node.step.id, field)
        return expression.evaluate(self._context(node), self._evaluator)

    def _attempt_id(self, node: Node) -> UUID:
        return attempt_id(self.run_id, node.key, node.attempt, node.generation, self._incarnation)

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
        node.weight = None  # what expressions read of it changed
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
            n.status in FAILED and not n.step.continue_on_failure for n in scope.nodes.values()
        )
    )


def _nested_error(owner: Node, message: str, culprit: str, cause: dict[str, Any]) -> dict[str, Any]:
    return StepError(
        f"step '{owner.key}': {message}: {cause.get('message', 'no message')}",
        category="branch_failed",
        retryable=False,
        details={"failed_step": culprit, "cause": cause},
    ).to_dict()


def _timestamp(value: Any, expression: Expression) -> datetime:
    """`until` gives a CEL timestamp or an RFC 3339 string; naive means UTC."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise expression.error(f"`until` gave {value!r}, not an RFC 3339 timestamp") from None
    if not isinstance(value, datetime):
        raise expression.error(f"`until` must give a timestamp, got {kind_of(value)}")
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
