"""`type: wait` in definitions: its fields, its key expression, what validation refuses."""

from __future__ import annotations

import pytest
import yaml

from flowforge_orchestrator.core.definition.models import WaitStep
from flowforge_orchestrator.core.definition.parse import parse_definition
from flowforge_orchestrator.errors import DefinitionError


def _parse(steps: str) -> object:
    return parse_definition(yaml.safe_load(f"name: w\nversion: 1\nsteps:\n{steps}"), source="w")


def test_a_wait_step_names_its_event_and_may_compute_a_key_and_set_a_timeout() -> None:
    defn = parse_definition(
        yaml.safe_load(
            """
name: order
version: 1
steps:
  - {id: reserve, type: transform, output: "${{ input.order_id }}"}
  - id: paid
    type: wait
    depends_on: [reserve]
    event: payment.confirmed
    key: "'order-' + string(steps.reserve.output)"
    timeout: 2s
  - {id: approval, type: wait, event: approved}
"""
        ),
        source="order",
    )
    paid, approval = defn.steps[1], defn.steps[2]
    assert isinstance(paid, WaitStep) and isinstance(approval, WaitStep)
    assert (paid.event, paid.timeout, approval.key, approval.timeout) == (
        "payment.confirmed",
        2.0,
        None,
        None,
    )
    assert defn.compiled.expression("paid", "key") is not None


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ("  - {id: w, type: wait}", "event"),
        ("  - {id: w, type: wait, event: ''}", "event"),
        ("  - {id: w, type: wait, event: 'has space'}", "event"),
        ("  - {id: w, type: wait, event: e, with: {a: 1}}", "with"),
        ("  - {id: w, type: wait, event: e, key: 'steps.nope.output'}", "nope"),
        ("  - {id: w, type: wait, event: e, key: 'input.'}", "key"),
    ],
)
def test_validation_names_what_is_wrong_with_a_wait(step: str, message: str) -> None:
    with pytest.raises(DefinitionError) as caught:
        _parse(step)
    assert "w" in str(caught.value) and message in str(caught.value)


def test_a_wait_takes_the_fields_of_every_step_and_no_other() -> None:
    _parse("  - {id: w, type: wait, event: e, retry: {max_retries: 1}, continue_on_failure: true}")
    with pytest.raises(DefinitionError, match="step 'w', field 'bogus': unknown field"):
        _parse("  - {id: w, type: wait, event: e, bogus: 1}")
