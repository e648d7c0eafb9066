"""Validation of switch, fail, catch and compensate: each mistake named by step id and
field, with "did you mean" where a name is close; the JSON Schema knows the new fields."""

from __future__ import annotations

from typing import Any

import pytest

from flowforge_orchestrator.core.definition.models import definition_json_schema
from flowforge_orchestrator.core.definition.parse import parse_definition
from flowforge_orchestrator.errors import DefinitionError


def problems(*steps: dict[str, Any]) -> list[tuple[str | None, str | None, str]]:
    with pytest.raises(DefinitionError) as caught:
        parse_definition({"name": "wf", "version": 1, "steps": list(steps)})
    return [(p.step_id, p.field, p.message) for p in caught.value.problems]


def t(step_id: str, output: Any = 1, **extra: Any) -> dict[str, Any]:
    return {"id": step_id, "type": "transform", "output": output, **extra}


def test_a_switch_needs_a_case_and_boolean_cel_that_reads_what_exists() -> None:
    assert problems({"id": "s", "type": "switch", "cases": []}) == [
        ("s", "cases", "List should have at least 1 item after validation, not 0")
    ]
    found = problems(
        {
            "id": "s",
            "type": "switch",
            "cases": [
                {"when": "input.x ==", "steps": [t("a")]},
                {"when": "steps.nope.output", "steps": [t("b")]},
            ],
            "defualt": [],
        }
    )
    assert ("s", "defualt", "unknown field; did you mean 'default'?") in found
    assert any(f == "cases.0.when" and m.startswith("invalid expression") for _, f, m in found)
    assert ("s", "cases.1.when", "reads steps.nope, but no step has the id 'nope'") in found


def test_error_is_readable_only_in_handlers_and_compensations() -> None:
    assert problems(t("a", "${{ error.message }}")) == [
        ("a", "output", "'error' exists only in the steps of a catch handler or a compensation")
    ]
    ok = parse_definition(
        {
            "name": "wf",
            "version": 1,
            "steps": [
                t(
                    "a",
                    catch=[{"steps": [t("h", "${{ error.message }}")]}],
                    compensate=[t("u", "${{ error.category }} ${{ steps.a.output }}")],
                )
            ],
        }
    )
    assert ok.step("h").id == "h" and ok.step("u").id == "u"


def test_catch_categories_ids_and_compensations_are_checked() -> None:
    found = problems(
        t("a", catch=[{"errors": ["HTTP_500"], "steps": [t("a")]}, {"steps": []}]),
        {
            "id": "each",
            "type": "parallel",
            "for_each": "input.xs",
            "step": t("one", compensate=[t("undo_one")]),
        },
        t("b", compensate=[t("c", compensate=[t("d")])]),
        t("e", catch=[{"step": [t("f")]}]),
    )
    assert (
        "a",
        "id",
        "duplicate step id: ids are unique across the whole definition, nested steps included",
    ) in found
    assert any(f == "catch[0].errors[0]" and "http_NNN" in m for _, f, m in found)
    assert ("a", "catch[1].steps", "List should have at least 1 item after validation, not 0") in (
        found
    )
    assert any(s == "one" and f == "compensate" and "for_each" in m for s, f, m in found)
    assert (
        "b",
        "compensate",
        "step 'c' of this compensation has a compensation of its own; "
        "compensations are not compensated",
    ) in found
    assert any(s == "e" and f == "catch[0].step" for s, f, _ in found)


def test_fail_needs_a_message_and_its_templates_are_checked() -> None:
    found = problems(
        {"id": "f", "type": "fail", "error": {"category": "X"}},
        {"id": "g", "type": "fail", "error": {"message": "${{ steps.zz.output }}"}},
    )
    assert ("f", "error.message", "required field is missing") in found
    assert ("g", "error.message", "reads steps.zz, but no step has the id 'zz'") in found


def test_the_json_schema_describes_the_new_fields() -> None:
    defs = definition_json_schema()["$defs"]
    assert {"cases", "default"} <= set(defs["SwitchStep"]["properties"])
    assert "error" in defs["FailStep"]["properties"]
    assert {"catch", "compensate"} <= set(defs["TaskStep"]["properties"])
    assert {"errors", "steps"} <= set(defs["CatchHandler"]["properties"])
    assert "compensate_on" in definition_json_schema()["properties"]
