"""What PostgreSQL's JSONB can hold, checked before a value is written.

JSONB refuses two things that Python's JSON accepts: the NUL character (`\\u0000`) in any
string or key, and lone UTF-16 surrogates (`\\ud800`), which cannot even be encoded as
UTF-8. One such value in a batch statement would fail the statement for every run in it,
so values that come from outside (inputs, step outputs, expression results, error
messages) are checked here first: an output is refused with a clear error, a message is
mended with `storable`.

Nesting is bounded too: the JSON decoders on the way back (asyncpg's codec, the CEL
evaluator) recurse once per level, and a value nested thousands deep would crash them.

Pure: no I/O.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = [
    "MAX_DEPTH",
    "depth_problem",
    "storable",
    "text_depth_problem",
    "text_problem",
    "value_problem",
]

MAX_DEPTH = 64
"""Deepest nesting of lists and objects accepted in inputs and outputs."""

# A JSON text holds a NUL as the escape `\u0000`; an escaped backslash before it (`\\u0000`)
# is the six characters `\u0000`, which is fine.
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
_SURROGATE = re.compile("[\ud800-\udfff]")
_NUL = "\x00"


def text_problem(text: str) -> str | None:
    """Why this JSON text cannot be stored as JSONB, or None if it can."""
    if "\\u0000" in text and _NUL_ESCAPE.search(text):
        return "it holds a NUL character (\\u0000), which PostgreSQL cannot store"
    if _NUL in text:
        return "it holds a NUL character (\\u0000), which PostgreSQL cannot store"
    if _SURROGATE.search(text):
        return "it holds an unpaired UTF-16 surrogate, which is not valid Unicode"
    return None


def depth_problem(value: Any, limit: int = MAX_DEPTH) -> str | None:
    """Why this value is nested too deeply, or None. Iterative: any depth is safe to test."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if depth > limit:
            return f"it is nested more than {limit} levels deep"
        stack.extend((child, depth + 1) for child in children)
    return None


def text_depth_problem(text: str, value: Any, limit: int = MAX_DEPTH) -> str | None:
    """`depth_problem` of `value`, whose JSON text is `text`: a text with fewer brackets
    than the limit cannot be too deep, and is not walked (the common case costs a count)."""
    if text.count("[") + text.count("{") <= limit:
        return None
    return depth_problem(value, limit)


def value_problem(value: Any, limit: int = MAX_DEPTH) -> str | None:
    """Why this JSON value cannot be stored (NUL, surrogate, nesting), or None."""
    problem = depth_problem(value, limit)
    if problem is not None:
        return problem
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _NUL in item:
                return "it holds a NUL character (\\u0000), which PostgreSQL cannot store"
            if _SURROGATE.search(item):
                return "it holds an unpaired UTF-16 surrogate, which is not valid Unicode"
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return None


def storable(value: Any) -> Any:
    """A copy of `value` with NUL characters and lone surrogates replaced by U+FFFD, for
    messages and error details that must be kept whatever they quote."""
    if isinstance(value, str):
        if _NUL in value or _SURROGATE.search(value):
            return _SURROGATE.sub("\ufffd", value.replace(_NUL, "\ufffd"))
        return value
    if isinstance(value, dict):
        return {storable(k): storable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [storable(v) for v in value]
    return value
