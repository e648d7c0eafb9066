"""CEL expressions and `${{ }}` templates, compiled once and evaluated against a run context.

The context every expression sees (build it with `build_context`)::

    {
        "input": <the run's input, any JSON value>,
        "steps": {<step id>: {"output": <JSON value or None>,
                              "status": "pending" | "running" | "succeeded" | "failed" | ...,
                              "error": {"message": ..., "category": ..., ...} | None}},
        "run": {"id": str, "workflow": str, "version": int},
        "item": <current element>, "index": <int>,   # only inside a for_each step
        "secrets": {...},                            # only on a worker, only in `with`
    }

CEL, not Python `eval`: typed, side-effect free, always terminating, but not always soon
(`expressions.cost`). Evaluation hands CEL only what an expression reads: the variables it
names, and of `input`, `steps` and `item` only the fields it selects by name
(`steps.order.output.total` passes that one value, not the run's every output), so a big run
context is neither converted nor weighed for every expression.

Evaluating is pluggable: `Expression.evaluate(context, evaluator)` hands the work to an
`Evaluator` (the orchestrator's routes it inline, to a sandbox process, or refuses it, by
its estimated cost); without one it runs in process, unbounded (validation, tests). A
context built by the graph carries a `Weigher`: the cached weights of what it holds.

A template is any JSON-like value whose strings may hold `${{ expr }}`. A string that is
exactly one expression keeps the value's type; other strings interpolate. A literal `${{` is
written as an expression: `${{ '${{' }}`. Rendered values are JSON-ready: timestamps become
RFC 3339 strings, durations `"90s"`, bytes base64 (the protobuf JSON mapping).
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import cel

from flowforge_orchestrator.core.expressions.cost import Shape, Weight, shape_of
from flowforge_orchestrator.core.expressions.messages import cel_message
from flowforge_orchestrator.errors import ExpressionError

__all__ = [
    "MAX_EXPRESSION_CHARS",
    "MAX_EXPRESSION_OPERATORS",
    "Context",
    "Evaluator",
    "Expression",
    "PathPart",
    "Template",
    "TemplateString",
    "Weigher",
    "build_context",
    "compile_expression",
    "compile_template",
    "field_path",
    "render_at",
    "to_json_value",
    "to_text",
]

PathPart = str | int
_UNSET: Any = object()

MAX_EXPRESSION_CHARS = 8192
"""Longest expression source accepted."""
MAX_EXPRESSION_OPERATORS = 1000
"""Most operators, selections and indexes in one expression. CEL's parser and evaluator
recurse once per operator of a chain (`a + b + c ...`): 14,000 crash the process on an 8 MB
stack, 2,000 on a 1 MB thread stack. Well below both."""
_OPERATOR = re.compile(r"&&|\|\||==|!=|<=|>=|[-+*/%<>?.\[]")
# Roots whose fields an expression selects by name can be passed pruned to those fields.
_PRUNABLE = ("input", "steps", "item")
_ROOT_USE = {
    root: re.compile(rf"(?<![\w.]){root}\b((?:\s*\.\s*[A-Za-z_]\w*)*)(\s*\()?")
    for root in _PRUNABLE
}
_FIELD = re.compile(r"[A-Za-z_]\w*")
_PRUNE_DEPTH = 8  # deeper selections keep the value at this depth whole
# Identifiers CEL reports as variables that are not context roots: type names, namespaces.
_BUILTIN_NAMES = frozenset(
    {"int", "uint", "double", "bool", "string", "bytes", "list", "map", "null_type", "type"}
    | {"dyn", "optional", "google", "cel"}
)
_STRING_LITERAL = re.compile(
    r"""[rRbB]{0,2}(?:\"\"\"[\s\S]*?\"\"\"|'''[\s\S]*?'''|"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')"""
)
_BOUND_ONE = re.compile(r"\.\s*(?:all|exists|exists_one|map|filter)\s*\(\s*([A-Za-z_]\w*)\s*,")
_BOUND_TWO = re.compile(
    r"\.\s*(?:all|exists|exists_one|existsOne|transformList|transformMap)\s*\(\s*"
    r"([A-Za-z_]\w*)\s*,\s*([A-Za-z_]\w*)\s*,"
)


class Weigher(Protocol):
    """What the values of a context weigh (the graph caches them); `step_refs` are the steps
    an expression reads (None: all of them)."""

    def weight(self, root: str, step_refs: frozenset[str] | None) -> Weight: ...


class Context(dict[str, Any]):
    """The variables expressions see, and (from the graph) what they weigh."""

    __slots__ = ("weigher",)

    def __init__(self, values: Mapping[str, Any], weigher: Weigher | None = None) -> None:
        super().__init__(values)
        self.weigher = weigher


class Evaluator(Protocol):
    """Evaluates an expression against a context; any failure is an ExpressionError."""

    def evaluate(self, expression: Expression, context: Mapping[str, Any]) -> Any: ...


def build_context(
    input: Any,
    steps: Mapping[str, Mapping[str, Any]],
    run: Mapping[str, Any],
    *,
    item: Any = _UNSET,
    index: int | None = None,
    weigher: Weigher | None = None,
) -> Context:
    """The evaluation context; pass `item`/`index` when evaluating inside a for_each step.
    `steps` is kept as given (the graph passes a lazy view: an expression reads only the
    steps it names)."""
    context = Context({"input": input, "steps": steps, "run": run}, weigher)
    if item is not _UNSET:
        context["item"] = item
        context["index"] = index
    return context


# A prefix tree of the fields an expression selects below a root: None is "the whole value".
Selection = dict[str, "Selection | None"]


class _Compiled(NamedTuple):
    program: Any
    names: tuple[str, ...]  # variables to pass
    roots: frozenset[str]  # context roots it reads
    step_refs: frozenset[str] | None  # steps it names; None if it reads `steps` dynamically
    selections: dict[str, Selection]  # per prunable root read only by named fields
    shape: Shape


class Expression:
    """One compiled CEL expression and where it comes from (for error messages)."""

    __slots__ = ("_compiled", "field", "roots", "shape", "source", "step_id", "step_refs")

    def __init__(self, source: str, *, step_id: str | None = None, field: str | None = None):
        self.source = source
        self.step_id = step_id
        self.field = field
        self._compiled = _compile(source)
        self.roots = self._compiled.roots
        self.step_refs = self._compiled.step_refs
        self.shape = self._compiled.shape

    def evaluate(self, context: Mapping[str, Any], evaluator: Evaluator | None = None) -> Any:
        """The result (raw CEL from an in-process run: timestamps stay `datetime`; JSON-ready
        from a sandbox); any failure is an ExpressionError. Without `evaluator`, in process
        and unbounded."""
        if evaluator is not None:
            return evaluator.evaluate(self, context)
        return self.run(self.variables(context))

    def variables(self, context: Mapping[str, Any]) -> dict[str, Any]:
        """What CEL gets: the variables the expression names, pruned to the fields it selects
        (`steps` becomes a plain dict of the steps it names: CEL reads dicts, not views)."""
        compiled = self._compiled
        variables: dict[str, Any] = {}
        for name in compiled.names:
            if name not in context:
                continue
            value = context[name]
            selection = compiled.selections.get(name)
            if selection is not None:
                value = _select(value, selection)
            elif name == "steps" and isinstance(value, Mapping) and not isinstance(value, dict):
                value = dict(value)
            variables[name] = value
        return variables

    def bound(self, context: Mapping[str, Any]) -> Weight | None:
        """What the roots it reads weigh in all (an upper bound of `variables`), from the
        context's cached weights; None if the context carries none."""
        weigher = getattr(context, "weigher", None)
        if weigher is None:
            return None
        total: Weight | None = None
        for root in self.roots:
            if root in context:
                weight = weigher.weight(root, self.step_refs)
                total = weight if total is None else total + weight
        return total if total is not None else Weight()

    def run(self, variables: Mapping[str, Any]) -> Any:
        """Evaluate in this process, unbounded: for evaluations known to be cheap."""
        try:
            return self._compiled.program.execute(variables)
        except KeyError as exc:
            raise self.error(f"no such key: {exc.args[0] if exc.args else exc}") from exc
        except Exception as exc:  # CEL raises TypeError, RuntimeError, ValueError, ...
            message = cel_message(str(exc) or type(exc).__name__, variables)
            raise self.error(message) from exc

    def error(self, message: str) -> ExpressionError:
        """An ExpressionError about this expression (its source, step and field)."""
        return ExpressionError(
            message, expression=self.source, step_id=self.step_id, field=self.field
        )

    def __repr__(self) -> str:
        return f"Expression({self.source!r})"


@functools.lru_cache(maxsize=4096)
def _compile(source: str) -> _Compiled:
    program = cel.compile(source)
    names = tuple(program.variables())
    code = _STRING_LITERAL.sub("''", source)
    bound = set(_BOUND_ONE.findall(code))
    bound.update(name for pair in _BOUND_TWO.findall(code) for name in pair)
    roots = frozenset(names) - bound - _BUILTIN_NAMES
    selections: dict[str, Selection] = {}
    for root in _PRUNABLE:
        selection = _selection(code, root) if root in names else None
        if selection is not None:
            selections[root] = selection
    step_refs = frozenset(selections["steps"]) if "steps" in selections else None
    if "steps" not in names:
        step_refs = frozenset()
    shape = shape_of(code, program.functions())
    return _Compiled(program, names, roots, step_refs, selections, shape)


def _selection(code: str, root: str) -> Selection | None:
    """The fields selected below `root` (`input.order.id` selects order.id), or None if
    any use of it is not a selection by name (`input[k]`, `size(input)`, a method on it)."""
    tree: Selection = {}
    for use in _ROOT_USE[root].finditer(code):
        path = _FIELD.findall(use.group(1))
        if use.group(2):  # `input.items.exists(...)`: the last name is a method
            path = path[:-1]
        if not path:
            return None
        path = path[:_PRUNE_DEPTH]
        node = tree
        for field in path[:-1]:
            child = node.setdefault(field, {})
            if child is None:
                break  # an enclosing field is passed whole already
            node = child
        else:
            node[path[-1]] = None
    return tree


def _select(value: Any, selection: Selection) -> Any:
    """`value` with only the selected fields (a value that is no object is kept whole, so
    CEL reports the same error on it). Recursion is bounded by _PRUNE_DEPTH."""
    if type(value) is not dict and not isinstance(value, Mapping):
        return value
    out: dict[str, Any] = {}
    for field, inner in selection.items():
        try:
            child = value[field]
        except KeyError:
            continue  # absent: CEL says "no such key", `has()` says false, as before
        out[field] = child if inner is None else _select(child, inner)
    return out


def compile_expression(
    source: str, *, step_id: str | None = None, field: str | None = None
) -> Expression:
    """Compile bare CEL; a syntax error is an ExpressionError naming the step and field."""
    if not isinstance(source, str):
        raise ExpressionError(
            f"expected a CEL expression string, got {type(source).__name__}",
            expression=repr(source),
            step_id=step_id,
            field=field,
        )
    problem = _size_problem(source)
    if problem is not None:
        excerpt = source if len(source) <= 80 else f"{source[:77]}..."
        raise ExpressionError(problem, expression=excerpt, step_id=step_id, field=field)
    try:
        return Expression(source, step_id=step_id, field=field)
    except ValueError as exc:
        message = str(exc)
        prefix = f"Failed to parse expression '{source}': "
        message = message.removeprefix(prefix)
        message = re.sub(r"ERROR: <input>:(\d+):(\d+): ", r"line \1, column \2: ", message)
        raise ExpressionError(message, expression=source, step_id=step_id, field=field) from exc


def _size_problem(source: str) -> str | None:
    """Why this source is too big to compile safely, or None."""
    if len(source) > MAX_EXPRESSION_CHARS:
        return (
            f"the expression is {len(source)} characters long; the limit is {MAX_EXPRESSION_CHARS}"
        )
    operators = len(_OPERATOR.findall(_STRING_LITERAL.sub("''", source)))
    if operators > MAX_EXPRESSION_OPERATORS:
        return (
            f"the expression has {operators} operators; the limit is "
            f"{MAX_EXPRESSION_OPERATORS} (split it, or compute part of it in a step)"
        )
    return None


# --- JSON conversion ---------------------------------------------------------------------


def to_json_value(value: Any) -> Any:
    """`value` made JSON-ready: datetime to RFC 3339, timedelta to `"1.5s"`, bytes to base64.

    Raises ValueError for what JSON cannot hold (NaN, infinities, unknown types).
    """
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise ValueError(f"{value} is not a JSON number")
        return value
    if isinstance(value, Mapping):
        return {_key(k): to_json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json_value(v) for v in value]
    if isinstance(value, dt.datetime | dt.date | dt.timedelta | bytes):
        return _scalar_text(value)
    if isinstance(value, cel.OptionalValue):
        return to_json_value(value.value()) if value.has_value() else None
    raise ValueError(f"a {type(value).__name__} is not a JSON value")


def _key(key: Any) -> str:
    return key if isinstance(key, str) else to_text(key)


def _scalar_text(value: dt.datetime | dt.date | dt.timedelta | bytes) -> str:
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        text = value.isoformat()
        return text[:-6] + "Z" if text.endswith("+00:00") else text
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        micros = value // dt.timedelta(microseconds=1)
        sign = "-" if micros < 0 else ""
        whole, frac = divmod(abs(micros), 1_000_000)
        fraction = f".{frac:06d}".rstrip("0") if frac else ""
        return f"{sign}{whole}{fraction}s"
    return base64.b64encode(value).decode("ascii")


def to_text(value: Any) -> str:
    """How a value reads inside an interpolated string (`None` is empty, `true`, JSON)."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    value = to_json_value(value)
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return str(value)


# --- templates ---------------------------------------------------------------------------


def field_path(base: str | None, path: tuple[PathPart, ...]) -> str | None:
    """`with` + ("json", "items", 2) -> `with.json.items[2]`."""
    text = base or ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][\w-]*", part):
            text += f".{part}" if text else part
        else:
            text += f"[{json.dumps(part)}]"
    return text or None


@dataclass(frozen=True, slots=True)
class TemplateString:
    """A string of a template holding at least one `${{ }}`."""

    path: tuple[PathPart, ...]
    field: str | None
    text: str
    parts: tuple[str | Expression, ...]
    roots: frozenset[str]

    @property
    def expressions(self) -> tuple[Expression, ...]:
        return tuple(p for p in self.parts if isinstance(p, Expression))

    def render(
        self,
        context: Mapping[str, Any],
        skip_roots: frozenset[str],
        evaluator: Evaluator | None = None,
    ) -> Any:
        if skip_roots and not self.roots.isdisjoint(skip_roots):
            return self.text
        if len(self.parts) == 1 and isinstance(self.parts[0], Expression):
            return self._json(self.parts[0], self.parts[0].evaluate(context, evaluator))
        out = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
            else:
                value = part.evaluate(context, evaluator)
                self._json(part, value)
                out.append(to_text(value))
        return "".join(out)

    @staticmethod
    def _json(expression: Expression, value: Any) -> Any:
        try:
            return to_json_value(value)
        except ValueError as exc:
            raise expression.error(f"result is not JSON: {exc}") from exc


def _split(text: str, step_id: str | None, field: str | None) -> tuple[str | Expression, ...]:
    """Cut `text` into literal text and compiled expressions; whitespace around one is kept."""
    parts: list[str | Expression] = []
    position = 0
    while (start := text.find("${{", position)) != -1:
        end = _expression_end(text, start + 3)
        if end is None:
            raise ExpressionError(
                "unterminated '${{': close it with '}}'",
                expression=text,
                step_id=step_id,
                field=field,
            )
        if start > position:
            parts.append(text[position:start])
        parts.append(
            compile_expression(text[start + 3 : end].strip(), step_id=step_id, field=field)
        )
        position = end + 2
    if position < len(text):
        parts.append(text[position:])
    expressions = [p for p in parts if isinstance(p, Expression)]
    if len(expressions) == 1 and all(isinstance(p, Expression) or not p.strip() for p in parts):
        return (expressions[0],)
    return tuple(parts)


def _expression_end(text: str, position: int) -> int | None:
    """Index of the `}}` closing an expression, skipping CEL strings and nested braces."""
    depth = 0
    while position < len(text):
        char = text[position]
        if char in "'\"":
            after = _string_end(text, position)
            if after is None:
                return None
            position = after
            continue
        if char == "}" and depth == 0 and text.startswith("}}", position):
            return position
        depth += {"{": 1, "}": -1}.get(char, 0)
        position += 1
    return None


def _string_end(text: str, start: int) -> int | None:
    """Index just past the CEL string literal opening at `start`."""
    quote = text[start : start + 3] if text.startswith(("'''", '"""'), start) else text[start]
    raw = start > 0 and text[start - 1] in "rR"
    position = start + len(quote)
    while position < len(text):
        if text.startswith(quote, position):
            return position + len(quote)
        position += 2 if text[position] == "\\" and not raw else 1
    return None


class Template:
    """A JSON-like value with `${{ }}` strings, compiled once; `render` fills it in."""

    __slots__ = ("_tree", "field", "is_static", "roots", "step_id", "strings", "value")

    def __init__(self, value: Any, *, step_id: str | None = None, field: str | None = None):
        self.value = value
        self.step_id = step_id
        self.field = field
        strings: list[TemplateString] = []
        self._tree = self._build(value, (), strings)
        self.strings: tuple[TemplateString, ...] = tuple(strings)
        self.roots: frozenset[str] = frozenset().union(*(s.roots for s in strings))
        self.is_static = not strings

    def _build(self, value: Any, path: tuple[PathPart, ...], out: list[TemplateString]) -> Any:
        if isinstance(value, Mapping):
            return {k: self._build(v, (*path, k), out) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._build(v, (*path, i), out) for i, v in enumerate(value)]
        if isinstance(value, str) and "${{" in value:
            field = field_path(self.field, path)
            parts = _split(value, self.step_id, field)
            roots = frozenset().union(*(p.roots for p in parts if isinstance(p, Expression)))
            node = TemplateString(path, field, value, parts, roots)
            out.append(node)
            return node
        try:
            return to_json_value(value)
        except ValueError as exc:
            raise ExpressionError(
                str(exc),
                expression=repr(value),
                step_id=self.step_id,
                field=field_path(self.field, path),
            ) from exc

    def render(
        self,
        context: Mapping[str, Any],
        *,
        skip_roots: frozenset[str] = frozenset(),
        evaluator: Evaluator | None = None,
    ) -> Any:
        """A new JSON value; strings reading any of `skip_roots` are left as written.
        `evaluator` evaluates each expression (None: in process, unbounded)."""
        return _render(self._tree, context, skip_roots, evaluator)

    def deferred_paths(self, roots: frozenset[str]) -> tuple[tuple[PathPart, ...], ...]:
        """Paths of the strings `render(skip_roots=roots)` leaves as written (for `render_at`)."""
        return tuple(s.path for s in self.strings if not s.roots.isdisjoint(roots))

    def __repr__(self) -> str:
        return f"Template({self.value!r})"


def _render(
    node: Any,
    context: Mapping[str, Any],
    skip_roots: frozenset[str],
    evaluator: Evaluator | None,
) -> Any:
    if isinstance(node, TemplateString):
        return node.render(context, skip_roots, evaluator)
    if isinstance(node, dict):
        return {k: _render(v, context, skip_roots, evaluator) for k, v in node.items()}
    if isinstance(node, list):
        return [_render(v, context, skip_roots, evaluator) for v in node]
    return node


def compile_template(
    value: Any, *, step_id: str | None = None, field: str | None = None
) -> Template:
    """Compile every `${{ }}` in `value`; errors name the field path (`with.json.items[2]`)."""
    return Template(value, step_id=step_id, field=field)


def render_at(
    value: Any,
    paths: Iterable[tuple[PathPart, ...]],
    context: Mapping[str, Any],
    *,
    step_id: str | None = None,
    field: str | None = None,
) -> Any:
    """A copy of `value` with only the strings at `paths` (`Template.deferred_paths`) rendered.

    This is how a worker resolves `${{ secrets.X }}`: only strings the definition wrote are
    rendered, never text that came from input or step outputs, so data cannot read secrets.
    """
    for path in paths:
        value = _replace(value, path, context, step_id, field_path(field, path))
    return value


def _replace(
    node: Any,
    path: tuple[PathPart, ...],
    context: Mapping[str, Any],
    step_id: str | None,
    field: str | None,
) -> Any:
    if not path:
        if not isinstance(node, str):
            raise ExpressionError(
                f"expected a template string, found a {type(node).__name__}",
                expression=repr(node),
                step_id=step_id,
                field=field,
            )
        return compile_template(node, step_id=step_id, field=field).render(context)
    head, rest = path[0], path[1:]
    if isinstance(node, dict):
        return {**node, head: _replace(node[head], rest, context, step_id, field)}
    if isinstance(node, list) and isinstance(head, int):
        return [
            *node[:head],
            _replace(node[head], rest, context, step_id, field),
            *node[head + 1 :],
        ]
    raise ExpressionError(
        f"no value at {head!r}", expression=repr(node), step_id=step_id, field=field
    )
