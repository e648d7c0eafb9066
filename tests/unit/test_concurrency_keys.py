"""The keys a run needs for its concurrency limits (pure)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from flowforge_orchestrator.concurrency import concurrency_keys, key_of_value, workflow_key
from flowforge_orchestrator.definitions import WorkflowDefinition, parse_definition
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
