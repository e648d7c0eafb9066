"""The built-in http step: requests, parsing, error categories, limits and trace propagation.

Outbound HTTP goes to respx or to a real server on 127.0.0.1, never to the network.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
import respx
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from flowforge_orchestrator.core.definition.models import RetryPolicy
from flowforge_orchestrator.core.retry import decide
from flowforge_orchestrator.errors import StepError
from flowforge_orchestrator.ops import telemetry
from flowforge_orchestrator.worker.steps.http import redact_url, run_http_step

URL = "https://api.test/items"
LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def _module_exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    telemetry.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()


@pytest.fixture
def spans(_module_exporter: InMemorySpanExporter) -> InMemorySpanExporter:
    _module_exporter.clear()
    return _module_exporter


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    # trust_env=False: no proxy from the environment between us and 127.0.0.1.
    async with httpx.AsyncClient(trust_env=False) as c:
        yield c


async def run(
    client: httpx.AsyncClient, max_body_bytes: int = LIMIT, **params: Any
) -> dict[str, Any]:
    return await run_http_step(
        params, client=client, default_timeout=5.0, max_body_bytes=max_body_bytes
    )


async def run_error(client: httpx.AsyncClient, **params: Any) -> StepError:
    with pytest.raises(StepError) as info:
        await run(client, **params)
    return info.value


def client_span(exporter: InMemorySpanExporter) -> ReadableSpan:
    (span,) = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.CLIENT]
    return span


# Requests ---------------------------------------------------------------------------------


async def test_get_with_query_parses_json_and_selects_default_headers(
    respx_mock: respx.MockRouter, client: httpx.AsyncClient
) -> None:
    route = respx_mock.get("https://api.test/items").respond(
        200,
        json={"items": [1, 2]},
        headers={"ETag": '"v1"', "X-Request-Id": "r-1", "X-Other": "no", "Set-Cookie": "s=1"},
    )
    result = await run(client, url=URL + "?fixed=1", query={"page": 2, "tag": ["a", "b"]})
    request = route.calls.last.request
    assert request.method == "GET"
    assert request.url.params.multi_items() == [
        ("fixed", "1"),
        ("page", "2"),
        ("tag", "a"),
        ("tag", "b"),
    ]
    assert result == {
        "status": 200,
        "headers": {"content-type": "application/json", "etag": '"v1"', "x-request-id": "r-1"},
        "body": {"items": [1, 2]},
    }
    json.dumps(result)  # what the worker stores must serialize


async def test_post_json(respx_mock: respx.MockRouter, client: httpx.AsyncClient) -> None:
    route = respx_mock.post(URL).respond(201, json={"id": 7})
    result = await run(client, method="post", url=URL, json={"name": "é", "n": [1, None]})
    request = route.calls.last.request
    assert request.headers["content-type"] == "application/json"
    assert json.loads(request.content) == {"name": "é", "n": [1, None]}
    assert result["status"] == 201
    assert result["body"] == {"id": 7}


async def test_raw_body_is_sent_as_is(
    respx_mock: respx.MockRouter, client: httpx.AsyncClient
) -> None:
    route = respx_mock.put(URL).respond(204)
    result = await run(
        client, method="PUT", url=URL, body="a=1&b=2", headers={"Content-Type": "text/x-form"}
    )
    request = route.calls.last.request
    assert request.content == b"a=1&b=2"
    assert request.headers["content-type"] == "text/x-form"
    assert result == {"status": 204, "headers": {}, "body": ""}


async def test_timeout_defaults_and_overrides(
    respx_mock: respx.MockRouter, client: httpx.AsyncClient
) -> None:
    route = respx_mock.get(URL).respond(200)
    await run(client, url=URL)
    assert route.calls.last.request.extensions["timeout"]["read"] == 5.0
    await run(client, url=URL, timeout=1.5)
    assert route.calls.last.request.extensions["timeout"]["read"] == 1.5


# Response parsing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "content", "body"),
    [
        ("application/json", b'{"a": 1}', {"a": 1}),
        ("application/problem+json; charset=utf-8", b'{"title": "x"}', {"title": "x"}),
        ("application/json", b"[1, 2", "[1, 2"),  # mislabelled: kept as text
        ("application/json", b'{"x": NaN}', '{"x": NaN}'),  # not JSON, JSONB would refuse it
        ("text/plain", b'{"a": 1}', '{"a": 1}'),  # JSON-looking text stays text
        ("text/plain; charset=latin-1", "café".encode("latin-1"), "café"),
        ("text/plain; charset=no-such-codec", b"plain", "plain"),
    ],
)
async def test_json_versus_text(
    respx_mock: respx.MockRouter,
    client: httpx.AsyncClient,
    content_type: str,
    content: bytes,
    body: Any,
) -> None:
    respx_mock.get(URL).respond(200, content=content, headers={"Content-Type": content_type})
    assert (await run(client, url=URL))["body"] == body


async def test_selected_response_headers(
    respx_mock: respx.MockRouter, client: httpx.AsyncClient
) -> None:
    respx_mock.get(URL).respond(
        200,
        headers=[("X-Rate", "10"), ("Link", "<a>"), ("Link", "<b>"), ("ETag", "e")],
    )
    result = await run(client, url=URL, response_headers=["X-Rate", "link", "X-Absent"])
    assert result["headers"] == {"x-rate": "10", "link": "<a>, <b>"}


async def test_head_has_empty_body(respx_mock: respx.MockRouter, client: httpx.AsyncClient) -> None:
    respx_mock.head(URL).respond(200, headers={"Content-Length": "1234"})
    result = await run(client, method="HEAD", url=URL)
    assert result["body"] == ""


# Unexpected status ----------------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 503, 408, 429, 400, 404, 301])
async def test_unexpected_status_category_and_retryability(
    respx_mock: respx.MockRouter, client: httpx.AsyncClient, status: int
) -> None:
    respx_mock.get(URL).respond(status, text="x" * 5000)
    error = await run_error(client, url=URL)
    assert error.category == f"http_{status}"
    assert error.retryable is True  # retry_on decides; its default has no 4xx but 429
    assert error.details["status"] == status
    assert error.details["body"] == "x" * 1024
    assert "retry_after" not in error.details
    assert str(status) in error.message and URL in error.message


async def test_expected_status_replaces_2xx(
    respx_mock: respx.MockRouter, client: httpx.AsyncClient
) -> None:
    respx_mock.get(URL).mock(side_effect=[httpx.Response(404), httpx.Response(200)])
    assert (await run(client, url=URL, expected_status=[404, 410]))["status"] == 404
    error = await run_error(client, url=URL, expected_status=[404, 410])
    assert error.category == "http_200"


async def test_retry_after_delta_seconds(
    respx_mock: respx.MockRouter, client: httpx.AsyncClient
) -> None:
    respx_mock.get(URL).respond(429, headers={"Retry-After": " 120 "})
    error = await run_error(client, url=URL)
    assert error.details["retry_after"] == 120.0


async def test_retry_after_http_date(
    respx_mock: respx.MockRouter, client: httpx.AsyncClient
) -> None:
    when = datetime.now(UTC) + timedelta(seconds=90)
    respx_mock.get(URL).respond(503, headers={"Retry-After": format_datetime(when, usegmt=True)})
    error = await run_error(client, url=URL)
    assert 80.0 <= error.details["retry_after"] <= 90.0


async def test_retry_after_sets_the_retry_delay(
    respx_mock: respx.MockRouter, client: httpx.AsyncClient
) -> None:
    respx_mock.get(URL).mock(
        side_effect=[
            httpx.Response(503, headers={"Retry-After": "7"}),
            httpx.Response(503, headers={"Retry-After": "in a while"}),
        ]
    )
    policy = RetryPolicy(max_retries=2, initial_interval=1, jitter=False)
    honoured = (await run_error(client, url=URL)).to_dict()
    assert honoured["details"]["retry_after"] == 7.0
    assert decide(policy, honoured, 1, rand=0.5, now=datetime.now(UTC)).delay == 7.0
    garbage = (await run_error(client, url=URL)).to_dict()
    assert "retry_after" not in garbage["details"]
    assert decide(policy, garbage, 1, rand=0.5, now=datetime.now(UTC)).delay == 1.0


# Transport failures ---------------------------------------------------------------------------


@asynccontextmanager
async def local_server(
    respond: Callable[[asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[str]:
    """A real HTTP/1.1 server on 127.0.0.1 whose handler writes the raw response."""
    tasks: set[asyncio.Task[Any]] = set()

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await reader.readuntil(b"\r\n\r\n")
            await respond(writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client gave up on us: that is what some tests want
        finally:
            writer.close()
            tasks.discard(task)

    server = await asyncio.start_server(on_connection, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/resource?token=secret-value"
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


async def test_timeout_when_the_server_never_answers(client: httpx.AsyncClient) -> None:
    async def hang(writer: asyncio.StreamWriter) -> None:
        await asyncio.Event().wait()

    async with local_server(hang) as url:
        error = await run_error(client, url=url, timeout=0.2)
    assert (error.category, error.retryable) == ("timeout", True)
    assert "secret-value" not in error.message


async def test_timeout_bounds_the_whole_exchange(client: httpx.AsyncClient) -> None:
    # Each read is quick, so only an overall deadline stops this one.
    async def drip(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        for _ in range(1000):
            writer.write(b"x")
            await writer.drain()
            await asyncio.sleep(0.02)

    async with local_server(drip) as url:
        loop = asyncio.get_running_loop()
        started = loop.time()
        error = await run_error(client, url=url, timeout=0.3)
        assert loop.time() - started < 2.0
    assert error.category == "timeout"


async def test_connection_refused_is_connection_error(client: httpx.AsyncClient) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    error = await run_error(client, url=f"http://127.0.0.1:{port}/")
    assert (error.category, error.retryable) == ("connection_error", True)
    assert isinstance(error.__cause__, httpx.ConnectError)


@pytest.mark.parametrize(
    ("raised", "category"),
    [
        (httpx.ConnectTimeout("t"), "timeout"),
        (httpx.ReadTimeout("t"), "timeout"),
        (httpx.PoolTimeout("t"), "timeout"),
        (httpx.ConnectError("refused"), "connection_error"),
        (httpx.RemoteProtocolError("peer closed"), "connection_error"),
        (httpx.ReadError("reset"), "connection_error"),
    ],
)
async def test_transport_errors_map_to_categories(
    respx_mock: respx.MockRouter,
    client: httpx.AsyncClient,
    raised: Exception,
    category: str,
) -> None:
    respx_mock.get(URL).mock(side_effect=raised)
    error = await run_error(client, url=URL)
    assert (error.category, error.retryable) == (category, True)


async def test_too_many_redirects_is_not_retryable(respx_mock: respx.MockRouter) -> None:
    respx_mock.get(URL).respond(302, headers={"Location": URL})
    async with httpx.AsyncClient(follow_redirects=True, max_redirects=2) as redirecting:
        error = await run_error(redirecting, url=URL)
    assert (error.category, error.retryable) == ("too_many_redirects", False)


# Body limit ---------------------------------------------------------------------------------


async def test_large_streamed_body_stops_past_the_limit(client: httpx.AsyncClient) -> None:
    """A real 64 MiB chunked response: we read a little over the limit and hang up."""
    total = 64 * 1024 * 1024
    chunk = b"y" * 65536
    sent = 0

    async def huge(writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        while sent < total:
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await writer.drain()
            sent += len(chunk)
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async with local_server(huge) as url:
        with pytest.raises(StepError) as info:
            await run(client, max_body_bytes=LIMIT, url=url)
    error = info.value
    assert (error.category, error.retryable) == ("payload_too_large", False)
    assert error.details["limit"] == LIMIT and error.details["size_exact"] is False
    assert f"more than {LIMIT} bytes" in error.message
    assert "http://127.0.0.1" in error.message and "secret-value" not in error.message
    assert sent < total


async def test_declared_length_over_the_limit_is_refused_before_reading(
    respx_mock: respx.MockRouter, client: httpx.AsyncClient
) -> None:
    respx_mock.get(URL).respond(200, content=b"z" * (LIMIT + 1))
    with pytest.raises(StepError) as info:
        await run(client, max_body_bytes=LIMIT, url=URL)
    assert info.value.category == "payload_too_large"
    assert info.value.details["size"] == LIMIT + 1
    assert f"{LIMIT + 1} bytes" in info.value.message


async def test_body_at_the_limit_is_accepted(
    respx_mock: respx.MockRouter, client: httpx.AsyncClient
) -> None:
    respx_mock.get(URL).respond(200, text="z" * LIMIT)
    assert len((await run(client, max_body_bytes=LIMIT, url=URL))["body"]) == LIMIT


# Tracing -----------------------------------------------------------------------------------


async def test_traceparent_is_injected_from_the_client_span(
    respx_mock: respx.MockRouter, client: httpx.AsyncClient, spans: InMemorySpanExporter
) -> None:
    route = respx_mock.get(URL).respond(200)
    with telemetry.tracer().start_as_current_span("attempt") as outer:
        await run(client, url=URL, headers={"Authorization": "Bearer s3cret"})
    version, trace_id, parent_id, _flags = route.calls.last.request.headers["traceparent"].split(
        "-"
    )
    span = client_span(spans)
    assert span.context is not None and span.parent is not None
    assert version == "00"
    assert int(trace_id, 16) == outer.get_span_context().trace_id
    assert int(parent_id, 16) == span.context.span_id  # the callee's parent is the HTTP span
    assert span.parent.span_id == outer.get_span_context().span_id
    assert span.name == "HTTP GET"
    assert dict(span.attributes or {}) == {
        "http.request.method": "GET",
        "url.full": URL,
        "server.address": "api.test",
        "server.port": 443,
        "http.response.status_code": 200,
    }
    assert span.status.status_code is StatusCode.UNSET


async def test_failed_span_has_error_status_and_no_secrets(
    respx_mock: respx.MockRouter, client: httpx.AsyncClient, spans: InMemorySpanExporter
) -> None:
    respx_mock.get(url__startswith=URL).respond(503)
    await run_error(
        client,
        url="https://user:pw-secret@api.test/items?api_key=key-secret",
        headers={"Authorization": "Bearer header-secret"},
    )
    span = client_span(spans)
    assert span.status.status_code is StatusCode.ERROR
    attributes = dict(span.attributes or {})
    assert attributes["error.type"] == "503"
    assert attributes["http.response.status_code"] == 503
    assert attributes["url.full"] == "https://REDACTED:REDACTED@api.test/items?api_key=REDACTED"
    recorded = repr(attributes) + repr([dict(e.attributes or {}) for e in span.events])
    recorded += span.status.description or ""
    for secret in ("pw-secret", "key-secret", "header-secret"):
        assert secret not in recorded


def test_redact_url() -> None:
    assert redact_url(httpx.URL("http://h/p")) == "http://h/p"
    assert redact_url(httpx.URL("https://a:b@h:8443/p?x=1&x=2&y#frag")) == (
        "https://REDACTED:REDACTED@h:8443/p?x=REDACTED&x=REDACTED&y=REDACTED"
    )


# Invalid parameters --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({}, "url"),
        ({"url": ""}, "url"),
        ({"url": 42}, "url"),
        ({"url": "/relative"}, "url"),
        ({"url": "ftp://files.test/x"}, "url"),
        ({"url": "http://[::1"}, "url"),
        ({"url": URL, "method": "FETCH"}, "method"),
        ({"url": URL, "method": 1}, "method"),
        ({"url": URL, "method": "POST", "json": {"a": 1}, "body": "a=1"}, "body"),
        ({"url": URL, "body": {"a": 1}}, "body"),
        ({"url": URL, "headers": {"X-Key": 123}}, "headers"),
        ({"url": URL, "headers": ["X-Key"]}, "headers"),
        ({"url": URL, "query": {"q": {"nested": 1}}}, "query"),
        ({"url": URL, "query": "q=1"}, "query"),
        ({"url": URL, "timeout": 0}, "timeout"),
        ({"url": URL, "timeout": -1.0}, "timeout"),
        ({"url": URL, "timeout": float("inf")}, "timeout"),
        ({"url": URL, "timeout": "5"}, "timeout"),
        ({"url": URL, "timeout": True}, "timeout"),
        ({"url": URL, "expected_status": ["200"]}, "expected_status"),
        ({"url": URL, "expected_status": [42]}, "expected_status"),
        ({"url": URL, "expected_status": 200}, "expected_status"),
        ({"url": URL, "response_headers": "etag"}, "response_headers"),
        ({"url": URL, "header": {"X": "1"}}, "header"),
    ],
)
async def test_bad_params_are_invalid_params(
    respx_mock: respx.MockRouter,
    client: httpx.AsyncClient,
    spans: InMemorySpanExporter,
    params: dict[str, Any],
    field: str,
) -> None:
    error = await run_error(client, **params)
    assert (error.category, error.retryable) == ("invalid_params", False)
    assert error.details == {"field": field}
    assert f"'{field}'" in error.message
    assert not respx_mock.calls  # nothing was sent
    assert spans.get_finished_spans() == ()


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Token": ["top-secret"]},
        {"X-Token": "top-secret\r\nInjected: 1"},
        {"X-Token": "top-secret\x00"},
        {"Bad Name": "top-secret"},
        {"X-Token": "top-secret-\u00e9"},  # Latin-1, but httpx sends ASCII only
        {"X-Token": "top-secret-\u2603"},
    ],
)
async def test_bad_header_is_invalid_params_and_its_value_is_never_shown(
    respx_mock: respx.MockRouter, client: httpx.AsyncClient, headers: dict[str, Any]
) -> None:
    error = await run_error(client, url=URL, headers=headers)
    assert (error.category, error.retryable) == ("invalid_params", False)
    assert "top-secret" not in error.message
    assert not respx_mock.calls


async def test_non_ascii_header_value_names_the_header_and_is_not_retried(
    respx_mock: respx.MockRouter, client: httpx.AsyncClient
) -> None:
    error = await run_error(client, url=URL, headers={"X-Name": "Zo\u00eb-top-secret"})
    assert (error.category, error.retryable, error.details) == (
        "invalid_params",
        False,
        {"field": "headers"},
    )
    assert "'X-Name'" in error.message and "ASCII" in error.message
    assert "top-secret" not in error.message
    assert not respx_mock.calls


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://svc.test:18080:S3CR3T-token/x", "invalid port"),
        ("http://S3CR3T\x01.test/", "invalid non-printable ascii character in url"),
        ("http://[S3CR3T]/", "invalid ipv6 address"),
        ("http://0177.0.0.1:1/S3CR3T", "invalid ipv4 address"),
    ],
)
async def test_an_unparseable_url_is_described_without_quoting_it(
    respx_mock: respx.MockRouter, client: httpx.AsyncClient, url: str, problem: str
) -> None:
    error = await run_error(client, url=url)
    assert (error.category, error.retryable) == ("invalid_params", False)
    assert error.message == f"http step: field 'url' is not a valid URL ({problem})"
    assert "S3CR3T" not in repr(error.to_dict())
    assert not respx_mock.calls
