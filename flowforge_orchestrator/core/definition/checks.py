"""The checks behind `definitions.parse_definition`, each turning a mistake into a problem.

They work on the raw data (dicts and lists as loaded), not on the models, so they run even
when pydantic rejected part of the definition and every problem is reported at once:

* `translate` turns pydantic errors into problems located by step id and field;
* `check_raw` checks ids, `depends_on` (same list, no cycles), step types, `with` of http
  steps, and every expression: it compiles, reads only variables that exist where it is
  written, and names only existing steps in `steps.<id>`.

Also here, because they need no models: `load_text` (YAML or JSON text to data, refusing a
YAML key written twice) and `topological_order`. `definitions` re-exports what is public.
"""

from __future__ import annotations

import datetime as dt
import difflib
import heapq
import json
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, get_args

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from flowforge_orchestrator.core.definition.urls import url_template_problem
from flowforge_orchestrator.core.expressions.cost import Budget, Route, Weight, route
from flowforge_orchestrator.core.expressions.templates import (
    Expression,
    PathPart,
    Template,
    compile_expression,
    compile_template,
    field_path,
)
from flowforge_orchestrator.core.jsonb import MAX_DEPTH, depth_problem, value_problem
from flowforge_orchestrator.errors import DefinitionError, DefinitionProblem, ExpressionError

__all__ = [
    "MAX_DATA_DEPTH",
    "MAX_STEP_DEPTH",
    "MAX_TEXT_CHARS",
    "MAX_YAML_NODES",
    "Problems",
    "check_bounds",
    "check_raw",
    "load_text",
    "topological_order",
    "translate",
]

MAX_STEP_DEPTH = 32
"""Deepest nesting of steps (conditions and parallel steps inside each other)."""
MAX_DATA_DEPTH = 256
"""Deepest nesting of lists and mappings anywhere in a definition's data."""
MAX_YAML_NODES = 100_000
"""Most values a YAML text may stand for, each alias counted as what it repeats."""
MAX_TEXT_CHARS = 1 << 20
"""Longest definition text (1 MiB)."""
_MAX_REPORTED = 20  # problems of one kind worth listing

BUILTIN_STEP_TYPES = frozenset(
    {"http", "condition", "parallel", "delay", "transform", "wait", "switch", "fail", "workflow"}
)
INLINE_STEP_TYPES = frozenset(
    {"condition", "parallel", "delay", "transform", "wait", "switch", "fail", "workflow"}
)
# Union member labels pydantic puts in an error's loc; they are not keys of the data.
UNION_TAGS = frozenset(
    {"TaskStep", "ConditionStep", "ParallelStep", "DelayStep", "TransformStep", "WaitStep"}
    | {"SwitchStep", "FailStep", "WorkflowStep", "JoinMode", "JoinAtLeast"}
)
ROOTS = frozenset({"input", "steps", "run"})
ITEM_ROOTS = frozenset({"item", "index"})
ERROR_ROOT = "error"  # in a catch handler's steps and a compensation's
SECRETS = "secrets"


@dataclass
class Problems:
    """Collects problems of one definition source, dropping exact duplicates."""

    source: str | None
    items: list[DefinitionProblem] = field(default_factory=list)

    def add(self, message: str, step_id: str | None = None, field: str | None = None) -> None:
        problem = DefinitionProblem(message, self.source, step_id, field)
        if problem not in self.items:
            self.items.append(problem)

    def at(self, step: RawStep | None, message: str, name: str | None) -> None:
        """Add a problem in field `name` of a raw step (None: the workflow itself)."""
        step_id, where = step.where(name) if step is not None else (None, name)
        self.add(message, step_id, where)


# --- pydantic errors ---------------------------------------------------------------------


def translate(
    exc: ValidationError,
    data: Any,
    problems: Problems,
    fields_for: Callable[[dict[str, Any] | None], Collection[str]],
    model_for: Callable[[dict[str, Any] | None], type[BaseModel]] | None = None,
) -> None:
    """Add one problem per pydantic error; `fields_for(step or None)` names allowed fields,
    `model_for(step or None)` the model, for the fields of nested objects (`retry`)."""
    for error in exc.errors(include_url=False):
        step, path = locate(data, error["loc"])
        context = error.get("ctx") or {}
        if isinstance(context.get("field"), str):
            path = (*path, context["field"])
        message = _message(error)
        last = path[-1] if path else None
        if error["type"] == "extra_forbidden" and isinstance(last, str):
            if len(path) == 1:
                message = _unknown_field(last, fields_for(step))
            elif model_for is not None:
                nested = _nested_model(model_for(step), path[:-1])
                if nested is not None:
                    message = _unknown_field(last, _model_fields(nested))
        step_id = step.get("id") if step is not None else None
        problems.add(message, step_id if isinstance(step_id, str) else None, field_path(None, path))


def _model_fields(model: type[BaseModel]) -> set[str]:
    return {info.alias or name for name, info in model.model_fields.items()}


def _nested_model(model: type[BaseModel], path: Sequence[PathPart]) -> type[BaseModel] | None:
    """The model of the object at `path` (field names, list indexes) inside `model`."""
    current: Any = model
    for part in path:
        if isinstance(part, int):
            continue  # an element of a list: the list's model is already in hand
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        fields = {info.alias or name: info for name, info in current.model_fields.items()}
        info = fields.get(part)
        if info is None:
            return None
        current = _model_in(info.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The one model class inside an annotation (`Retry | None`, `list[Retry]`), if one."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    found = {m for arg in get_args(annotation) if (m := _model_in(arg)) is not None}
    return found.pop() if len(found) == 1 else None


def _message(error: ErrorDetails) -> str:
    if error["type"] == "value_error":
        return error["msg"].removeprefix("Value error, ")
    if error["type"] == "missing":
        return "required field is missing"
    return error["msg"]


def locate(
    data: Any, loc: tuple[int | str, ...]
) -> tuple[dict[str, Any] | None, tuple[PathPart, ...]]:
    """The innermost step on `loc` (a dict with a string `id` at a step position) and the
    path from it; union labels and anything past the data (a scalar) are dropped."""
    node: Any = data
    step: dict[str, Any] | None = None
    path: list[PathPart] = []
    for part in loc:
        if part in UNION_TAGS and not (isinstance(node, dict) and part in node):
            continue
        if not isinstance(node, dict | list):
            break
        path.append(part)
        node = _child(node, part)
        if isinstance(node, dict) and isinstance(node.get("id"), str) and _at_step(path):
            step, path = node, []
    return step, tuple(path)


def _child(node: dict[str, Any] | list[Any], part: PathPart) -> Any:
    if isinstance(node, dict):
        return node.get(part) if isinstance(part, str) else None
    return node[part] if isinstance(part, int) and 0 <= part < len(node) else None


def _at_step(path: list[PathPart]) -> bool:
    match path[-3:]:
        case [*_, "steps" | "then" | "else", int()] | ["branches", int(), int()] | [*_, "step"]:
            return True
    return False


# --- bounds, before anything recurses into the data -----------------------------------------


def check_bounds(data: Any, problems: Problems) -> bool:
    """Find what must be refused before pydantic and the other checks walk the data: nesting
    past MAX_DATA_DEPTH, steps nested past MAX_STEP_DEPTH, `with`/`output` values nested past
    jsonb.MAX_DEPTH, text PostgreSQL cannot store (NUL, lone surrogates), values JSON cannot
    hold. Iterative, so any data is safe to check; True if nothing was found."""
    before = len(problems.items)
    if isinstance(data, dict):
        _check_step_depth(data, problems)  # first: it names the step nested too deep
    if len(problems.items) == before:
        _check_values(data, problems)
    return len(problems.items) == before


def _check_values(data: Any, problems: Problems) -> None:
    # Each entry: a value, its depth, and a link to its parent's (the path, built only to
    # report a problem: paths copied per value would cost depth x values).
    stack: list[tuple[Any, int, _Link]] = [(data, 0, None)]
    found = 0
    while stack and found < _MAX_REPORTED:
        value, depth, link = stack.pop()
        problem = None
        if isinstance(value, dict | list) and depth >= MAX_DATA_DEPTH:
            _add_at(problems, data, _path(link), f"nested more than {MAX_DATA_DEPTH} levels deep")
            return
        if isinstance(value, dict):
            for key, child in value.items():
                if isinstance(key, str) and value_problem(key) is not None:
                    problem = f"the key {key[:40]!r} " + str(value_problem(key))[3:]
                    break
                stack.append((child, depth + 1, (link, key if isinstance(key, str) else str(key))))
        elif isinstance(value, list):
            stack.extend((child, depth + 1, (link, i)) for i, child in enumerate(value))
        elif isinstance(value, str):
            reason = value_problem(value)
            problem = f"the text {reason[3:]}" if reason is not None else None
        elif not isinstance(value, int | float | bool | dt.date) and value is not None:
            problem = f"a {type(value).__name__} is not a JSON value"
        if problem is not None:
            found += 1
            _add_at(problems, data, _path(link), problem)


_Link = tuple["_Link", PathPart] | None


def _path(link: _Link) -> tuple[PathPart, ...]:
    parts: list[PathPart] = []
    while link is not None:
        link, part = link
        parts.append(part)
    return tuple(reversed(parts))


def _check_step_depth(data: dict[str, Any], problems: Problems) -> None:
    if data.get("output") is not None:
        problem = depth_problem(data["output"], MAX_DEPTH)
        if problem is not None:
            problems.add("the value " + problem.removeprefix("it "), None, "output")
    todo = [(step, 1, where) for step, where in _steps_in(data.get("steps"), ("steps",))]
    while todo:
        step, depth, where = todo.pop()
        if depth > MAX_STEP_DEPTH:
            message = (
                f"nested {depth} steps deep (inside conditions and parallel steps); "
                f"the limit is {MAX_STEP_DEPTH}"
            )
            _add_at(problems, data, where, message)
            continue
        for name in ("with", "output", "input"):
            problem = depth_problem(step.get(name), MAX_DEPTH)
            if problem is not None:
                _add_at(problems, data, (*where, name), "the value " + problem[3:])
        todo.extend((inner, depth + 1, path) for inner, path in _children(step, where))


def _steps_in(
    steps: Any, where: tuple[PathPart, ...]
) -> Iterator[tuple[dict[str, Any], tuple[PathPart, ...]]]:
    for i, step in enumerate(steps if isinstance(steps, list) else ()):
        if isinstance(step, dict):
            yield step, (*where, i)


def _children(
    step: dict[str, Any], where: tuple[PathPart, ...]
) -> Iterator[tuple[dict[str, Any], tuple[PathPart, ...]]]:
    """The steps nested directly in a raw step, with their paths."""
    kind = step.get("type")
    if kind == "condition":
        yield from _steps_in(step.get("then"), (*where, "then"))
        yield from _steps_in(step.get("else"), (*where, "else"))
    elif kind == "parallel":
        branches = step.get("branches")
        for j, branch in enumerate(branches if isinstance(branches, list) else ()):
            yield from _steps_in(branch, (*where, "branches", j))
        if isinstance(step.get("step"), dict):
            yield step["step"], (*where, "step")
    elif kind == "switch":
        cases = step.get("cases")
        for j, case in enumerate(cases if isinstance(cases, list) else ()):
            if isinstance(case, dict):
                yield from _steps_in(case.get("steps"), (*where, "cases", j, "steps"))
        yield from _steps_in(step.get("default"), (*where, "default"))
    for name, steps in _handler_lists(step):
        yield from _steps_in(steps, (*where, *name))


def _handler_lists(step: dict[str, Any]) -> Iterator[tuple[tuple[PathPart, ...], Any]]:
    """A raw step's catch handlers' steps and its compensation, with their paths."""
    catch = step.get("catch")
    for j, handler in enumerate(catch if isinstance(catch, list) else ()):
        if isinstance(handler, dict):
            yield ("catch", j, "steps"), handler.get("steps")
    if "compensate" in step:
        yield ("compensate",), step.get("compensate")


def _add_at(problems: Problems, data: Any, path: tuple[PathPart, ...], message: str) -> None:
    """A problem at `path` of the raw data, located by its innermost step."""
    step, rest = locate(data, path)
    step_id = step.get("id") if step is not None else None
    problems.add(message, step_id if isinstance(step_id, str) else None, field_path(None, rest))


# --- checks on the raw data ----------------------------------------------------------------


@dataclass
class RawStep:
    data: dict[str, Any]
    id: str | None
    in_for_each: bool  # inside a for_each template: `item` and `index` exist
    owner: str | None = None  # nearest enclosing step with an id, to locate an id-less step
    path: tuple[PathPart, ...] = ()  # from `owner` (or the root) to this step
    reads_error: bool = False  # inside a catch handler or a compensation: `error` exists

    def where(self, name: str | None) -> tuple[str | None, str | None]:
        """(step id, field) of a problem in field `name`, located via the owner if no id."""
        if self.id is not None:
            return self.id, name
        prefix = field_path(None, self.path)
        return self.owner, f"{prefix}.{name}" if prefix and name else prefix or name


def step_lists(steps: Any) -> Iterator[tuple[list[RawStep], bool]]:
    """Every step list as (steps, is a for_each template), outer lists first."""
    yield from _lists(steps, None, ("steps",), in_for_each=False, template=False)


def _lists(
    steps: Any,
    owner: str | None,
    prefix: tuple[PathPart, ...],
    *,
    in_for_each: bool,
    template: bool,
    reads_error: bool = False,
) -> Iterator[tuple[list[RawStep], bool]]:
    if not isinstance(steps, list):
        return
    raws = [
        RawStep(
            s,
            s["id"] if isinstance(s.get("id"), str) else None,
            in_for_each,
            owner,
            prefix if template else (*prefix, i),
            reads_error,
        )
        for i, s in enumerate(steps)
        if isinstance(s, dict)
    ]
    yield raws, template
    for raw in raws:
        kind, data = raw.data.get("type"), raw.data
        inner = (raw.id, ()) if raw.id is not None else (raw.owner, raw.path)
        for where, handler_steps in _handler_lists(data):
            yield from _lists(
                handler_steps,
                inner[0],
                (*inner[1], *where),
                in_for_each=in_for_each,
                template=False,
                reads_error=True,
            )
        if kind == "switch":
            for where, case_steps in _switch_lists(data):
                yield from _lists(
                    case_steps,
                    inner[0],
                    (*inner[1], *where),
                    in_for_each=in_for_each,
                    template=False,
                    reads_error=reads_error,
                )
        if kind == "condition":
            for name in ("then", "else"):
                yield from _lists(
                    data.get(name),
                    inner[0],
                    (*inner[1], name),
                    in_for_each=in_for_each,
                    template=False,
                    reads_error=reads_error,
                )
        elif kind == "parallel":
            branches = data.get("branches")
            for j, branch in enumerate(branches if isinstance(branches, list) else ()):
                where = (*inner[1], "branches", j)
                yield from _lists(
                    branch,
                    inner[0],
                    where,
                    in_for_each=in_for_each,
                    template=False,
                    reads_error=reads_error,
                )
            if isinstance(data.get("step"), dict):
                where = (*inner[1], "step")
                yield from _lists(
                    [data["step"]],
                    inner[0],
                    where,
                    in_for_each=True,
                    template=True,
                    reads_error=reads_error,
                )


def _switch_lists(data: dict[str, Any]) -> Iterator[tuple[tuple[PathPart, ...], Any]]:
    cases = data.get("cases")
    for j, case in enumerate(cases if isinstance(cases, list) else ()):
        if isinstance(case, dict):
            yield ("cases", j, "steps"), case.get("steps")
    yield ("default",), data.get("default")


def check_raw(
    data: Any,
    problems: Problems,
    *,
    known_types: Collection[str] | None,
    http_params: type[BaseModel],
) -> None:
    """Add the graph, type and expression problems of a raw definition."""
    if not isinstance(data, dict):
        return
    lists = list(step_lists(data.get("steps")))
    steps = [step for found, _ in lists for step in found]
    ids = _check_ids(steps, problems)
    for found, template in lists:
        _check_dependencies(found, template, ids, problems)
    for step in steps:
        _check_type(step, known_types, problems)
        if step.in_for_each and step.data.get("compensate") is not None:
            problems.at(
                step,
                "a step inside a for_each cannot have a compensation (its elements leave "
                "memory once the fan-out ends); compensate the parallel step itself",
                "compensate",
            )
        _check_nested_compensations(step, problems)
        if step.data.get("type") == "http":
            _check_http(step, http_params, problems)
        _check_step_expressions(step, ids, problems)
    concurrency = data.get("concurrency")
    if isinstance(concurrency, dict) and isinstance(concurrency.get("key"), str):
        _Reads(problems, ids, None, frozenset({"input", "run"})).bare(
            concurrency["key"], "concurrency.key"
        )
    if data.get("output") is not None:
        _Reads(problems, ids, None, ROOTS).template(data["output"], "output")


def _check_nested_compensations(step: RawStep, problems: Problems) -> None:
    """A compensation's steps undo; they are not undone in turn."""
    undo = step.data.get("compensate")
    todo = [s for s, _ in _steps_in(undo, ())]
    while todo:
        inner = todo.pop()
        if inner.get("compensate") is not None:
            name = inner.get("id") if isinstance(inner.get("id"), str) else "?"
            problems.at(
                step,
                f"step '{name}' of this compensation has a compensation of its own; "
                "compensations are not compensated",
                "compensate",
            )
        todo.extend(s for s, _ in _children(inner, ()))


def _check_ids(steps: list[RawStep], problems: Problems) -> set[str]:
    seen: set[str] = set()
    for step in steps:
        if step.id is None:
            continue
        if step.id in seen:
            problems.add(
                "duplicate step id: ids are unique across the whole definition, "
                "nested steps included",
                step.id,
                "id",
            )
        seen.add(step.id)
    return seen


def _check_dependencies(
    steps: list[RawStep], template: bool, ids: set[str], problems: Problems
) -> None:
    local = {s.id for s in steps if s.id is not None}
    edges: dict[str, list[str]] = {}
    for step in steps:
        deps = step.data.get("depends_on")
        if step.id is None or not isinstance(deps, list):
            continue
        if template and deps:
            problems.add(
                "a for_each step runs alone in each branch: it cannot depend on other steps",
                step.id,
                "depends_on",
            )
            continue
        edges[step.id] = []
        for dep in deps:
            if not isinstance(dep, str):
                continue
            if dep == step.id:
                problems.add("a step cannot depend on itself", step.id, "depends_on")
            elif dep in local:
                edges[step.id].append(dep)
            elif dep in ids:
                problems.add(
                    f"depends on '{dep}', which is in another step list: "
                    "nested steps may only depend on steps of their own list",
                    step.id,
                    "depends_on",
                )
            else:
                problems.add(f"depends on unknown step '{dep}'", step.id, "depends_on")
    order = [s.id for s in steps if s.id in edges]
    for cycle in find_cycles(order, edges):
        problems.add(
            "dependency cycle: " + " -> ".join([*cycle, cycle[0]]) + " (each depends on the next)",
            cycle[0],
            "depends_on",
        )


def find_cycles(order: list[str], edges: dict[str, list[str]]) -> list[list[str]]:
    """Disjoint dependency cycles (at most _MAX_REPORTED), each starting at its first step
    in definition order."""
    position = {step: i for i, step in enumerate(order)}
    remaining = set(order)
    cycles: list[list[str]] = []
    while len(cycles) < _MAX_REPORTED:
        _drop_acyclic(remaining, edges)
        if not remaining:
            break
        # Every remaining step waits on a remaining step: walking deps must loop.
        walk: list[str] = []
        node = min(remaining, key=position.__getitem__)
        while node not in walk:
            walk.append(node)
            node = next(d for d in edges[node] if d in remaining)
        cycle = walk[walk.index(node) :]
        first = min(cycle, key=position.__getitem__)
        cycle = cycle[cycle.index(first) :] + cycle[: cycle.index(first)]
        cycles.append(cycle)
        remaining.difference_update(cycle)
    return cycles


def _drop_acyclic(remaining: set[str], edges: dict[str, list[str]]) -> None:
    """Remove the steps that can run once the steps not in `remaining` are done (Kahn's
    algorithm: linear in steps and edges, so a long chain is cheap to check)."""
    waiting = dict.fromkeys(remaining, 0)
    dependents: dict[str, list[str]] = {}
    for step in remaining:
        for dep in edges.get(step, ()):
            if dep in remaining:
                waiting[step] += 1
                dependents.setdefault(dep, []).append(step)
    ready = [step for step, count in waiting.items() if count == 0]
    while ready:
        step = ready.pop()
        remaining.discard(step)
        for dependent in dependents.get(step, ()):
            waiting[dependent] -= 1
            if waiting[dependent] == 0:
                ready.append(dependent)


def _check_type(step: RawStep, known: Collection[str] | None, problems: Problems) -> None:
    kind = step.data.get("type")
    if known is None or not isinstance(kind, str) or kind in BUILTIN_STEP_TYPES or kind in known:
        return
    names = ", ".join(sorted(BUILTIN_STEP_TYPES | set(known)))
    problems.at(step, f"unknown step type '{kind}'; known types: {names}", "type")


def _check_http(step: RawStep, model: type[BaseModel], problems: Problems) -> None:
    """Validate keys and literal values of `with`; templated values are checked once rendered,
    but a templated URL must leave its scheme, host and port to the definition."""
    params = step.data.get("with", {})
    if not isinstance(params, dict):
        return
    url = params.get("url")
    problem = url_template_problem(url) if isinstance(url, str) and "${{" in url else None
    if problem is not None:
        problems.at(step, problem, "with.url")
    try:
        model.model_validate(params)
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            if _templated(params, error["loc"]):
                continue
            path: tuple[PathPart, ...] = tuple(error["loc"])
            context = error.get("ctx") or {}
            if isinstance(context.get("field"), str):
                path = (*path, context["field"])
            message = _message(error)
            if error["type"] == "extra_forbidden" and len(path) == 1:
                names = {info.alias or name for name, info in model.model_fields.items()}
                message = _unknown_field(str(path[0]), names)
            problems.at(step, message, field_path("with", path))


def _unknown_field(name: str, allowed: Collection[str]) -> str:
    close = difflib.get_close_matches(name, sorted(allowed), n=1)
    return f"unknown field; did you mean '{close[0]}'?" if close else "unknown field"


def _templated(params: dict[str, Any], loc: tuple[int | str, ...]) -> bool:
    node: Any = params
    for part in loc:
        if isinstance(node, str):
            break
        if not isinstance(node, dict | list):
            return False
        node = _child(node, part)
    return isinstance(node, str) and "${{" in node


_BARE_FIELDS = {"condition": "if", "parallel": "for_each", "delay": "until", "wait": "key"}


def _check_step_expressions(step: RawStep, ids: set[str], problems: Problems) -> None:
    kind = step.data.get("type")
    if not isinstance(kind, str):
        return
    roots = ROOTS | ITEM_ROOTS if step.in_for_each else ROOTS
    reads = _Reads(problems, ids, step, roots | {ERROR_ROOT} if step.reads_error else roots)
    bare = _BARE_FIELDS.get(kind)
    if bare is not None and isinstance(step.data.get(bare), str):
        reads.bare(step.data[bare], bare)
    _check_switch_and_fail(step, kind, reads)
    if kind == "transform" and "output" in step.data:
        reads.template(step.data["output"], "output")
    elif kind == "workflow" and "input" in step.data:
        reads.template(step.data["input"], "input")
    elif kind not in INLINE_STEP_TYPES and "with" in step.data:
        reads.allowed |= {SECRETS}
        template = reads.template(step.data["with"], "with")
        for string in template.strings if template else ():
            if SECRETS not in string.roots:
                continue
            if len(string.roots) > 1:
                problems.at(
                    step,
                    "a string that reads secrets can read nothing else: the worker "
                    "resolves it without the run context",
                    string.field,
                )
            if any(e.shape.comprehensions or e.shape.other_calls for e in string.expressions):
                problems.at(
                    step,
                    "a string that reads secrets cannot use map, filter, all, exists or "
                    "matches: the worker evaluates it without the orchestrator's limits",
                    string.field,
                )


def _check_switch_and_fail(step: RawStep, kind: str, reads: _Reads) -> None:
    """A switch's `when`s are bare CEL; a fail step's `error` is a template."""
    if kind == "switch" and isinstance(step.data.get("cases"), list):
        for j, case in enumerate(step.data["cases"]):
            if isinstance(case, dict) and isinstance(case.get("when"), str):
                reads.bare(case["when"], f"cases.{j}.when")
    if kind == "fail" and "error" in step.data:
        reads.template(step.data["error"], "error")


@dataclass
class _Reads:
    """Checks the expressions written in one place against what they may read there."""

    problems: Problems
    ids: set[str]
    step: RawStep | None
    allowed: frozenset[str]

    def bare(self, source: str, name: str) -> None:
        step_id = self.step.id if self.step else None
        try:
            expression = compile_expression(source, step_id=step_id, field=name)
        except ExpressionError as exc:
            self.problems.at(self.step, f"invalid expression {source!r}: {exc.reason}", name)
            return
        self.check(expression, name)

    def template(self, value: Any, name: str) -> Template | None:
        step_id = self.step.id if self.step else None
        try:
            template = compile_template(value, step_id=step_id, field=name)
        except ExpressionError as exc:
            message = f"invalid expression {exc.expression!r}: {exc.reason}"
            self.problems.at(self.step, message, exc.field)
            return None
        for string in template.strings:
            for expression in string.expressions:
                self.check(expression, string.field)
        return template

    def check(self, expression: Expression, name: str | None) -> None:
        for root in sorted(expression.roots - self.allowed):
            if root in ITEM_ROOTS:
                message = f"'{root}' exists only inside the step of a for_each"
            elif root == ERROR_ROOT:
                message = "'error' exists only in the steps of a catch handler or a compensation"
            elif root == SECRETS:
                message = (
                    "secrets can only be read in `with` of a worker step: "
                    "the worker resolves them and they are never stored"
                )
            else:
                readable = ", ".join(sorted(self.allowed))
                message = f"unknown variable '{root}'; expressions here can read {readable}"
            self.problems.at(self.step, message, name)
        for ref in sorted((expression.step_refs or frozenset()) - self.ids):
            self.problems.at(self.step, f"reads steps.{ref}, but no step has the id '{ref}'", name)
        # Over its own literals alone (before any data), is it past every sane budget?
        verdict = route(expression.shape, Weight(), Budget())
        if verdict.route is Route.REFUSED:
            message = (
                f"too costly: over its own literals alone it would run at least "
                f"{verdict.seconds:.3g} s (nested map/filter over a long list?)"
            )
            self.problems.at(self.step, message, name)


# --- text and order ----------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe YAML that refuses a key written twice in one mapping (the last would win), and
    keeps what a small text can make big within bounds: each alias counts as the nodes it
    stands for (a billion-laughs text is refused after MAX_YAML_NODES, in milliseconds, not
    expanded by whoever walks the data next), nesting stops at MAX_DATA_DEPTH (PyYAML's
    composer recurses), and an alias inside the node it names (a cycle) is refused."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._sizes: dict[int, int] = {}  # id(node) -> nodes it stands for, once composed
        self._nodes = 0
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        event: Any = self.peek_event()  # type: ignore[no-untyped-call]
        mark: Any = event.start_mark
        if isinstance(event, yaml.AliasEvent):
            target = self.anchors.get(event.anchor) if event.anchor is not None else None
            if target is not None:
                size = self._sizes.get(id(target))
                if size is None:
                    raise yaml.composer.ComposerError(
                        None,
                        None,
                        f"alias *{event.anchor} is used inside the node it names",
                        mark,
                    )
                self._count(size, mark)
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > MAX_DATA_DEPTH:
            raise yaml.composer.ComposerError(
                None, None, f"nested more than {MAX_DATA_DEPTH} levels deep", mark
            )
        before = self._nodes
        self._count(1, mark)
        node = super().compose_node(parent, index)
        self._depth -= 1
        self._sizes[id(node)] = self._nodes - before
        return node

    def fetch_flow_collection_start(self, token_class: Any) -> None:
        # PyYAML's scanner revisits every open flow level at each token: quadratic in the
        # nesting of `[[[...`, so it is bounded here, before the composer sees any of it.
        super().fetch_flow_collection_start(token_class)
        if self.flow_level > MAX_DATA_DEPTH:
            raise yaml.scanner.ScannerError(
                None, None, f"nested more than {MAX_DATA_DEPTH} levels deep", self.get_mark()
            )

    def _count(self, nodes: int, mark: Any) -> None:
        self._nodes += nodes
        if self._nodes > MAX_YAML_NODES:
            raise yaml.composer.ComposerError(
                None,
                None,
                f"the document stands for more than {MAX_YAML_NODES} values once its "
                "aliases are expanded (an alias bomb?)",
                mark,
            )

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str | int | float | bool | None):
                raise yaml.constructor.ConstructorError(
                    None, None, "a key must be a string", key_node.start_mark
                )
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is written twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_text(text: str, format: Literal["yaml", "json"], source: str | None) -> Any:
    """Data of a YAML or JSON text; a syntax error is a DefinitionError naming the line.
    Bounded: text size (MAX_TEXT_CHARS), expanded YAML size, nesting (MAX_DATA_DEPTH)."""
    if len(text) > MAX_TEXT_CHARS:
        message = f"the definition is {len(text)} characters long; the limit is {MAX_TEXT_CHARS}"
        raise DefinitionError([DefinitionProblem(message, source)])
    try:
        if format == "json":
            data = json.loads(text)
        else:
            data = yaml.load(text, Loader=_UniqueKeyLoader)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        message = f"invalid JSON ({where}): {exc.msg}"
        raise DefinitionError([DefinitionProblem(message, source)]) from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        reason = getattr(exc, "problem", None) or str(exc)
        raise DefinitionError(
            [DefinitionProblem(f"invalid YAML{where}: {reason}", source)]
        ) from exc
    except RecursionError as exc:  # JSON nested past the decoder's recursion limit
        message = f"invalid {format.upper()}: nested more than {MAX_DATA_DEPTH} levels deep"
        raise DefinitionError([DefinitionProblem(message, source)]) from exc
    return data


class _Node(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def depends_on(self) -> list[str]: ...


def topological_order(steps: Sequence[_Node]) -> list[str]:
    """Ids of one step list, dependencies first; ready steps keep definition order.

    Dependencies outside the list are ignored; raises ValueError on a cycle.
    """
    position = {step.id: i for i, step in enumerate(steps)}
    waiting = {s.id: {d for d in s.depends_on if d in position} for s in steps}
    dependents: dict[str, list[str]] = {s.id: [] for s in steps}
    for step_id, deps in waiting.items():
        for dep in deps:
            dependents[dep].append(step_id)
    ready = [position[s] for s, deps in waiting.items() if not deps]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        step_id = steps[heapq.heappop(ready)].id
        order.append(step_id)
        for dependent in dependents[step_id]:
            waiting[dependent].discard(step_id)
            if not waiting[dependent]:
                heapq.heappush(ready, position[dependent])
    if len(order) != len(steps):
        raise ValueError(f"dependency cycle among {sorted(set(position) - set(order))}")
    return order
