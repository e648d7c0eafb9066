"""Workflow definitions: the models, every validation problem located, loading, schema."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

from flowforge_orchestrator.cli.definitions import load_definition
from flowforge_orchestrator.core.definition.checks import MAX_STEP_DEPTH, MAX_TEXT_CHARS
from flowforge_orchestrator.core.definition.models import (
    BUILTIN_STEP_TYPES,
    INLINE_STEP_TYPES,
    AtLeast,
    ConditionStep,
    DelayStep,
    HttpParams,
    ParallelStep,
    RetryPolicy,
    TaskStep,
    TransformStep,
    WorkflowDefinition,
    child_lists,
    compile_definition,
    definition_json_schema,
    topological_order,
)
from flowforge_orchestrator.core.definition.parse import parse_definition, parse_definition_text
from flowforge_orchestrator.core.expressions.templates import build_context
from flowforge_orchestrator.core.jsonb import MAX_DEPTH
from flowforge_orchestrator.errors import DefinitionError, DefinitionProblem

EXAMPLE = Path(__file__).parent / "data" / "order_fulfilment.yaml"
SOURCE = "wf.yaml"


def workflow(*steps: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"name": "wf", "version": 1, "steps": list(steps), **top}


def http(step_id: str, **fields: Any) -> dict[str, Any]:
    return {"id": step_id, "type": "http", "with": {"url": "https://x.test/"}, **fields}


def problems(data: Any, **kwargs: Any) -> list[DefinitionProblem]:
    with pytest.raises(DefinitionError) as info:
        parse_definition(data, source=SOURCE, **kwargs)
    assert all(p.source == SOURCE for p in info.value.problems)
    return info.value.problems


def problem(data: Any, step_id: str | None, field: str | None, **kwargs: Any) -> str:
    """The message of the one problem at (step_id, field)."""
    found = problems(data, **kwargs)
    at = [p for p in found if (p.step_id, p.field) == (step_id, field)]
    assert len(at) == 1, found
    return at[0].message


# --- the example -------------------------------------------------------------------------


def test_example_parses_with_its_custom_type() -> None:
    defn = load_definition(EXAMPLE, known_types={"sms_send"})
    assert (defn.name, defn.version, defn.max_concurrency, defn.timeout) == (
        "order-fulfilment",
        3,
        20,
        3600.0,
    )
    assert defn.concurrency is not None and defn.concurrency.limit == 1
    assert defn.defaults.timeout == 30.0
    assert defn.defaults.retry == RetryPolicy(max_retries=3, max_interval=60.0)
    assert [s.id for s in defn.all_steps()] == [
        "order",
        "route",
        "review",
        "approve",
        "notify",
        "email",
        "cooldown",
        "sms",
        "charge_all",
        "charge",
        "summary",
    ]
    route, notify, charge_all = defn.step("route"), defn.step("notify"), defn.step("charge_all")
    assert isinstance(route, ConditionStep) and route.if_.startswith("steps.order")
    assert [s.id for s in route.else_] == ["approve"]
    assert isinstance(notify, ParallelStep) and notify.join == "all" and not notify.fail_fast
    assert [[s.id for s in b] for b in child_lists(notify)] == [["email"], ["cooldown", "sms"]]
    cooldown = defn.step("cooldown")
    assert isinstance(cooldown, DelayStep)
    assert cooldown.duration == 600.0
    assert isinstance(charge_all, ParallelStep) and charge_all.join == AtLeast(at_least=1)
    charge = defn.step("charge")
    assert isinstance(charge, TaskStep) and charge.with_["json"] == "${{ item }}"
    assert isinstance(defn.step("sms"), TaskStep) and defn.step("sms").type == "sms_send"
    assert isinstance(defn.step("summary"), TransformStep)
    with pytest.raises(KeyError):
        defn.step("nope")


def test_example_round_trips_through_model_dump() -> None:
    defn = load_definition(EXAMPLE)
    assert defn.compiled is not None and defn.step("order") is not None  # caches filled
    dumped = defn.model_dump(by_alias=True, mode="json")
    assert parse_definition(json.loads(json.dumps(dumped))) == defn
    assert parse_definition(defn) == defn


def test_unknown_types_are_only_checked_against_known_types() -> None:
    load_definition(EXAMPLE)  # no known_types: any worker type goes
    message = problem(
        yaml.safe_load(EXAMPLE.read_text()), "sms", "type", known_types={"email_send"}
    )
    assert message == (
        "unknown step type 'sms_send'; known types: condition, delay, email_send, fail, "
        "http, parallel, switch, transform, wait, workflow"
    )


def test_builtin_type_sets() -> None:
    assert INLINE_STEP_TYPES < BUILTIN_STEP_TYPES
    assert BUILTIN_STEP_TYPES - INLINE_STEP_TYPES == {"http"}


# --- loading files -----------------------------------------------------------------------


def test_load_json_and_yml(tmp_path: Path) -> None:
    data = workflow(
        http("a"), {"id": "b", "type": "delay", "duration": "PT1M", "depends_on": ["a"]}
    )
    (tmp_path / "wf.json").write_text(json.dumps(data))
    (tmp_path / "wf.yml").write_text(yaml.safe_dump(data))
    assert load_definition(tmp_path / "wf.json") == load_definition(str(tmp_path / "wf.yml"))


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: wf\nversion: 1\nsteps:\n  - id: a\n   type: http\n")
    with pytest.raises(DefinitionError) as info:
        load_definition(path)
    [found] = info.value.problems
    assert found.source == str(path)
    assert "invalid YAML (line 5" in found.message
    assert str(path) in str(info.value)


def test_json_syntax_error_names_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"name": "wf",\n "version": 1,,}')
    with pytest.raises(DefinitionError, match=r"invalid JSON \(line 2, column 15\)"):
        load_definition(path)


def test_yaml_key_written_twice_is_an_error() -> None:
    with pytest.raises(DefinitionError, match="'depends_on' is written twice") as info:
        parse_definition_text(
            "name: wf\nversion: 1\nsteps:\n  - id: a\n    type: http\n"
            "    depends_on: [x]\n    depends_on: [y]\n",
            source="dup.yaml",
        )
    assert "line 7" in info.value.problems[0].message


def test_yaml_merge_keys_still_work() -> None:
    text = (
        "name: wf\nversion: 1\nsteps:\n"
        "  - &base {id: a, type: http, with: {url: 'https://x.test/'}}\n"
        "  - <<: *base\n    id: b\n"
    )
    assert [s.id for s in parse_definition_text(text).steps] == ["a", "b"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("wf.txt", "name: wf", "unsupported file type"),
        ("empty.yaml", "", "the definition is empty"),
        ("list.yaml", "- 1\n- 2\n", "valid dictionary"),
    ],
)
def test_bad_files(tmp_path: Path, name: str, content: str, message: str) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(DefinitionError, match=message):
        load_definition(tmp_path / name)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DefinitionError, match="cannot read the file") as info:
        load_definition(tmp_path / "nope.yaml")
    assert info.value.problems[0].source == str(tmp_path / "nope.yaml")


# --- pydantic problems, located ----------------------------------------------------------


def test_workflow_level_problems_have_no_step() -> None:
    found = problems({"name": "bad name!", "version": 0, "steps": []})
    located = {(p.step_id, p.field) for p in found}
    assert located == {(None, "name"), (None, "version"), (None, "steps")}
    assert "not a valid workflow name" in problem({"name": "-x", "version": 1}, None, "name")
    assert problem({"name": "x", "steps": [http("a")]}, None, "version") == (
        "required field is missing"
    )


def test_unknown_field_suggests_the_right_one() -> None:
    assert problem(workflow(http("a"), timout="1m"), None, "timout") == (
        "unknown field; did you mean 'timeout'?"
    )
    data = workflow({"id": "a", "type": "http", "wiht": {"url": "https://x.test/"}})
    assert problem(data, "a", "wiht") == "unknown field; did you mean 'with'?"
    assert problem(workflow(http("a", colour="red")), "a", "colour") == "unknown field"


def test_nested_field_paths() -> None:
    data = workflow(http("a", retry={"max_retries": -1, "backoff_factor": 0.5}))
    found = problems(data)
    assert {(p.step_id, p.field) for p in found} == {
        ("a", "retry.max_retries"),
        ("a", "retry.backoff_factor"),
    }


def test_innermost_step_is_named() -> None:
    inner = {"id": "deep", "type": "delay", "duration": "10 parsecs"}
    data = workflow(
        {
            "id": "outer",
            "type": "parallel",
            "branches": [
                [http("x")],
                [{"id": "c", "type": "condition", "if": "true", "then": [inner]}],
            ],
        }
    )
    message = problem(data, "deep", "duration")
    assert message.startswith("invalid duration '10 parsecs'")
    assert "1h30m" in message and "PT1H30M" in message


def test_step_without_an_id_is_located_by_path() -> None:
    data = workflow(
        http("a"),
        {"id": "c", "type": "condition", "if": "true", "then": [{"type": "http", "with": {}}]},
    )
    found = problems(data)
    assert {(p.step_id, p.field, p.message) for p in found} == {
        ("c", "then[0].id", "required field is missing"),
        ("c", "then[0].with.url", "required field is missing"),
    }


def test_step_id_pattern_says_why() -> None:
    message = problem(workflow(http("order-1")), "order-1", "id")
    assert "so that `steps.<id>` works in expressions" in message
    problem(workflow(http("x" * 65)), "x" * 65, "id")


def test_bad_durations_name_the_accepted_forms() -> None:
    message = problem(workflow(http("a", timeout="5M")), "a", "timeout")
    assert "expected a number of seconds, a string like 250ms" in message
    assert problem(workflow(http("a", timeout=0)), "a", "timeout") == (
        "Input should be greater than 0"
    )
    problem(
        workflow(http("a"), defaults={"retry": {"max_interval": "soon"}}),
        None,
        "defaults.retry.max_interval",
    )


def test_step_types_get_their_own_fields() -> None:
    assert problem(
        workflow({"id": "t", "type": "transform", "output": 1, "with": {}}), "t", "with"
    ).startswith("unknown field")
    assert problem(workflow({"id": "c", "type": "condition", "then": []}), "c", "if") == (
        "required field is missing"
    )
    assert problem(workflow({"id": "t", "type": "transform"}), "t", "output") == (
        "required field is missing"
    )


def test_parallel_needs_one_form() -> None:
    both = {
        "id": "p",
        "type": "parallel",
        "branches": [[http("a")]],
        "for_each": "[1]",
        "step": http("b"),
    }
    assert "either branches or for_each" in problem(workflow(both), "p", "branches")
    assert "needs branches" in problem(workflow({"id": "p", "type": "parallel"}), "p", "branches")
    only_each = {"id": "p", "type": "parallel", "for_each": "[1]"}
    assert "needs a step" in problem(workflow(only_each), "p", "step")
    only_step = {"id": "p", "type": "parallel", "step": http("b")}
    assert "needs for_each" in problem(workflow(only_step), "p", "for_each")
    empty_branch = {"id": "p", "type": "parallel", "branches": [[]]}
    assert "at least 1 item" in problem(workflow(empty_branch), "p", "branches[0]")


def test_join_policies() -> None:
    base = {"id": "p", "type": "parallel", "branches": [[http("a")], [http("b")]]}
    assert problem(workflow({**base, "join": "some"}), "p", "join") == (
        "join is 'all', 'any' or {at_least: n}"
    )
    problem(workflow({**base, "join": {"at_least": 0}}), "p", "join.at_least")
    assert "only 2 branches" in problem(workflow({**base, "join": {"at_least": 3}}), "p", "join")
    defn = parse_definition(workflow({**base, "join": {"at_least": 2}, "max_parallel": 1}))
    step = defn.steps[0]
    assert isinstance(step, ParallelStep)
    assert step.join == AtLeast(at_least=2)


def test_delay_needs_exactly_one_of_duration_and_until() -> None:
    assert "exactly one" in problem(workflow({"id": "d", "type": "delay"}), "d", "duration")
    both = {"id": "d", "type": "delay", "duration": 1, "until": "timestamp('2030-01-01T00:00:00Z')"}
    assert "exactly one" in problem(workflow(both), "d", "duration")


# --- graph problems ----------------------------------------------------------------------


def test_duplicate_ids_anywhere() -> None:
    data = workflow(
        http("a"),
        {"id": "p", "type": "parallel", "for_each": "[1, 2]", "step": http("a")},
    )
    message = problem(data, "a", "id")
    assert "unique across the whole definition" in message


def test_depends_on_unknown_step() -> None:
    assert problem(workflow(http("a", depends_on=["ghost"])), "a", "depends_on") == (
        "depends on unknown step 'ghost'"
    )


def test_depends_on_a_step_of_another_list() -> None:
    data = workflow(
        http("a"),
        {"id": "c", "type": "condition", "if": "true", "then": [http("b", depends_on=["a"])]},
    )
    message = problem(data, "b", "depends_on")
    assert "nested steps may only depend on steps of their own list" in message


def test_cycles_are_named_in_order() -> None:
    data = workflow(
        http("start"),
        http("a", depends_on=["c"]),
        http("b", depends_on=["a", "start"]),
        http("c", depends_on=["b"]),
        http("after", depends_on=["c"]),
        http("x", depends_on=["y"]),
        http("y", depends_on=["x"]),
    )
    found = problems(data)
    assert [(p.step_id, p.field, p.message) for p in found] == [
        ("a", "depends_on", "dependency cycle: a -> c -> b -> a (each depends on the next)"),
        ("x", "depends_on", "dependency cycle: x -> y -> x (each depends on the next)"),
    ]


def test_self_dependency() -> None:
    assert problem(workflow(http("a", depends_on=["a"])), "a", "depends_on") == (
        "a step cannot depend on itself"
    )


def test_cycle_inside_a_branch() -> None:
    branch = [http("m", depends_on=["n"]), http("n", depends_on=["m"])]
    data = workflow({"id": "p", "type": "parallel", "branches": [branch]})
    assert "m -> n -> m" in problem(data, "m", "depends_on")


def test_for_each_step_cannot_depend() -> None:
    data = workflow(
        http("a"),
        {"id": "p", "type": "parallel", "for_each": "[1]", "step": http("b", depends_on=["a"])},
    )
    assert "cannot depend on other steps" in problem(data, "b", "depends_on")


# --- expressions -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "step_id", "field"),
    [
        ({"id": "c", "type": "condition", "if": "input.x >", "then": []}, "c", "if"),
        ({"id": "p", "type": "parallel", "for_each": "[1,", "step": http("s")}, "p", "for_each"),
        ({"id": "d", "type": "delay", "until": "timestamp("}, "d", "until"),
        ({"id": "h", "type": "http", "with": {"url": "https://x/${{ input. }}"}}, "h", "with.url"),
        (
            {"id": "k", "type": "sms_send", "with": {"to": [{"n": 1}, {"n": "${{ 1 + }}"}]}},
            "k",
            "with.to[1].n",
        ),
        ({"id": "t", "type": "transform", "output": {"a": ["${{ )( }}"]}}, "t", "output.a[0]"),
    ],
)
def test_expressions_that_do_not_compile(step: dict[str, Any], step_id: str, field: str) -> None:
    message = problem(workflow(step), step_id, field)
    assert message.startswith("invalid expression")
    assert "Syntax error" in message


def test_workflow_level_expressions() -> None:
    data = workflow(
        http("a"), concurrency={"key": "input.customer +", "limit": 2}, output="${{ ( }}"
    )
    found = problems(data)
    assert {(p.step_id, p.field) for p in found} == {(None, "concurrency.key"), (None, "output")}


def test_unknown_variables_and_steps() -> None:
    data = workflow(http("a"), {"id": "t", "type": "transform", "output": "${{ inptu.x }}"})
    assert problem(data, "t", "output") == (
        "unknown variable 'inptu'; expressions here can read input, run, steps"
    )
    data = workflow(http("a"), output={"x": "${{ steps.nope.output }}"})
    assert problem(data, None, "output.x") == "reads steps.nope, but no step has the id 'nope'"
    data = workflow(http("a"), concurrency={"key": "steps.a.output", "limit": 1})
    assert "can read input, run" in problem(data, None, "concurrency.key")


def test_item_and_index_only_inside_for_each() -> None:
    outside = workflow(http("a", **{"with": {"url": "https://x/${{ index }}"}}))
    assert "only inside the step of a for_each" in problem(outside, "a", "with.url")
    nested = {
        "id": "p",
        "type": "parallel",
        "for_each": "input.items",
        "step": {
            "id": "c",
            "type": "condition",
            "if": "item.ok",
            "then": [{"id": "t", "type": "transform", "output": "${{ item.v + index }}"}],
        },
    }
    parse_definition(workflow(nested))


def test_secrets_only_alone_in_with() -> None:
    alone = http("a", **{"with": {"url": "https://x/", "headers": {"T": "${{ secrets.T }}"}}})
    parse_definition(workflow(alone))
    mixed = http(
        "a", **{"with": {"url": "https://x/", "headers": {"T": "${{ secrets.T }}-${{ input.x }}"}}}
    )
    assert "reads secrets can read nothing else" in problem(workflow(mixed), "a", "with.headers.T")
    stored = {"id": "t", "type": "transform", "output": "${{ secrets.T }}"}
    assert "never stored" in problem(workflow(stored), "t", "output")
    condition = {"id": "c", "type": "condition", "if": "secrets.ON", "then": []}
    assert "never stored" in problem(workflow(condition), "c", "if")


# --- http params -------------------------------------------------------------------------


def test_http_with_literal_values_are_checked() -> None:
    data = workflow(
        {
            "id": "h",
            "type": "http",
            "with": {
                "method": "FETCH",
                "url": "ftp://x",
                "expected_status": [200, 99],
                "json": {"a": 1},
                "body": "x",
                "header": {},
            },
        }
    )
    found = {(p.field, p.message) for p in problems(data)}
    assert (
        "with.method",
        "Input should be 'GET', 'POST', 'PUT', 'PATCH', 'DELETE', 'HEAD' or 'OPTIONS'",
    ) in found
    assert ("with.url", "'ftp://x' is not an absolute http:// or https:// URL") in found
    assert ("with.expected_status[1]", "Input should be greater than or equal to 100") in found
    assert ("with.header", "unknown field; did you mean 'headers'?") in found


def test_http_json_and_body_are_exclusive() -> None:
    data = workflow(http("h", **{"with": {"url": "https://x/", "json": {}, "body": "b"}}))
    assert problem(data, "h", "with.body") == "json and body are mutually exclusive"


def test_http_templated_values_are_checked_once_rendered() -> None:
    params = {
        "method": "${{ input.method }}",
        "url": "${{ input.url }}",
        "headers": "${{ input.headers }}",
        "expected_status": ["${{ input.status }}"],
        "timeout": "${{ input.timeout }}",
    }
    parse_definition(workflow(http("h", **{"with": params})))
    assert problem(workflow(http("h", **{"with": {}})), "h", "with.url") == (
        "required field is missing"
    )


def test_http_params_validate_rendered_values() -> None:
    params = HttpParams.model_validate(
        {
            "method": "post",
            "url": "https://x.test/a",
            "headers": {"X-N": 3, "X-B": True},
            "json": {"a": 1},
            "timeout": "5s",
        }
    )
    assert params.method == "POST"
    assert params.headers == {"X-N": "3", "X-B": "true"}
    assert params.json_ == {"a": 1}
    assert params.timeout == 5.0
    assert params.response_headers == ["content-type", "etag", "location", "retry-after"]
    assert params.status_ok(204) and not params.status_ok(304)
    custom = HttpParams(url="https://x.test/", expected_status=[404], response_headers=["X-Id"])
    assert custom.status_ok(404) and not custom.status_ok(200)
    assert custom.response_headers == ["x-id"]


# --- everything at once ------------------------------------------------------------------


def test_all_problems_are_reported_together() -> None:
    data = {
        "name": "bad name",
        "version": 1,
        "steps": [
            http("a", timeout="soon", depends_on=["ghost"]),
            http("a"),
            {"id": "c", "type": "condition", "if": "(", "then": [{"id": "d", "type": "mystery"}]},
        ],
    }
    found = problems(data, known_types=set())
    assert {(p.step_id, p.field) for p in found} == {
        (None, "name"),
        ("a", "timeout"),
        ("a", "id"),
        ("a", "depends_on"),
        ("c", "if"),
        ("d", "type"),
    }
    text = str(DefinitionError(found))
    assert "file wf.yaml, step 'd', field 'type': unknown step type 'mystery'" in text


# --- helpers for the engine --------------------------------------------------------------


def test_effective_timeout_and_retry() -> None:
    defn = parse_definition(
        workflow(
            http("plain"),
            http("own", timeout="5s", retry={"max_retries": 9, "jitter": False}),
            defaults={"timeout": "30s", "retry": {"max_retries": 2, "retry_on": ["timeout"]}},
        )
    )
    plain, own = defn.step("plain"), defn.step("own")
    assert defn.effective_timeout(plain, 99.0) == 30.0
    assert defn.effective_timeout(own, 99.0) == 5.0
    assert defn.effective_retry(plain) == RetryPolicy(max_retries=2, retry_on=["timeout"])
    assert defn.effective_retry(own) == RetryPolicy(
        max_retries=9, jitter=False, retry_on=["timeout"]
    )
    bare = parse_definition(workflow(http("a")))
    assert bare.effective_timeout(bare.step("a"), 12.0) == 12.0
    assert bare.effective_timeout(bare.step("a")) is None
    assert bare.effective_retry(bare.step("a")) == RetryPolicy()
    assert RetryPolicy().retry_on == ["timeout", "connection_error", "http_5xx", "http_429"]


def test_topological_order_is_stable() -> None:
    defn = parse_definition(
        workflow(
            http("d", depends_on=["b", "c"]),
            http("a"),
            http("b", depends_on=["a"]),
            http("c"),
            http("e"),
        )
    )
    assert topological_order(defn.steps) == ["a", "b", "c", "d", "e"]
    loop = [
        TaskStep(id="x", type="http", depends_on=["y"]),
        TaskStep(id="y", type="http", depends_on=["x"]),
    ]
    with pytest.raises(ValueError, match="cycle"):
        topological_order(loop)


def test_compiled_expressions() -> None:
    defn = load_definition(EXAMPLE)
    compiled = defn.compiled
    assert defn.compiled is compiled
    assert set(compiled.expressions) == {("route", "if"), ("charge_all", "for_each")}
    assert ("charge", "with") in compiled.templates and ("summary", "output") in compiled.templates
    assert compiled.concurrency_key is not None and compiled.output is not None
    ctx = build_context(
        {"customer_id": "c9", "order_id": 5, "phone": "+1"},
        {
            "order": {
                "output": {"body": {"total": 2000, "items": [1]}},
                "status": "succeeded",
                "error": None,
            }
        },
        {"id": "r1", "workflow": "order-fulfilment", "version": 3},
    )
    assert compiled.expression("route", "if").evaluate(ctx) is True
    assert compiled.concurrency_key.evaluate(ctx) == "c9"
    charge = compiled.template("charge", "with").render(dict(ctx, item={"sku": 1}, index=0))
    assert charge["json"] == {"sku": 1}
    assert charge["headers"] == {"Idempotency-Key": "r1-0"}
    sms = compiled.template("sms", "with")
    assert sms.render(ctx, skip_roots=frozenset({"secrets"})) == {
        "to": "+1",
        "token": "${{ secrets.SMS_TOKEN }}",
    }
    assert compile_definition(defn).expressions.keys() == compiled.expressions.keys()


def test_models_are_frozen() -> None:
    defn = load_definition(EXAMPLE)
    with pytest.raises(ValueError, match="frozen"):
        defn.version = 4


def test_task_step_refuses_inline_types() -> None:
    with pytest.raises(ValueError, match="not a worker step type"):
        TaskStep(id="x", type="delay")


# --- JSON Schema -------------------------------------------------------------------------


def test_json_schema_for_editors() -> None:
    schema = definition_json_schema()
    json.dumps(schema)
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert {"name", "version", "steps", "defaults", "output"} <= set(schema["properties"])
    assert set(schema["required"]) == {"name", "version", "steps"}
    defs = schema["$defs"]
    assert "with" in defs["TaskStep"]["properties"]
    assert {"if", "then", "else"} <= set(defs["ConditionStep"]["properties"])
    assert defs["TaskStep"]["properties"]["id"]["pattern"] == r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
    assert defs["TaskStep"]["properties"]["type"]["not"] == {
        "enum": [
            "condition",
            "delay",
            "fail",
            "parallel",
            "switch",
            "transform",
            "wait",
            "workflow",
        ]
    }
    assert {"workflow", "version", "input"} <= set(defs["WorkflowStep"]["properties"])
    duration = defs["DelayStep"]["properties"]["duration"]["anyOf"][0]
    assert "1h30m" in duration["description"] and "ISO 8601" in duration["description"]
    assert {"type": "number", "minimum": 0} in duration["anyOf"]


def test_workflow_definition_model_validates_directly() -> None:
    defn = WorkflowDefinition.model_validate(workflow(http("a")))
    assert defn.step("a").type == "http"


# --- bounds: what a small text can make big, and what nests too deep -----------------------

LAUGHS = "".join(
    f"      l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10) if i else ', '.join(['lol'] * 10)}]\n"
    for i in range(10)
)


def text_problem(text: str, format: Literal["yaml", "json"] = "yaml") -> str:
    with pytest.raises(DefinitionError) as info:
        parse_definition_text(text, format=format, source=SOURCE)
    assert len(info.value.problems) >= 1
    return str(info.value)


def nested(depth: int, *, leaf: dict[str, Any] | None = None) -> dict[str, Any]:
    """A definition whose steps nest `depth` deep, alternating conditions, branches and
    fan-outs; the innermost step is `leaf`."""
    step = leaf or {"id": f"s{depth}", "type": "transform", "output": "${{ run.id }}"}
    for d in range(depth - 1, 0, -1):
        if d % 3 == 0:
            step = {"id": f"s{d}", "type": "condition", "if": "true", "then": [step]}
        elif d % 3 == 1:
            step = {"id": f"s{d}", "type": "parallel", "branches": [[step]]}
        else:
            step = {"id": f"s{d}", "type": "parallel", "for_each": "[1]", "step": step}
    return workflow(step)


def test_a_yaml_alias_bomb_is_refused_in_milliseconds() -> None:
    text = f"name: wf\nversion: 1\nsteps:\n  - id: t\n    type: transform\n    output:\n{LAUGHS}"
    started = time.perf_counter()
    message = text_problem(text)
    assert time.perf_counter() - started < 1.0  # ~10 ms; a billion values if expanded
    assert "more than 100000 values once its aliases are expanded" in message
    assert "line 11" in message


def test_aliases_that_stay_small_are_fine() -> None:
    text = """
name: wf
version: 1
defaults: &defaults {timeout: 5s, retry: {max_retries: 2}}
steps:
  - {id: a, type: http, with: &params {url: "https://x.test/", headers: {x: "1"}}}
  - {id: b, type: http, depends_on: [a], with: *params, retry: {max_retries: 1}}
"""
    definition = parse_definition_text(text)
    a, b = definition.step("a"), definition.step("b")
    assert isinstance(a, TaskStep) and isinstance(b, TaskStep)
    assert b.with_ == a.with_


def test_an_alias_inside_the_node_it_names_is_refused() -> None:
    message = text_problem("name: wf\nversion: 1\nsteps: &s [{id: a, type: http, x: *s}]\n")
    assert "alias *s is used inside the node it names" in message


@pytest.mark.parametrize(
    ("text", "format"),
    [
        ("name: wf\nsteps: " + "[" * 5_000 + "]" * 5_000, "yaml"),
        ("name: wf\nsteps:\n" + "".join(" " * i + "- \n" for i in range(1, 400)), "yaml"),
        ('{"name": "wf", "steps": ' + "[" * 100_000 + "]" * 100_000 + "}", "json"),
        ('{"steps": ' + '{"a": ' * 300 + "1" + "}" * 300 + "}", "json"),
    ],
)
def test_text_nested_past_the_limit_is_refused_not_a_recursion_error(
    text: str, format: Literal["yaml", "json"]
) -> None:
    started = time.perf_counter()
    assert "nested more than 256 levels deep" in text_problem(text, format)
    assert time.perf_counter() - started < 2.0


def test_a_text_over_the_size_limit_is_refused_before_parsing() -> None:
    message = text_problem("#" * (MAX_TEXT_CHARS + 1))
    assert f"characters long; the limit is {MAX_TEXT_CHARS}" in message


def test_steps_nest_up_to_32_deep() -> None:
    definition = parse_definition(nested(MAX_STEP_DEPTH))
    assert len(list(definition.all_steps())) == MAX_STEP_DEPTH
    too_deep = problems(nested(MAX_STEP_DEPTH + 1))
    assert [(p.step_id, p.field) for p in too_deep] == [("s33", None)]
    assert too_deep[0].message == (
        "nested 33 steps deep (inside conditions and parallel steps); the limit is 32"
    )


@pytest.mark.parametrize("depth", [250, 400, 5_000])
def test_far_too_deep_is_refused_as_such_before_pydantic_walks_it(depth: int) -> None:
    found = problems(nested(depth))
    assert [(p.step_id, p.message.split(";")[0]) for p in found] == [
        ("s33", "nested 33 steps deep (inside conditions and parallel steps)")
    ]


def test_values_in_with_and_output_nest_up_to_64_deep() -> None:
    def deep(levels: int) -> Any:
        value: Any = 1
        for _ in range(levels):
            value = [value]
        return value

    ok = workflow(
        http("a", **{"with": {"url": "https://x.test/", "json": deep(MAX_DEPTH - 1)}}),
        {"id": "t", "type": "transform", "output": deep(MAX_DEPTH)},
        output=deep(MAX_DEPTH),
    )
    parse_definition(ok)
    bad = workflow(
        http("a", **{"with": {"url": "https://x.test/", "json": deep(MAX_DEPTH)}}),
        {"id": "t", "type": "transform", "output": deep(MAX_DEPTH + 1)},
        output=deep(MAX_DEPTH + 1),
    )
    found = {(p.step_id, p.field): p.message for p in problems(bad)}
    assert found == {
        ("a", "with"): "the value is nested more than 64 levels deep",
        ("t", "output"): "the value is nested more than 64 levels deep",
        (None, "output"): "the value is nested more than 64 levels deep",
    }


def test_text_postgresql_cannot_store_is_refused_where_it_is() -> None:
    data = workflow(
        http("a", **{"with": {"url": "https://x.test/", "headers": {"x": "a\x00b"}}}),
        {"id": "t", "type": "transform", "output": {"k\ud800": 1}},
        description="fine \\u0000 as six characters",
    )
    found = {(p.step_id, p.field): p.message for p in problems(data)}
    assert found == {
        ("a", "with.headers.x"): (
            "the text holds a NUL character (\\u0000), which PostgreSQL cannot store"
        ),
        ("t", "output"): (
            "the key 'k\\ud800' holds an unpaired UTF-16 surrogate, which is not valid Unicode"
        ),
    }


def test_values_json_cannot_hold_are_refused() -> None:
    text = "name: wf\nversion: 1\nsteps:\n  - {id: t, type: transform, output: !!binary aGk=}\n"
    assert "step 't', field 'output': a bytes is not a JSON value" in text_problem(text)


def test_expressions_too_big_or_too_costly_are_refused_at_validation() -> None:
    huge = "${{ " + " + ".join(["1"] * 3_000) + " }}"
    long_list = "[" + ", ".join(str(i) for i in range(300)) + "]"
    bomb = f"${{{{ {long_list}.map(x, {long_list}.map(y, {long_list}.map(z, x + y + z))) }}}}"
    found = {
        (p.step_id, p.field): p.message
        for p in problems(
            workflow(
                {"id": "t", "type": "transform", "output": {"a": huge}},
                {"id": "u", "type": "transform", "output": bomb},
            )
        )
    }
    assert "characters long; the limit is 8192" in found[("t", "output.a")]
    assert found[("u", "output")].startswith("too costly: over its own literals alone")


def test_a_secret_string_cannot_iterate_the_worker_evaluates_it_unbounded() -> None:
    bad = http("a", **{"with": {"url": "https://x.test/", "headers": {
        "x": "${{ [1, 2].map(i, secrets.TOKEN).join(',') }}",
        "y": "${{ secrets.TOKEN.matches('^a') }}",
    }}})  # fmt: skip
    found = {(p.step_id, p.field) for p in problems(workflow(bad))}
    assert found == {("a", "with.headers.x"), ("a", "with.headers.y")}


def test_a_long_chain_validates_in_linear_time() -> None:
    chain = [
        {"id": f"s{i}", "type": "transform", "output": i, "depends_on": [f"s{i - 1}"] if i else []}
        for i in range(3_000)
    ]
    chain.append({"id": "fan", "type": "parallel", "depends_on": ["s2999"],
                  "for_each": "steps.s2999.output", "step": {"id": "x", "type": "http",
                  "with": {"url": "https://x.test/"}}})  # fmt: skip
    started = time.perf_counter()
    parse_definition(workflow(*chain))
    assert time.perf_counter() - started < 10  # ~0.5 s; quadratic checks took minutes
