"""Fuzzing definition validation: whatever the text, `parse_definition_text` either returns a
definition that compiles for execution and can be stored, or raises DefinitionError, and it
finishes within a deadline (to catch hangs and blow-ups, not to measure speed).

Texts are drawn as random definitions (valid and broken, deep, wide, odd unicode, huge
strings, expressions too big or too costly) written as YAML or JSON, YAML with anchors,
aliases, merges and alias bombs, mutated texts, and plain noise.

Deterministic by default (the same examples every run). To hunt with fresh random seeds
and many more examples: FLOWFORGE_FUZZ=hunt pytest tests/unit/test_definition_fuzz.py
(hypothesis prints the seed and the failing example of any failure).
"""

from __future__ import annotations

import json
import os
from typing import Any, Literal

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowforge_orchestrator.core.definition.models import WorkflowDefinition
from flowforge_orchestrator.core.definition.parse import parse_definition_text
from flowforge_orchestrator.core.definition.plan import CompiledWorkflow
from flowforge_orchestrator.core.jsonb import value_problem
from flowforge_orchestrator.errors import DefinitionError

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    max_examples=100,
    deadline=2_000,  # ms: generous, every example takes far less
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "hunt",
    parent=settings.get_profile("ci"),
    derandomize=False,
    max_examples=5_000,
)
FUZZ = settings.get_profile("hunt" if os.environ.get("FLOWFORGE_FUZZ") == "hunt" else "ci")

IDS = ["a", "b", "c", "d", "e", "order", "x" * 64, "x" * 65, "1bad", "é", ""]
TYPES = ["http", "transform", "condition", "parallel", "delay", "sms.send", "", "bad type"]
EXPRESSIONS = [
    "input.x",
    "steps.a.output.total > 1000",
    "true",
    "item",
    "index + 1",
    "size(input.l) > 2",
    "input.l.map(x, x * 2)",
    "input.l.map(x, input.l.map(y, x + y))",
    "'${{' + '}}'",
    "run.id + 'x'",
    "secrets.TOKEN",
    "steps['a'].status",
    "input.",
    "((",
    "}}",
    "'unterminated",
    "1 +",
    "\x00",
    "\ud800",
    "🦜 == '🦜'",
    "1" + " + 1" * 1_200,
    "x" * 9_000,
    "[" * 120 + "]" * 120,
    "[" + ", ".join(map(str, range(300))) + "].map(a, [1, 2].map(b, a + b))",
    "["
    + ", ".join(map(str, range(300)))
    + "]"
    + ".map(x, ["
    + ", ".join(map(str, range(300)))
    + "].map(y, ["
    + ", ".join(map(str, range(300)))
    + "].map(z, x + y + z)))",
]
expressions = st.sampled_from(EXPRESSIONS)
odd_text = st.text(
    st.characters(codec=None, exclude_categories=()), max_size=40
)  # any code point: controls, NUL, lone surrogates, emoji
strings = (
    st.sampled_from(["", "x", "https://x.test/", "10s", "1h30m", "-1s", "all", "any"])
    | odd_text
    | expressions.map(lambda e: f"${{{{ {e} }}}}")
    | expressions.map(lambda e: f"pre ${{{{ {e} }}}} post")
    | st.just("${{ unterminated")
    | st.integers(0, 4_000).map(lambda n: "h" * n)  # long (YAML parses ~200 KB/s: keep it fast)
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | strings
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(strings, inner, max_size=4),
    max_leaves=15,
)
ids = st.sampled_from(IDS) | st.integers() | odd_text


@st.composite
def steps(draw: st.DrawFn, depth: int) -> dict[str, Any]:
    kind = draw(st.sampled_from(TYPES) | odd_text)
    step: dict[str, Any] = {"id": draw(ids), "type": kind}
    if draw(st.booleans()):
        step["depends_on"] = draw(st.lists(ids, max_size=3) | values)
    children = st.lists(steps(depth - 1), max_size=3) if depth > 0 else st.just([])
    if kind == "http":
        step["with"] = draw(
            st.fixed_dictionaries({"url": strings}, optional={"json": values, "method": strings})
            | values
        )
    elif kind == "transform":
        step["output"] = draw(values)
    elif kind == "condition":
        step["if"] = draw(expressions | values)
        step["then"] = draw(children)
        if draw(st.booleans()):
            step["else"] = draw(children)
    elif kind == "parallel":
        if draw(st.booleans()):
            step["branches"] = draw(st.lists(children, max_size=3))
        else:
            step["for_each"] = draw(expressions)
            if depth > 0:
                step["step"] = draw(steps(depth - 1))
        if draw(st.booleans()):
            step["join"] = draw(st.sampled_from(["all", "any", {"at_least": 2}]) | values)
    elif kind == "delay":
        step[draw(st.sampled_from(["duration", "until"]))] = draw(strings | expressions)
    else:
        step["with"] = draw(values)
    if draw(st.integers(0, 9)) == 0:
        step[draw(strings)] = draw(values)  # a field nobody knows
    return step


@st.composite
def nested_steps(draw: st.DrawFn) -> list[dict[str, Any]]:
    """A chain of conditions and parallel steps 20 to 45 deep around one leaf."""
    step: dict[str, Any] = {"id": "leaf", "type": "transform", "output": draw(values)}
    for level in range(draw(st.integers(20, 45)), 0, -1):
        form = draw(st.sampled_from(["condition", "branches", "for_each"]))
        if form == "condition":
            step = {"id": f"n{level}", "type": "condition", "if": "true", "then": [step]}
        elif form == "branches":
            step = {"id": f"n{level}", "type": "parallel", "branches": [[step]]}
        else:
            step = {"id": f"n{level}", "type": "parallel", "for_each": "[1]", "step": step}
    return [step]


@st.composite
def definitions(draw: st.DrawFn) -> Any:
    step_lists = (
        st.lists(steps(2), min_size=1, max_size=4)
        | st.lists(steps(0), min_size=20, max_size=60)  # wide
        | nested_steps()
        | values
    )
    data: dict[str, Any] = {
        "name": draw(st.sampled_from(["wf", "order-fulfilment"]) | strings),
        "version": draw(st.integers(-1, 3) | values),
        "steps": draw(step_lists),
    }
    for field in ("output", "defaults", "concurrency", "max_concurrency", "timeout"):
        if draw(st.integers(0, 4)) == 0:
            data[field] = draw(
                values | st.fixed_dictionaries({"key": expressions, "limit": values})
            )
    if draw(st.integers(0, 9)) == 0:
        return draw(values)  # not even a mapping
    return data


def yaml_text(data: Any) -> str:
    return yaml.safe_dump(data, allow_unicode=True, width=2**20)


@st.composite
def anchored_texts(draw: st.DrawFn) -> str:
    """YAML that reuses nodes: anchors, aliases, merges, bombs, cycles."""
    shared = json.dumps(draw(values), ensure_ascii=False)
    levels, width = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    laughs = "".join(
        f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}' if i else '1'] * width)}]\n"
        for i in range(levels)
    )
    use = draw(st.sampled_from(["*shared", f"*l{levels - 1}", "{<<: *shared}", "*nowhere"]))
    cycle = draw(st.sampled_from(["", "  cyclic: &c [*c]\n", "  self: &m {a: *m}\n"]))
    return (
        "name: wf\nversion: 1\n"
        f"x-shared: &shared {shared}\n"
        f"x-laughs:\n{laughs}{cycle}"
        "steps:\n"
        f"  - {{id: a, type: transform, output: {use}}}\n"
        f"  - {{id: b, type: http, with: {{url: 'https://x.test/', json: {use}}}}}\n"
    )


@st.composite
def mutated_texts(draw: st.DrawFn) -> str:
    """A real definition's text with a few characters inserted, deleted or replaced."""
    text = yaml_text(draw(definitions()))
    for _ in range(draw(st.integers(1, 5))):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(["", "[", "{", "&x ", "*x", ":", "\n  ", "\t"]))
        text += yaml_text({"k": 1})[: draw(st.integers(0, 3))] + text[at + 1 :]
    return text


def check(text: str, format: Literal["yaml", "json"] = "yaml") -> None:
    """The property: a definition that compiles and can be stored, or a DefinitionError."""
    try:
        definition = parse_definition_text(text, format=format, source="fuzz")
    except DefinitionError as exc:
        assert exc.problems
        assert all(p.source == "fuzz" for p in exc.problems)
        str(exc)  # readable, whatever it quotes
        return
    assert isinstance(definition, WorkflowDefinition)
    CompiledWorkflow(definition)
    spec = definition.model_dump(mode="json", by_alias=True, exclude_none=True)
    json.dumps(spec)  # the stored spec is JSON ...
    assert value_problem(spec) is None  # ... that PostgreSQL's JSONB accepts


@FUZZ
@given(definitions())
def test_random_definitions_as_yaml(data: Any) -> None:
    check(yaml_text(data))


@FUZZ
@given(definitions())
def test_random_definitions_as_json(data: Any) -> None:
    check(json.dumps(data, ensure_ascii=False), "json")


@FUZZ
@given(anchored_texts())
def test_yaml_with_anchors_aliases_and_bombs(text: str) -> None:
    check(text)


@FUZZ
@given(mutated_texts())
def test_mutated_texts(text: str) -> None:
    check(text)


@FUZZ
@given(definitions(), st.lists(st.integers(100_000, 600_000), min_size=1, max_size=3))
def test_huge_strings_as_json(data: Any, sizes: list[int]) -> None:
    if isinstance(data, dict):
        data["description"] = "d" * sizes[0]
        data["output"] = ["o" * size for size in sizes]
    check(json.dumps(data, ensure_ascii=False), "json")


@FUZZ
@given(st.text(max_size=2_000) | st.binary(max_size=2_000).map(lambda b: b.decode("latin-1")))
def test_noise(text: str) -> None:
    check(text)
    check(text, "json")
