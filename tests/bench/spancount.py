"""`python -m tests.bench.spancount <flowforge-orchestrator arguments>`: the daemon, with
every span it ends counted, for the soak's "spans per minute idle, per step under load".

With `BENCH_SPAN_COUNTS=DIR` set, a span processor counts the spans this process ends (in
total, those without a parent, and by name) and rewrites `DIR/<command>.json` (`run.json`,
`worker.json`) twice a second and at exit. Counting installs a tracer provider, so the
daemon records spans (and instruments asyncpg) as it would with an exporter configured;
nothing is exported anywhere.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor

from flowforge_orchestrator.ops import telemetry

__all__ = ["ENV", "SpanCounter", "read_counts"]

ENV = "BENCH_SPAN_COUNTS"
WRITE_EVERY = 0.5  # seconds


class SpanCounter(SpanProcessor):
    """Counts ended spans; a thread writes the counts to `path` every WRITE_EVERY seconds."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self.total = 0
        self.roots = 0
        self.by_name: Counter[str] = Counter()
        self._stop = threading.Event()
        self._write()
        self._thread = threading.Thread(target=self._write_loop, name="span-counts", daemon=True)
        self._thread.start()

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        with self._lock:
            self.total += 1
            self.roots += span.parent is None
            self.by_name[span.name] += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"total": self.total, "roots": self.roots, "by_name": dict(self.by_name)}

    def _write(self) -> None:
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.snapshot()))
        temporary.replace(self.path)  # a reader never sees half a file

    def _write_loop(self) -> None:
        while not self._stop.wait(WRITE_EVERY):
            self._write()

    def shutdown(self) -> None:
        self._stop.set()
        self._write()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        self._write()
        return True


def read_counts(path: Path) -> dict[str, Any]:
    """What a counting process wrote last (all zero before its first write)."""
    try:
        counts: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return {"total": 0, "roots": 0, "by_name": {}}
    return counts


def main() -> int:
    from flowforge_orchestrator.cli import main as cli_main

    args = sys.argv[1:]
    where = os.environ.get(ENV)
    if where and args:
        Path(where).mkdir(parents=True, exist_ok=True)
        telemetry.add_span_processor(SpanCounter(Path(where) / f"{args[0]}.json"))
    return cli_main(args)


if __name__ == "__main__":
    sys.exit(main())
