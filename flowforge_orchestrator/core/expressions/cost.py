"""What evaluating a CEL expression may cost, estimated before it runs (pure: no I/O).

CEL always terminates, but not always soon: its `map` and `filter` macros copy their
accumulator at every element (quadratic: about 30 ns x n^2, 1.3 s over 6,000 elements),
nesting them multiplies, and the evaluator holds the GIL and cannot be interrupted. So each
evaluation is routed by an estimate made of two halves:

* the **shape** of the expression, computed once at compile (`shape_of`): how deeply its
  comprehension macros nest, how many there are, which are quadratic, whether it calls a
  function outside the linear ones (`matches` compiles a regular expression from data), how
  much concatenation and how many literal elements its source holds;
* the **weight** of what it reads (`weigh`): JSON values counted (each costs a conversion
  into CEL, ~0.1-2 us), characters of text, the longest list or object (the range of a
  comprehension). The graph caches the weight of every step output, of the input and of
  each for_each item, so an ordinary evaluation walks nothing.

`route` then picks one of three paths: **inline** (in process: nothing that can grow, and
little to convert; every ordinary expression takes it), **sandbox** (a child process with a
hard deadline and a memory cap: `engine.sandbox`) or **refused** at once (even an
optimistic estimate is far past the time budget).

The estimates are deliberately lopsided: the inline test uses upper bounds (a wrong "inline"
would block the event loop), the refusal uses lower bounds (a wrong "refused" would fail a
good run); everything in between pays a sandbox round trip and is bounded by its deadline.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

__all__ = [
    "INLINE_BYTES",
    "INLINE_NODES",
    "INLINE_UNITS",
    "MAX_VALUE_DEPTH",
    "REFUSE_FACTOR",
    "Budget",
    "Route",
    "Shape",
    "Verdict",
    "Weight",
    "bytes_text",
    "inline_ok",
    "route",
    "shape_of",
    "weigh",
]

INLINE_NODES = 2_000
"""Most JSON values an inline evaluation may convert into CEL (~2 us each at worst)."""
INLINE_UNITS = 20_000
"""Most comprehension steps (each ~30-120 ns) an inline evaluation may take: ~2 ms."""
INLINE_BYTES = 4 * 1024 * 1024
"""Most memory an inline evaluation may build, by the upper estimate."""
REFUSE_FACTOR = 20
"""Refused at once when even the optimistic estimate is this many times the timeout."""
MAX_VALUE_DEPTH = 128
"""Deepest nesting of a value handed to CEL. What the engine stores is at most 64 deep
(jsonb.MAX_DEPTH; `steps` adds two levels of its own); CEL's conversion recurses once per
level and crashes the process somewhere past 5,000."""

# Optimistic costs, measured on common-expression-language 0.10 (see README, "Expression
# limits"): a quadratic macro step (map, filter) ~30-110 ns, an element of a linear one
# (exists_one; all/exists stop early, so they promise nothing) ~0.3-1.3 us.
_QUADRATIC_SECONDS = 30e-9
_LINEAR_SECONDS = 300e-9
# Bytes a value takes beyond its text, as an upper estimate (CEL values, Python objects).
_NODE_BYTES = 64

# Macros that iterate: quadratic ones build a list; all/exists may stop at the first element.
_QUADRATIC = frozenset({"map", "filter", "transformList", "transformMap", "transformMapEntry"})
_SHORT_CIRCUIT = frozenset({"all", "exists"})
_LINEAR = frozenset({"exists_one", "existsOne", "sortBy"})
_MACRO_CALL = re.compile(
    r"\.\s*(" + "|".join(sorted(_QUADRATIC | _SHORT_CIRCUIT | _LINEAR)) + r")\s*\(\s*$"
)
_BIND = re.compile(r"\bcel\s*\.\s*bind\s*\(\s*$")

# Functions and operators whose cost is linear in their operands (program.functions()).
# Anything else (`matches`: a regular expression compiled from data; an extension added
# later) goes to the sandbox.
LINEAR_FUNCTIONS = frozenset(
    {
        "_+_", "_-_", "_*_", "_/_", "_%_", "-_", "!_",
        "_==_", "_!=_", "_<_", "_<=_", "_>_", "_>=_",
        "_&&_", "_||_", "_?_:_", "_[_]", "@in", "@not_strictly_false",
        "size", "contains", "startsWith", "endsWith",
        "int", "uint", "double", "string", "bytes", "bool", "dyn", "type",
        "timestamp", "duration", "has",
        "getFullYear", "getMonth", "getDate", "getDayOfMonth", "getDayOfWeek",
        "getDayOfYear", "getHours", "getMinutes", "getSeconds", "getMilliseconds",
    }
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Shape:
    """What the source of an expression says about its cost, whatever it reads."""

    depth: int = 0  # deepest nesting of comprehension macros (0: none)
    comprehensions: int = 0
    # (exponent, seconds per unit) per comprehension: it takes at least seconds x n^exponent
    # over a range of n elements (exponent counts the enclosing macros that visit them all).
    lower_terms: tuple[tuple[int, float], ...] = ()
    other_calls: frozenset[str] = frozenset()  # functions outside LINEAR_FUNCTIONS
    concatenations: int = 0  # `+` in the source: how often a value may be doubled
    literal_width: int = 0  # elements of the longest list or map literal
    literal_items: int = 0  # elements of every literal together

    @property
    def simple(self) -> bool:
        """No comprehension and only linear functions: its cost is its variables'."""
        return not self.comprehensions and not self.other_calls


@dataclass(frozen=True, slots=True)
class Weight:
    """How much a value holds: JSON values, characters of text, its longest list or object,
    its nesting. `nodes` over a weighing's cap means "more than the cap" (and `widest` and
    `depth` are then lower bounds)."""

    nodes: int = 0
    chars: int = 0
    widest: int = 0
    depth: int = 0

    def __add__(self, other: Weight) -> Weight:
        return Weight(
            self.nodes + other.nodes,
            self.chars + other.chars,
            max(self.widest, other.widest),
            max(self.depth, other.depth),
        )

    @property
    def bytes(self) -> int:
        """An upper estimate of the memory the values take once converted."""
        return self.chars + _NODE_BYTES * self.nodes


@dataclass(frozen=True, slots=True)
class Budget:
    """The limits of one evaluation (from Settings: FLOWFORGE_EXPRESSION_TIMEOUT,
    FLOWFORGE_EXPRESSION_MEMORY_BYTES, FLOWFORGE_MAX_CONTEXT_BYTES)."""

    timeout: float = 0.1
    memory_bytes: int = 256 * 1024 * 1024
    max_result_bytes: int = 4 * 1024 * 1024


class Route(StrEnum):
    INLINE = "inline"
    SANDBOX = "sandbox"
    REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class Verdict:
    route: Route
    seconds: float = 0.0  # the optimistic estimate
    reason: str = ""  # why it is refused


def weigh(value: Any, cap: int | None = None) -> Weight:
    """The weight of a JSON-like value, walked iteratively (any depth is safe). With `cap`,
    stops after `cap + 1` values: the result then says "more than cap" and its `widest` is
    a lower bound."""
    nodes = chars = widest = deepest = 0
    stack = [(value, 0)]
    limit = cap + 1 if cap is not None else -1
    while stack:
        item, depth = stack.pop()
        nodes += 1
        if nodes == limit:
            break
        if isinstance(item, str):
            chars += len(item)
        elif isinstance(item, dict):
            widest, deepest = max(widest, len(item)), max(deepest, depth + 1)
            for key in item:
                chars += len(key) if isinstance(key, str) else 8
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list | tuple):
            widest, deepest = max(widest, len(item)), max(deepest, depth + 1)
            stack.extend((child, depth + 1) for child in item)
        elif isinstance(item, bytes):
            chars += len(item)
    return Weight(nodes, chars, widest, deepest)


def shape_of(code: str, functions: Iterable[str]) -> Shape:
    """The shape of an expression: `code` is its source with string literals emptied (a
    bracket or a `.map(` inside a string means nothing), `functions` what CEL says it calls
    (`program.functions()`, which does not list the macros: the source does)."""
    # Each open bracket: its character, the macro it opens (or None), commas inside it.
    stack: list[list[Any]] = []
    terms: list[tuple[int, float]] = []
    depth = count = widest = items = 0
    for position, char in enumerate(code):
        if char in "([{":
            macro = None
            if char == "(":
                head = code[max(0, position - 40) : position + 1]
                found = _MACRO_CALL.search(head)
                macro = found.group(1) if found else ("bind" if _BIND.search(head) else None)
            stack.append([char, macro, 0])
            if macro is not None:
                level = 1 + sum(1 for entry in stack[:-1] if entry[1] is not None)
                visits_all = sum(
                    1 for entry in stack[:-1] if entry[1] not in (None, *_SHORT_CIRCUIT)
                )
                depth, count = max(depth, level), count + 1
                if macro in _QUADRATIC or macro == "bind":
                    terms.append((visits_all + 2, _QUADRATIC_SECONDS))
                elif macro not in _SHORT_CIRCUIT:
                    terms.append((visits_all + 1, _LINEAR_SECONDS))
        elif char == "," and stack:
            stack[-1][2] += 1
        elif char in ")]}" and stack:
            opener, _, commas = stack.pop()
            if opener in "[{":
                inner = commas + 1
                widest, items = max(widest, inner), items + inner
    return Shape(
        depth=depth,
        comprehensions=count,
        lower_terms=tuple(terms),
        other_calls=frozenset(functions) - LINEAR_FUNCTIONS,
        concatenations=code.count("+"),
        literal_width=widest,
        literal_items=items,
    )


def inline_ok(shape: Shape, weight: Weight) -> bool:
    """Whether an upper estimate keeps this evaluation small enough to run in process."""
    if shape.other_calls or weight.depth > MAX_VALUE_DEPTH:
        return False
    nodes = weight.nodes + shape.literal_items
    if nodes > INLINE_NODES:
        return False
    grow = 1 + shape.concatenations  # each `+` may add another copy of the largest value
    size = (weight.bytes + _NODE_BYTES * shape.literal_items) * grow
    if not shape.comprehensions:
        return size <= INLINE_BYTES
    span = nodes * grow  # no range is longer than every value read, concatenated
    reach = int(span**shape.depth)  # iterations of the innermost body
    return shape.comprehensions * reach * span <= INLINE_UNITS and size * reach <= INLINE_BYTES


def route(shape: Shape, weight: Weight, budget: Budget) -> Verdict:
    """Inline, sandbox or refused, for an expression of this shape over values this heavy
    (`weight` of the values actually passed: exact, or capped with a lower-bound `widest`)."""
    if inline_ok(shape, weight):
        return Verdict(Route.INLINE)
    if weight.depth > MAX_VALUE_DEPTH:
        reason = (
            f"refused before evaluation: a value it reads is nested more than "
            f"{MAX_VALUE_DEPTH} levels deep"
        )
        return Verdict(Route.REFUSED, reason=reason)
    span = max(weight.widest, shape.literal_width)
    seconds = max((unit * float(span) ** power for power, unit in shape.lower_terms), default=0.0)
    if seconds > REFUSE_FACTOR * budget.timeout:
        reason = (
            f"refused before evaluation: over a range of {span} elements it would run "
            f"at least {_duration_text(seconds)}, far past FLOWFORGE_EXPRESSION_TIMEOUT "
            f"({_duration_text(budget.timeout)})"
        )
        return Verdict(Route.REFUSED, seconds, reason)
    return Verdict(Route.SANDBOX, seconds)


def timeout_text(budget: Budget) -> str:
    return (
        f"evaluation ran past FLOWFORGE_EXPRESSION_TIMEOUT ({_duration_text(budget.timeout)})"
        " and was stopped"
    )


def memory_text(budget: Budget) -> str:
    return (
        f"evaluation needed more than FLOWFORGE_EXPRESSION_MEMORY_BYTES "
        f"({bytes_text(budget.memory_bytes)}) and was stopped"
    )


def result_text(size: int, budget: Budget) -> str:
    return (
        f"result is {bytes_text(size)}, over the limit of "
        f"{bytes_text(budget.max_result_bytes)} (FLOWFORGE_MAX_CONTEXT_BYTES)"
    )


def bytes_text(size: int) -> str:
    """`9.1 MB`, `512 KB`, `100 bytes` (binary multiples, as the settings are)."""
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size} bytes"


def _duration_text(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.3g} ms"
    return f"{seconds:.3g} s"
