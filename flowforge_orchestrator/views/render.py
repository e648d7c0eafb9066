"""A run's DAG for people: the step tree of a run, drawn for a terminal (`views.pictures` draws
it as Mermaid or Graphviz text).

Pure: `build_tree` takes the definition, the run's checkpoint, its attempts and its
transitions (as read by the store) and returns `StepNode`s; `render_tree` takes those and a
`now`, and returns text. No I/O, no clock.

Every step list of the definition is drawn as it is nested: a condition's `then`/`else`, a
parallel step's branches, and a for_each's elements, each named by its key (`charge[3]`).
A fan-out with more elements than `max_elements` is summarised: the elements worth a look
(failed, running) and the first ones are drawn, the rest counted by status.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from flowforge_orchestrator.core.definition.models import (
    ConditionStep,
    ParallelStep,
    Step,
    SwitchStep,
)
from flowforge_orchestrator.core.definition.plan import CompiledWorkflow, ListPlan
from flowforge_orchestrator.core.graph.checkpoint import Saved, read_checkpoint

__all__ = [
    "MAX_ELEMENTS",
    "StepList",
    "StepNode",
    "build_tree",
    "facts",
    "list_title",
    "render_tree",
    "summary",
    "timing",
    "walk",
]

MAX_ELEMENTS = 8  # for_each elements drawn before the rest are summarised

_FINISHED = frozenset({"succeeded", "failed", "timed_out", "skipped", "cancelled"})
_CALM = frozenset({"succeeded", "skipped", "pending"})  # what a summary may hide


@dataclass
class StepList:
    """One nested step list. `label` is None for a for_each element (its key says which);
    `taken` is a condition's verdict on it (None: not decided, or not a condition)."""

    label: str | None
    steps: list[StepNode]
    taken: bool | None = None
    exceptional: bool = False  # a catch handler or a compensation: drawn dashed unless taken


@dataclass
class StepNode:
    """One step instance of the run, with what the run recorded about it."""

    key: str
    step_id: str
    kind: str  # a worker type (http, ...), or condition | parallel | for_each | delay | transform
    status: str = "pending"
    attempts: int = 0
    started_at: datetime | None = None
    finished_at: datetime | None = None
    depends_on: tuple[str, ...] = ()  # keys in the same list
    error: str | None = None
    lists: list[StepList] = field(default_factory=list)
    elements: int | None = None  # a for_each's element count, once known
    hidden: Counter[str] | None = None  # elements left out of the drawing, by status
    caught: str | None = None  # the failure a catch handler took (the step failed first)

    @property
    def worker_step(self) -> bool:
        return self.kind not in (
            "condition",
            "parallel",
            "for_each",
            "delay",
            "transform",
            "switch",
            "fail",
        )


# -- building --------------------------------------------------------------------------------


@dataclass
class _Times:
    started: datetime | None = None
    finished: datetime | None = None
    status: str | None = None


def _times(transitions: Sequence[Mapping[str, Any]]) -> dict[str, _Times]:
    """When each step key last started and finished (a redrive starts it again)."""
    found: dict[str, _Times] = {}
    for row in transitions:
        key = row.get("step_id")
        if not key:
            continue
        times = found.setdefault(key, _Times())
        to_status = str(row["to_status"])
        if to_status in _FINISHED:
            times.finished = row["at"]
        elif to_status == "pending":  # a redrive: it starts again
            times.started = times.finished = None
        elif times.started is None or times.status in _FINISHED:
            times.started, times.finished = row["at"], None
        times.status = to_status
    return found


def _kind(step: Step) -> str:
    if isinstance(step, ParallelStep):
        return "for_each" if step.for_each is not None else "parallel"
    return step.type


def _message(error: object) -> str | None:
    if isinstance(error, Mapping):
        return str(error.get("message") or error.get("category") or "failed")
    return None if error is None else str(error)


@dataclass
class _Builder:
    workflow: CompiledWorkflow
    saved: Mapping[str, Saved]
    times: dict[str, _Times]
    errors: dict[str, str]
    tries: Counter[str]
    max_elements: int

    def steps(self, plan: ListPlan, suffix: str) -> list[StepNode]:
        nodes = [self.node(step, suffix) for step in _topological(plan.steps)]
        return nodes

    def node(self, step: Step, suffix: str) -> StepNode:
        key = step.id + suffix
        entry = self.saved.get(key)
        times = self.times.get(key, _Times())
        node = StepNode(
            key=key,
            step_id=step.id,
            kind=_kind(step),
            # A finished fan-out's elements leave the checkpoint: their transitions remain.
            status=entry.status.value if entry else times.status or "pending",
            attempts=max(entry.attempt if entry else 0, self.tries[key]),
            started_at=times.started,
            finished_at=times.finished,
            depends_on=tuple(dep + suffix for dep in step.depends_on),
            error=_message(entry.error) if entry and entry.error else self.errors.get(key),
        )
        if isinstance(step, ConditionStep):
            then, else_ = self.workflow.children[step.id]
            chosen = entry.branch if entry else None
            for label, plan in (("then", then), ("else", else_)):
                taken = None if chosen is None else chosen == label
                node.lists.append(StepList(label, self.steps(plan, suffix), taken))
        elif isinstance(step, ParallelStep) and step.for_each is None:
            for number, plan in enumerate(self.workflow.children[step.id], start=1):
                node.lists.append(StepList(f"branch {number}", self.steps(plan, suffix)))
        elif isinstance(step, ParallelStep):
            (template,) = self.workflow.children[step.id]
            node.elements = entry.items if entry and entry.items is not None else None
            if node.elements is None:
                node.elements = self.seen_elements(template.steps[0].id + suffix)
            self.fan_out(node, template, suffix)
        elif isinstance(step, SwitchStep):
            chosen = entry.branch if entry else None
            labels = [f"case {i}: {case.when}" for i, case in enumerate(step.cases)]
            for index, plan in enumerate(self.workflow.children[step.id]):
                name = str(index) if index < len(step.cases) else "default"
                taken = None if chosen is None else chosen == name
                label = labels[index] if index < len(labels) else "default"
                node.lists.append(StepList(label, self.steps(plan, suffix), taken))
        self.handlers(node, step, entry, suffix)
        return node

    def handlers(self, node: StepNode, step: Step, entry: Saved | None, suffix: str) -> None:
        """Catch handlers (the one that took the failure marked taken) and the compensation
        (with how it went)."""
        caught = entry.caught if entry else None
        for index, plan in enumerate(self.workflow.handlers.get(step.id, ())):
            errors = (step.catch or [])[index].errors
            label = "catch " + (", ".join(errors) if errors else "any error")
            taken = True if caught == index else None
            node.lists.append(StepList(label, self.steps(plan, suffix), taken, exceptional=True))
        if caught is not None and entry is not None:
            node.caught = _message(entry.error)
            if node.status == "succeeded":
                node.error = None
        undo = self.workflow.compensations.get(step.id)
        if undo is not None:
            steps = self.steps(undo, suffix)
            state = _undo_state(steps)
            node.lists.append(
                StepList(f"compensate{state}", steps, True if state else None, exceptional=True)
            )

    def seen_elements(self, prefix: str) -> int | None:
        """How many elements the history shows (`charge[0]` ... `charge[n-1]`)."""
        element = re.compile(re.escape(prefix) + r"\[(\d+)\]")
        found = [int(m[1]) for key in (*self.times, *self.tries) if (m := element.fullmatch(key))]
        return max(found) + 1 if found else None

    def fan_out(self, node: StepNode, template: ListPlan, suffix: str) -> None:
        count = node.elements or 0
        elements = [self.steps(template, f"{suffix}[{i}]") for i in range(count)]
        shown = _chosen(elements, self.max_elements)
        hidden: Counter[str] = Counter()
        for index, steps in enumerate(elements):
            if index in shown:
                node.lists.append(StepList(None, steps))
            else:
                hidden.update(s.status for s in steps)
        node.hidden = hidden or None


def _undo_state(steps: Sequence[StepNode]) -> str:
    statuses = {s.status for s in steps}
    if statuses <= {"pending"}:
        return ""
    if statuses & {"failed", "timed_out"}:
        return " (compensation failed)"
    if statuses <= {"succeeded", "skipped"}:
        return " (compensated)"
    return " (compensating)"


def _topological(steps: Sequence[Step]) -> list[Step]:
    """Definition order, except that a step comes after what it depends on."""
    placed: set[str] = set()
    ordered: list[Step] = []
    waiting = list(steps)
    while waiting:
        step = next((s for s in waiting if placed.issuperset(s.depends_on)), waiting[0])
        ordered.append(step)
        placed.add(step.id)
        waiting.remove(step)
    return ordered


def _chosen(elements: list[list[StepNode]], limit: int) -> set[int]:
    """Which elements to draw: all when few; else the unusual ones, then the first."""
    if len(elements) <= limit:
        return set(range(len(elements)))
    unusual = [i for i, steps in enumerate(elements) if any(s.status not in _CALM for s in steps)]
    shown = set(unusual[:limit])
    for index in range(len(elements)):
        if len(shown) >= limit:
            break
        shown.add(index)
    return shown


def build_tree(
    workflow: CompiledWorkflow | None,
    checkpoint: Mapping[str, Any] | None,
    *,
    attempts: Sequence[Mapping[str, Any]] = (),
    transitions: Sequence[Mapping[str, Any]] = (),
    max_elements: int = MAX_ELEMENTS,
) -> list[StepNode]:
    """The run's top-level steps, each with its nested lists.

    Without a definition (a run of a workflow that was never registered) the steps the
    checkpoint and the attempts know are listed flat.
    """
    saved = read_checkpoint(checkpoint).steps
    tries = _latest_attempts(attempts)
    errors = {
        str(a["step_id"]): message
        for a in attempts
        if (message := _message(a.get("error"))) is not None
    }
    times = _times(transitions)
    if workflow is None:
        return _flat(saved, attempts, times, tries, errors)
    builder = _Builder(workflow, saved, times, errors, tries, max(1, max_elements))
    return builder.steps(workflow.root, "")


def _latest_attempts(attempts: Sequence[Mapping[str, Any]]) -> Counter[str]:
    """The number of each step's latest attempt (`attempts` in dispatch order), as its events
    and its worker know it. Not a count of attempts: a fan-out that a redrive runs again
    numbers its elements' attempts afresh, so `charge[0]` may have two attempts 1."""
    latest: Counter[str] = Counter()
    seen: Counter[str] = Counter()
    for a in attempts:
        key = str(a["step_id"])
        seen[key] += 1
        number = a.get("attempt")
        latest[key] = number if isinstance(number, int) else seen[key]
    return latest


def _flat(
    saved: Mapping[str, Saved],
    attempts: Sequence[Mapping[str, Any]],
    times: dict[str, _Times],
    tries: Counter[str],
    errors: dict[str, str],
) -> list[StepNode]:
    kinds = {str(a["step_id"]): str(a["step_type"]) for a in attempts}
    nodes = []
    for key in sorted(set(saved) | set(kinds)):
        entry = saved.get(key)
        t = times.get(key, _Times())
        nodes.append(
            StepNode(
                key=key,
                step_id=key.split("[", 1)[0],
                kind=kinds.get(key, "?"),
                status=entry.status.value if entry else "pending",
                attempts=max(entry.attempt if entry else 0, tries[key]),
                started_at=t.started,
                finished_at=t.finished,
                error=_message(entry.error) if entry and entry.error else errors.get(key),
            )
        )
    return nodes


def walk(nodes: Sequence[StepNode]) -> Iterator[StepNode]:
    """Every node, parents before children."""
    for node in nodes:
        yield node
        for child in node.lists:
            yield from walk(child.steps)


# -- shared wording --------------------------------------------------------------------------


def _seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.3f}s"
    minutes, rest = divmod(seconds, 60)
    if minutes < 60:
        return f"{int(minutes)}m{rest:04.1f}s"
    hours, minutes = divmod(minutes, 60)
    return f"{int(hours)}h{int(minutes):02d}m"


def timing(node: StepNode, now: datetime) -> str:
    """`0.412s` once finished, `running 3.000s` while open, empty before it starts."""
    if node.started_at is None:
        return ""
    if node.finished_at is not None:
        return _seconds((node.finished_at - node.started_at).total_seconds())
    if node.status in _FINISHED:
        return ""
    return f"for {_seconds(max(0.0, (now - node.started_at).total_seconds()))}"


def _kind_text(node: StepNode) -> str:
    if node.kind == "for_each" and node.elements is not None:
        return f"for_each of {node.elements}"
    return node.kind


def facts(node: StepNode, now: datetime) -> list[str]:
    """Kind, status, attempts, timing: always four, some empty, so columns line up."""
    if node.worker_step and node.attempts:
        tries = f"attempt {node.attempts}"
    else:
        tries = f"{node.attempts} tries" if node.attempts > 1 else ""
    return [_kind_text(node), node.status, tries, timing(node, now)]


def list_title(child: StepList) -> str:
    title = child.label or ""
    if child.taken is True and not title.endswith(")"):  # a compensation says how it went
        title += " (taken)"
    elif child.taken is False:
        title += " (not taken)"
    return title


def summary(hidden: Counter[str]) -> str:
    total = sum(hidden.values())
    counts = ", ".join(f"{n} {status}" for status, n in sorted(hidden.items()))
    return f"… {total} more: {counts}"


# -- terminal tree ---------------------------------------------------------------------------


def render_tree(nodes: Sequence[StepNode], now: datetime) -> str:
    """Box-drawing tree, one step per line, its facts in aligned columns:

    ```
    ├─ fetch_order  http  succeeded  attempt 1  0.104s
    ├─ route        condition  succeeded  0.002s
    │  └─ then (taken)
    │     └─ review http  succeeded  attempt 2  1.318s
    ```
    """
    rows: list[tuple[str, list[str]]] = []  # tree prefix + label, facts
    _tree_rows(nodes, "", rows, now)
    table = [[label, *facts] for label, facts in rows if facts]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))] if table else []
    return "\n".join(
        "  ".join(f"{cell:<{w}}" for cell, w in zip([label, *facts], widths, strict=True)).rstrip()
        if facts
        else label
        for label, facts in rows
    )


_Rows = list[tuple[str, list[str]]]


def _tree_rows(nodes: Sequence[StepNode], indent: str, rows: _Rows, now: datetime) -> None:
    for position, node in enumerate(nodes):
        _node_rows(node, indent, position == len(nodes) - 1, rows, now)


def _node_rows(node: StepNode, indent: str, last: bool, rows: _Rows, now: datetime) -> None:
    branch, cont = ("└─ ", "   ") if last else ("├─ ", "│  ")
    rows.append((indent + branch + node.key, facts(node, now)))
    inner = indent + cont
    items = _child_items(node)
    if node.caught:
        rows.append((f"{inner}{'│  ' if items else '   '}failed, caught: {node.caught}", []))
    if node.error and node.status not in ("succeeded", "skipped"):
        rows.append((f"{inner}{'│  ' if items else '   '}error: {node.error}", []))
    for position, item in enumerate(items):
        last_item = position == len(items) - 1
        if isinstance(item, StepNode):  # a for_each element hangs from its fan-out
            _node_rows(item, inner, last_item, rows, now)
            continue
        branch, cont = ("└─ ", "   ") if last_item else ("├─ ", "│  ")
        if isinstance(item, str):
            rows.append((inner + branch + item, []))
        else:
            rows.append((inner + branch + list_title(item), []))
            _tree_rows(item.steps, inner + cont, rows, now)


def _child_items(node: StepNode) -> list[StepList | StepNode | str]:
    items: list[StepList | StepNode | str] = []
    for child in node.lists:
        if child.label is None:
            items.extend(child.steps)
        elif child.steps:
            items.append(child)
    if node.hidden:
        items.append(summary(node.hidden))
    return items
