"""The cost estimate that routes an evaluation inline, to the sandbox, or refuses it (pure)."""

from __future__ import annotations

import pytest

from flowforge_orchestrator.core.expressions.cost import (
    INLINE_NODES,
    MAX_VALUE_DEPTH,
    Budget,
    Route,
    Shape,
    Weight,
    bytes_text,
    inline_ok,
    route,
    shape_of,
    weigh,
)
from flowforge_orchestrator.core.expressions.templates import compile_expression

BUDGET = Budget(timeout=0.1)


def shape(source: str) -> Shape:
    return compile_expression(source).shape


# --- shape ------------------------------------------------------------------------------


def test_a_plain_expression_has_no_comprehension_and_only_linear_calls() -> None:
    plain = shape("input.total > 1000 && size(steps.a.output.items) < 5")
    assert plain.depth == 0
    assert plain.comprehensions == 0
    assert plain.other_calls == frozenset()
    assert plain.simple


def test_nesting_depth_counts_macros_inside_macros_not_one_after_another() -> None:
    nested = shape("l.map(x, l.map(y, l.filter(z, z > x + y)))")
    assert (nested.depth, nested.comprehensions) == (3, 3)
    chained = shape("l.map(x, x + 1).filter(y, y > 2).map(z, z * 2)")
    assert (chained.depth, chained.comprehensions) == (1, 3)
    sibling = shape("l.map(x, x).size() + m.map(k, l.exists(y, y == k)).size()")
    assert (sibling.depth, sibling.comprehensions) == (2, 3)


def test_every_spelling_of_a_comprehension_counts() -> None:
    for source in (
        "l.all(x, x > 0)",
        "l.exists(x, x > 0)",
        "l.exists_one(x, x > 0)",
        "l.existsOne(x, x > 0)",
        "l.filter(x, x > 0)",
        "l.map(x, x > 0, x)",
        "l . map ( x , x )",
    ):
        assert shape(source).depth == 1, source


def test_macro_names_inside_string_literals_do_not_count() -> None:
    quoted = shape("'l.map(x, l.map(y, 1))' + \"[1, 2, 3]\" + r'.filter('")
    assert quoted.comprehensions == 0
    assert quoted.literal_width == 0


def test_map_and_filter_are_quadratic_all_and_exists_promise_nothing() -> None:
    assert [p for p, _ in shape("l.map(x, x)").lower_terms] == [2]
    assert [p for p, _ in shape("l.filter(x, x > 1)").lower_terms] == [2]
    assert [p for p, _ in shape("l.exists_one(x, x > 1)").lower_terms] == [1]
    # exists/all may stop at the first element: no lower bound from them, nor through them.
    assert shape("l.exists(x, l.map(y, y).size() > x)").lower_terms[0][0] == 2
    assert [p for p, _ in shape("l.map(x, l.map(y, l.map(z, z)))").lower_terms] == [2, 3, 4]


def test_functions_outside_the_linear_ones_are_named() -> None:
    assert shape("input.email.matches('^[a-z]+@')").other_calls == frozenset({"matches"})
    assert not shape("input.s.startsWith('a') && 'x' in input.l").other_calls


def test_literal_lists_and_maps_are_measured() -> None:
    literal = shape("[1, 2, 3, 4].map(x, {'a': x, 'b': [x, x]})")
    assert literal.literal_width == 4
    assert literal.literal_items == 4 + 2 + 2
    assert shape("a + b + c").concatenations == 2
    assert shape_of("((((", []).depth == 0  # unbalanced text is tolerated


# --- weight -----------------------------------------------------------------------------


def test_weigh_counts_values_text_and_the_longest_collection() -> None:
    weight = weigh({"items": [{"sku": "ab"}, {"sku": "cde"}], "n": 1})
    assert weight.nodes == 1 + 1 + 2 + 2 + 1
    assert weight.chars == len("items") + len("n") + 2 * len("sku") + len("ab") + len("cde")
    assert weight.widest == 2
    assert weight.depth == 3  # the object, its list, the objects in it
    assert weigh(list(range(10))).widest == 10
    assert weigh("flat").depth == 0
    assert Weight(1, 2, 3) + Weight(4, 5, 1) == Weight(5, 7, 3)


def test_weigh_is_iterative_and_stops_at_its_cap() -> None:
    deep: object = 0
    for _ in range(100_000):
        deep = [deep]
    assert weigh(deep).nodes == 100_001
    assert weigh(deep).depth == 100_000
    capped = weigh(list(range(1_000_000)), cap=100)
    assert capped.nodes == 101  # "more than 100"
    assert capped.widest == 1_000_000


# --- routes -----------------------------------------------------------------------------


def test_ordinary_expressions_stay_inline() -> None:
    small = weigh({"order": {"id": 7, "total": 1500, "items": [{"sku": "a"}] * 10}})
    for source in (
        "input.order.total > 1000",
        "'order ' + string(input.order.id)",
        "input.order.items.map(i, i.sku)",
        "input.order.items.exists(i, i.sku == 'a')",
    ):
        assert route(shape(source), small, BUDGET).route is Route.INLINE, source


def test_what_can_grow_leaves_the_process() -> None:
    items = weigh(list(range(1_000)))
    assert route(shape("l.map(x, x * 2)"), items, BUDGET).route is Route.SANDBOX
    assert not inline_ok(shape("s.matches('a+')"), weigh("aaa"))
    many = weigh(list(range(INLINE_NODES + 1)))
    assert not inline_ok(shape("size(l)"), many)
    text = weigh("x" * (1 << 20))
    assert inline_ok(shape("s + 'x'"), text)
    assert not inline_ok(shape("s + s + s + s + s"), text)


def test_the_cel_bomb_is_refused_at_once_and_says_why() -> None:
    bomb = route(shape("l.map(x, l.map(y, l.map(z, x + y + z)))"), weigh(list(range(150))), BUDGET)
    assert bomb.route is Route.REFUSED
    assert bomb.seconds > 10
    assert "FLOWFORGE_EXPRESSION_TIMEOUT (100 ms)" in bomb.reason
    assert "150 elements" in bomb.reason
    # Half a bomb is not refused on an estimate: the sandbox's deadline decides.
    half = route(shape("l.map(x, l.map(y, x + y))"), weigh(list(range(150))), BUDGET)
    assert half.route is Route.SANDBOX


def test_linear_scans_of_long_lists_are_never_refused() -> None:
    ids = weigh(list(range(200_000)))
    verdict = route(shape("l.exists(x, x == 5) || l.all(x, x > 0)"), ids, BUDGET)
    assert verdict.route is Route.SANDBOX


def test_a_longer_timeout_refuses_later() -> None:
    source = shape("l.map(x, l.map(y, l.map(z, x + y + z)))")
    items = weigh(list(range(150)))
    assert route(source, items, Budget(timeout=5.0)).route is Route.SANDBOX


@pytest.mark.parametrize(
    ("size", "text"),
    [(100, "100 bytes"), (2048, "2 KB"), (int(9.1 * (1 << 20)), "9.1 MB"), (3 << 30, "3 GB")],
)
def test_sizes_read_as_people_write_them(size: int, text: str) -> None:
    assert bytes_text(size) == text


def test_values_nested_past_what_cel_can_convert_are_refused() -> None:
    deep: object = 1
    for _ in range(MAX_VALUE_DEPTH + 1):
        deep = [deep]
    verdict = route(shape("size(input)"), weigh(deep), BUDGET)
    assert verdict.route is Route.REFUSED
    assert f"nested more than {MAX_VALUE_DEPTH} levels deep" in verdict.reason
    assert route(shape("size(input)"), weigh([[[1]]]), BUDGET).route is Route.INLINE
