"""Parallel steps: branches or a fan-out, started within `max_parallel`, judged by the join
policy (`joins`), the losers cancelled (mixed into RunState).

Branches start one at a time through the follow-up queue, so a branch that finishes at once
is judged before another is dispatched. A fan-out's elements each get a list instance and a
frame (`item`, `index`); once it finishes they leave memory and the checkpoint.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from flowforge_orchestrator.core.definition.models import ParallelStep, TaskStep
from flowforge_orchestrator.core.expressions.templates import to_json_value
from flowforge_orchestrator.core.graph.joins import JoinState, JoinVerdict, needed
from flowforge_orchestrator.core.graph.nodes import Frame, Node, Scope, kind_of, list_output
from flowforge_orchestrator.core.graph.parts import GraphParts
from flowforge_orchestrator.core.records import json_size
from flowforge_orchestrator.core.state import StepStatus
from flowforge_orchestrator.errors import StepError

__all__ = ["Fanning"]


class Fanning(GraphParts):
    """The parallel half of RunState (what it uses of RunState: graph.parts)."""

    def _start_parallel(self, node: Node, step: ParallelStep, now: datetime) -> None:
        if step.for_each is not None:
            items = self._evaluate(node, "for_each")
            if not isinstance(items, list):
                expression = self.workflow.expression(step.id, "for_each")
                raise expression.error(f"`for_each` must give a list, got {kind_of(items)}")
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
            node.elements = [next(iter(scope.nodes.values())) for scope in node.children]
            for element in node.elements:
                element.packed = True
                del self._saved_alone[element.key]

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
        output = [branch_entry(scope) for scope in node.children]
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

    def _forget_elements(self, node: Node) -> None:
        """A finished fan-out keeps only its own output: its elements leave memory and the
        checkpoint (their history stays in the transitions)."""
        stack = list(node.children)
        while stack:
            scope = stack.pop()
            for inner in scope.nodes.values():
                self._nodes.pop(inner.key, None)
                self._saved_alone.pop(inner.key, None)
                self._timers.pop(inner.key, None)
                if inner.status is StepStatus.SUCCEEDED:
                    self._context_bytes -= json_size(inner.output)
                stack.extend(inner.children)
        node.children, node.items, node.elements = [], None, []
        self._packed.pop(node.key, None)


def branch_entry(scope: Scope) -> dict[str, Any]:
    entry: dict[str, Any] = {"status": scope.outcome or "cancelled", "output": None}
    if scope.outcome == "succeeded":
        entry["output"] = list_output(scope)
    elif scope.outcome == "failed":
        entry["error"] = scope.failure
    return entry
