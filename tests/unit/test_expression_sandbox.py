"""The expression sandbox (real child processes) and the evaluator that routes to it.

Timing: a test that needs an evaluation to finish gives it a deadline of seconds; a test
that needs one to overrun evaluates something that takes a minute (or gigabytes). Both hold
on a loaded machine.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

from flowforge_orchestrator.core.expressions.cost import Budget, Route
from flowforge_orchestrator.core.expressions.templates import build_context, compile_expression
from flowforge_orchestrator.engine.sandbox.pool import BoundedEvaluator, Sandbox
from flowforge_orchestrator.errors import ExpressionError

GENEROUS = Budget(timeout=10.0, memory_bytes=256 << 20, max_result_bytes=4 << 20)
TIGHT = Budget(timeout=0.1, memory_bytes=256 << 20, max_result_bytes=4 << 20)
BOMB = "l.map(x, l.map(y, l.map(z, x + y + z)))"  # a minute over 150 elements
HALF_BOMB = "l.map(x, l.map(y, x + y))"  # seconds over 400: the sandbox's case
STARTED = 20.0  # seconds a child may take to start on a loaded machine


@pytest.fixture(scope="module")
def generous() -> Iterator[Sandbox]:
    with Sandbox(GENEROUS) as sandbox:
        assert sandbox.warm(STARTED)
        yield sandbox


@pytest.fixture
def tight() -> Iterator[Sandbox]:
    with Sandbox(TIGHT) as sandbox:
        assert sandbox.warm(STARTED)
        yield sandbox


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# --- the sandbox ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "variables", "expected"),
    [
        ("input.a + 1", {"input": {"a": 1}}, 2),
        ("[input.s, {'k': 1.5}, null, true]", {"input": {"s": "é"}}, ["é", {"k": 1.5}, None, True]),
        ("timestamp('2024-05-01T10:00:00Z') + duration('1h')", {}, "2024-05-01T11:00:00Z"),
        ("b'ab'", {}, "YWI="),
        ("l.map(x, x * 2)", {"l": list(range(500))}, [x * 2 for x in range(500)]),
    ],
)
def test_values_come_back_json_ready(
    generous: Sandbox, source: str, variables: dict[str, Any], expected: Any
) -> None:
    outcome = generous.evaluate(source, variables)
    assert (outcome.kind, outcome.value) == ("value", expected)


def test_cel_errors_read_as_they_do_in_process(generous: Sandbox) -> None:
    cases: list[tuple[str, dict[str, Any]]] = [
        ("input.missing", {"input": {}}),
        ("1 / input.zero", {"input": {"zero": 0}}),
        ("input.s + 1", {"input": {"s": "a"}}),
    ]
    for source, variables in cases:
        with pytest.raises(ExpressionError) as info:
            compile_expression(source).run(variables)
        outcome = generous.evaluate(source, variables)
        assert (outcome.kind, outcome.message) == ("error", info.value.reason)
    outcome = generous.evaluate("double('NaN')", {})
    assert (outcome.kind, outcome.message) == (
        "error",
        "result is not JSON: nan is not a JSON number",
    )


def test_an_overrun_is_killed_and_the_warm_spare_takes_over(tight: Sandbox) -> None:
    first, spare = tight.pid, tight.spare_pid
    assert first is not None and spare is not None
    started = time.monotonic()
    outcome = tight.evaluate(BOMB, {"l": list(range(150))})
    elapsed = time.monotonic() - started
    assert outcome.kind == "timeout"
    assert elapsed < 5  # stopped at its deadline, not after the minute it needs
    assert gone(first)  # SIGKILLed and reaped
    assert tight.pid == spare  # started (and warmed) before it was needed
    assert tight.spare_pid not in (None, first, spare)  # and a new spare is on its way
    assert tight.kills == 1
    assert tight.evaluate("1 + 1", {}).value == 2


def test_back_to_back_overruns_each_get_a_fresh_process(tight: Sandbox) -> None:
    pids = set()
    for _ in range(3):
        # The spare promoted by the last kill may still be starting on a loaded machine;
        # an evaluation would then fail fast as "still starting" (the next test).
        assert tight.warm(STARTED)
        pids.add(tight.pid)
        assert tight.evaluate(BOMB, {"l": list(range(150))}).kind == "timeout"
    assert len(pids) == 3
    assert all(gone(pid) for pid in pids if pid is not None)
    assert tight.warm(STARTED)
    assert tight.evaluate("'still' + ' here'", {}).value == "still here"


def test_memory_is_capped() -> None:
    budget = Budget(timeout=60.0, memory_bytes=128 << 20, max_result_bytes=4 << 20)
    with Sandbox(budget) as sandbox:
        doubled = "l.map(a, l.map(b, s + s))"  # 900 strings of 2 MB: 1.8 GB
        outcome = sandbox.evaluate(doubled, {"l": list(range(30)), "s": "x" * (1 << 20)})
        assert outcome.kind == "memory"
        assert sandbox.evaluate("size(s)", {"s": "abc"}).value == 3


def test_results_are_capped() -> None:
    budget = Budget(timeout=20.0, memory_bytes=512 << 20, max_result_bytes=1 << 20)
    with Sandbox(budget) as sandbox:
        outcome = sandbox.evaluate("l.map(a, s)", {"l": list(range(20)), "s": "y" * 100_000})
        assert outcome.kind == "too_large"
        assert outcome.size >= 2_000_000
        assert sandbox.evaluate("l.map(a, s)", {"l": [1], "s": "y"}).value == ["y"]


def test_a_child_killed_from_outside_is_replaced_unnoticed(generous: Sandbox) -> None:
    victim = generous.pid
    assert victim is not None
    os.kill(victim, 9)
    deadline = time.monotonic() + STARTED
    while not gone(victim) and generous._current is not None:
        generous._current.process.poll()  # reap it, as a poll of ours would
        if time.monotonic() > deadline:
            raise AssertionError("the killed child never exited")
    assert generous.evaluate("2 * 21", {}).value == 42
    assert generous.pid != victim


def test_waiting_for_a_process_still_starting_is_bounded_by_the_timeout() -> None:
    with Sandbox(Budget(timeout=0.001)) as sandbox:
        started = time.monotonic()
        outcome = sandbox.evaluate("1 + 1", {})  # no Python starts in a millisecond
        assert time.monotonic() - started < 0.5
        assert outcome.kind == "unavailable"
        assert "still starting after FLOWFORGE_EXPRESSION_TIMEOUT (1 ms)" in outcome.message
        assert sandbox.warm(STARTED)


def test_a_sandbox_that_cannot_start_says_so() -> None:
    with Sandbox(GENEROUS, python="/nonexistent/python") as sandbox:
        outcome = sandbox.evaluate("1", {})
    assert outcome.kind == "unavailable"
    assert "could not start" in outcome.message


# --- routing ------------------------------------------------------------------------------


def evaluator(sandbox: Sandbox, **kwargs: Any) -> BoundedEvaluator:
    return BoundedEvaluator(sandbox, **kwargs)


def context(**input: Any) -> dict[str, Any]:
    return build_context(input, {}, {"id": "run-1", "workflow": "wf", "version": 1})


def test_an_ordinary_expression_is_evaluated_in_process(generous: Sandbox) -> None:
    bounded = evaluator(generous)
    expression = compile_expression("timestamp(input.at) + duration('1h')")
    value = expression.evaluate(context(at="2024-05-01T10:00:00Z"), bounded)
    assert value == dt.datetime(2024, 5, 1, 11, tzinfo=dt.UTC)  # CEL's own type: in process
    assert bounded.routes[Route.INLINE] == 1
    assert bounded.routes[Route.SANDBOX] == 0


def test_a_costly_expression_goes_to_the_sandbox(generous: Sandbox) -> None:
    bounded = evaluator(generous)
    expression = compile_expression("input.l.map(x, x * 2)")
    assert expression.evaluate(context(l=list(range(300))), bounded) == list(range(0, 600, 2))
    assert bounded.routes == {Route.INLINE: 0, Route.SANDBOX: 1, Route.REFUSED: 0}
    with pytest.raises(ExpressionError, match="no such key"):
        compile_expression("input.l.map(x, input.m.k)").evaluate(
            context(l=list(range(300)), m={}), bounded
        )


def test_the_bomb_is_refused_without_running(
    tight: Sandbox, caplog: pytest.LogCaptureFixture
) -> None:
    bounded = evaluator(tight)
    expression = compile_expression(
        "input.l.map(x, input.l.map(y, input.l.map(z, x + y + z)))", step_id="s", field="output"
    )
    pid = tight.pid
    started = time.monotonic()
    with caplog.at_level(logging.ERROR), pytest.raises(ExpressionError) as info:
        expression.evaluate(context(l=list(range(150))), bounded)
    assert time.monotonic() - started < 1
    assert "refused before evaluation" in info.value.reason
    assert "FLOWFORGE_EXPRESSION_TIMEOUT (100 ms)" in info.value.reason
    assert (info.value.step_id, info.value.field) == ("s", "output")
    assert (tight.pid, tight.kills) == (pid, 0)  # no process was even asked
    assert bounded.routes[Route.REFUSED] == 1
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert getattr(errors[0], "run_id", None) == "run-1"


def test_an_overrun_fails_naming_the_limit_then_is_refused_at_once(
    tight: Sandbox, caplog: pytest.LogCaptureFixture
) -> None:
    now = [0.0]
    bounded = evaluator(tight, clock=lambda: now[0], memo_seconds=60)
    expression = compile_expression(
        "input.l.map(x, input.l.map(y, x + y))", step_id="sum", field="output"
    )
    big = context(l=list(range(400)))
    with caplog.at_level(logging.ERROR), pytest.raises(ExpressionError) as info:
        expression.evaluate(big, bounded)
    message = str(info.value)
    assert "evaluation ran past FLOWFORGE_EXPRESSION_TIMEOUT (100 ms)" in message
    assert "step 'sum'" in message and "field 'output'" in message
    assert expression.source in message
    assert tight.kills == 1
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1
    # The same expression over data as large: refused at once, no process killed.
    with pytest.raises(ExpressionError, match="moments ago"):
        expression.evaluate(big, bounded)
    assert tight.kills == 1
    # Over smaller data it runs; and once the memory fades, large data is tried again.
    assert expression.evaluate(context(l=[1, 2]), bounded) == [[2, 3], [3, 4]]
    now[0] = 61
    with pytest.raises(ExpressionError, match="ran past FLOWFORGE_EXPRESSION_TIMEOUT"):
        expression.evaluate(big, bounded)
    assert tight.kills == 2


def test_memory_and_size_limits_are_named() -> None:
    budget = Budget(timeout=60.0, memory_bytes=128 << 20, max_result_bytes=1 << 20)
    with Sandbox(budget) as sandbox:
        bounded = BoundedEvaluator(sandbox)
        doubled = compile_expression("input.l.map(a, input.l.map(b, input.s + input.s))")
        with pytest.raises(ExpressionError, match=r"FLOWFORGE_EXPRESSION_MEMORY_BYTES \(128 MB\)"):
            doubled.evaluate(context(l=list(range(30)), s="x" * (1 << 20)), bounded)
        wide = compile_expression("input.l.map(a, input.s)")
        with pytest.raises(ExpressionError) as info:
            wide.evaluate(context(l=list(range(60)), s="y" * 100_000), bounded)
        assert "over the limit of 1 MB (FLOWFORGE_MAX_CONTEXT_BYTES)" in info.value.reason
        assert info.value.reason.startswith("result is 5.7")


def test_a_value_too_deep_for_cel_is_refused_before_it_can_crash_the_process(
    generous: Sandbox,
) -> None:
    deep: Any = 1
    for _ in range(20_000):  # CEL's conversion segfaults on this
        deep = [deep]
    bounded, pid = evaluator(generous), generous.pid
    with pytest.raises(ExpressionError, match="nested more than 128 levels deep"):
        compile_expression("size(input.v)").evaluate(context(v=deep), bounded)
    assert generous.pid == pid
    assert bounded.routes[Route.REFUSED] == 1
