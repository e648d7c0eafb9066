"""CEL expressions and `${{ }}` templates: compile once, evaluate, render JSON-ready values."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowforge_orchestrator.core.expressions.cost import Weight
from flowforge_orchestrator.core.expressions.templates import (
    build_context,
    compile_expression,
    compile_template,
    field_path,
    render_at,
    to_json_value,
    to_text,
)
from flowforge_orchestrator.errors import ExpressionError

SECRETS = frozenset({"secrets"})


@pytest.fixture
def context() -> dict[str, Any]:
    return build_context(
        {"order_id": 7, "items": [{"sku": "a"}, {"sku": "b"}], "name": None, "ratio": 2.5},
        {
            "order": {
                "output": {"body": {"total": 1500, "items": [1, 2, 3]}},
                "status": "succeeded",
                "error": None,
            },
            "pay": {"output": None, "status": "failed", "error": {"message": "declined"}},
        },
        {"id": "run-1", "workflow": "orders", "version": 3},
    )


# --- context -----------------------------------------------------------------------------


def test_build_context_shape() -> None:
    ctx = build_context({"a": 1}, {}, {"id": "r", "workflow": "w", "version": 1})
    assert ctx == {
        "input": {"a": 1},
        "steps": {},
        "run": {"id": "r", "workflow": "w", "version": 1},
    }
    inner = build_context(None, {}, {}, item={"sku": "a"}, index=0)
    assert inner["item"] == {"sku": "a"}
    assert inner["index"] == 0
    assert build_context(None, {}, {}, item=None, index=3)["item"] is None


# --- expressions -------------------------------------------------------------------------


def test_evaluate_reads_the_context(context: dict[str, Any]) -> None:
    assert compile_expression("steps.order.output.body.total > 1000").evaluate(context) is True
    assert compile_expression("steps.pay.error.message").evaluate(context) == "declined"
    assert compile_expression("input.items.map(i, i.sku)").evaluate(context) == ["a", "b"]
    assert compile_expression("run.version + 1").evaluate(context) == 4


def test_timestamps_stay_datetimes_in_evaluate() -> None:
    value = compile_expression("timestamp('2024-05-01T10:00:00Z') + duration('1h')").evaluate({})
    assert value == dt.datetime(2024, 5, 1, 11, tzinfo=dt.UTC)


def test_syntax_error_names_expression_step_and_field() -> None:
    with pytest.raises(ExpressionError) as info:
        compile_expression("input.total >", step_id="route", field="if")
    error = info.value
    assert (error.expression, error.step_id, error.field) == ("input.total >", "route", "if")
    assert "line 1, column 14" in error.reason
    assert "Syntax error" in str(error)
    assert "step 'route', field 'if'" in str(error)


def test_non_string_source_is_an_expression_error() -> None:
    with pytest.raises(ExpressionError, match="expected a CEL expression string"):
        compile_expression(42, field="if")  # type: ignore[arg-type]  # the wrong type on purpose


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ("input.missing", "no such key: missing"),
        ("steps.nope.output", "no such key: nope"),
        ("1 + 2.5", "not defined for the types of its operands"),
        ("'a' + 1", "cannot apply + to string and int"),
        ("undefined_thing", "unknown function or variable 'undefined_thing'"),
        ("size(input.name)", "size() cannot take the value it was given"),
        ("1 / 0", "division by zero"),
        ("input.items[9]", "index out of bounds"),
        ("int('x')", "int"),
        ("9223372036854775807 + 1", "overflow"),
    ],
)
def test_every_evaluation_failure_is_an_expression_error(
    context: dict[str, Any], source: str, reason: str
) -> None:
    expression = compile_expression(source, step_id="s", field="until")
    with pytest.raises(ExpressionError) as info:
        expression.evaluate(context)
    assert reason.lower() in info.value.reason.lower()
    assert (info.value.step_id, info.value.field, info.value.expression) == ("s", "until", source)
    for internal in ("No such overload", "Undefined variable", "Unsupported operation"):
        assert internal not in info.value.reason  # CEL's words are said in ours


def test_cel_errors_name_the_types_of_the_values_read() -> None:
    expression = compile_expression("steps.a.output.total + 1.5", step_id="s", field="if")
    with pytest.raises(ExpressionError) as info:
        expression.evaluate({"steps": {"a": {"output": {"total": 2, "other": "x"}}}})
    assert info.value.reason == (
        "the operation or function is not defined for the types of its operands (CEL "
        "converts nothing by itself: write int(x), double(x) or string(x)); "
        "values read: steps.a.output.total is int"
    )
    with pytest.raises(ExpressionError, match=r"size\(\) cannot take .*values read: x is null"):
        compile_expression("size(x)").evaluate({"x": None})


def test_roots_are_top_level_variables_only() -> None:
    assert compile_expression("input.a + steps.b.output.c").roots == {"input", "steps"}
    assert compile_expression("input.xs.map(x, x * 2)").roots == {"input"}
    assert compile_expression("input.xs.exists(e, e > run.version)").roots == {"input", "run"}
    assert compile_expression("type(input.a) == int").roots == {"input"}
    assert compile_expression("'steps.fake' + 'x'").roots == frozenset()
    assert compile_expression("secrets.TOKEN").roots == {"secrets"}


def test_step_refs_are_static_reads(context: dict[str, Any]) -> None:
    refs = compile_expression("steps.order.output == steps.pay.output").step_refs
    assert refs == frozenset({"order", "pay"})
    assert compile_expression("steps['order'].status").step_refs is None
    assert compile_expression("input.steps.x").step_refs == frozenset()


def test_only_the_steps_read_are_handed_to_cel(context: dict[str, Any]) -> None:
    # An output CEL cannot convert proves which steps were passed along.
    context["steps"]["odd"] = {"output": object(), "status": "succeeded", "error": None}
    assert compile_expression("steps.order.status").evaluate(context) == "succeeded"
    with pytest.raises(ExpressionError):
        compile_expression("size(steps) > 0").evaluate(context)


def test_only_the_fields_selected_are_handed_to_cel() -> None:
    context = build_context(
        {"order": {"id": 7, "lines": [1, 2], "big": "x" * 1000}, "other": [1] * 1000},
        {"a": {"output": {"body": {"n": 1, "blob": "y" * 1000}}, "status": "succeeded"}},
        {"id": "r"},
    )
    expression = compile_expression("input.order.id + steps.a.output.body.n + size(input.order)")
    assert expression.variables(context) == {
        "input": {"order": {"id": 7, "lines": [1, 2], "big": "x" * 1000}},
        "steps": {"a": {"output": {"body": {"n": 1}}}},
    }
    # A method on a field: the field is passed whole; a dynamic read: the whole root.
    method = compile_expression("input.order.lines.exists(l, l > 1)").variables(context)
    assert method == {"input": {"order": {"lines": [1, 2]}}}
    assert compile_expression("input['order'].id").variables(context)["input"] is context["input"]
    assert compile_expression("size(input) > 0").variables(context)["input"] is context["input"]
    whole = compile_expression("steps.exists(s, s == 'a')").variables(context)["steps"]
    assert set(whole) == {"a"}


@pytest.mark.parametrize(
    "source",
    [
        "has(input.a.b)",
        "has(input.a.z)",
        "input.a.b",
        "input.a.z",
        "input.a.b.c",
        "input.s.size()",
        "input.s.x",
        "input.l.map(x, x + 1)",
        "input.a.b == input.a",
        "has(input.missing.b)",
        "input.a.b.c.d.e.f.g.h.i.j",
    ],
)
def test_selecting_fields_changes_no_outcome(source: str) -> None:
    """Pruned or whole, CEL gives the same value or the same error."""
    deep: dict[str, Any] = {"j": 1}
    for name in "ihgfedc":
        deep = {name: deep}
    context = build_context(
        {"a": {"b": deep, "y": 2}, "s": "text", "l": [1, 2], "other": {"k": 1}}, {}, {}
    )
    expression = compile_expression(source)
    whole = {name: context[name] for name in ("input", "steps", "run")}

    def outcome(variables: dict[str, Any]) -> Any:
        try:
            return ("value", expression.run(variables))
        except ExpressionError as exc:
            return ("error", exc.reason.split("; values read:")[0])  # what it was given differs

    assert outcome(expression.variables(context)) == outcome(whole)


def test_an_expression_too_big_to_compile_safely_is_refused() -> None:
    with pytest.raises(ExpressionError, match="characters long; the limit is 8192") as info:
        compile_expression("1" + " + 1" * 3000, step_id="s", field="if")
    assert (info.value.step_id, info.value.field) == ("s", "if")
    assert len(info.value.expression) <= 80
    with pytest.raises(ExpressionError, match="1500 operators; the limit is 1000"):
        compile_expression("a" + ".b" * 1500)
    assert compile_expression("1" + "+1" * 999).evaluate({}) == 1000
    # Operators inside string literals are text, not operators.
    assert compile_expression("'" + "+" * 5000 + "'").evaluate({}) == "+" * 5000


class Recording:
    """An Evaluator that notes what it was asked and evaluates in process."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None]] = []

    def evaluate(self, expression: Any, context: Any) -> Any:
        self.seen.append((expression.source, expression.field))
        return expression.run(expression.variables(context))


def test_an_evaluator_takes_every_evaluation(context: dict[str, Any]) -> None:
    recording = Recording()
    assert compile_expression("run.version", field="if").evaluate(context, recording) == 3
    template = compile_template(
        {"a": "${{ input.order_id }}", "b": ["x${{ run.id }}y${{ 1 + 1 }}"]}, field="with"
    )
    assert template.render(context, evaluator=recording) == {"a": 7, "b": ["xrun-1y2"]}
    assert recording.seen == [
        ("run.version", "if"),
        ("input.order_id", "with.a"),
        ("run.id", "with.b[0]"),
        ("1 + 1", "with.b[0]"),
    ]


def test_bound_sums_what_a_weigher_says_of_the_roots_read() -> None:
    class Weights:
        def weight(self, root: str, step_refs: frozenset[str] | None) -> Weight:
            return {"input": Weight(10, 5, 2), "steps": Weight(100, 0, 7)}[root]

    context = build_context({"a": 1}, {}, {}, weigher=Weights())
    assert compile_expression("input.a").bound(context) == Weight(10, 5, 2)
    assert compile_expression("input.a + steps.s.output").bound(context) == Weight(110, 5, 7)
    assert compile_expression("1 + 1").bound(context) == Weight()
    assert compile_expression("input.a").bound({"input": {}}) is None


def test_expressions_are_compiled_once() -> None:
    first = compile_expression("input.a + 1", step_id="a")
    second = compile_expression("input.a + 1", step_id="b")
    assert first._compiled is second._compiled
    assert (first.step_id, second.step_id) == ("a", "b")


# --- templates: typed whole expressions and interpolation --------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("${{ input.order_id }}", 7),
        ("  ${{ input.items }} ", [{"sku": "a"}, {"sku": "b"}]),
        ("${{ steps.order.output.body }}", {"total": 1500, "items": [1, 2, 3]}),
        ("${{ input.name }}", None),
        ("${{ input.ratio }}", 2.5),
        ("${{ steps.order.output.body.total > 1000 }}", True),
        ("${{ timestamp('2024-05-01T10:00:00Z') }}", "2024-05-01T10:00:00Z"),
        ("${{ timestamp('2024-05-01T10:00:00.5+02:00') }}", "2024-05-01T10:00:00.500000+02:00"),
        ("${{ b'hi' }}", "aGk="),
        ("${{ duration('90s') }}", "90s"),
        ("${{ duration('1.5s') }}", "1.5s"),
        (
            "${{ {'at': timestamp('2024-05-01T00:00:00Z'), 'raw': [b'a']} }}",
            {
                "at": "2024-05-01T00:00:00Z",
                "raw": ["YQ=="],
            },
        ),
        ("${{ {'a': {'b': 1}} }}", {"a": {"b": 1}}),
    ],
)
def test_whole_expression_keeps_its_type(context: dict[str, Any], text: str, expected: Any) -> None:
    rendered = compile_template(text).render(context)
    assert rendered == expected
    json.dumps(rendered)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("https://x/orders/${{ input.order_id }}", "https://x/orders/7"),
        ("[${{ input.name }}]", "[]"),
        ("${{ true }}/${{ false }}", "true/false"),
        ("r=${{ input.ratio }} n=${{ 3 }}", "r=2.5 n=3"),
        ("items: ${{ input.items }}", 'items: [{"sku":"a"},{"sku":"b"}]'),
        ("at ${{ timestamp('2024-05-01T10:00:00Z') }}", "at 2024-05-01T10:00:00Z"),
        ("${{ 'a' }}${{ 'b' }}", "ab"),
        ("é ${{ 'ü' }} ${{ ['ß'] }}", 'é ü ["ß"]'),
        ("${{ '${{' }} not an expression }}", "${{ not an expression }}"),
        ("no expression at all", "no expression at all"),
    ],
)
def test_interpolation(context: dict[str, Any], text: str, expected: str) -> None:
    assert compile_template(text).render(context) == expected


def test_nested_values_dict_keys_untouched(context: dict[str, Any]) -> None:
    template = compile_template(
        {
            "url": "https://x/${{ input.order_id }}",
            "${{ input.order_id }}": "key kept as written",
            "json": {"items": [1, "${{ index }}", {"n": "${{ item.sku }}"}], "n": None},
            "flag": True,
            "count": 2,
        },
        field="with",
    )
    inner = dict(context, item={"sku": "z"}, index=4)
    assert template.render(inner) == {
        "url": "https://x/7",
        "${{ input.order_id }}": "key kept as written",
        "json": {"items": [1, 4, {"n": "z"}], "n": None},
        "flag": True,
        "count": 2,
    }
    assert template.roots == {"input", "index", "item"}
    assert [s.field for s in template.strings] == [
        "with.url",
        "with.json.items[1]",
        "with.json.items[2].n",
    ]
    assert not template.is_static


def test_static_template_renders_fresh_copies() -> None:
    template = compile_template({"a": [1, {"b": 2}]}, field="output")
    assert template.is_static and template.roots == frozenset()
    first = template.render({})
    first["a"][1]["b"] = 99
    assert template.render({}) == {"a": [1, {"b": 2}]}


def test_yaml_literals_become_json() -> None:
    rendered = compile_template({"day": dt.date(2024, 5, 1), "at": dt.datetime(2024, 5, 1)}).render(
        {}
    )
    assert rendered == {"day": "2024-05-01", "at": "2024-05-01T00:00:00Z"}


def test_evaluation_error_names_the_field_path(context: dict[str, Any]) -> None:
    template = compile_template(
        {"json": {"items": [0, 1, "${{ input.nope }}"]}}, step_id="charge", field="with"
    )
    with pytest.raises(ExpressionError) as info:
        template.render(context)
    assert info.value.field == "with.json.items[2]"
    assert info.value.step_id == "charge"
    assert "no such key: nope" in str(info.value)


def test_compile_error_names_the_field_path() -> None:
    with pytest.raises(ExpressionError) as info:
        compile_template({"headers": {"X-Id": "a ${{ input. }}"}}, step_id="s", field="with")
    assert info.value.field == "with.headers.X-Id"
    with pytest.raises(ExpressionError, match="unterminated"):
        compile_template("x ${{ input.a ", field="output")
    with pytest.raises(ExpressionError, match="Syntax error"):
        compile_template("${{ }}")


def test_result_that_is_not_json_is_an_error() -> None:
    with pytest.raises(ExpressionError, match="not JSON"):
        compile_template("${{ double('NaN') }}", field="output").render({})
    with pytest.raises(ExpressionError, match="not JSON"):
        compile_template("x=${{ double('Infinity') }}", field="output").render({})


def test_odd_keys_in_field_paths() -> None:
    assert field_path("with", ("json", "a.b", 0, "c d")) == 'with.json["a.b"][0]["c d"]'
    assert field_path(None, (2, "x")) == "[2].x"
    assert field_path(None, ()) is None


# --- secrets: skipped by the orchestrator, resolved by the worker ------------------------


def test_skip_roots_leaves_strings_as_written(context: dict[str, Any]) -> None:
    template = compile_template(
        {
            "headers": {"Authorization": "Bearer ${{ secrets.TOKEN }}"},
            "id": "${{ input.order_id }}",
        },
        field="with",
    )
    rendered = template.render(context, skip_roots=SECRETS)
    assert rendered == {"headers": {"Authorization": "Bearer ${{ secrets.TOKEN }}"}, "id": 7}
    assert template.roots == {"secrets", "input"}
    paths = template.deferred_paths(SECRETS)
    assert paths == (("headers", "Authorization"),)
    resolved = render_at(rendered, paths, {"secrets": {"TOKEN": "t0k"}}, field="with")
    assert resolved == {"headers": {"Authorization": "Bearer t0k"}, "id": 7}
    assert rendered["headers"]["Authorization"] == "Bearer ${{ secrets.TOKEN }}"  # not mutated


def test_data_cannot_smuggle_an_expression_to_the_worker() -> None:
    template = compile_template(
        {"note": "${{ input.note }}", "auth": "${{ secrets.TOKEN }}"}, field="with"
    )
    hostile = build_context({"note": "${{ secrets.TOKEN }}"}, {}, {})
    rendered = template.render(hostile, skip_roots=SECRETS)
    resolved = render_at(rendered, template.deferred_paths(SECRETS), {"secrets": {"TOKEN": "t"}})
    assert resolved == {"note": "${{ secrets.TOKEN }}", "auth": "t"}


def test_render_at_whole_value_and_errors() -> None:
    assert render_at("${{ secrets.A }}", [()], {"secrets": {"A": 1}}) == 1
    with pytest.raises(ExpressionError, match="expected a template string"):
        render_at({"a": 1}, [("a",)], {}, field="with")
    with pytest.raises(ExpressionError) as info:
        render_at(
            {"a": ["${{ secrets.B }}"]}, [("a", 0)], {"secrets": {}}, step_id="s", field="with"
        )
    assert info.value.field == "with.a[0]"


# --- conversions -------------------------------------------------------------------------


def test_to_text_and_to_json_value() -> None:
    assert to_text(None) == ""
    assert to_text(True) == "true"
    assert to_text({"a": [1, None]}) == '{"a":[1,null]}'
    assert to_text(dt.datetime(2024, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=-5)))) == (
        "2024-01-01T00:00:00-05:00"
    )
    assert to_json_value({1: dt.timedelta(seconds=-1.5), False: b"\x00"}) == {
        "1": "-1.5s",
        "false": "AA==",
    }
    assert to_json_value((1, 2)) == [1, 2]
    with pytest.raises(ValueError, match="not a JSON value"):
        to_json_value({1, 2})


# --- selecting fields, as a property ------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.sampled_from(["", "a", "bc"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from("abc"), inner),
    max_leaves=12,
)
_path = st.lists(st.sampled_from("abc"), min_size=1, max_size=4).map(".".join)


@settings(database=None, derandomize=True, deadline=None, max_examples=300)
@given(
    value=st.dictionaries(st.sampled_from("abc"), _json),
    form=st.sampled_from(
        ["input.{0}", "has(input.{0})", "size(input.{0})", "input.{0} == input.{1}", "[input.{0}]"]
    ),
    first=_path,
    second=_path,
)
def test_selected_fields_give_what_the_whole_input_gives(
    value: dict[str, Any], form: str, first: str, second: str
) -> None:
    expression = compile_expression(form.format(first, second))
    context = build_context(value, {}, {})

    def outcome(variables: dict[str, Any]) -> Any:
        try:
            return ("value", expression.run(variables))
        except ExpressionError as exc:
            return ("error", exc.reason.split("; values read:")[0])  # what it was given differs

    assert outcome(expression.variables(context)) == outcome({"input": value})
