"""CEL's own error messages, said in FlowForge's words with the types of the values read.

The evaluator's messages name its internals ("No such overload", "Undefined variable or
function: 'size'" for `size(null)`, Rust type names like `float`); a person writing a
definition needs to know which operation failed on which types, and what to write instead.
Pure: a message and the expression's variables in, one line out.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = ["cel_message", "type_name"]

# Functions CEL has: "undefined" for one of these means the arguments did not fit.
_BUILTINS = frozenset(
    {"size", "int", "uint", "double", "string", "bytes", "bool", "has", "matches"}
    | {"contains", "startsWith", "endsWith", "timestamp", "duration", "exists", "all"}
    | {"exists_one", "map", "filter", "max", "min", "type", "dyn"}
)
_TYPES = {"float": "double", "str": "string", "NoneType": "null", "dict": "map"}
_MAX_VALUES = 6
_CONVERT = "CEL converts nothing by itself: write int(x), double(x) or string(x)"

_UNDEFINED = re.compile(r"Undefined variable or function: '([^']+)'")
_UNSUPPORTED = re.compile(r"Unsupported operation: (\w+) (\S+) (\w+)")
_FUNCTION = re.compile(r"Function '([^']+)' error: ([^.]*)")


def type_name(value: Any) -> str:
    """The CEL name of a Python value's type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, list | tuple):
        return f"list of {len(value)}"
    name = type(value).__name__
    return _TYPES.get(name, name)


def _values(variables: Mapping[str, Any]) -> list[str]:
    """`path: type` of each value read (the variables are pruned to what it selects)."""
    found: list[str] = []
    todo: list[tuple[str, Any]] = sorted(variables.items(), reverse=True)
    while todo and len(found) < _MAX_VALUES:
        path, value = todo.pop()
        if isinstance(value, Mapping) and value:
            todo.extend(sorted(((f"{path}.{k}", v) for k, v in value.items()), reverse=True))
        else:
            found.append(f"{path} is {type_name(value) if value != {} else 'an empty map'}")
    return found


def _rewrite(raw: str) -> str:
    undefined = _UNDEFINED.search(raw)
    if undefined:
        name = undefined.group(1)
        if name in _BUILTINS:
            return f"{name}() cannot take the value it was given"
        return f"unknown function or variable '{name}'"
    unsupported = _UNSUPPORTED.search(raw)
    if unsupported:
        left, op, right = unsupported.groups()
        return f"cannot apply {op} to {_TYPES.get(left, left)} and {_TYPES.get(right, right)}"
    if raw.startswith("No such overload"):
        return "the operation or function is not defined for the types of its operands"
    function = _FUNCTION.search(raw)
    if function:
        return f"{function.group(1)}() failed: {function.group(2).strip()}"
    if raw.startswith("division by zero"):
        return "division by zero"
    return raw


def cel_message(raw: str, variables: Mapping[str, Any]) -> str:
    """One line for a failed evaluation: what failed, how to write it, the types read."""
    message = _rewrite(raw)
    if message != raw and ("cannot apply" in message or "not defined for" in message):
        message += f" ({_CONVERT})"
    values = _values(variables)
    return f"{message}; values read: {', '.join(values)}" if values else message
