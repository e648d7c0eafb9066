"""Random run inputs (deep nesting, huge strings, odd unicode, long keys) submitted among
good runs: every odd run ends, failed or completed, and the good runs complete beside them.

Hypothesis draws the odd inputs; a failing example is printed with the seed to replay it.
Inputs hold nothing PostgreSQL itself refuses on insert (NUL, lone surrogates): those never
become runs.
"""

from __future__ import annotations

import json
from typing import Any
from uuid import UUID

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import wait_for
from tests.integration.conftest import Engine

ODD = """
name: odd
version: 1
concurrency: {key: "input", limit: 3}
steps:
  - {id: t, type: transform, output: "${{ input }}"}
  - {id: e, type: echo, depends_on: [t], with: {v: "${{ steps.t.output }}"}}
"""

GOOD = """
name: good
version: 1
steps:
  - {id: a, type: echo, with: {n: "${{ input.n }}"}}
"""

_TEXT = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00"),
    max_size=40,
)
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | _TEXT
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXT, inner, max_size=4),
    max_leaves=20,
)


def _nested(depth: int) -> Any:
    value: Any = "bottom"
    for _ in range(depth):
        value = {"d": value}
    return value


_ODD_INPUTS = st.one_of(
    _VALUES,
    st.integers(1, 120).map(_nested),  # past the nesting limit of 64, and under it
    st.integers(1, 6_000_000).map(lambda n: {"s": "x" * n}),  # past the context limit too
    st.integers(100, 5_000).map(lambda n: {"k" * n: 1}),  # a long key (and concurrency key)
    st.text(min_size=1, max_size=200)
    .filter(lambda s: "\x00" not in s)
    .map(lambda s: {"u": s.encode("utf-8", "ignore").decode("utf-8")}),
)


async def _insert(engine: Engine, workflow: str, value: Any) -> UUID:
    # As JSON text: the way an API inserts a run (and no client-side recursion limit).
    text = json.dumps(value, ensure_ascii=False)
    run_id: UUID = await engine.conn.fetchval(
        "INSERT INTO flowforge.runs (workflow_name, input) VALUES ($1, $2::text::jsonb)"
        " RETURNING id",
        workflow,
        text,
    )
    return run_id


@settings(
    max_examples=4,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(odd=st.lists(_ODD_INPUTS, min_size=3, max_size=6))
async def test_odd_inputs_end_alone_and_good_runs_complete(
    steps_engine: Engine, odd: list[Any]
) -> None:
    await steps_engine.register(ODD)
    await steps_engine.register(GOOD)
    bad = [await _insert(steps_engine, "odd", value) for value in odd]
    good = [await _insert(steps_engine, "good", {"n": n}) for n in range(20)]

    async def all_good() -> bool:
        statuses = await steps_engine.conn.fetch(
            "SELECT status FROM flowforge.runs WHERE id = ANY($1::uuid[])", good
        )
        return all(r["status"] == "completed" for r in statuses)

    await wait_for(all_good, timeout=30, message="good runs were held up by odd inputs")
    for run_id in bad:
        run = await steps_engine.finished(run_id, timeout=30)
        assert run["status"] in ("completed", "failed"), run
        if run["status"] == "failed":
            assert run["error"]["category"] in (
                "payload_too_large",
                "invalid_input",
                "invalid_output",
                "expression_error",
            ), run["error"]
