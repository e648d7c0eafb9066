"""URL templates of http steps: every value encoded for the part it lands in; no value
changes the scheme, userinfo, host or port the definition wrote."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowforge_orchestrator.core.definition.urls import UrlTemplate, url_template_problem
from flowforge_orchestrator.core.expressions.templates import build_context
from flowforge_orchestrator.errors import ExpressionError

ATTACK = "../../admin/delete?all=1#"
# Text that is valid Unicode (no lone surrogates): what JSON input can hold and UTF-8 encode.
TEXT = st.text(st.characters(exclude_categories=["Cs"]))
# Deterministic examples and no per-example deadline: the same cases on every run, however
# loaded the machine.
properties = settings(database=None, derandomize=True, deadline=None, max_examples=200)


def render(template: str, **input: Any) -> str:
    url = UrlTemplate.compile(template, step_id="call")
    return url.render(build_context(input, {}, {"id": "r", "workflow": "w", "version": 1}))


def render_error(template: str, **input: Any) -> ExpressionError:
    with pytest.raises(ExpressionError) as info:
        render(template, **input)
    return info.value


# --- path ----------------------------------------------------------------------------------


def test_a_path_value_is_one_segment() -> None:
    url = render("https://api.test/users/${{ input.p }}/profile", p=ATTACK)
    assert url == "https://api.test/users/..%2F..%2Fadmin%2Fdelete%3Fall%3D1%23/profile"
    parsed = httpx.URL(url)
    assert parsed.raw_path.split(b"/") == [
        b"",
        b"users",
        b"..%2F..%2Fadmin%2Fdelete%3Fall%3D1%23",
        b"profile",
    ]
    assert parsed.query == b"" and parsed.fragment == ""


@pytest.mark.parametrize("value", [".", ".."])
def test_a_value_may_not_make_a_dot_segment(value: str) -> None:
    error = render_error("https://api.test/a/${{ input.p }}/b", p=value)
    assert (error.step_id, error.field) == ("call", "with.url")
    assert f"path segment {value!r}" in error.reason


def test_an_encoded_dot_in_a_value_stays_data() -> None:
    # `%` is encoded, so `%2E%2E` arrives as that text, not as a dot segment.
    url = render("https://api.test/a/${{ input.p }}/b", p="%2E%2E")
    assert url == "https://api.test/a/%252E%252E/b"


def test_a_dot_segment_made_with_the_literal_text_is_refused() -> None:
    assert "path segment '..'" in render_error("https://api.test/.${{ input.p }}", p=".").reason
    assert "path segment '..'" in render_error("https://api.test/%2E${{ input.p }}", p=".").reason
    # Dots that are not a whole segment are fine.
    assert render("https://api.test/v${{ input.p }}/x", p="..") == "https://api.test/v../x"
    assert render("https://api.test/${{ input.p }}", p="...") == "https://api.test/..."


def test_literal_text_is_kept_as_the_definition_wrote_it() -> None:
    url = render("https://api.test/a/../b;x=1/${{ input.p }}?flag&k=v", p="c")
    assert url == "https://api.test/a/../b;x=1/c?flag&k=v"


@properties
@given(value=TEXT.filter(lambda v: v not in (".", "..")))
def test_any_path_value_decodes_back_to_itself_in_one_segment(value: str) -> None:
    url = httpx.URL(render("http://127.0.0.1:8080/users/${{ input.p }}/profile", p=value))
    assert (url.scheme, url.host, url.port, url.userinfo) == ("http", "127.0.0.1", 8080, b"")
    segments = url.raw_path.split(b"/")
    assert len(segments) == 4 and segments[-1] == b"profile"
    assert unquote(segments[2].decode("ascii")) == value
    assert url.query == b"" and url.fragment == ""


# --- query and fragment ----------------------------------------------------------------------


def test_a_query_value_cannot_add_parameters() -> None:
    url = render("https://api.test/search?q=${{ input.q }}&page=2", q="a&page=99#x+y")
    assert url == "https://api.test/search?q=a%26page%3D99%23x%2By&page=2"
    assert httpx.URL(url).params.multi_items() == [("q", "a&page=99#x+y"), ("page", "2")]


def test_a_query_name_is_encoded_as_a_name() -> None:
    url = render("https://api.test/s?${{ input.k }}=1&b=2", k="a=b&c")
    assert httpx.URL(url).params.multi_items() == [("a=b&c", "1"), ("b", "2")]


@properties
@given(name=TEXT, value=TEXT)
def test_any_query_name_and_value_decode_back(name: str, value: str) -> None:
    url = httpx.URL(render("https://api.test/s?${{ input.k }}=${{ input.v }}&z=1", k=name, v=value))
    assert url.host == "api.test"
    assert url.params.multi_items() == [(name, value), ("z", "1")]
    assert url.fragment == ""


@properties
@given(value=TEXT)
def test_any_fragment_value_stays_in_the_fragment(value: str) -> None:
    url = httpx.URL(render("https://api.test/doc?x=1#${{ input.f }}", f=value))
    assert url.host == "api.test" and url.raw_path == b"/doc?x=1"
    assert unquote(url.fragment) == value


def test_fragment_keeps_its_sub_delimiters_and_encodes_hash_and_space() -> None:
    assert render("https://api.test/d#${{ input.f }}", f="a=b&c #d") == (
        "https://api.test/d#a=b&c%20%23d"
    )


# --- values ----------------------------------------------------------------------------------


def test_unicode_is_utf8_percent_encoded() -> None:
    url = render("https://api.test/${{ input.p }}?q=${{ input.q }}", p="é/ü", q="日本")
    assert url == "https://api.test/%C3%A9%2F%C3%BC?q=%E6%97%A5%E6%9C%AC"


@pytest.mark.parametrize(
    ("value", "encoded"),
    [(42, "42"), (2.5, "2.5"), (True, "true"), (None, ""), ([1, "a b"], "%5B1,%22a%20b%22%5D")],
)
def test_non_string_values_are_written_as_text_then_encoded(value: Any, encoded: str) -> None:
    assert render("https://api.test/x/${{ input.v }}", v=value) == f"https://api.test/x/{encoded}"


def test_a_lone_surrogate_is_an_expression_error_not_a_crash() -> None:
    # JSON input may hold one (`"\\ud800"`); it cannot be UTF-8 encoded into a URL.
    error = render_error("https://api.test/x/${{ input.v }}", v="a\ud800b")
    assert (error.step_id, error.field) == ("call", "with.url")


# --- host, port and userinfo ------------------------------------------------------------------


@pytest.mark.parametrize(
    "template",
    [
        "http://127.0.0.1:8080${{ input.p }}",  # the value would continue the authority
        "https://api.test${{ input.p }}/x",
        "https://${{ input.host }}/x",
        "https://api.test:${{ input.port }}/x",
        "https://user:${{ input.password }}@api.test/x",
        "${{ input.scheme }}://api.test/x",
        "api.test/${{ input.p }}",  # no scheme
        "ftp://files.test/${{ input.p }}",
        "https:///${{ input.p }}",  # no host
        " https://api.test/${{ input.p }}",
        "${{ input.base }}api/${{ input.p }}",  # the base must be followed by / ? #
        "${{ input.base }}${{ input.p }}",
        "${{ input.base }}:8080/x",
    ],
)
def test_a_value_that_could_reach_the_authority_is_refused(template: str) -> None:
    problem = url_template_problem(template)
    assert problem is not None and "scheme and host" in problem
    # A definition registered before the rule fails when it renders, with the same words.
    error = render_error(template, p="/x", host="h", port=1, password="pw", scheme="http")
    assert error.field == "with.url" and error.reason == problem


@pytest.mark.parametrize(
    "template",
    [
        "https://api.test/${{ input.p }}",
        "https://api.test?q=${{ input.p }}",
        "https://api.test#${{ input.p }}",
        "HTTPS://user:pw@api.test:8443/x/${{ input.p }}",
        "http://[::1]:8080/${{ input.p }}",
        "${{ input.base }}",
        "${{ input.base }}/orders/${{ input.p }}",
        "${{ input.base }}?q=${{ input.p }}",
        "${{ input.base }}#${{ input.p }}",
        "https://api.test/plain",
        "https://api.test/${{ input.( }}",  # a syntax error is reported elsewhere
    ],
)
def test_shapes_that_keep_the_authority_are_accepted(template: str) -> None:
    assert url_template_problem(template) is None


def test_a_value_that_tries_the_userinfo_trick_stays_in_the_path() -> None:
    url = httpx.URL(render("http://127.0.0.1:18080/${{ input.p }}", p="@169.254.169.254/latest"))
    assert (url.host, url.port) == ("127.0.0.1", 18080)
    assert url.raw_path == b"/@169.254.169.254%2Flatest"  # `@` is plain data in a path


# --- the base form (the demo's) ----------------------------------------------------------------


def test_the_demo_form_encodes_what_follows_the_base() -> None:
    template = "${{ input.base_url }}/orders/${{ input.order_id }}"
    assert render(template, base_url="http://127.0.0.1:8000", order_id="A-1001") == (
        "http://127.0.0.1:8000/orders/A-1001"
    )
    assert render(template, base_url="http://127.0.0.1:8000/api", order_id="A 1/../2") == (
        "http://127.0.0.1:8000/api/orders/A%201%2F..%2F2"
    )


def test_the_whole_url_may_be_one_expression() -> None:
    assert render("${{ input.url }}", url=" https://h.test/a?b=c ") == "https://h.test/a?b=c"


def test_what_follows_a_base_with_a_query_is_encoded_as_query() -> None:
    url = render("${{ input.base }}/x/${{ input.v }}", base="https://h.test/p?a=", v="1&b=2")
    assert httpx.URL(url).params.multi_items() == [("a", "/x/1&b=2")]


@pytest.mark.parametrize(
    "base",
    ["/S3CR3T", "ftp://u:S3CR3T@h.test/", "S3CR3T.test", "http://", "http://[S3CR3T", 42, None],
)
def test_a_base_that_is_not_an_absolute_http_url_fails_without_showing_it(base: Any) -> None:
    error = render_error("${{ input.base }}/orders/${{ input.p }}", base=base, p="1")
    assert error.field == "with.url"
    assert "absolute http:// or https:// URL" in error.reason
    assert "S3CR3T" not in str(error)


def test_an_expression_that_fails_is_an_expression_error() -> None:
    error = render_error("https://api.test/${{ input.missing }}")
    assert (error.step_id, error.field, error.expression) == ("call", "with.url", "input.missing")
