"""Attempts of worker steps: dispatch, deadlines, schedule-to-start, retries, the run's
timeout (mixed into RunState).

An attempt is dispatched with its parameters rendered (secrets left to the worker), gets a
deadline timer, and ends with a result, a timeout or a cancellation. A failed or timed-out
attempt is retried when its policy says so (`retry.decide`), after a backoff timer; the
jitter comes from the attempt id, so a replay waits the same.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from flowforge_orchestrator.core.definition.plan import SECRET_ROOTS
from flowforge_orchestrator.core.graph.nodes import Node
from flowforge_orchestrator.core.graph.parts import GraphParts
from flowforge_orchestrator.core.jsonb import MAX_DEPTH, depth_problem, storable, text_problem
from flowforge_orchestrator.core.records import Dispatch
from flowforge_orchestrator.core.retry import decide
from flowforge_orchestrator.core.state import StepStatus
from flowforge_orchestrator.errors import ExpressionError, PayloadTooLarge, StepError

__all__ = ["Attempts", "expression_error", "invalid_output", "iso", "measure"]


class Attempts(GraphParts):
    """The attempts half of RunState (what it uses of RunState: graph.parts)."""

    def _dispatch_new_attempt(self, node: Node, now: datetime) -> None:
        node.attempt += 1
        node.generation = self._generation
        node.attempt_id = self._attempt_id(node)
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
        self._pending().dispatches.append(dispatch)

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
            context = self._context(node)
            params = self.workflow.params[step.id].render(
                context, skip_roots=SECRET_ROOTS, evaluator=self._evaluator
            )
            url = self.workflow.urls.get(step.id)
            if url is not None:  # every value encoded for the part of the URL it lands in
                params["url"] = url.render(context, evaluator=self._evaluator)
        except ExpressionError as exc:
            self._fail(node, expression_error(exc), now)
            return None
        size, problem = measure(params)
        if problem is not None:
            self._fail(node, invalid_output(node.key, "the rendered parameters", problem), now)
            return None
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

    def _retry(self, node: Node, error: dict[str, Any], now: datetime, outcome: StepStatus) -> bool:
        """`outcome`: how the attempt ended (failed or timed_out). The retrying event says
        it, because that event is what ends the attempt in `step_attempts` (sql/0007)."""
        assert node.attempt_id is not None
        policy = self.workflow.definition.effective_retry(node.step)
        # The jitter comes from the attempt id: a replay after a crash waits the same.
        rand = node.attempt_id.int / 2**128
        decision = decide(policy, error, node.attempt, rand=rand, now=now)
        if not decision.retry:
            return False
        at = now + timedelta(seconds=decision.delay)
        data = {
            "error": error,
            "outcome": outcome.value,
            "next_attempt": node.attempt + 1,
            "next_attempt_at": iso(at),
        }
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


def expression_error(exc: ExpressionError) -> dict[str, Any]:
    # The message may quote data (a key, a value): mended so that PostgreSQL can store it.
    return StepError(
        storable(str(exc)),
        category="expression_error",
        retryable=False,
        details=storable({"expression": exc.expression, "field": exc.field}),
    ).to_dict()


def measure(value: Any) -> tuple[int, str | None]:
    """Bytes of the compact JSON of a value the orchestrator computed, and why PostgreSQL
    could not store it (a NUL, a lone surrogate, nesting past jsonb.MAX_DEPTH), or None.
    One encoding serves both; the nesting is walked only when the text has brackets enough."""
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    except RecursionError:
        return 0, f"it is nested more than {MAX_DEPTH} levels deep"
    problem = text_problem(text)
    if problem is None and text.count("[") + text.count("{") > MAX_DEPTH:
        problem = depth_problem(value)
    if problem is not None:
        return len(text), problem
    return len(text.encode()), None


def invalid_output(step_id: str | None, what: str, problem: str) -> dict[str, Any]:
    """The error of a computed value that cannot be stored: never retried."""
    where = f"step '{step_id}': " if step_id else ""
    return StepError(
        f"{where}{what} cannot be stored: {problem}",
        category="invalid_output",
        retryable=False,
        details={"step_id": step_id, "what": what} if step_id else {"what": what},
    ).to_dict()


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")
