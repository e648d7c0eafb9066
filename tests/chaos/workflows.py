"""The chaos run's workflows, what each run's input is, and what each must end with.

All four mix the engine's features so that a kill can land anywhere: sequential steps,
fork/join (fixed branches, `for_each`, join `all` and `any`), conditions, delays, retried
HTTP steps (`tracked_http` and the built-in `http`), a failure that is allowed
(`continue_on_failure`), and one workflow designed to fail.

Every worker step retries on `timeout` too: a killed worker's attempt, or one lost with
Redis, ends by its deadline and is tried again. `max_retries` is high enough that injected
503s alone do not exhaust it (0.15^9), so a run that fails is a finding, except for
`chaos-doomed`.
"""

from __future__ import annotations

import copy
import functools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

__all__ = ["DESIGNED_TO_FAIL", "WORKFLOWS", "Workflow", "problem_of"]

_DEFAULTS = """
defaults:
  timeout: 2s
  retry: {max_retries: 8, initial_interval: 0.1s, backoff_factor: 2.0, max_interval: 1s,
          retry_on: [timeout, connection_error, http_5xx]}
"""

CHAIN = (
    """
name: chaos-chain
version: 1
"""
    + _DEFAULTS
    + """
steps:
  - id: a
    type: tracked_http
    schedule_to_start: 3s
    with: {method: POST, url: "${{ input.base }}/work/a", json: {x: "${{ input.x }}"}}
  - id: b
    type: http
    depends_on: [a]
    with:
      method: POST
      url: "${{ input.base }}/http/${{ run.id }}/b"
      json: {x: "${{ steps.a.output.body.x + 1 }}"}
  - {id: pause, type: delay, duration: 1s, depends_on: [b]}
  - id: c
    type: tracked_http
    depends_on: [pause]
    with:
      method: POST
      url: "${{ input.base }}/work/c"
      json: {x: "${{ steps.b.output.body.x + 1 }}"}
output: {x: "${{ steps.c.output.body.x }}"}
"""
)

FANOUT = (
    """
name: chaos-fanout
version: 1
"""
    + _DEFAULTS
    + """
steps:
  - id: items
    type: http
    with: {method: GET, url: "${{ input.base }}/items/${{ run.id }}", query: {n: "${{ input.n }}"}}
  - id: each
    type: parallel
    depends_on: [items]
    for_each: "steps.items.output.body.items"
    max_parallel: 4
    step:
      id: charge
      type: tracked_http
      schedule_to_start: 3s
      with: {method: POST, url: "${{ input.base }}/work/charge", json: {x: "${{ item }}"}}
  - id: total
    type: transform
    depends_on: [each]
    output:
      n: "${{ size(steps.each.output) }}"
      ok: "${{ steps.each.output.all(b, b.status == 'succeeded') }}"
output: "${{ steps.total.output }}"
"""
)

BRANCH = (
    """
name: chaos-branch
version: 1
"""
    + _DEFAULTS
    + """
steps:
  - id: probe
    type: tracked_http
    schedule_to_start: 3s
    with: {method: POST, url: "${{ input.base }}/work/probe", json: {x: "${{ input.x }}"}}
  - id: route
    type: condition
    depends_on: [probe]
    if: "steps.probe.output.body.x % 2 == 0"
    then:
      - {id: even_wait, type: delay, duration: 0.5s}
      - id: even
        type: tracked_http
        depends_on: [even_wait]
        with: {method: POST, url: "${{ input.base }}/work/even", json: {x: 0}}
    else:
      - id: fork
        type: parallel
        join: all
        branches:
          - - id: left
              type: http
              with: {method: POST, url: "${{ input.base }}/http/${{ run.id }}/left", json: {x: 1}}
          - - {id: right_wait, type: delay, duration: 0.3s}
            - id: right
              type: tracked_http
              depends_on: [right_wait]
              with: {method: POST, url: "${{ input.base }}/work/right", json: {x: 2}}
  - id: race
    type: parallel
    depends_on: [route]
    join: any
    branches:
      - - id: quick
          type: tracked_http
          with: {method: POST, url: "${{ input.base }}/work/quick", json: {x: 3}}
      - - {id: slow_wait, type: delay, duration: 2s}
        - id: slow
          type: tracked_http
          depends_on: [slow_wait]
          with: {method: POST, url: "${{ input.base }}/work/slow", json: {x: 4}}
  - id: optional
    type: tracked_http
    depends_on: [route]
    continue_on_failure: true
    retry: {max_retries: 1}
    with: {method: POST, url: "${{ input.base }}/fail/optional"}
  - id: finish
    type: transform
    depends_on: [race, optional]
    output:
      branch: "${{ steps.route.output.branch }}"
      optional_failed: "${{ steps.optional.status in ['failed', 'timed_out'] }}"
output: "${{ steps.finish.output }}"
"""
)

DOOMED = (
    """
name: chaos-doomed
version: 1
"""
    + _DEFAULTS
    + """
steps:
  - id: ok
    type: tracked_http
    with: {method: POST, url: "${{ input.base }}/work/ok", json: {x: 5}}
  - id: broken
    type: tracked_http
    depends_on: [ok]
    retry: {max_retries: 2}
    with: {method: POST, url: "${{ input.base }}/fail/broken"}
  - id: never
    type: tracked_http
    depends_on: [broken]
    with: {method: POST, url: "${{ input.base }}/work/never", json: {x: 6}}
"""
)


@dataclass(frozen=True)
class Workflow:
    """A definition, how often it is submitted, and what its runs must end with."""

    text: str
    weight: float
    make_input: Callable[[random.Random], dict[str, Any]]
    output: Callable[[dict[str, Any]], Any]  # what a completed run's output must be
    expected: str = "completed"
    forbidden_steps: frozenset[str] = field(default_factory=frozenset)  # must never execute

    @property
    def spec(self) -> dict[str, Any]:
        return _parsed(self.text)

    @property
    def name(self) -> str:
        return str(self.spec["name"])


@functools.cache
def _parsed_once(text: str) -> dict[str, Any]:
    spec = yaml.safe_load(text)
    assert isinstance(spec, dict)
    return spec


def _parsed(text: str) -> dict[str, Any]:
    """The definition as data, parsed once per text (a plan asks for names hundreds of
    times); a deep copy, so no caller can change another's."""
    return copy.deepcopy(_parsed_once(text))


def _x(rng: random.Random) -> dict[str, Any]:
    return {"x": rng.randint(0, 1000)}


def _branch_output(input: dict[str, Any]) -> dict[str, Any]:
    return {"branch": "then" if input["x"] % 2 == 0 else "else", "optional_failed": True}


WORKFLOWS = [
    Workflow(CHAIN, 0.35, _x, lambda input: {"x": input["x"] + 2}),
    Workflow(
        FANOUT, 0.25, lambda rng: {"n": rng.randint(2, 8)}, lambda i: {"n": i["n"], "ok": True}
    ),
    Workflow(BRANCH, 0.30, _x, _branch_output),
    Workflow(
        DOOMED,
        0.10,
        lambda rng: {},
        lambda input: None,
        expected="failed",
        forbidden_steps=frozenset({"never"}),
    ),
]
BY_NAME = {w.name: w for w in WORKFLOWS}
DESIGNED_TO_FAIL = [w.name for w in WORKFLOWS if w.expected == "failed"]


def problem_of(name: str, status: str, input: dict[str, Any], output: Any) -> str | None:
    """Why a finished run is wrong (unexpected status or output), or None."""
    workflow = BY_NAME.get(name)
    if workflow is None:
        return f"unknown workflow {name!r}"
    if status != workflow.expected:
        return f"{status}, expected {workflow.expected}"
    want = workflow.output(input)
    if status == "completed" and output != want:
        return f"output {output!r}, expected {want!r}"
    return None
