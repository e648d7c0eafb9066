"""The step tree of a run, from definition + checkpoint + attempts + transitions, and its three
drawings: a terminal tree, Mermaid flowchart text, Graphviz digraph text (parsed by pydot)."""

from __future__ import annotations

import re
import warnings
from datetime import UTC, datetime, timedelta
from typing import Any

import pydot
import pytest
import yaml

from flowforge_orchestrator.core.definition.parse import parse_definition
from flowforge_orchestrator.core.definition.plan import CompiledWorkflow
from flowforge_orchestrator.views.pictures import render_dot, render_mermaid
from flowforge_orchestrator.views.render import StepNode, build_tree, render_tree, timing, walk

with warnings.catch_warnings():  # pydot's grammar still uses pyparsing's old method names
    warnings.simplefilter("ignore", DeprecationWarning)
    import pydot.dot_parser

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
NOW = T0 + timedelta(seconds=5)

ORDER = """
name: order
version: 1
steps:
  - {id: order, type: http, with: {url: "http://x.test/o"}}
  - id: route
    type: condition
    depends_on: [order]
    if: "steps.order.output.body.total > 1000"
    then: [{id: review, type: http, with: {url: "http://x.test/r"}}]
    else: [{id: approve, type: http, with: {url: "http://x.test/a"}}]
  - id: notify
    type: parallel
    depends_on: [route]
    branches:
      - [{id: email, type: http, with: {url: "http://x.test/e"}}]
      - [{id: sms, type: sms_send, depends_on: [cooldown]},
         {id: cooldown, type: delay, duration: 10m}]
  - id: charge_all
    type: parallel
    depends_on: [order]
    for_each: "steps.order.output.body.items"
    step: {id: charge, type: http, with: {url: "http://x.test/c"}}
"""


def workflow(text: str = ORDER) -> CompiledWorkflow:
    return CompiledWorkflow(parse_definition(yaml.safe_load(text)))


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def checkpoint(elements: int = 3, **steps: Any) -> dict[str, Any]:
    saved: dict[str, Any] = {
        "order": "S1",
        "route": {"s": "S", "n": 1, "b": "then"},
        "review": "S2",
        "approve": "K",
        "notify": "r1",
        "email": "S1",
        "cooldown": {"s": "r", "n": 1, "t": at(600).isoformat()},
        "charge_all": {"s": "r", "n": 1, "x": elements},
    }
    saved.update({f"charge[{i}]": "S1" for i in range(elements)})
    saved.update(steps)
    return {"v": 2, "seq": 40, "steps": saved}


TRANSITIONS: list[dict[str, object]] = [
    {"step_id": None, "to_status": "running", "at": at(0)},
    {"step_id": "order", "to_status": "dispatched", "at": at(0)},
    {"step_id": "order", "to_status": "running", "at": at(0.1)},
    {"step_id": "order", "to_status": "succeeded", "at": at(0.5)},
    {"step_id": "review", "to_status": "dispatched", "at": at(0.6)},
    {"step_id": "review", "to_status": "retrying", "at": at(0.7)},
    {"step_id": "review", "to_status": "dispatched", "at": at(0.9)},
    {"step_id": "review", "to_status": "succeeded", "at": at(1.25)},
    {"step_id": "cooldown", "to_status": "running", "at": at(2)},
]

ATTEMPTS: list[dict[str, object]] = [
    {"step_id": "review", "step_type": "http", "error": {"message": "HTTP 503"}},
    {"step_id": "review", "step_type": "http", "error": None},
]


def tree(**kw: Any) -> list[StepNode]:
    return build_tree(workflow(), checkpoint(), attempts=ATTEMPTS, transitions=TRANSITIONS, **kw)


def by_key(nodes: list[StepNode]) -> dict[str, StepNode]:
    return {node.key: node for node in walk(nodes)}


def test_the_tree_follows_the_definitions_nesting_with_each_steps_state() -> None:
    nodes = by_key(tree())

    assert [n.key for n in tree()] == ["order", "route", "notify", "charge_all"]
    route = nodes["route"]
    assert [(c.label, c.taken, [s.key for s in c.steps]) for c in route.lists] == [
        ("then", True, ["review"]),
        ("else", False, ["approve"]),
    ]
    assert [c.label for c in nodes["notify"].lists] == ["branch 1", "branch 2"]
    # A list is drawn in dependency order: cooldown before the sms that waits for it.
    assert [s.key for s in nodes["notify"].lists[1].steps] == ["cooldown", "sms"]
    assert nodes["sms"].depends_on == ("cooldown",)
    assert [c.steps[0].key for c in nodes["charge_all"].lists] == [
        "charge[0]",
        "charge[1]",
        "charge[2]",
    ]
    assert (nodes["review"].status, nodes["review"].attempts) == ("succeeded", 2)
    assert nodes["approve"].status == "skipped"
    assert nodes["sms"].status == "pending"  # not in the checkpoint yet
    assert (nodes["order"].started_at, nodes["order"].finished_at) == (at(0), at(0.5))
    # A retry does not restart the clock: the step took from its first dispatch.
    assert (nodes["review"].started_at, nodes["review"].finished_at) == (at(0.6), at(1.25))


def test_the_terminal_tree_shows_kind_status_attempts_and_timing_in_columns() -> None:
    text = render_tree(tree(), NOW)

    assert text.splitlines() == [
        "├─ order           http           succeeded  attempt 1  0.500s",
        "├─ route           condition      succeeded",
        "│  ├─ then (taken)",
        "│  │  └─ review    http           succeeded  attempt 2  0.650s",
        "│  └─ else (not taken)",
        "│     └─ approve   http           skipped",
        "├─ notify          parallel       running",
        "│  ├─ branch 1",
        "│  │  └─ email     http           succeeded  attempt 1",
        "│  └─ branch 2",
        "│     ├─ cooldown  delay          running               for 3.000s",
        "│     └─ sms       sms_send       pending",
        "└─ charge_all      for_each of 3  running",
        "   ├─ charge[0]    http           succeeded  attempt 1",
        "   ├─ charge[1]    http           succeeded  attempt 1",
        "   └─ charge[2]    http           succeeded  attempt 1",
    ]


def test_a_failed_step_shows_its_error_under_it() -> None:
    saved = checkpoint(
        order={"s": "F", "n": 3, "e": {"message": "GET http://x.test/o returned HTTP 500"}},
        route="C",
    )

    text = render_tree(build_tree(workflow(), saved), NOW)

    lines = text.splitlines()
    assert re.match(r"├─ order +http +failed +attempt 3$", lines[0])
    assert lines[1] == "│     error: GET http://x.test/o returned HTTP 500"
    assert re.match(r"├─ route +condition +cancelled$", lines[2])


def test_a_large_fan_out_shows_the_unusual_elements_and_the_first_and_counts_the_rest() -> None:
    saved = checkpoint(
        elements=1000,
        **{"charge[500]": {"s": "F", "n": 3, "e": {"message": "declined"}}, "charge[999]": "r1"},
    )

    nodes = build_tree(workflow(), saved, max_elements=4)
    text = render_tree(nodes, NOW)

    fan_out = by_key(nodes)["charge_all"]
    shown = [c.steps[0].key for c in fan_out.lists]
    assert shown == ["charge[0]", "charge[1]", "charge[500]", "charge[999]"]
    assert fan_out.hidden == {"succeeded": 996}
    assert re.search(r"^└─ charge_all +for_each of 1000 +running$", text, re.M)
    assert "│     error: declined" in text
    assert text.endswith("└─ … 996 more: 996 succeeded")


def test_without_a_definition_the_known_steps_are_listed_flat() -> None:
    attempts = [{"step_id": "fetch", "step_type": "http", "error": {"message": "refused"}}]
    saved = {"steps": {"fetch": {"s": "F", "n": 1}, "shape": "S1"}}

    nodes = build_tree(None, saved, attempts=attempts)

    assert [(n.key, n.kind, n.status, n.error) for n in nodes] == [
        ("fetch", "http", "failed", "refused"),
        ("shape", "?", "succeeded", None),
    ]


def test_timing_is_empty_before_a_start_and_counts_up_while_open() -> None:
    node = StepNode("a", "a", "http")
    assert timing(node, NOW) == ""
    node.started_at = at(1)
    assert timing(node, NOW) == "for 4.000s"
    node.finished_at = at(125)
    assert timing(node, NOW) == "2m04.0s"
    node.finished_at = at(2 * 3600 + 61)
    assert timing(node, NOW) == "2h01m"


def test_a_redriven_step_is_timed_from_its_new_start() -> None:
    transitions = [
        {"step_id": "order", "to_status": "dispatched", "at": at(0)},
        {"step_id": "order", "to_status": "failed", "at": at(1)},
        {"step_id": "order", "to_status": "pending", "at": at(50)},
        {"step_id": "order", "to_status": "dispatched", "at": at(60)},
        {"step_id": "order", "to_status": "succeeded", "at": at(60.25)},
    ]

    (order, *_) = build_tree(workflow(), checkpoint(), transitions=transitions)

    assert (order.started_at, order.finished_at) == (at(60), at(60.25))


# -- pictures -----------------------------------------------------------------------------------

MERMAID_NODE = re.compile(r"^\s+(s\d+)(\[\[|\{|\(\[|\[/|\[)\"(.*)\"(\]\]|\}|\]\)|/\]|\]):::(\w+)$")
MERMAID_EDGE = re.compile(r"^\s+(s\d+) (-->|-\.->)(?:\|([^|]+)\|)? (s\d+)$")
MERMAID_GROUP = re.compile(r'^\s+subgraph (s\d+)\["(.*)"\]$')


def test_mermaid_is_a_flowchart_whose_edges_join_declared_nodes() -> None:
    text = render_mermaid(tree(), NOW, title='order v1 · run "x"')

    lines = text.splitlines()
    assert lines[:4] == ["---", "title: order v1 · run #quot;x#quot;", "---", "flowchart TD"]
    nodes: dict[str, tuple[str, str]] = {}
    edges: list[tuple[str, str, str | None, str]] = []
    depth = 0
    for line in lines[4:]:
        if line.strip().startswith("classDef "):
            continue
        if m := MERMAID_GROUP.match(line):
            depth += 1
        elif line.strip() == "end":
            depth -= 1
            assert depth >= 0
        elif m := MERMAID_NODE.match(line):
            nodes[m[1]] = (m[3].split("<br/>")[0], m[5])
        elif m := MERMAID_EDGE.match(line):
            edges.append((m[1], m[2], m[3], m[4]))
        else:
            raise AssertionError(f"not a flowchart line: {line!r}")
    assert depth == 0
    assert all(a in nodes and b in nodes for a, _, _, b in edges)
    named = {
        (nodes[a][0], arrow, label, nodes[b][0]) for a, arrow, label, b in edges
    }  # by step key
    assert ("order", "-->", None, "route") in named
    assert ("route", "-->", "then", "review") in named
    assert ("route", "-.->", "else", "approve") in named
    assert ("notify", "-->", "branch 2", "cooldown") in named
    assert ("cooldown", "-->", None, "sms") in named
    assert ("charge_all", "-->", None, "charge[2]") in named
    assert nodes[next(k for k, v in nodes.items() if v[0] == "approve")][1] == "skipped"
    assert re.search(r'\{"route<br/>condition · succeeded"\}', text)


def test_dot_is_a_digraph_graphviz_parses_with_a_cluster_per_list() -> None:
    saved = checkpoint(order={"s": "F", "n": 1, "e": {"message": 'said "no"\\ and left'}})

    text = render_dot(build_tree(workflow(), saved), NOW, title="order v1")

    graphs = pydot.graph_from_dot_data(text)
    assert graphs is not None
    (graph,) = graphs
    assert graph.get_type() == "digraph"
    labels: dict[str, str] = {}

    def collect(g: Any) -> list[str]:
        for node in g.get_nodes():
            if node.get("label"):
                labels[node.get_name()] = node.get("label").strip('"').split("\\n")[0]
        return [s.get("label").strip('"') for s in g.get_subgraphs()] + [
            title for s in g.get_subgraphs() for title in collect(s)
        ]

    clusters = collect(graph)
    assert clusters == [
        "then (taken)",
        "else (not taken)",
        "branch 1",
        "branch 2",
        "charge_all: for each",
    ]
    edges = {
        (labels[str(e.get_source())], labels[str(e.get_destination())]) for e in graph.get_edges()
    }
    assert {("order", "route"), ("route", "review"), ("cooldown", "sms")} <= edges
    (failed,) = [n for n in graph.get_nodes() if (n.get("label") or "").startswith('"order')]
    assert failed.get("label") == '"order\\nhttp · failed · attempt 1\\nsaid \\"no\\"\\\\ and left"'
    assert failed.get("fillcolor") == '"#fee2e2"'


@pytest.mark.parametrize("render", [render_mermaid, render_dot])
def test_pictures_summarise_a_large_fan_out(render: Any) -> None:
    nodes = build_tree(workflow(), checkpoint(elements=500), max_elements=3)

    text = render(nodes, NOW)

    assert "… 497 more: 497 succeeded" in text
    assert "charge[2]" in text and "charge[3]" not in text


def test_a_finished_fan_outs_elements_come_from_the_history() -> None:
    # The checkpoint forgets a finished fan-out's elements; the transitions keep them.
    saved = checkpoint(elements=0, charge_all="S1")
    transitions = [
        {"step_id": key, "to_status": status, "at": at(t)}
        for key, status, t in [
            ("charge[0]", "dispatched", 1),
            ("charge[1]", "dispatched", 1),
            ("charge[0]", "succeeded", 1.5),
            ("charge[1]", "failed", 2),
            ("charge[1]", "dispatched", 3),
            ("charge[1]", "succeeded", 3.25),
            ("charge[1][0]", "succeeded", 3.5),  # a deeper key is not an element of this list
        ]
    ]

    nodes = by_key(build_tree(workflow(), saved, transitions=transitions))

    assert nodes["charge_all"].elements == 2
    assert [(n.key, n.status, timing(n, NOW)) for n in walk([nodes["charge_all"]])][1:] == [
        ("charge[0]", "succeeded", "0.500s"),
        ("charge[1]", "succeeded", "0.250s"),
    ]
