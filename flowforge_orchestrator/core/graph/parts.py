"""What the parts of RunState (graph.parallel, graph.attempts, graph.restore) may use of
it: declared once, for the type checker only; RunState in graph.py defines them all."""

from __future__ import annotations

from collections import deque
from datetime import datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID

from flowforge_orchestrator.core.state import RunStatus, StepStatus

if TYPE_CHECKING:
    from flowforge_orchestrator.core.definition.plan import CompiledWorkflow, ListPlan
    from flowforge_orchestrator.core.expressions.templates import Context, Evaluator
    from flowforge_orchestrator.core.graph.nodes import Frame, Node, Scope
    from flowforge_orchestrator.core.records import Limits, RunChanges

__all__ = ["GraphParts"]


class GraphParts:
    """RunState's state and helpers, as its parts see them."""

    if TYPE_CHECKING:
        run_id: UUID
        status: RunStatus
        workflow: CompiledWorkflow
        limits: Limits
        _seq: int
        _generation: int
        _context_bytes: int
        _timers: dict[str, datetime]
        _nodes: dict[str, Node]
        _packed: dict[str, Node]
        _saved_alone: dict[str, Node]
        _root: Scope
        _broken: list[tuple[Node, dict[str, Any]]]
        _queue: deque[tuple[str, Any]]
        _evaluator: Evaluator | None

        def _pending(self) -> RunChanges: ...
        def _attempt_id(self, node: Node) -> UUID: ...
        def _context(self, node: Node | None) -> Context: ...
        def _evaluate(self, node: Node, field: str) -> Any: ...
        def _drain(self, now: datetime) -> None: ...
        def fail_run(self, error: dict[str, Any], now: datetime) -> None: ...
        def _new_scope(self, plan: ListPlan, frame: Frame, owner: Node | None) -> Scope: ...
        def _start_scope(self, scope: Scope, now: datetime) -> None: ...
        def _expand(self, node: Node, items: list[Any]) -> None: ...
        def _cancel_children(self, node: Node, now: datetime) -> None: ...
        def _succeed(
            self, node: Node, output: Any, now: datetime, *, computed: bool = False
        ) -> None: ...
        def _fail(
            self,
            node: Node,
            error: dict[str, Any],
            now: datetime,
            *,
            status: StepStatus = StepStatus.FAILED,
        ) -> None: ...
        def _to(
            self,
            node: Node,
            target: StepStatus,
            at: datetime,
            event: str,
            *,
            data: dict[str, Any] | None = None,
        ) -> None: ...
