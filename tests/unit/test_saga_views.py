"""`runs show` pictures of catch handlers, compensations and switch cases: the tree, Mermaid
and Graphviz, built from a run's checkpoint as the graph writes it."""

from __future__ import annotations

from datetime import UTC, datetime

from flowforge_orchestrator.views.pictures import render_dot, render_mermaid
from flowforge_orchestrator.views.render import build_tree, render_tree
from tests.unit.test_catch_graph import catching, three_way
from tests.unit.test_control_flow import Live
from tests.unit.test_graph import http, transform, workflow
from tests.unit.test_saga_graph import E400, saga

NOW = datetime(2024, 5, 1, 13, 0, tzinfo=UTC)


def test_the_tree_shows_compensations_as_they_went() -> None:
    live = Live.start(saga())
    live.ok("reserve")
    live.ok("charge")
    live.fail("ship", error=E400)
    live.ok("undo_charge")
    text = render_tree(build_tree(live.run.workflow, live.rec.checkpoint), NOW)
    lines = [line.split()[:4] for line in text.splitlines()]
    assert ["├─", "reserve", "http", "succeeded"] in lines
    assert ["│", "└─", "compensate", "(compensating)"] in lines
    assert ["│", "└─", "compensate", "(compensated)"] in lines
    assert ["└─", "compensate"] in lines  # notify's: never ran
    assert "error: bad request" in text


def test_the_tree_shows_a_caught_failure_and_the_cases_taken() -> None:
    wf = workflow(
        three_way(),
        http(
            "a",
            "route",
            catch=catching((["http_4xx"], [transform("h", "x")]), (None, [transform("h2", 1)])),
        ),
    )
    live = Live.start(wf, {"n": 1})
    live.fail("a", error=E400)
    nodes = build_tree(wf, live.rec.checkpoint)
    text = render_tree(nodes, NOW)
    assert "case 0: input.n == 1 (taken)" in text
    assert "case 2: input.n == 3 (not taken)" in text
    assert "default (not taken)" in text
    assert "failed, caught: bad request" in text
    assert "catch http_4xx (taken)" in text
    assert "catch any error\n" in text + "\n"

    mermaid = render_mermaid(nodes, NOW)
    assert "-->|case 0: input.n == 1|" in mermaid
    assert "-.->|default|" in mermaid
    assert "-->|catch http_4xx|" in mermaid and "-.->|catch any error|" in mermaid
    dot = render_dot(nodes, NOW)
    assert '[label="catch any error", style=dashed];' in dot
    assert '[label="catch http_4xx"];' in dot
    assert "failed, caught: bad request" in dot
