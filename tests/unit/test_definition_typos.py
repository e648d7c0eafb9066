"""Typos caught when a definition is applied: unknown fields at any depth get "did you
mean", and a step reading a step that is not upstream of it is refused naming depends_on."""

from __future__ import annotations

from typing import Any

import pytest

from flowforge_orchestrator.core.definition.parse import parse_definition
from flowforge_orchestrator.errors import DefinitionError


def _problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(DefinitionError) as caught:
        parse_definition(data, source="wf.yaml")
    return [str(p) for p in caught.value.problems]


def _http(step_id: str, *deps: str, **extra: Any) -> dict[str, Any]:
    return (
        {"id": step_id, "type": "http", "with": {"url": "https://x.test/"}}
        | ({"depends_on": list(deps)} if deps else {})
        | extra
    )


def test_unknown_fields_of_nested_objects_get_did_you_mean() -> None:
    problems = _problems(
        {
            "name": "wf",
            "version": 1,
            "defaults": {"retry": {"max_retry": 3}},
            "steps": [_http("a", retry={"max_retries": 2, "backof_factor": 2.0})],
        }
    )
    assert problems == [
        "file wf.yaml, field 'defaults.retry.max_retry': unknown field; "
        "did you mean 'max_retries'?",
        "file wf.yaml, step 'a', field 'retry.backof_factor': unknown field; "
        "did you mean 'backoff_factor'?",
    ]


def test_a_step_reading_a_step_it_does_not_depend_on_is_refused_naming_depends_on() -> None:
    reads_a = {"url": "https://x.test/${{ steps.a.output.id }}"}
    problems = _problems(
        {"name": "wf", "version": 1, "steps": [_http("a"), {**_http("b"), "with": reads_a}]}
    )
    assert len(problems) == 1
    assert "step 'b', field 'with'" in problems[0]
    assert "reads steps.a" in problems[0] and "add 'a' to depends_on" in problems[0]


def test_reads_of_upstream_steps_are_accepted_at_any_depth() -> None:
    reads = {"url": "https://x.test/${{ steps.a.output.id }}/${{ steps.inner.output }}"}
    parse_definition(
        {
            "name": "wf",
            "version": 1,
            "steps": [
                _http("a"),
                {
                    "id": "route",
                    "type": "condition",
                    "depends_on": ["a"],
                    "if": "steps.a.output.ok",
                    "then": [_http("inner")],
                    "else": [],
                },
                # Transitively upstream (a), and nested in an upstream step (inner).
                {**_http("c", "route"), "with": reads},
            ],
        }
    )


def test_a_condition_reading_a_sibling_it_does_not_wait_for_is_refused() -> None:
    problems = _problems(
        {
            "name": "wf",
            "version": 1,
            "steps": [
                _http("a"),
                {
                    "id": "route",
                    "type": "condition",
                    "if": "steps.a.output.ok",
                    "then": [_http("x")],
                },
            ],
        }
    )
    assert any("step 'route', field 'if'" in p and "add 'a' to depends_on" in p for p in problems)
