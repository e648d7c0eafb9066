"""The keys a run needs for its concurrency limits (pure)."""

from __future__ import annotations

import re
import uuid
from typing import Any

import pytest

from flowforge_orchestrator.core.concurrency import (
    MAX_KEY_CHARS,
    concurrency_keys,
    key_of_value,
    workflow_key,
)
from flowforge_orchestrator.core.definition.models import WorkflowDefinition
from flowforge_orchestrator.core.definition.parse import parse_definition
from flowforge_orchestrator.errors import ExpressionError

RUN = uuid.UUID("00000000-0000-4000-8000-000000000001")
STEPS = [{"id": "s", "type": "transform", "output": {}}]


def _definition(**fields: Any) -> WorkflowDefinition:
    return parse_definition({"name": "orders", "version": 3, "steps": STEPS, **fields})


def _keys(definition: WorkflowDefinition, input: Any) -> dict[str, int]:
    return concurrency_keys(definition, run_id=RUN, version=3, input=input)


def test_no_limit_needs_no_key() -> None:
    assert _keys(_definition(), {"customer": 1}) == {}


def test_max_concurrency_is_the_workflow_key() -> None:
    assert _keys(_definition(max_concurrency=5), {}) == {"workflow:orders": 5}
    assert workflow_key("orders") == "workflow:orders"


def test_a_concurrency_key_is_its_value_as_json_with_its_limit() -> None:
    definition = _definition(max_concurrency=5, concurrency={"key": "input.customer", "limit": 2})
    assert _keys(definition, {"customer": "c-42"}) == {"workflow:orders": 5, 'key:"c-42"': 2}
    assert _keys(definition, {"customer": 42}) == {"workflow:orders": 5, "key:42": 2}


def test_equal_values_give_equal_keys_whatever_their_order() -> None:
    assert key_of_value({"b": 1, "a": [1, "x"]}) == key_of_value({"a": [1, "x"], "b": 1})
    assert key_of_value({"a": 1}) == 'key:{"a":1}'
    assert key_of_value("42") != key_of_value(42)


def test_the_key_sees_run_and_input() -> None:
    definition = _definition(
        concurrency={"key": "run.workflow + ':' + string(input.region)", "limit": 1}
    )
    assert _keys(definition, {"region": 7}) == {'key:"orders:7"': 1}


def test_a_null_key_puts_no_keyed_limit() -> None:
    definition = _definition(
        concurrency={"key": "has(input.customer) ? input.customer : null", "limit": 1}
    )
    assert _keys(definition, {}) == {}
    assert _keys(definition, {"customer": 1}) == {"key:1": 1}


def test_a_key_that_fails_names_the_field_and_the_expression() -> None:
    definition = _definition(concurrency={"key": "input.customer", "limit": 1})
    with pytest.raises(ExpressionError) as caught:
        _keys(definition, {"order": 1})
    assert caught.value.field == "concurrency.key"
    assert "input.customer" in str(caught.value)
    assert "concurrency.key" in str(caught.value)


def test_a_long_key_is_a_readable_prefix_and_a_hash() -> None:
    customer = "c" * 3_000
    key = key_of_value(customer)
    assert len(key) <= MAX_KEY_CHARS
    assert key.startswith('key:"ccc')
    prefix, _, digest = key.partition("...#")
    assert len(prefix) == len('key:"') + 119
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert key == key_of_value("c" * 3_000)  # equal values, equal keys
    assert key != key_of_value("c" * 2_999 + "d")  # the same prefix, another value
    assert key_of_value("c" * 190) == 'key:"' + "c" * 190 + '"'  # short ones stay as written


def test_no_key_is_too_long_for_the_slots_index() -> None:
    for value in ("🦜" * 10_000, ["é" * 50] * 100, {"k" * 500: "v" * 500}):
        assert len(key_of_value(value).encode()) < 2704 // 4


def test_a_lone_surrogate_is_escaped_so_postgresql_can_store_the_key() -> None:
    key = key_of_value("a\ud800b")
    key.encode()  # no UnicodeEncodeError
    assert key == 'key:"a\\ud800b"'
    assert key_of_value("é") == 'key:"é"'


def test_a_key_nested_too_deeply_is_an_expression_error() -> None:
    definition = _definition(concurrency={"key": "input.v", "limit": 1})
    deep: Any = 1
    for _ in range(5_000):
        deep = [deep]
    with pytest.raises(ExpressionError, match="not a JSON value"):
        _keys(definition, {"v": deep})


def test_the_key_is_evaluated_by_the_evaluator_given() -> None:
    seen: list[str | None] = []

    class Recording:
        def evaluate(self, expression: Any, context: Any) -> Any:
            seen.append(expression.field)
            return expression.run(expression.variables(context))

    definition = _definition(concurrency={"key": "input.customer", "limit": 2})
    keys = concurrency_keys(
        definition, run_id=RUN, version=3, input={"customer": "x"}, evaluator=Recording()
    )
    assert keys == {'key:"x"': 2}
    assert seen == ["concurrency.key"]
