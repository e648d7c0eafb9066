"""Concurrency limits: the keys a run must hold while it runs, each with its limit.

Pure: the store takes the slots (sql/0003_concurrency.sql). A key is a string, so runs of
different workflows share a limit when they compute the same key:

* `workflow:<name>` for `max_concurrency` (all versions of a workflow share it);
* `key:<JSON of the value>` for `concurrency: {key, limit}`, the value of the CEL expression
  over `input` and `run` (JSON with sorted object keys, so equal values give equal keys; a
  string and a number stay apart: `key:"42"` is not `key:42`). A key that evaluates to null
  puts no keyed limit on that run. A key longer than MAX_KEY_CHARS keeps a readable prefix
  and adds the SHA-256 of the whole text: `key:"cust...#<64 hex digits>` (the slots' btree
  index refuses entries over 2704 bytes; equal values still give equal keys, and no short
  key can look like a long one, since compact JSON never ends in `#` and hex digits).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any
from uuid import UUID

from flowforge_orchestrator.core.definition.models import WorkflowDefinition
from flowforge_orchestrator.core.expressions.templates import Evaluator, to_json_value

__all__ = ["MAX_KEY_CHARS", "concurrency_keys", "key_of_value", "workflow_key"]

MAX_KEY_CHARS = 200
"""Longest key kept as written; longer ones are a prefix and a hash (~200 characters)."""
_PREFIX_CHARS = 120


def workflow_key(name: str) -> str:
    """The key of a workflow's `max_concurrency`."""
    return f"workflow:{name}"


def key_of_value(value: Any) -> str:
    """The key of a `concurrency.key` value (ValueError for what JSON cannot hold)."""
    try:
        value = to_json_value(value)
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        text.encode()
    except RecursionError:
        raise ValueError("it is nested too deeply") from None
    except UnicodeEncodeError:  # a lone surrogate: PostgreSQL text cannot hold it raw
        text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    key = f"key:{text}"
    if len(key) <= MAX_KEY_CHARS:
        return key
    digest = hashlib.sha256(text.encode()).hexdigest()
    return f"key:{text[:_PREFIX_CHARS]}...#{digest}"


def concurrency_keys(
    definition: WorkflowDefinition,
    *,
    run_id: UUID,
    version: int,
    input: Any,
    evaluator: Evaluator | None = None,
) -> dict[str, int]:
    """The keys a run of `definition` needs, with their limits (empty: no limit).

    Raises ExpressionError, naming `concurrency.key` and the expression, when the key cannot
    be evaluated (within the evaluator's limits) or is not a JSON value.
    """
    keys: dict[str, int] = {}
    if definition.max_concurrency is not None:
        keys[workflow_key(definition.name)] = definition.max_concurrency
    expression = definition.compiled.concurrency_key
    if expression is None or definition.concurrency is None:
        return keys
    run = {"id": str(run_id), "workflow": definition.name, "version": version}
    value = expression.evaluate({"input": input, "run": run}, evaluator)
    if value is None:
        return keys
    try:
        key = key_of_value(value)
    except ValueError as exc:
        raise expression.error(f"the key is not a JSON value: {exc}") from exc
    keys[key] = definition.concurrency.limit
    return keys
