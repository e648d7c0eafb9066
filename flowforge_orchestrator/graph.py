"""One run's graph: which steps are ready, what a result changes, when the run is over.

Pure: no I/O, no clock (every method takes `now`), ids come from an injected factory. The
orchestrator feeds it claims, results and timers, and drains `take_changes()` into a group
commit. Everything the graph needs to resume after a crash is in `checkpoint()` plus the
stored outputs of finished attempts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID, uuid4

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
    INLINE_STEP_TYPES,
    Step,
    TaskStep,
    TransformStep,
    WorkflowDefinition,
)
from flowforge_orchestrator.errors import ExpressionError, PayloadTooLarge, StepError
from flowforge_orchestrator.expressions import Template, build_context
from flowforge_orchestrator.state import RunStatus, StepStatus, check_run, check_step

__all__ = ["SECRET_ROOTS", "CompiledWorkflow", "RunState"]

SECRET_ROOTS = frozenset({"secrets"})


class CompiledWorkflow:
    """A definition with its expressions compiled once, shared by all runs of that version."""

    def __init__(self, definition: WorkflowDefinition) -> None:
        self.definition = definition
        compiled = definition.compiled
        self.steps: dict[str, Step] = {step.id: step for step in definition.steps}
        self.params: dict[str, Template] = {}
        self.outputs: dict[str, Template] = {}
        # Paths in `with` that read `secrets`: only the worker renders them, from its own
        # environment, so secret values never reach PostgreSQL, Redis, logs or events.
        self.secret_paths: dict[str, list[list[str | int]]] = {}
        for step in definition.steps:
            if isinstance(step, TaskStep):
                params = compiled.template(step.id, "with")
                self.params[step.id] = params
                deferred = params.deferred_paths(SECRET_ROOTS)
                if deferred:
                    self.secret_paths[step.id] = [list(path) for path in deferred]
            elif isinstance(step, TransformStep):
                self.outputs[step.id] = compiled.template(step.id, "output")
        self.run_output = compiled.output
        depended = {dep for step in definition.steps for dep in step.depends_on}
        self.sinks = [s.id for s in definition.steps if s.id not in depended]


@dataclass
class _Step:
    status: StepStatus = StepStatus.PENDING
    attempt: int = 0
    attempt_id: UUID | None = None
    output: Any = None
    error: dict[str, Any] | None = None


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
        new_id: Callable[[], UUID] = uuid4,
    ) -> None:
        self.run_id = run_id
        self.workflow = workflow
        self.version = version
        self.input = input
        self.limits = limits
        self.status = status
        self._new_id = new_id
        self._steps = {sid: _Step() for sid in workflow.steps}
        self._seq = 0
        self._context_bytes = json_size(input)
        self._changes: RunChanges | None = None
        self.output: Any = None
        self.error: dict[str, Any] | None = None
        if checkpoint:
            self._restore(checkpoint, results or {})

    # -- persistence -------------------------------------------------------------------

    def checkpoint(self) -> dict[str, Any]:
        """The graph state as stored in `runs.checkpoint` (outputs live in step_results)."""
        steps: dict[str, dict[str, Any]] = {}
        for sid, st in self._steps.items():
            if st.status is StepStatus.PENDING:
                continue
            saved: dict[str, Any] = {"s": st.status.value, "n": st.attempt, "a": str(st.attempt_id)}
            if st.error is not None:
                # Some failures are the orchestrator's verdict (an output over its limit, a
                # template that failed): no result row holds them, so the checkpoint does.
                saved["e"] = st.error
            steps[sid] = saved
        return {"v": CHECKPOINT_VERSION, "seq": self._seq, "steps": steps}

    def _restore(self, checkpoint: Mapping[str, Any], results: Mapping[UUID, StepResult]) -> None:
        self._seq = int(checkpoint.get("seq", 0))
        for sid, saved in checkpoint.get("steps", {}).items():
            st = self._steps.get(sid)
            if st is None:
                continue
            st.status = StepStatus(saved["s"])
            st.attempt = int(saved.get("n", 0))
            st.attempt_id = UUID(saved["a"]) if saved.get("a") not in (None, "None") else None
            st.error = saved.get("e")
            result = results.get(st.attempt_id) if st.attempt_id else None
            if result is not None and st.status is StepStatus.SUCCEEDED:
                st.output = result.output
                self._context_bytes += json_size(result.output)

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
            st.attempt_id
            for st in self._steps.values()
            if st.attempt_id and st.status in (StepStatus.DISPATCHED, StepStatus.RUNNING)
        ]

    def step_status(self, step_id: str) -> StepStatus:
        return self._steps[step_id].status

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
            data={"workflow": self.workflow.definition.name, "version": self.version},
        )
        self._pending().started_at = now
        self.advance(now)

    def resume(self, now: datetime) -> None:
        """An adopted run: hand outstanding attempts to the queue again (same ids)."""
        changes = self._pending()
        for sid, st in self._steps.items():
            if st.status is StepStatus.DISPATCHED and st.attempt_id is not None:
                dispatch = self._dispatch_for(sid, st, now)
                if dispatch is not None:
                    changes.dispatches.append(dispatch)
        self.advance(now)

    def apply_result(self, result: StepResult, now: datetime) -> bool:
        """Apply a worker's result exactly once; False if it is stale or a duplicate."""
        if self.status is not RunStatus.RUNNING:
            return False
        st = self._steps.get(result.step_id)
        if st is None or st.attempt_id != result.attempt_id:
            return False
        if st.status not in (StepStatus.DISPATCHED, StepStatus.RUNNING):
            return False
        if st.status is StepStatus.DISPATCHED:
            self._step_to(
                result.step_id,
                StepStatus.RUNNING,
                result.started_at or result.finished_at,
                "step.started",
                data={"worker": result.worker} if result.worker else None,
            )
        if result.outcome == "succeeded":
            self._finish_with(result.step_id, result.output, now)
        else:
            self._fail(result.step_id, result.error or {"message": "step failed"}, now)
        self.advance(now)
        return True

    def fail_run(self, error: dict[str, Any], now: datetime) -> None:
        """End the run as failed: everything not finished is cancelled."""
        if self.status.finished:
            return
        self._cancel_open_steps(now)
        self.error = error
        self._finish(RunStatus.FAILED, now, "workflow.failed", {"error": error})

    # -- the graph ----------------------------------------------------------------------

    def advance(self, now: datetime) -> None:
        """Start every step whose dependencies are done; finish the run when all are."""
        progressed = True
        while progressed and self.status is RunStatus.RUNNING:
            progressed = False
            for step in self.workflow.definition.steps:
                st = self._steps[step.id]
                if st.status is not StepStatus.PENDING:
                    continue
                deps = [self._steps[d] for d in step.depends_on]
                if not all(d.status.finished for d in deps):
                    continue
                failed = [
                    d
                    for d, dep in zip(step.depends_on, deps, strict=True)
                    if dep.status in (StepStatus.FAILED, StepStatus.TIMED_OUT)
                    and not self.workflow.steps[d].continue_on_failure
                ]
                if failed:
                    # A failure that nobody tolerates ends the run (it was already failed
                    # when the step failed; this guards a restored checkpoint).
                    continue
                if deps and all(d.status is StepStatus.SKIPPED for d in deps):
                    self._step_to(step.id, StepStatus.SKIPPED, now, "step.skipped")
                else:
                    self._start_step(step, now)
                progressed = True
        if self.status is RunStatus.RUNNING and all(
            st.status.finished for st in self._steps.values()
        ):
            self._complete(now)

    def _start_step(self, step: Step, now: datetime) -> None:
        if isinstance(step, TransformStep):
            self._run_transform(step, now)
        elif step.type in INLINE_STEP_TYPES:
            self._fail(
                step.id,
                StepError(
                    f"step '{step.id}': type '{step.type}' is not supported by this engine yet",
                    category="unsupported",
                    retryable=False,
                ).to_dict(),
                now,
            )
        else:
            self._dispatch_new_attempt(step, now)

    def _dispatch_new_attempt(self, step: Step, now: datetime) -> None:
        st = self._steps[step.id]
        st.attempt += 1
        st.attempt_id = self._new_id()
        dispatch = self._dispatch_for(step.id, st, now)
        if dispatch is None:  # the parameters could not be rendered: already failed
            return
        self._step_to(
            step.id,
            StepStatus.DISPATCHED,
            now,
            "step.dispatched",
            data={"type": step.type, "attempt": st.attempt},
        )
        changes = self._pending()
        changes.attempts_started.append(
            AttemptStarted(st.attempt_id, step.id, st.attempt, step.type, now)
        )
        changes.dispatches.append(dispatch)

    def _dispatch_for(self, step_id: str, st: _Step, now: datetime) -> Dispatch | None:
        step = self.workflow.steps[step_id]
        assert st.attempt_id is not None
        try:
            params = self.workflow.params[step_id].render(self._context(), skip_roots=SECRET_ROOTS)
        except ExpressionError as exc:
            self._fail(step_id, _expression_error(exc), now)
            return None
        size = json_size(params)
        if size > self.limits.max_context_bytes:
            self._fail(
                step_id,
                PayloadTooLarge(
                    step_id=step_id,
                    what="the rendered parameters",
                    size=size,
                    limit=self.limits.max_context_bytes,
                ).to_dict(),
                now,
            )
            return None
        timeout = self.workflow.definition.effective_timeout(step, self.limits.default_timeout)
        return Dispatch(
            attempt_id=st.attempt_id,
            run_id=self.run_id,
            step_id=step_id,
            step_type=step.type,
            attempt=st.attempt,
            params=params,
            timeout=timeout,
            secret_paths=self.workflow.secret_paths.get(step_id, []),
        )

    def _run_transform(self, step: TransformStep, now: datetime) -> None:
        st = self._steps[step.id]
        st.attempt += 1
        st.attempt_id = self._new_id()
        try:
            output = self.workflow.outputs[step.id].render(self._context())
        except ExpressionError as exc:
            self._fail(step.id, _expression_error(exc), now, inline=True)
            return
        self._finish_with(step.id, output, now, inline=True)

    def _finish_with(
        self, step_id: str, output: Any, now: datetime, *, inline: bool = False
    ) -> None:
        """Succeed with `output`, or fail the step if the output breaks a byte limit."""
        size = json_size(output)
        error = self._limit_error(step_id, size)
        if error is not None:
            self._fail(step_id, error, now, inline=inline)
            return
        st = self._steps[step_id]
        st.output = output
        self._context_bytes += size
        self._step_to(step_id, StepStatus.SUCCEEDED, now, "step.succeeded")
        assert st.attempt_id is not None
        if inline:
            self._pending().inline_results.append(
                InlineResult(st.attempt_id, step_id, "succeeded", output, None, now)
            )
        else:
            self._pending().attempts_finished.append(
                AttemptFinished(st.attempt_id, StepStatus.SUCCEEDED, now, None)
            )

    def _limit_error(self, step_id: str, size: int) -> dict[str, Any] | None:
        if size > self.limits.max_output_bytes:
            return PayloadTooLarge(
                step_id=step_id, what="the output", size=size, limit=self.limits.max_output_bytes
            ).to_dict()
        total = self._context_bytes + size
        if total > self.limits.max_context_bytes:
            return PayloadTooLarge(
                step_id=step_id,
                what="the run context with this output",
                size=total,
                limit=self.limits.max_context_bytes,
            ).to_dict()
        return None

    def _fail(
        self, step_id: str, error: dict[str, Any], now: datetime, *, inline: bool = False
    ) -> None:
        st = self._steps[step_id]
        st.error = error
        was_dispatched = st.status in (StepStatus.DISPATCHED, StepStatus.RUNNING)
        self._step_to(step_id, StepStatus.FAILED, now, "step.failed", data={"error": error})
        changes = self._pending()
        if was_dispatched and st.attempt_id is not None:
            changes.attempts_finished.append(
                AttemptFinished(st.attempt_id, StepStatus.FAILED, now, error)
            )
        if inline and st.attempt_id is not None:
            changes.inline_results.append(
                InlineResult(st.attempt_id, step_id, "failed", None, error, now)
            )
        if not self.workflow.steps[step_id].continue_on_failure:
            self.fail_run({**error, "step_id": step_id}, now)

    def _complete(self, now: datetime) -> None:
        template = self.workflow.run_output
        if template is not None:
            try:
                output = template.render(self._context())
            except ExpressionError as exc:
                self.fail_run(_expression_error(exc), now)
                return
        else:
            output = {sid: self._steps[sid].output for sid in self.workflow.sinks}
        self.output = output
        self._finish(RunStatus.COMPLETED, now, "workflow.completed", {"output": output})

    def _finish(self, status: RunStatus, now: datetime, event: str, data: dict[str, Any]) -> None:
        previous = self.status
        check_run(previous, status)
        self.status = status
        self._emit(now, event, status, from_status=previous, data=data)
        self._pending().finished_at = now

    def _cancel_open_steps(self, now: datetime) -> None:
        for sid, st in self._steps.items():
            if st.status.finished:
                continue
            was_dispatched = st.status in (StepStatus.DISPATCHED, StepStatus.RUNNING)
            self._step_to(sid, StepStatus.CANCELLED, now, "step.cancelled")
            if was_dispatched and st.attempt_id is not None:
                self._pending().attempts_finished.append(
                    AttemptFinished(st.attempt_id, StepStatus.CANCELLED, now, None)
                )

    # -- helpers ------------------------------------------------------------------------

    def _context(self) -> dict[str, Any]:
        steps = {
            sid: {"output": st.output, "status": st.status.value, "error": st.error}
            for sid, st in self._steps.items()
            if st.status.finished
        }
        run = {
            "id": str(self.run_id),
            "workflow": self.workflow.definition.name,
            "version": self.version,
        }
        return build_context(self.input, steps, run)

    def _pending(self) -> RunChanges:
        if self._changes is None:
            self._changes = RunChanges(self.run_id, self.status, {})
        return self._changes

    def _step_to(
        self,
        step_id: str,
        target: StepStatus,
        at: datetime,
        event: str,
        *,
        data: dict[str, Any] | None = None,
    ) -> None:
        st = self._steps[step_id]
        check_step(step_id, st.status, target)
        previous = st.status
        st.status = target
        payload: dict[str, Any] = {"step_id": step_id}
        if st.attempt:
            payload["attempt"] = st.attempt
        if data:
            payload.update(data)
        self._emit(
            at,
            event,
            target,
            from_status=previous,
            step_id=step_id,
            attempt_id=st.attempt_id,
            data=payload,
        )

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


def _expression_error(exc: ExpressionError) -> dict[str, Any]:
    return StepError(
        str(exc),
        category="expression_error",
        retryable=False,
        details={"expression": exc.expression, "field": exc.field},
    ).to_dict()
