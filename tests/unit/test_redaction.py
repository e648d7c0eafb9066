"""Redaction of secret values from results and log records, in every form foreseen."""

from __future__ import annotations

import io
import json
import logging
import re
from urllib.parse import quote, quote_plus

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowforge_orchestrator.errors import ConfigError
from flowforge_orchestrator.ops.logs import JsonFormatter
from flowforge_orchestrator.worker.redaction import (
    MIN_SECRET_LENGTH,
    REDACTED,
    RedactingFilter,
    Redactor,
    attempt_redaction,
    check_secrets,
    credential_values,
)

SECRET = "S3CR3T/va lue+&=%"


def lower_hex(encoded: str) -> str:
    """Percent-encoding with lowercase hex digits, as some servers echo it."""
    return re.sub(r"%[0-9A-F]{2}", lambda m: m[0].lower(), encoded)


@pytest.mark.parametrize(
    "form",
    [
        SECRET,
        quote(SECRET, safe=""),
        lower_hex(quote(SECRET, safe="")),
        quote(SECRET),
        quote_plus(SECRET),
        json.dumps(SECRET)[1:-1],
    ],
)
def test_each_form_of_a_secret_is_redacted(form: str) -> None:
    redactor = Redactor([SECRET])
    assert redactor.text(f"before {form} after") == f"before {REDACTED} after"


def test_values_keys_and_nested_strings_are_redacted_numbers_kept() -> None:
    redactor = Redactor(["s3cret-value"])
    value = {
        "url": "http://h:1/users/s3cret-value/x",
        "s3cret-value": [1, 2.5, None, True, {"echo": "Bearer s3cret-value"}],
    }
    assert redactor.value(value) == {
        "url": f"http://h:1/users/{REDACTED}/x",
        REDACTED: [1, 2.5, None, True, {"echo": f"Bearer {REDACTED}"}],
    }


def test_an_empty_redactor_returns_its_input_unchanged() -> None:
    value = {"a": ["b"]}
    assert Redactor([]).value(value) is value
    assert Redactor(["short"]).empty  # under the minimum: not a value to redact


def test_secrets_too_short_to_redact_are_refused_by_name_never_by_value() -> None:
    check_secrets({"LONG": "x" * MIN_SECRET_LENGTH})
    with pytest.raises(ConfigError) as info:
        check_secrets({"PIN": "1234", "EMPTY": "", "LONG": "x" * MIN_SECRET_LENGTH})
    message = str(info.value)
    assert "FLOWFORGE_SECRET_EMPTY, FLOWFORGE_SECRET_PIN" in message
    assert "1234" not in message and "LONG" not in message


def test_credential_headers_and_their_parts_are_found_case_insensitively() -> None:
    params = {
        "headers": {
            "authorization": "Bearer tok-abcdefgh",
            "Cookie": "session=sess-12345678; theme=dark",
            "Proxy-Authorization": "Basic dXNlcjpwYXNz",
            "X-Other": "not-a-credential-value",
        }
    }
    assert set(credential_values(params)) == {
        "Bearer tok-abcdefgh",
        "tok-abcdefgh",
        "session=sess-12345678; theme=dark",
        "sess-12345678",
        "Basic dXNlcjpwYXNz",
        "dXNlcjpwYXNz",
    }
    assert credential_values({"headers": "x"}) == []
    assert credential_values(["not", "a", "mapping"]) == []


@settings(database=None, derandomize=True, max_examples=300)
@given(
    secret=st.text(min_size=MIN_SECRET_LENGTH, max_size=30),
    before=st.text(max_size=20),
    after=st.text(max_size=20),
    encode=st.sampled_from(
        [
            lambda s: s,
            lambda s: quote(s, safe=""),
            lambda s: lower_hex(quote(s, safe="")),
            quote,
            quote_plus,
            lambda s: json.dumps(s)[1:-1],
        ]
    ),
)
def test_no_form_of_any_secret_survives_in_any_text(
    secret: str, before: str, after: str, encode: object
) -> None:
    assert callable(encode)
    form = encode(secret)
    redacted = Redactor([secret]).text(before + form + after)
    assert form not in redacted
    assert REDACTED in redacted


def test_log_records_are_redacted_with_the_attempts_values_inside_its_block() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactingFilter(Redactor(["process-secret"])))
    log = logging.getLogger("test.redaction")
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.INFO)
    try:
        log.info("sent %s", "process-secret", extra={"url": "http://h/process-secret"})
        with attempt_redaction(Redactor(["process-secret", "Bearer attempt-token"])):
            try:
                raise ValueError("header was Bearer attempt-token")
            except ValueError:
                log.exception("failed")
        log.info("outside: Bearer attempt-token")
    finally:
        log.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines[0]["message"] == f"sent {REDACTED}"
    assert lines[0]["url"] == f"http://h/{REDACTED}"
    assert "attempt-token" not in lines[1]["exception"]
    assert REDACTED in lines[1]["exception"]
    assert lines[2]["message"] == "outside: Bearer attempt-token"  # the attempt has ended
