"""What a run's expressions see from one node: `input`, `run`, the finished `steps` visible
from its frame, `item`/`index` inside a for_each, `error` in a catch handler or a
compensation, and what those values weigh (for the evaluator's routing)."""

from __future__ import annotations

from typing import Any, Protocol

from flowforge_orchestrator.core.definition.plan import CompiledWorkflow
from flowforge_orchestrator.core.expressions.cost import Weight
from flowforge_orchestrator.core.expressions.templates import Context, Evaluator, build_context
from flowforge_orchestrator.core.graph.nodes import FrameWeigher, Node, Scope, StepsView

__all__ = ["Reading", "context", "evaluate"]


class Reading(Protocol):
    """What evaluating an expression uses of the run."""

    input: object
    workflow: CompiledWorkflow
    _run_info: dict[str, str | int]  # `run` as expressions see it
    _evaluator: Evaluator | None  # None: in process, unbounded
    _root: Scope

    def _weigh_input(self) -> Weight: ...


def context(run: Reading, node: Node | None) -> Context:
    """The context of an expression of `node` (None: of the run, such as its output)."""
    frame = node.scope.frame if node is not None else run._root.frame
    element = frame.item_frame()
    # The weights are for the evaluator's routing; without one, nobody asks.
    weigher = FrameWeigher(frame, run._weigh_input) if run._evaluator else None
    if element is None:
        built = build_context(run.input, StepsView(frame), run._run_info, weigher=weigher)
    else:
        built = build_context(
            run.input,
            StepsView(frame),
            run._run_info,
            item=element.item,
            index=element.index,
            weigher=weigher,
        )
    error = frame.error_value()
    if error is not None:  # in a catch handler or a compensation
        built["error"] = error
    return built


def evaluate(run: Reading, node: Node, field: str) -> Any:
    """The value of the step's expression `field` (`if`, `for_each`, `until`)."""
    expression = run.workflow.expression(node.step.id, field)
    return expression.evaluate(context(run, node), run._evaluator)
