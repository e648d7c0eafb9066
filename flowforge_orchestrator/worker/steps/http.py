"""The built-in `http` step, as a worker runs one attempt of it.

Every failure becomes a `StepError` whose `category` is what `retry_on` matches: `timeout`,
`connection_error`, `http_<status>`, `payload_too_large`, `too_many_redirects`,
`invalid_params`, `destination_denied` (the worker's client, `http_client.make_http_client`,
checks each connection against the destination policy). The retry policy decides;
`retryable=False` only marks what cannot succeed.
A `Retry-After` on an unexpected status becomes `details.retry_after`, in seconds from when
the response arrived (`retry.parse_retry_after`), for the retry policy to honour.

Secrets may sit in header values and in the URL (userinfo, query string). Neither reaches a
span, a log or an error message: errors and spans carry a redacted URL and no headers.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NoReturn

import httpx
from opentelemetry import propagate
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.semconv.attributes.http_attributes import (
    HTTP_REQUEST_METHOD,
    HTTP_RESPONSE_STATUS_CODE,
)
from opentelemetry.semconv.attributes.server_attributes import SERVER_ADDRESS, SERVER_PORT
from opentelemetry.semconv.attributes.url_attributes import URL_FULL
from opentelemetry.trace import Span, SpanKind

from flowforge_orchestrator.core.retry import parse_retry_after
from flowforge_orchestrator.errors import DestinationDenied, StepError
from flowforge_orchestrator.ops.telemetry import tracer

__all__ = [
    "DEFAULT_RESPONSE_HEADERS",
    "METHODS",
    "redact_url",
    "run_http_step",
]

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
DEFAULT_RESPONSE_HEADERS = ("content-type", "etag", "location", "retry-after", "x-request-id")
_PARAM_KEYS = frozenset(
    {
        "method",
        "url",
        "headers",
        "query",
        "json",
        "body",
        "timeout",
        "expected_status",
        "response_headers",
    }
)
_SNIPPET_BYTES = 1024
_SCALARS = (str, int, float, bool, type(None))
_REDACTED = "REDACTED"
# RFC 9110 field-name token; a value must not smuggle a line break (header injection) or NUL.
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEADER_VALUE_FORBIDDEN = re.compile(r"[\r\n\x00]")


@dataclass(frozen=True)
class _Request:
    method: str
    url: httpx.URL  # with `query` merged in
    headers: dict[str, str]
    json: Any
    body: str | None
    timeout: float
    expected_status: frozenset[int] | None
    response_headers: tuple[str, ...]


async def run_http_step(
    params: Mapping[str, Any],
    *,
    client: httpx.AsyncClient,
    default_timeout: float,
    max_body_bytes: int,
) -> dict[str, Any]:
    """Send one request; return `{"status", "headers", "body"}` or raise `StepError`.

    `params` are already rendered. The body is JSON when the response says so and parses,
    text otherwise; it is read in a stream and abandoned past `max_body_bytes`.
    """
    req = _parse_params(params, default_timeout)
    safe_url = redact_url(req.url)
    attributes: dict[str, str | int] = {
        HTTP_REQUEST_METHOD: req.method,
        URL_FULL: safe_url,
        SERVER_ADDRESS: req.url.host,
        SERVER_PORT: req.url.port or (443 if req.url.scheme == "https" else 80),
    }
    # The span's own exception handling records the (URL-redacted) StepError and sets the
    # ERROR status; we add the low-cardinality `error.type`.
    with tracer().start_as_current_span(
        f"HTTP {req.method}", kind=SpanKind.CLIENT, attributes=attributes
    ) as span:
        try:
            return await _exchange(client, req, safe_url, span, max_body_bytes)
        except StepError as exc:
            status = exc.details.get("status")
            span.set_attribute(ERROR_TYPE, str(status) if status else exc.category)
            raise


async def _exchange(
    client: httpx.AsyncClient,
    req: _Request,
    safe_url: str,
    span: Span,
    max_body_bytes: int,
) -> dict[str, Any]:
    where = f"{req.method} {safe_url}"
    headers = httpx.Headers(req.headers)
    # Inside the client span, so the callee's parent is this span.
    propagate.inject(headers)
    try:
        # httpx's timeout bounds each connect/read/write; this bounds the whole exchange,
        # so a server dripping one byte at a time cannot hold the attempt forever.
        async with (
            asyncio.timeout(req.timeout),
            client.stream(
                req.method,
                req.url,
                headers=headers,
                json=req.json,
                content=req.body,
                timeout=req.timeout,
            ) as response,
        ):
            span.set_attribute(HTTP_RESPONSE_STATUS_CODE, response.status_code)
            if not _status_expected(response.status_code, req.expected_status):
                snippet, _ = await _read_capped(response, _SNIPPET_BYTES)
                raise _status_error(where, safe_url, response, snippet)
            body = await _read_body(response, where, safe_url, max_body_bytes)
            return {
                "status": response.status_code,
                "headers": _select_headers(response.headers, req.response_headers),
                "body": _decode_body(response, body),
            }
    except DestinationDenied as exc:  # raised at connect time, before anything was sent
        raise StepError(
            f"{where} was not sent: {exc.message}",
            category=exc.category,
            retryable=False,
            details={"url": safe_url, **exc.details},
        ) from exc
    except (TimeoutError, httpx.TimeoutException) as exc:
        _fail(f"{where} timed out after {req.timeout:g} s", "timeout", True, safe_url, exc)
    except httpx.LocalProtocolError as exc:
        # We could not even form the request (e.g. a header value with a newline).
        _fail(f"{where} could not be sent: {exc}", "invalid_params", False, safe_url, exc)
    except httpx.TooManyRedirects as exc:
        _fail(f"{where} redirected too many times", "too_many_redirects", False, safe_url, exc)
    except httpx.RequestError as exc:
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        _fail(f"{where} failed: {reason}", "connection_error", True, safe_url, exc)


def _fail(message: str, category: str, retryable: bool, url: str, cause: BaseException) -> NoReturn:
    raise StepError(
        message, category=category, retryable=retryable, details={"url": url}
    ) from cause


def _status_expected(status: int, expected: frozenset[int] | None) -> bool:
    return 200 <= status < 300 if expected is None else status in expected


def _status_error(where: str, safe_url: str, response: httpx.Response, snippet: bytes) -> StepError:
    status = response.status_code
    details: dict[str, Any] = {
        "status": status,
        "url": safe_url,
        "body": _decode_text(response, snippet),
    }
    retry_after = parse_retry_after(response.headers.get("retry-after"), now=datetime.now(UTC))
    if retry_after is not None:
        details["retry_after"] = retry_after
    # Any status may be worth another attempt (a 404 before a record is replicated, a
    # 409 while a lock is held): `retry_on` decides. Its default names 5xx and 429 only.
    return StepError(
        f"{where} returned HTTP {status}",
        category=f"http_{status}",
        retryable=True,
        details=details,
    )


async def _read_capped(response: httpx.Response, cap: int) -> tuple[bytes, bool]:
    """At most `cap` bytes of the (decoded) body, and whether there was more."""
    buf = bytearray()
    async for chunk in response.aiter_bytes():
        buf += chunk
        if len(buf) > cap:
            return bytes(buf[:cap]), True
    return bytes(buf), False


async def _read_body(response: httpx.Response, where: str, safe_url: str, limit: int) -> bytes:
    declared = _declared_length(response)
    if declared is not None and declared > limit:
        _too_large(where, safe_url, declared, limit, exact=True)
    body, more = await _read_capped(response, limit)
    if more:
        _too_large(where, safe_url, limit + 1, limit, exact=False)
    return body


def _declared_length(response: httpx.Response) -> int | None:
    """Content-Length, when it is the size of what we will read (no content encoding)."""
    if response.headers.get("content-encoding", "identity").strip().lower() != "identity":
        return None
    try:
        return int(response.headers["content-length"])
    except (KeyError, ValueError):
        return None


def _too_large(where: str, url: str, size: int, limit: int, *, exact: bool) -> NoReturn:
    what = f"{size} bytes" if exact else f"more than {limit} bytes"
    raise StepError(
        f"response body of {where} is {what}, over the limit of {limit} bytes",
        category="payload_too_large",
        retryable=False,
        details={"url": url, "size": size, "size_exact": exact, "limit": limit},
    )


def _select_headers(headers: httpx.Headers, names: Sequence[str]) -> dict[str, str]:
    # httpx joins repeated headers with ", ".
    return {name: headers[name] for name in names if name in headers}


def _is_json(content_type: str) -> bool:
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or media_type.endswith("+json")


def _reject_constant(name: str) -> NoReturn:
    # NaN and Infinity parse in Python but are not JSON: PostgreSQL JSONB would refuse them.
    raise ValueError(f"not JSON: {name}")


def _decode_body(response: httpx.Response, body: bytes) -> Any:
    if _is_json(response.headers.get("content-type", "")):
        try:
            return json.loads(body, parse_constant=_reject_constant)
        except (ValueError, RecursionError):
            pass  # mislabelled or too deep: keep it as text
    return _decode_text(response, body)


def _decode_text(response: httpx.Response, body: bytes) -> str:
    encoding = response.charset_encoding or "utf-8"
    try:
        codecs.lookup(encoding)
    except LookupError:
        encoding = "utf-8"
    return body.decode(encoding, errors="replace")


def redact_url(url: httpx.URL) -> str:
    """The URL with credentials and query values replaced, fit for spans and error messages."""
    if url.userinfo:
        url = url.copy_with(username=_REDACTED, password=_REDACTED)
    if url.query:
        url = url.copy_with(params=[(key, _REDACTED) for key, _ in url.params.multi_items()])
    return str(url.copy_with(fragment=None))


# Parameter validation: the definition model validates `with` already; this guards the worker
# against whatever rendering produced, with errors that name the field.


def _invalid(field: str, problem: str) -> NoReturn:
    raise StepError(
        f"http step: field '{field}' {problem}",
        category="invalid_params",
        retryable=False,
        details={"field": field},
    )


def _parse_params(params: Mapping[str, Any], default_timeout: float) -> _Request:
    unknown = sorted(set(params) - _PARAM_KEYS)
    if unknown:
        _invalid(unknown[0], "is not a parameter of the http step")
    method = params.get("method") or "GET"
    if not isinstance(method, str) or method.upper() not in METHODS:
        _invalid("method", f"must be one of {', '.join(sorted(METHODS))}, not {method!r}")
    json_value = params.get("json")
    body = params.get("body")
    if json_value is not None and body is not None:
        _invalid("body", "cannot be used together with 'json'")
    if body is not None and not isinstance(body, str):
        _invalid("body", "must be a string (use 'json' for structured data)")
    response_headers = params.get("response_headers")
    return _Request(
        method=method.upper(),
        url=_parse_url(params.get("url"), params.get("query")),
        headers=_parse_headers(params.get("headers")),
        json=json_value,
        body=body,
        timeout=_parse_timeout(params.get("timeout"), default_timeout),
        expected_status=_parse_expected_status(params.get("expected_status")),
        response_headers=DEFAULT_RESPONSE_HEADERS
        if response_headers is None
        else _parse_names(response_headers),
    )


def _parse_url(value: object, query: object) -> httpx.URL:
    if not isinstance(value, str) or not value.strip():
        _invalid("url", "is required and must be a non-empty string")
    try:
        url = httpx.URL(value.strip())
    except httpx.InvalidURL as exc:
        # httpx quotes the offending text ("Invalid port: '...'"), which may be a secret.
        _invalid("url", f"is not a valid URL ({_url_problem(exc)})")
    if url.scheme not in ("http", "https") or not url.host:
        _invalid("url", "must be an absolute http:// or https:// URL")
    if query is None:
        return url
    if not isinstance(query, Mapping) or not all(isinstance(k, str) for k in query):
        _invalid("query", "must be a mapping of names to values")
    for name, item in query.items():
        items = item if isinstance(item, list | tuple) else [item]
        if not all(isinstance(v, _SCALARS) for v in items):
            _invalid("query", f"value of '{name}' must be a scalar or a list of scalars")
    return url.copy_merge_params(dict(query)) if query else url


def _url_problem(exc: httpx.InvalidURL) -> str:
    """What httpx found wrong, without the text it quotes: `Invalid port: '...'` gives
    `invalid port`."""
    words = re.split(r"[:,'\"]", str(exc), maxsplit=1)[0].strip().rstrip(".")
    return words.lower() or "unparseable"


def _parse_headers(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        _invalid("headers", "must be a mapping of names to strings")
    for name, item in value.items():
        # Name the header, never show its value: it may be a secret.
        if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
            _invalid("headers", f"entry {name!r} is not a valid header name")
        if not isinstance(item, str) or _HEADER_VALUE_FORBIDDEN.search(item):
            _invalid("headers", f"value of '{name}' must be a string without line breaks")
        if not item.isascii():  # what httpx encodes; anything else fails every attempt
            _invalid(
                "headers",
                f"value of '{name}' must be ASCII text (percent- or base64-encode other text)",
            )
    return dict(value)


def _parse_timeout(value: object, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        _invalid("timeout", "must be a number of seconds")
    if not math.isfinite(value) or value <= 0:
        _invalid("timeout", "must be a positive, finite number of seconds")
    return float(value)


def _parse_expected_status(value: object) -> frozenset[int] | None:
    if value is None:
        return None
    if not isinstance(value, list | tuple) or not all(
        isinstance(v, int) and not isinstance(v, bool) and 100 <= v <= 599 for v in value
    ):
        _invalid("expected_status", "must be a list of HTTP status codes (100-599)")
    return frozenset(value)


def _parse_names(value: object) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v for v in value):
        _invalid("response_headers", "must be a list of header names")
    return tuple(v.lower() for v in value)
