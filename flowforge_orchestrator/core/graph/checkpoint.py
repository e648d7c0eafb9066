"""The checkpoint format: what `runs.checkpoint` holds of a run's graph, written and read
here only (the graph, the redrive and the views all go through this module).

```
{"v": 3, "seq": 12, "g": 1, "deadline": "2024-05-01T13:00:00+00:00",
 "steps": {"order": "S1", "route": {"s": "r", "n": 1, "b": "then"},
           "charge_all": {"s": "r", "n": 1, "x": 3, "i": "Sdp", "na": {"1": 2}}}}
```

* `v`: the version. 3: attempt ids carry the run's incarnation (`nodes.attempt_id`);
  2: they do not, and a run checkpointed at 2 keeps its ids, so it stays at 2. Version 1
  stored attempt ids (`a`) and full status names; it is still read.
* `seq`: the last event's sequence number; `g`: the redrives so far (absent: 0);
  `deadline`: when the run times out (absent: no timeout).
* `o`: the keys of the steps with a `compensate` that succeeded, in completion order
  (absent: none); `u`: set while the run compensates: `end` (failed | cancelled), `e` the
  `error` its compensations read, `r` a cancellation's reason. Which compensations ran is
  in their own steps' entries. Both are absent in older checkpoints, which read as none.
* `steps`: by node key, each node that is not pending (or pending with attempts behind it:
  redriven) as `"<status letter><attempt>"` ("S1": succeeded on its first attempt), or as a
  dict when it has more to say: `e` its error, `t` its timer, `b` a condition's branch,
  `x` a fan-out's size, `g` the generation of its attempt, `k` a running wait's key,
  `h` a running attempt handed off to another system (1), `c` the catch handler that took
  its failure.
* A running fan-out of one worker step packs its elements into its own entry: `i`, one
  letter per element ('p': pending, or saved on its own entry for an error or a retry
  timer) and `na`, the attempt numbers past 1 by element index. A fan-out of more than
  one part (`packing.PART_SIZE` elements) stores them in `flowforge.run_parts` instead,
  a row per part of `ic` letters, each written only by a commit that changes it: its entry
  carries `ic` and neither `i` nor `na`. The store joins the parts back in when it loads a
  run (`with_parts`), so every reader sees `i` and `na` as before.

Compact because the run row's checkpoint is rewritten by every commit of the run: a
fan-out of 1,000 elements costs ~1 byte per element, not ~60, and a bigger one costs the
parts that changed. Outputs are not here: they live in `step_results`, keyed by attempt id.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

from flowforge_orchestrator.core.definition.models import TaskStep
from flowforge_orchestrator.core.graph.compensation import Compensation
from flowforge_orchestrator.core.graph.nodes import Node
from flowforge_orchestrator.core.graph.packing import LETTERS, STATUSES, Packing
from flowforge_orchestrator.core.records import CHECKPOINT_VERSION
from flowforge_orchestrator.core.state import RunStatus, StepStatus

__all__ = [
    "CHECKPOINT_VERSION",
    "Checkpoint",
    "Saved",
    "carries_incarnation",
    "for_redrive",
    "read_checkpoint",
    "unpack",
    "with_parts",
    "write_checkpoint",
]

_WITHOUT_INCARNATION = 2  # the version of runs whose attempt ids lack the incarnation

_LETTERS = LETTERS
_STATUSES = STATUSES

Entry = str | dict[str, object]  # one node's saved form


@dataclass(frozen=True)
class Saved:
    """A decoded checkpoint entry."""

    status: StepStatus
    attempt: int
    attempt_id: UUID | None = None  # only version-1 checkpoints stored ids
    error: dict[str, Any] | None = None
    fire_at: datetime | None = None
    branch: str | None = None
    wait_key: str | None = None
    handed_off: bool = False
    items: int | None = None
    generation: int = 0
    elements: str | None = None  # a packed fan-out: one letter per element
    element_attempts: dict[str, int] = field(default_factory=dict)  # those past attempt 1
    part_size: int | None = None  # its elements were stored in parts of this many
    caught: int | None = None  # the catch handler that took its failure


@dataclass(frozen=True)
class Checkpoint:
    """A decoded checkpoint."""

    seq: int = 0
    generation: int = 0
    deadline: datetime | None = None
    steps: dict[str, Saved] = field(default_factory=dict)  # by node key
    completed: list[str] = field(default_factory=list)  # steps to undo, in completion order
    compensation: Compensation | None = None  # set while the run compensates


def carries_incarnation(saved: Mapping[str, Any] | None) -> bool:
    """Whether a run's attempt ids carry its incarnation: yes for a fresh run and for one
    checkpointed at the current version; a run saved at version 2 keeps the ids it has."""
    return not saved or int(saved.get("v", 0)) >= CHECKPOINT_VERSION


# -- writing -------------------------------------------------------------------------------


def write_checkpoint(
    *,
    nodes: Iterable[Node],
    fan_outs: Iterable[Packing],
    seq: int,
    generation: int,
    deadline: datetime | None,
    incarnation: bool,
    completed: list[str] | None = None,
    compensation: Compensation | None = None,
    parted: bool = False,
) -> dict[str, Any]:
    """The stored form of a run: `nodes` are saved one by one (the pending ones left out),
    `fan_outs` (running, of one worker step, refreshed) with their elements packed;
    `incarnation` says whether attempt ids carry it (`carries_incarnation`). `parted`: the
    form the run row stores, without the letters of a fan-out stored in parts (they go in
    `Packing.take_parts`); else every fan-out's letters inline, as `with_parts` gives them
    back."""
    steps = {
        node.key: _encode(node)
        for node in nodes
        if node.status is not StepStatus.PENDING or node.attempt  # redriven: "p<n>"
    }
    for fan_out in fan_outs:
        saved_entry = _encode(fan_out.node, full=True)
        assert isinstance(saved_entry, dict)
        if parted and fan_out.parted:
            saved_entry["ic"] = fan_out.size
        else:
            saved_entry["i"], attempts = fan_out.inline()
            if attempts:
                saved_entry["na"] = attempts
            if fan_out.parted:
                saved_entry["ic"] = fan_out.size
        steps[fan_out.node.key] = saved_entry
        steps.update((element.key, _encode(element)) for element in fan_out.alone.values())
    version = CHECKPOINT_VERSION if incarnation else _WITHOUT_INCARNATION
    saved: dict[str, object] = {"v": version, "seq": seq, "steps": steps}
    if generation:
        saved["g"] = generation
    if deadline is not None:
        saved["deadline"] = deadline.isoformat()
    if completed:
        saved["o"] = list(completed)
    if compensation is not None:
        phase: dict[str, object] = {"end": compensation.ending.value, "e": compensation.error}
        if compensation.reason is not None:
            phase["r"] = compensation.reason
        saved["u"] = phase
    return saved


def _encode(node: Node, *, full: bool = False) -> Entry:
    letter = _LETTERS[node.status]
    extra: dict[str, object] = {}
    if node.error is not None:
        # Some failures are the orchestrator's verdict (a limit, a template, a join): no
        # worker result holds them, so the checkpoint does.
        extra["e"] = node.error
    # A worker step's deadline is not saved: a restore gives its attempt a fresh one. Delays,
    # retry backoffs and handed-off attempts' deadlines are, so they end at their time
    # whoever holds the run.
    with_worker = (
        isinstance(node.step, TaskStep)
        and node.status is not StepStatus.RETRYING
        and not node.handed_off
    )
    if node.fire_at is not None and not node.status.finished and not with_worker:
        extra["t"] = node.fire_at.isoformat()
    if node.branch is not None:
        extra["b"] = node.branch
    if node.wait_key is not None and not node.status.finished:
        extra["k"] = node.wait_key
    if node.handed_off and not node.status.finished:
        extra["h"] = 1
    if node.items is not None:
        extra["x"] = len(node.items)
    if node.generation:
        extra["g"] = node.generation
    if node.caught is not None:
        extra["c"] = node.caught
    if not extra and not full:
        return f"{letter}{node.attempt or ''}"
    return {"s": letter, "n": node.attempt, **extra}


# -- reading -------------------------------------------------------------------------------


def read_checkpoint(saved: Mapping[str, Any] | None) -> Checkpoint:
    """Decode a stored checkpoint (None or empty: a run that never started)."""
    if not saved:
        return Checkpoint()
    deadline = saved.get("deadline")
    phase = saved.get("u")
    return Checkpoint(
        seq=int(saved.get("seq", 0)),
        generation=int(saved.get("g", 0)),
        deadline=datetime.fromisoformat(deadline) if deadline else None,
        steps={key: _decode(value) for key, value in saved.get("steps", {}).items()},
        completed=list(saved.get("o", [])),
        compensation=(
            Compensation(RunStatus(phase["end"]), dict(phase["e"]), phase.get("r"))
            if phase
            else None
        ),
    )


def _decode(saved: str | Mapping[str, Any]) -> Saved:
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
        wait_key=saved.get("k"),
        handed_off=bool(saved.get("h")),
        items=saved.get("x"),
        generation=int(saved.get("g", 0)),
        elements=saved.get("i"),
        element_attempts=dict(saved.get("na", {})),
        part_size=saved.get("ic"),
        caught=saved.get("c"),
    )


def unpack(fan_out: Saved, index: int, generation: int) -> Saved | None:
    """The state of element `index` packed in a fan-out's entry; None when the entry says
    'p' (pending, or saved on its own) or does not reach that far."""
    letters = fan_out.elements or ""
    if index >= len(letters) or letters[index] == "p":
        return None
    attempt = fan_out.element_attempts.get(str(index), 1)
    return Saved(_STATUSES[letters[index]], attempt, generation=generation)


Part = tuple[str, int, str, Mapping[str, int] | None]  # step, part, letters, attempts


def with_parts(saved: Mapping[str, Any] | None, parts: Sequence[Part]) -> dict[str, Any] | None:
    """A stored checkpoint with its fan-outs' parts (`flowforge.run_parts` rows) joined back
    into their entries as `i` and `na`: what `read_checkpoint` and a restore read. A part
    that is missing reads as pending letters; parts left over from an earlier expansion
    (past the fan-out's size) are ignored."""
    if saved is None:
        return None
    steps = saved.get("steps", {})
    parted = {
        key: entry
        for key, entry in steps.items()
        if isinstance(entry, Mapping) and "ic" in entry and "i" not in entry
    }
    if not parted:
        return dict(saved)
    by_step: dict[str, dict[int, tuple[str, Mapping[str, int] | None]]] = {}
    for step, part, letters, attempts in parts:
        if step in parted:
            by_step.setdefault(step, {})[part] = (letters, attempts)
    joined = dict(steps)
    for key, entry in parted.items():
        size, count = int(entry["ic"]), int(entry.get("x") or 0)
        stored = by_step.get(key, {})
        chunks: list[str] = []
        attempts_past_one: dict[str, int] = {}
        for part in range(-(-count // size)):
            letters, attempts = stored.get(part, ("", None))
            width = min(size, count - part * size)
            chunks.append(letters[:width].ljust(width, "p"))
            attempts_past_one.update(attempts or {})
        full = {**entry, "i": "".join(chunks)}
        if attempts_past_one:
            full["na"] = attempts_past_one
        joined[key] = full
    return {**saved, "steps": joined}


# -- redrive -------------------------------------------------------------------------------


def for_redrive(
    saved: Mapping[str, Any], *, dropped: Collection[str], rerun: Mapping[str, int]
) -> dict[str, Any]:
    """The checkpoint a redrive starts from: the `dropped` entries gone, each key of `rerun`
    pending again with the attempts it had (attempt numbers go on, so attempt records stay
    distinct; none: its entry goes), the next generation, and no deadline."""
    steps = {key: value for key, value in saved.get("steps", {}).items() if key not in dropped}
    for key, attempts in rerun.items():
        if attempts:
            steps[key] = f"{_LETTERS[StepStatus.PENDING]}{attempts}"
        else:
            steps.pop(key, None)
    # A compensation phase is over; the steps that stay succeeded keep their place.
    out = {key: value for key, value in saved.items() if key not in ("deadline", "u", "o")}
    completed = [k for k in saved.get("o", []) if k in steps and k not in rerun]
    if completed:
        out["o"] = completed
    out["steps"] = steps
    out["g"] = int(saved.get("g", 0)) + 1
    return out
