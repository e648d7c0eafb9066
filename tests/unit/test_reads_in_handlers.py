"""What catch handlers and compensations may read: the step they handle has ended before
any of their steps starts, so reading it is no typo; a step that may still be running is."""

from __future__ import annotations

import pytest
import yaml

from flowforge_orchestrator.core.definition.parse import parse_definition
from flowforge_orchestrator.errors import DefinitionError

SAGA = """
name: saga
version: 1
steps:
  - {id: other, type: http, with: {url: "https://svc.test/other"}}
  - id: charge
    type: http
    with: {url: "https://svc.test/charge"}
    compensate:
      - id: refund
        type: http
        with: {url: "https://svc.test/refund/${{ steps.charge.output.body.id }}"}
    catch:
      - steps:
          - id: note
            type: transform
            output: "${{ string(steps.charge.status) + error.message }}"
"""


def test_a_compensation_and_a_handler_may_read_the_step_they_handle() -> None:
    parse_definition(yaml.safe_load(SAGA), source="saga")


def test_they_may_not_read_a_step_that_may_still_be_running() -> None:
    text = SAGA.replace("steps.charge.output.body.id", "steps.other.output.body.id")
    with pytest.raises(DefinitionError, match=r"step 'refund', field 'with': reads steps.other"):
        parse_definition(yaml.safe_load(text), source="saga")
