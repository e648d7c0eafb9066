"""Secret values never leave the worker: not through a result, an error, the outbox, Redis,
the logs or `runs show`, whatever the step did with them.

A real HTTP server on loopback echoes what it received (path and headers) and answers
with the status the path asks for; steps put secrets in a URL path, in credential
headers, and in a URL that does not parse. Then the whole database is dumped with pg_dump,
every Redis key is read, and the captured logs and `runs show` are searched for each form
of each secret.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import quote, quote_plus

import pytest
import redis.asyncio

from flowforge_orchestrator import store
from flowforge_orchestrator.cli import main
from flowforge_orchestrator.config import Settings
from flowforge_orchestrator.engine.orchestrator import run_orchestrator
from flowforge_orchestrator.worker.runtime import load_step_types, run_worker
from tests.integration.conftest import Engine

SECRETS = {"TOKEN": "s3cret-token-42", "ODD": "p@ss/w0rd+x y"}
COOKIE = "session=cookie-value-123"


def forms(value: str) -> set[str]:
    """Every form in which a value could have been stored."""
    encoded = {quote(value, safe=""), quote(value), quote_plus(value)}
    lowered = {re.sub(r"%[0-9A-F]{2}", lambda m: m[0].lower(), e) for e in encoded}
    return {value, json.dumps(value)[1:-1], *encoded, *lowered}


LEAKS = set().union(*(forms(v) for v in SECRETS.values()))


class Echo(BaseHTTPRequestHandler):
    """`/status/<code>/...`: answers <code> with the path and headers it received."""

    def _answer(self) -> None:
        match = re.match(r"/status/(\d{3})", self.path)
        status = int(match[1]) if match else 200
        body = json.dumps({"path": self.path, "headers": dict(self.headers)}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def echo() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
async def engine(settings: Settings) -> AsyncIterator[Engine]:
    """An orchestrator and a worker that holds SECRETS."""
    stop = asyncio.Event()
    ready_o, ready_w = asyncio.Event(), asyncio.Event()
    tasks = [
        asyncio.create_task(run_orchestrator(settings, stop, ready=ready_o)),
        asyncio.create_task(
            run_worker(settings, load_step_types([]), stop=stop, ready=ready_w, secrets=SECRETS)
        ),
    ]
    await asyncio.wait_for(asyncio.gather(ready_o.wait(), ready_w.wait()), timeout=20)
    conn = await store.connect(settings.database_url or "")
    try:
        yield Engine(settings, conn)
    finally:
        await conn.close()
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)


def workflows(base: str) -> str:
    return f"""
name: leaky
version: 1
defaults: {{retry: {{max_retries: 0}}}}
steps:
  - id: path
    type: http
    continue_on_failure: true
    with:
      url: "{base}/status/500/users/${{{{ secrets.TOKEN }}}}/${{{{ secrets.ODD }}}}"
  - id: echoed
    type: http
    with:
      url: "{base}/status/200/ok"
      headers:
        Authorization: "Bearer ${{{{ secrets.TOKEN }}}}"
        Proxy-Authorization: "Basic ${{{{ secrets.ODD }}}}"
        Cookie: "{COOKIE}"
  - id: broken
    type: http
    depends_on: [path, echoed]
    with:
      # One expression gives the whole URL (validation refuses a value in the host part
      # otherwise); it does not parse: its port holds the secret.
      url: "${{{{ 'http://127.0.0.1:18080:' + secrets.TOKEN + '/' }}}}"
"""


def _dump(dsn: str) -> str:
    pg_dump = shutil.which("pg_dump")
    if pg_dump is None:
        pytest.skip("pg_dump is not installed")
    done = subprocess.run(
        [pg_dump, "--no-owner", "--data-only", dsn],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout


async def _redis_text(url: str) -> str:
    client = redis.asyncio.Redis.from_url(url)
    parts: list[bytes] = []
    try:
        async for key in client.scan_iter(count=500):
            parts.append(key)
            kind = await client.type(key)
            if kind == b"string":
                parts.append(await client.get(key) or b"")
            elif kind == b"zset":
                parts += await client.zrange(key, 0, -1)
            elif kind == b"hash":
                parts += [b for pair in (await client.hgetall(key)).items() for b in pair]
    finally:
        await client.aclose()
    return b"\n".join(parts).decode("utf-8", "replace")


async def test_no_form_of_a_secret_is_stored_logged_or_shown(
    engine: Engine,
    echo: str,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await engine.register(workflows(echo))
    run_id = await engine.submit("leaky")
    run = await engine.finished(run_id, timeout=30)

    # The steps did meet the secrets (the server saw them), and the run says what happened.
    assert run["status"] == "failed"
    assert run["error"]["category"] == "invalid_params"
    events = await engine.events(run_id)
    failed = {e["data"].get("step_id"): e["data"] for e in events if e["type"] == "step.failed"}
    assert failed["path"]["error"]["category"] == "http_500"
    assert "[REDACTED]" in json.dumps(failed["path"]["error"])
    echoed = await engine.conn.fetchval(
        "SELECT output FROM flowforge.step_results WHERE step_id = 'echoed'"
    )
    headers = {k.lower(): v for k, v in echoed["body"]["headers"].items()}
    assert headers["authorization"] == "Bearer [REDACTED]"
    # A credential header is redacted even when the definition wrote it out (it is in the
    # definition, not a secret of the worker's: the result alone must not repeat it).
    assert headers["cookie"] == "[REDACTED]"

    dump = _dump(engine.settings.database_url or "")
    assert "leaky" in dump and "[REDACTED]" in dump  # the dump is of this run
    assert [leak for leak in LEAKS if leak in dump] == []
    stored = await _redis_text(engine.settings.redis_url or "")
    assert [leak for leak in LEAKS if leak in stored] == []
    assert [leak for leak in LEAKS if leak in caplog.text] == []

    monkeypatch.setenv("FLOWFORGE_DATABASE_URL", engine.settings.database_url or "")
    capsys.readouterr()
    for args in (["runs", "show", str(run_id)], ["runs", "show", str(run_id), "--json"]):
        assert await asyncio.to_thread(main, args) == 0
    shown = capsys.readouterr().out
    assert "[REDACTED]" in shown
    assert [leak for leak in LEAKS if leak in shown] == []
