"""The in-memory tree of one run: step instances (nodes), step-list instances (scopes), and
the name spaces expressions read (frames).

* A **node** is one instance of a step. Its key is the step id, plus `[i]` for each
  enclosing for_each instance (`charge[3]`), so a key names one node in the whole run; it is
  what events, attempts and results carry as `step_id`.
* A **scope** is one instance of a step list: the top level, a `then`/`else`, a parallel
  branch, one for_each element. It knows how many of its nodes are still open.
* A **frame** is what `steps.<id>` and `item`/`index` mean: the top level has one, each
  for_each element another (its steps are visible inside it, the outer ones too). A catch
  handler and a compensation each have one too, which adds `error`.

Kept apart from the rules (`run` and its parts); these are the records the rules move, and
`checkpoint` saves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final
from uuid import NAMESPACE_URL, UUID, uuid5

from flowforge_orchestrator.core.definition.models import Step, TaskStep, WorkflowStep
from flowforge_orchestrator.core.definition.plan import ListPlan
from flowforge_orchestrator.core.expressions.cost import INLINE_NODES, Weight, weigh
from flowforge_orchestrator.core.graph.joins import JoinState
from flowforge_orchestrator.core.state import StepStatus

__all__ = [
    "FAILED",
    "WITH_WORKER",
    "Frame",
    "FrameWeigher",
    "Node",
    "Scope",
    "StepsView",
    "attempt_id",
    "child_run_id",
    "kind_of",
    "list_output",
    "list_succeeded",
    "own_lists",
    "weigh_capped",
]

_NO_ITEM: Final = object()
FAILED = (StepStatus.FAILED, StepStatus.TIMED_OUT)  # ends that fail a list (unless tolerated)
WITH_WORKER = (StepStatus.DISPATCHED, StepStatus.RUNNING)  # a worker step's attempt is out
# Weighing stops past what could still be evaluated inline: beyond it, "big" is all the
# router needs from the cache (it weighs the values actually read then).
WEIGH_CAP = INLINE_NODES
_SMALL = Weight(4, 64, 3)  # `run`, `index`: a few short values


def weigh_capped(value: object) -> Weight:
    return weigh(value, cap=WEIGH_CAP)


def attempt_id(
    run_id: UUID, key: str, attempt: int, generation: int = 0, incarnation: str | None = None
) -> UUID:
    """Attempt ids are derived, not drawn: the checkpoint need not store them, and a node
    restored after a crash re-dispatches under the very id arq may already hold. The
    generation counts redrives: a re-run step never reuses an id whose result exists. The
    incarnation (when the run row was created) tells apart a run inserted under the id of
    a deleted one: the old run's jobs and late results never answer the new one's."""
    run = f"{run_id}@{incarnation}" if incarnation else str(run_id)
    suffix = f"/g{generation}" if generation else ""
    return uuid5(NAMESPACE_URL, f"flowforge:{run}/{key}/{attempt}{suffix}")


# Child run ids are derived from the parent's attempt: one child per attempt, whoever
# (re)writes the commit that starts it.
CHILD_NAMESPACE: Final = UUID("6f0c3f3e-6d0e-4c1e-9a55-0c5f1f0a1d15")


def child_run_id(attempt: UUID) -> UUID:
    """The id of the child run a workflow step's attempt starts."""
    return uuid5(CHILD_NAMESPACE, str(attempt))


@dataclass(slots=True, eq=False)
class Frame:
    """Names visible to expressions: this frame's steps, then its parent's."""

    parent: Frame | None
    suffix: str = ""
    item: Any = _NO_ITEM
    index: int | None = None
    names: dict[str, Node] = field(default_factory=dict)
    weight: Weight | None = None  # of `item`, once an expression asked
    error: Any = _NO_ITEM  # `error` in a catch handler or a compensation, once known

    def lookup(self, step_id: str) -> Node | None:
        frame: Frame | None = self
        while frame is not None:
            node = frame.names.get(step_id)
            if node is not None:
                return node
            frame = frame.parent
        return None

    def item_frame(self) -> Frame | None:
        """The nearest frame that is a for_each element (it supplies `item`/`index`)."""
        frame: Frame | None = self
        while frame is not None and frame.item is _NO_ITEM:
            frame = frame.parent
        return frame

    def error_value(self) -> Any:
        """`error` as the nearest handler or compensation frame knows it (None: not set)."""
        frame: Frame | None = self
        while frame is not None and frame.error is _NO_ITEM:
            frame = frame.parent
        return None if frame is None else frame.error

    def item_weight(self) -> Weight:
        if self.weight is None:
            self.weight = weigh_capped(self.item)
        return self.weight


class StepsView(Mapping[str, Mapping[str, Any]]):
    """`steps` as expressions see it from one frame: finished steps only, built on read,
    so a large fan-out is never copied into a dict per expression."""

    __slots__ = ("_frame",)

    def __init__(self, frame: Frame) -> None:
        self._frame = frame

    def __getitem__(self, step_id: str) -> Mapping[str, Any]:
        node = self._frame.lookup(step_id)
        if node is None or not node.status.finished:
            raise KeyError(step_id)
        return {"output": node.output, "status": node.status.value, "error": node.error}

    def _visible(self) -> dict[str, Node]:
        names: dict[str, Node] = {}
        frame: Frame | None = self._frame
        while frame is not None:
            for step_id, node in frame.names.items():
                names.setdefault(step_id, node)
            frame = frame.parent
        return {k: n for k, n in names.items() if n.status.finished}

    def __iter__(self) -> Iterator[str]:
        return iter(self._visible())

    def __len__(self) -> int:
        return len(self._visible())


class FrameWeigher:
    """What the values expressions read from one frame weigh (`expressions.Weigher`), from
    weights cached once per output, per run input and per for_each item."""

    __slots__ = ("_frame", "_input")

    def __init__(self, frame: Frame, input_weight: Callable[[], Weight]) -> None:
        self._frame = frame
        self._input = input_weight

    def weight(self, root: str, step_refs: frozenset[str] | None) -> Weight:
        if root == "input":
            return self._input()
        if root == "steps":
            return self._steps(step_refs)
        if root == "item":
            element = self._frame.item_frame()
            return element.item_weight() if element is not None else _SMALL
        if root == "error":
            return weigh_capped(self._frame.error_value())
        return _SMALL

    def _steps(self, refs: frozenset[str] | None) -> Weight:
        if refs is not None and len(refs) == 1:  # the common case, without a sum
            (ref,) = refs
            node = self._frame.lookup(ref)
            finished = node is not None and node.status.finished
            return node.entry_weight() if node is not None and finished else Weight()
        total = Weight()
        if refs is None:
            nodes: Iterator[Node | None] = iter(StepsView(self._frame)._visible().values())
        else:
            nodes = (self._frame.lookup(ref) for ref in refs)
        for node in nodes:
            if node is not None and node.status.finished:
                total = total + node.entry_weight()
        return total


@dataclass(slots=True, eq=False)
class Scope:
    """One instance of a step list. `owner` is the composite node it belongs to (None for
    the top level); `closed` once its outcome is decided, after which its nodes' endings no
    longer start anything."""

    plan: ListPlan
    frame: Frame
    owner: Node | None
    role: str = "list"  # list | catch (a handler of `owner`) | undo (its compensation)
    nodes: dict[str, Node] = field(default_factory=dict)  # by step id
    open: int = 0
    started: bool = False
    closed: bool = False
    outcome: str | None = None  # succeeded | failed | skipped | cancelled, once closed
    failure: dict[str, Any] | None = None  # the error that failed it

    @property
    def done(self) -> bool:
        return self.open == 0


@dataclass(slots=True, eq=False)
class Node:
    """One instance of a step and what the graph knows about it."""

    key: str
    step: Step
    scope: Scope
    status: StepStatus = StepStatus.PENDING
    attempt: int = 0
    attempt_id: UUID | None = None
    generation: int = 0  # the run's redrive count when this attempt was made
    output: Any = None
    error: dict[str, Any] | None = None
    fire_at: datetime | None = None  # its timer: a delay's end, a deadline, a retry's start
    branch: str | None = None  # the condition's chosen list: "then" | "else"
    wait_key: str | None = None  # a running wait's correlation key, computed as it started
    handed_off: bool = False  # its attempt waits for a completion from outside
    children: list[Scope] = field(default_factory=list)
    items: list[Any] | None = None  # a for_each's elements
    join: JoinState | None = None
    launched: int = 0  # parallel branches started so far (max_parallel)
    probing: bool = False  # its timer is the schedule_to_start check, not the deadline
    packed: bool = False  # a fan-out element whose state its fan-out's entry carries
    elements: list[Node] = field(default_factory=list)  # a packed fan-out's, in order
    weight: Weight | None = None  # of context_entry(), cached while its status holds
    handlers: list[Scope] = field(default_factory=list)  # its catch handlers' lists
    caught: int | None = None  # the handler that took its failure (it runs, then ends it)
    undo: Scope | None = None  # its compensation

    @property
    def with_worker(self) -> bool:
        """A worker step whose current attempt is out: dispatched or running (a caught
        step runs its handler instead). A workflow step's attempt is out too, with its
        child run: its result comes back the same way."""
        return (
            self.status in WITH_WORKER
            and isinstance(self.step, TaskStep | WorkflowStep)
            and self.caught is None
        )

    def context_entry(self) -> dict[str, Any]:
        return {"output": self.output, "status": self.status.value, "error": self.error}

    def entry_weight(self) -> Weight:
        if self.weight is None:
            self.weight = weigh_capped(self.context_entry())
        return self.weight


def own_lists(node: Node) -> list[Scope]:
    """Every list instance `node` holds: its branches, its handlers, its compensation."""
    return node.children + node.handlers + ([node.undo] if node.undo is not None else [])


def list_output(scope: Scope) -> Any:
    """A list's output: its one final step's, or its final steps' by id."""
    sinks = scope.plan.sinks
    if not sinks:
        return None
    if len(sinks) == 1:
        return scope.nodes[sinks[0]].output
    return {sid: scope.nodes[sid].output for sid in sinks}


def list_succeeded(scope: Scope) -> bool:
    """Every step of the open list finished, and no failure is still waiting in the queue
    to close it (a step started by the same follow-up may have failed at once)."""
    return (
        not scope.closed
        and scope.done
        and not any(
            n.status in FAILED and not n.step.continue_on_failure for n in scope.nodes.values()
        )
    )


def kind_of(value: object) -> str:
    """A value's type as error messages name it."""
    return "null" if value is None else type(value).__name__
