"""How a run's graph is rebuilt from its checkpoint and stored results (mixed into RunState).

Restoring is the one place that reads the checkpoint format (`nodes.encode`/`decode`): it
walks the step lists top down, restores each saved node, expands a fan-out that had started
(its `for_each` evaluated again, its packed element states unpacked), then derives, bottom
up, which lists are started, closed, and how each parallel step's join stands.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from datetime import datetime
from typing import Any
from uuid import UUID

from flowforge_orchestrator.core.definition.models import ConditionStep, ParallelStep
from flowforge_orchestrator.core.expressions.templates import to_json_value
from flowforge_orchestrator.core.graph.joins import JoinState, needed
from flowforge_orchestrator.core.graph.nodes import FAILED, Node, Saved, Scope, decode, unpack
from flowforge_orchestrator.core.graph.parts import GraphParts
from flowforge_orchestrator.core.records import StepResult, json_size
from flowforge_orchestrator.core.state import RunStatus, StepStatus
from flowforge_orchestrator.errors import ExpressionError, StepError

__all__ = ["RUN_TIMER", "Restoring"]

RUN_TIMER = ""  # the run's own deadline, among the step timers (no step key is empty)


class Restoring(GraphParts):
    """The restoring half of RunState (what it uses of RunState: graph.parts)."""

    def _restore(self, checkpoint: Mapping[str, Any], results: Mapping[UUID, StepResult]) -> None:
        self._seq = int(checkpoint.get("seq", 0))
        self._generation = int(checkpoint.get("g", 0))
        if checkpoint.get("deadline"):
            self._timers[RUN_TIMER] = datetime.fromisoformat(checkpoint["deadline"])
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
            node.attempt_id = self._attempt_id(node)
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
            (n for n in nodes if n.status in FAILED and not n.step.continue_on_failure), None
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
