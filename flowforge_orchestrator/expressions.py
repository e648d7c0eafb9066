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

CEL, not Python `eval`: typed, side-effect free, always terminating. Evaluation hands CEL only
the variables an expression names (and, for `steps.<id>` reads, only those steps), so a big
run context is not converted for every expression.

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
from typing import Any

import cel

from flowforge_orchestrator.errors import ExpressionError

__all__ = [
    "Expression",
    "PathPart",
    "Template",
    "TemplateString",
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
_STEPS_NAME = re.compile(r"(?<![\w.])steps\b")
_STEPS_FIELD = re.compile(r"(?<![\w.])steps\s*\.\s*([A-Za-z_]\w*)")


def build_context(
    input: Any,
    steps: Mapping[str, Mapping[str, Any]],
    run: Mapping[str, Any],
    *,
    item: Any = _UNSET,
    index: int | None = None,
) -> dict[str, Any]:
    """The evaluation context; pass `item`/`index` when evaluating inside a for_each step.
    `steps` is kept as given (the graph passes a lazy view: an expression reads only the
    steps it names)."""
    context: dict[str, Any] = {"input": input, "steps": steps, "run": run}
    if item is not _UNSET:
        context["item"] = item
        context["index"] = index
    return context


class Expression:
    """One compiled CEL expression and where it comes from (for error messages)."""

    __slots__ = ("_names", "_program", "field", "roots", "source", "step_id", "step_refs")

    def __init__(self, source: str, *, step_id: str | None = None, field: str | None = None):
        self.source = source
        self.step_id = step_id
        self.field = field
        self._program, self._names, self.roots, self.step_refs = _compile(source)

    def evaluate(self, context: Mapping[str, Any]) -> Any:
        """The raw CEL result (timestamps stay `datetime`); any failure is an ExpressionError."""
        variables = {name: context[name] for name in self._names if name in context}
        steps = variables.get("steps")
        if isinstance(steps, Mapping):
            # Only the steps the expression names (all of them when it reads `steps`
            # dynamically), as a plain dict: CEL reads dicts, not lazy views.
            if self.step_refs is not None:
                variables["steps"] = {ref: steps[ref] for ref in self.step_refs if ref in steps}
            elif not isinstance(steps, dict):
                variables["steps"] = dict(steps)
        try:
            return self._program.execute(variables)
        except KeyError as exc:
            raise self.error(f"no such key: {exc.args[0] if exc.args else exc}") from exc
        except Exception as exc:  # CEL raises TypeError, RuntimeError, ValueError, ...
            raise self.error(str(exc) or type(exc).__name__) from exc

    def error(self, message: str) -> ExpressionError:
        """An ExpressionError about this expression (its source, step and field)."""
        return ExpressionError(
            message, expression=self.source, step_id=self.step_id, field=self.field
        )

    def __repr__(self) -> str:
        return f"Expression({self.source!r})"


@functools.lru_cache(maxsize=4096)
def _compile(source: str) -> tuple[Any, tuple[str, ...], frozenset[str], frozenset[str] | None]:
    """(program, variables to pass, roots, static step refs or None if `steps` is dynamic)."""
    program = cel.compile(source)
    names = tuple(program.variables())
    code = _STRING_LITERAL.sub("''", source)
    bound = set(_BOUND_ONE.findall(code))
    bound.update(name for pair in _BOUND_TWO.findall(code) for name in pair)
    roots = frozenset(names) - bound - _BUILTIN_NAMES
    refs = _STEPS_FIELD.findall(code)
    static = len(refs) == len(_STEPS_NAME.findall(code))
    return program, names, roots, frozenset(refs) if static else None


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
    try:
        return Expression(source, step_id=step_id, field=field)
    except ValueError as exc:
        message = str(exc)
        prefix = f"Failed to parse expression '{source}': "
        message = message.removeprefix(prefix)
        message = re.sub(r"ERROR: <input>:(\d+):(\d+): ", r"line \1, column \2: ", message)
        raise ExpressionError(message, expression=source, step_id=step_id, field=field) from exc


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

    def render(self, context: Mapping[str, Any], skip_roots: frozenset[str]) -> Any:
        if skip_roots and not self.roots.isdisjoint(skip_roots):
            return self.text
        if len(self.parts) == 1 and isinstance(self.parts[0], Expression):
            return self._json(self.parts[0], self.parts[0].evaluate(context))
        out = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
            else:
                value = part.evaluate(context)
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
        self, context: Mapping[str, Any], *, skip_roots: frozenset[str] = frozenset()
    ) -> Any:
        """A new JSON value; strings reading any of `skip_roots` are left as written."""
        return _render(self._tree, context, skip_roots)

    def deferred_paths(self, roots: frozenset[str]) -> tuple[tuple[PathPart, ...], ...]:
        """Paths of the strings `render(skip_roots=roots)` leaves as written (for `render_at`)."""
        return tuple(s.path for s in self.strings if not s.roots.isdisjoint(roots))

    def __repr__(self) -> str:
        return f"Template({self.value!r})"


def _render(node: Any, context: Mapping[str, Any], skip_roots: frozenset[str]) -> Any:
    if isinstance(node, TemplateString):
        return node.render(context, skip_roots)
    if isinstance(node, dict):
        return {k: _render(v, context, skip_roots) for k, v in node.items()}
    if isinstance(node, list):
        return [_render(v, context, skip_roots) for v in node]
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
