"""The in-memory tree of one run: step instances (nodes), step-list instances (scopes), and
the name spaces expressions read (frames).

* A **node** is one instance of a step. Its key is the step id, plus `[i]` for each
  enclosing for_each instance (`charge[3]`), so a key names one node in the whole run; it is
  what events, attempts and results carry as `step_id`.
* A **scope** is one instance of a step list: the top level, a `then`/`else`, a parallel
  branch, one for_each element. It knows how many of its nodes are still open.
* A **frame** is what `steps.<id>` and `item`/`index` mean: the top level has one, each
  for_each element another (its steps are visible inside it, the outer ones too).

Kept apart from `graph`, which holds the rules; these are the records the rules move.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from flowforge_orchestrator.core.definition.models import Step, TaskStep
from flowforge_orchestrator.core.definition.plan import ListPlan
from flowforge_orchestrator.core.expressions.cost import INLINE_NODES, Weight, weigh
from flowforge_orchestrator.core.graph.joins import JoinState
from flowforge_orchestrator.core.state import StepStatus

__all__ = [
    "FAILED",
    "Frame",
    "FrameWeigher",
    "Node",
    "Scope",
    "StepsView",
    "attempt_id",
    "decode",
    "encode",
    "kind_of",
    "list_output",
    "pack",
    "unpack",
]

_NO_ITEM: Any = object()
FAILED = (StepStatus.FAILED, StepStatus.TIMED_OUT)  # ends that fail a list (unless tolerated)
# Weighing stops past what could still be evaluated inline: beyond it, "big" is all the
# router needs from the cache (it weighs the values actually read then).
WEIGH_CAP = INLINE_NODES
_SMALL = Weight(4, 64, 3)  # `run`, `index`: a few short values


def weigh_capped(value: Any) -> Weight:
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


@dataclass(slots=True, eq=False)
class Frame:
    """Names visible to expressions: this frame's steps, then its parent's."""

    parent: Frame | None
    suffix: str = ""
    item: Any = _NO_ITEM
    index: int | None = None
    names: dict[str, Node] = field(default_factory=dict)
    weight: Weight | None = None  # of `item`, once an expression asked

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
    children: list[Scope] = field(default_factory=list)
    items: list[Any] | None = None  # a for_each's elements
    join: JoinState | None = None
    launched: int = 0  # parallel branches started so far (max_parallel)
    probing: bool = False  # its timer is the schedule_to_start check, not the deadline
    packed: bool = False  # a fan-out element whose state its fan-out's entry carries
    elements: list[Node] = field(default_factory=list)  # a packed fan-out's, in order
    weight: Weight | None = None  # of context_entry(), cached while its status holds

    def context_entry(self) -> dict[str, Any]:
        return {"output": self.output, "status": self.status.value, "error": self.error}

    def entry_weight(self) -> Weight:
        if self.weight is None:
            self.weight = weigh_capped(self.context_entry())
        return self.weight


# -- checkpoint encoding ---------------------------------------------------------------------
#
# A node that is not pending is saved as "<status letter><attempt>" ("S1": succeeded on its
# first attempt), or as a dict when it has more to say (an error, a timer, a chosen branch,
# a fan-out size). Compact because the whole checkpoint is rewritten by every commit of the
# run: a fan-out of 1,000 costs ~20 bytes per element, not ~60.

_LETTERS = {
    StepStatus.DISPATCHED: "d",
    StepStatus.RUNNING: "r",
    StepStatus.RETRYING: "w",
    StepStatus.PENDING: "p",  # saved only with attempts behind it (a redriven step)
    StepStatus.SUCCEEDED: "S",
    StepStatus.FAILED: "F",
    StepStatus.TIMED_OUT: "T",
    StepStatus.SKIPPED: "K",
    StepStatus.CANCELLED: "C",
}
_STATUSES = {letter: status for status, letter in _LETTERS.items()}


def encode(node: Node, *, full: bool = False) -> str | dict[str, Any]:
    letter = _LETTERS[node.status]
    extra: dict[str, Any] = {}
    if node.error is not None:
        # Some failures are the orchestrator's verdict (a limit, a template, a join): no
        # worker result holds them, so the checkpoint does.
        extra["e"] = node.error
    # A worker step's deadline is not saved: a restore gives its attempt a fresh one. Delays
    # and retry backoffs are, so they end at their time whoever holds the run.
    with_worker = isinstance(node.step, TaskStep) and node.status is not StepStatus.RETRYING
    if node.fire_at is not None and not node.status.finished and not with_worker:
        extra["t"] = node.fire_at.isoformat()
    if node.branch is not None:
        extra["b"] = node.branch
    if node.items is not None:
        extra["x"] = len(node.items)
    if node.generation:
        extra["g"] = node.generation
    if not extra and not full:
        return f"{letter}{node.attempt or ''}"
    return {"s": letter, "n": node.attempt, **extra}


@dataclass(frozen=True)
class Saved:
    """A decoded checkpoint entry."""

    status: StepStatus
    attempt: int
    attempt_id: UUID | None = None  # only version-1 checkpoints stored ids
    error: dict[str, Any] | None = None
    fire_at: datetime | None = None
    branch: str | None = None
    items: int | None = None
    generation: int = 0
    elements: str | None = None  # a packed fan-out: one letter per element
    element_attempts: dict[str, int] = field(default_factory=dict)  # those past attempt 1


def pack(fan_out: Node) -> tuple[str, dict[str, int], dict[str, str | dict[str, Any]]]:
    """A fan-out's element states as one letter each ('p': pending, or saved on its own),
    the attempt numbers past 1 ("na"), and the elements saved on their own (an error, a
    retry timer). A 1,000-element fan-out saves ~1 KB, not ~20 KB, at each of the many
    commits it takes; this runs at every one of them, hence the flat loops."""
    letters = _LETTERS
    pending, retrying = StepStatus.PENDING, StepStatus.RETRYING
    codes: list[str] = []
    attempts: dict[str, int] = {}
    alone: dict[str, str | dict[str, Any]] = {}
    for index, element in enumerate(fan_out.elements):
        status = element.status
        if status is pending:
            codes.append("p")
        elif element.error is not None or status is retrying:
            codes.append("p")
            alone[element.key] = encode(element)
        else:
            codes.append(letters[status])
            if element.attempt != 1:
                attempts[str(index)] = element.attempt
    return "".join(codes), attempts, alone


def unpack(letter: str, attempt: int | None, generation: int) -> Saved | None:
    if letter == "p":
        return None
    return Saved(_STATUSES[letter], attempt if attempt is not None else 1, generation=generation)


def decode(saved: str | Mapping[str, Any]) -> Saved:
    if isinstance(saved, str):
        return Saved(_STATUSES[saved[0]], int(saved[1:] or 0))
    status = saved["s"]
    explicit = saved.get("a")
    return Saved(
        status=_STATUSES[status] if len(status) == 1 else StepStatus(status),
        attempt=int(saved.get("n", 0)),
        attempt_id=UUID(explicit) if explicit not in (None, "None") else None,
        error=saved.get("e"),
        fire_at=datetime.fromisoformat(saved["t"]) if saved.get("t") else None,
        branch=saved.get("b"),
        items=saved.get("x"),
        generation=int(saved.get("g", 0)),
        elements=saved.get("i"),
        element_attempts=dict(saved.get("na", {})),
    )


def list_output(scope: Scope) -> Any:
    """A list's output: its one final step's, or its final steps' by id."""
    sinks = scope.plan.sinks
    if not sinks:
        return None
    if len(sinks) == 1:
        return scope.nodes[sinks[0]].output
    return {sid: scope.nodes[sid].output for sid in sinks}


def kind_of(value: Any) -> str:
    """A value's type as error messages name it."""
    return "null" if value is None else type(value).__name__
