"""http steps' URLs from definition to dispatch: validation refuses a URL whose host a value
could choose, the graph dispatches every value encoded, and a bad value fails only its run."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import pytest

from flowforge_orchestrator.core.definition.parse import parse_definition
from flowforge_orchestrator.core.graph.run import CompiledWorkflow, RunState
from flowforge_orchestrator.core.records import Dispatch, Limits, RunChanges
from flowforge_orchestrator.core.state import RunStatus
from flowforge_orchestrator.errors import DefinitionError

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
LIMITS = Limits(max_output_bytes=10_000, max_context_bytes=100_000, default_timeout=30.0)


def definition(*params: dict[str, Any]) -> dict[str, Any]:
    steps = [{"id": f"s{i}", "type": "http", "with": p} for i, p in enumerate(params)]
    return {"name": "wf", "version": 1, "steps": steps}


def dispatch(params: dict[str, Any], input: Any, run: int = 1) -> tuple[RunChanges, RunState]:
    state = RunState(
        run_id=UUID(int=run),
        workflow=CompiledWorkflow(parse_definition(definition(params))),
        version=1,
        input=input,
        limits=LIMITS,
    )
    state.start(T0)
    changes = state.take_changes()
    assert changes is not None
    return changes, state


def only_dispatch(changes: RunChanges) -> Dispatch:
    [sent] = changes.dispatches
    return sent


def test_validation_names_the_step_and_field_of_a_url_a_value_could_take_over() -> None:
    bad = definition(
        {"url": "https://ok.test/${{ input.p }}"},
        {"url": "http://127.0.0.1:8080${{ input.p }}"},
        {"url": "https://${{ input.host }}/x"},
    )
    with pytest.raises(DefinitionError) as info:
        parse_definition(bad, source="wf.yaml")
    found = info.value.problems
    assert [(p.source, p.step_id, p.field) for p in found] == [
        ("wf.yaml", "s1", "with.url"),
        ("wf.yaml", "s2", "with.url"),
    ]
    assert all("scheme and host" in p.message for p in found)
    assert "step 's1', field 'with.url'" in str(info.value)


def test_the_demo_base_url_form_validates() -> None:
    parse_definition(definition({"url": "${{ input.base_url }}/orders/${{ input.order_id }}"}))


def test_dispatched_url_has_each_value_encoded_and_the_rest_of_with_rendered() -> None:
    params = {
        "method": "POST",
        "url": "https://api.test/users/${{ input.p }}/profile?tag=${{ input.tag }}",
        "json": {"p": "${{ input.p }}"},
        "headers": {"X-Tag": "${{ input.tag }}"},
    }
    changes, _ = dispatch(params, {"p": "../../admin/delete?all=1#", "tag": "a&b=c"})
    sent = only_dispatch(changes).params
    assert sent == {
        "method": "POST",
        "url": "https://api.test/users/..%2F..%2Fadmin%2Fdelete%3Fall%3D1%23/profile?tag=a%26b%3Dc",
        "json": {"p": "../../admin/delete?all=1#"},  # only the URL is encoded
        "headers": {"X-Tag": "a&b=c"},
    }


def test_a_url_reading_secrets_is_left_to_the_worker() -> None:
    changes, _ = dispatch({"url": "https://api.test/x?key=${{ secrets.KEY }}"}, {})
    sent = only_dispatch(changes)
    assert sent.params == {"url": "https://api.test/x?key=${{ secrets.KEY }}"}
    assert sent.secret_paths == [["url"]]


def test_a_dot_segment_value_fails_its_step_with_an_expression_error() -> None:
    params = {"url": "https://api.test/files/${{ input.name }}"}
    changes, state = dispatch(params, {"name": ".."}, run=1)
    assert changes.dispatches == []
    assert state.status is RunStatus.FAILED
    assert changes.error is not None
    assert changes.error["category"] == "expression_error"
    assert changes.error["retryable"] is False
    assert changes.error["details"] == {"expression": "input.name", "field": "with.url"}
    # The same definition with a good value dispatches.
    good, _ = dispatch(params, {"name": "report.pdf"}, run=2)
    assert only_dispatch(good).params["url"] == "https://api.test/files/report.pdf"


def test_a_base_that_is_not_a_url_fails_its_step_without_showing_the_value() -> None:
    params = {"url": "${{ input.base }}/orders/1"}
    changes, state = dispatch(params, {"base": "not-a-url-S3CR3T"})
    assert state.status is RunStatus.FAILED and changes.error is not None
    assert changes.error["category"] == "expression_error"
    assert "absolute http:// or https:// URL" in changes.error["message"]
    assert "S3CR3T" not in repr(changes.error)
