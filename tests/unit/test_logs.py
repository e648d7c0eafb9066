"""Structured logs: JSON lines off a terminal, text on one; context from extra, task, span."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from pydantic import ValidationError

from flowforge_orchestrator.config import Settings
from flowforge_orchestrator.errors import ConfigError
from flowforge_orchestrator.ops.logs import configure_logging, log_context

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
SPAN_ID = 0x00F067AA0BA902B7
log = logging.getLogger("flowforge_orchestrator.test")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_when_not_a_terminal_with_extra_fields() -> None:
    out = io.StringIO()
    configure_logging("INFO", stream=out)
    log.info("run %s started", "r1", extra={"run_id": "r1", "attempt": 2, "custom": {"a": 1}})
    log.debug("not at INFO")
    [line] = lines(out)
    assert line["message"] == "run r1 started"
    assert line["level"] == "INFO" and line["logger"] == "flowforge_orchestrator.test"
    assert line["timestamp"].endswith("Z") and "T" in line["timestamp"]
    assert (line["run_id"], line["attempt"], line["custom"]) == ("r1", 2, {"a": 1})
    assert "step_id" not in line and "trace_id" not in line  # absent, not null


def test_task_context_and_extra_precedence() -> None:
    out = io.StringIO()
    configure_logging("DEBUG", json=True, stream=out)
    with log_context(run_id="r1", step_id=None):
        with log_context(step_id="fetch", attempt=1):
            log.debug("inner")
            log.debug("explicit", extra={"step_id": "other"})
        log.debug("outer")
    log.debug("outside")
    inner, explicit, outer, outside = lines(out)
    assert (inner["run_id"], inner["step_id"], inner["attempt"]) == ("r1", "fetch", 1)
    assert explicit["step_id"] == "other"
    assert outer["run_id"] == "r1" and "step_id" not in outer
    assert "run_id" not in outside


async def test_context_is_per_task() -> None:
    out = io.StringIO()
    configure_logging("INFO", json=True, stream=out)

    go = asyncio.Event()
    entered = {"a": asyncio.Event(), "b": asyncio.Event()}

    async def attempt(step_id: str) -> None:
        with log_context(step_id=step_id):
            entered[step_id].set()
            await go.wait()  # both tasks are inside their own contexts now
            log.info("done")

    tasks = [asyncio.create_task(attempt(s)) for s in entered]
    await asyncio.gather(*(e.wait() for e in entered.values()))
    go.set()
    await asyncio.gather(*tasks)
    assert sorted(line["step_id"] for line in lines(out)) == ["a", "b"]


def test_trace_id_from_the_current_span() -> None:
    out = io.StringIO()
    configure_logging("INFO", json=True, stream=out)
    span = NonRecordingSpan(SpanContext(TRACE_ID, SPAN_ID, False, TraceFlags(1)))
    with trace.use_span(span):
        log.info("in a span")
    log.info("no span")
    traced, untraced = lines(out)
    assert traced["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert traced["span_id"] == "00f067aa0ba902b7"
    assert "trace_id" not in untraced


def test_exceptions_and_unserialisable_values() -> None:
    out = io.StringIO()
    configure_logging("INFO", json=True, stream=out)
    try:
        raise ValueError("bad value")
    except ValueError:
        log.exception("it failed", extra={"thing": object()})
    [line] = lines(out)
    assert line["message"] == "it failed"
    assert "Traceback" in line["exception"] and "ValueError: bad value" in line["exception"]
    assert line["thing"].startswith("<object object")


def test_text_on_a_terminal_with_context() -> None:
    out = Terminal()
    configure_logging("INFO", stream=out)
    with log_context(run_id="r1", step_id="fetch", attempt=3, attempt_id="a-1"):
        log.warning("slow")
    log.info("plain")
    with_context, plain = out.getvalue().splitlines()
    assert with_context.endswith(
        "WARNING flowforge_orchestrator.test: slow [run_id=r1 step_id=fetch attempt=3]"
    )
    assert plain.endswith("INFO flowforge_orchestrator.test: plain")
    forced = io.StringIO()
    configure_logging("INFO", json=False, stream=forced)
    log.info("text anyway")
    assert forced.getvalue().rstrip().endswith("flowforge_orchestrator.test: text anyway")


def test_configuring_again_replaces_only_its_own_handler() -> None:
    root = logging.getLogger()
    before = len(root.handlers)
    first, second = io.StringIO(), io.StringIO()
    configure_logging("INFO", stream=first)
    configure_logging("warning", stream=second)
    assert len(root.handlers) == before + 1
    log.warning("once")
    log.info("filtered")
    assert first.getvalue() == "" and len(lines(second)) == 1
    assert logging.getLogger("arq").level == logging.WARNING
    with pytest.raises(ConfigError, match="unknown log level 'LOUD'"):
        configure_logging("LOUD")


def test_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWFORGE_LOG_LEVEL", "debug")
    monkeypatch.setenv("FLOWFORGE_LOG_FORMAT", "JSON")
    settings = Settings()
    assert (settings.log_level, settings.log_format) == ("DEBUG", "json")
    assert (settings.http_host, settings.http_port) == ("0.0.0.0", 9464)
    assert Settings(log_format="auto").log_format == "auto"
    with pytest.raises(ValidationError):
        Settings(log_format="xml")  # type: ignore[arg-type]  # the wrong value on purpose
    with pytest.raises(ValidationError):
        Settings(http_port=70000)
