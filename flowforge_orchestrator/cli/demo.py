"""`flowforge-orchestrator demo`: the whole engine on one machine, offline.

Starts (when no URLs are set) private PostgreSQL and Redis, migrates, serves three small
HTTP endpoints on localhost, runs an orchestrator and a worker in this process, registers
the example workflow, submits a run and prints its progress and output.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

import yaml

from flowforge_orchestrator import store
from flowforge_orchestrator.cli.follow import follow_run
from flowforge_orchestrator.client import enqueue
from flowforge_orchestrator.config import Settings
from flowforge_orchestrator.core.definition.parse import parse_definition
from flowforge_orchestrator.engine.orchestrator import run_orchestrator
from flowforge_orchestrator.worker.runtime import load_step_types, run_worker

__all__ = ["DemoShop", "run_demo"]


class _Handler(BaseHTTPRequestHandler):
    server: DemoShop

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _json(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length) or b"null")

    def do_GET(self) -> None:
        if self.path.startswith("/orders/"):
            order_id = self.path.removeprefix("/orders/")
            items: list[dict[str, Any]] = [
                {"sku": "KB-1", "qty": 2, "price": 49.5},
                {"sku": "MS-3", "qty": 1, "price": 25.0},
            ]
            total = sum(float(i["qty"]) * float(i["price"]) for i in items)
            self._send(
                200, {"id": order_id, "customer": "ada@example.com", "items": items, "total": total}
            )
        else:
            self._send(404, {"error": "not found"})

    def do_POST(self) -> None:
        body = self._json()
        if self.path == "/payments":
            self.server.payments += 1
            payment = f"pay-{self.server.payments:04d}"
            self._send(
                201, {"payment_id": payment, "order_id": body["order_id"], "amount": body["amount"]}
            )
        elif self.path == "/notifications":
            self._send(200, {"sent": True, "to": body["customer"]})
        else:
            self._send(404, {"error": "not found"})

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the run is the story
        pass


class DemoShop(ThreadingHTTPServer):
    """The endpoints the example workflow calls, on a free localhost port."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.payments = 0
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> DemoShop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()


def example_definition() -> dict[str, Any]:
    text = resources.files("flowforge_orchestrator").joinpath("examples/demo_order.yaml")
    data: dict[str, Any] = yaml.safe_load(text.read_text(encoding="utf-8"))
    return data


async def run_demo(settings: Settings, *, order_id: str = "A-1001") -> int:
    assert settings.database_url and settings.redis_url
    applied = await store.apply_migrations(settings.database_url)
    print(f"migrations: {', '.join(applied) if applied else 'up to date'}")
    definition = parse_definition(example_definition(), source="examples/demo_order.yaml")
    stop = asyncio.Event()
    ready = asyncio.Event()
    with DemoShop() as shop:
        print(f"demo endpoints on {shop.base_url}")
        tasks = [
            asyncio.create_task(run_orchestrator(settings, stop, ready=ready)),
            asyncio.create_task(
                run_worker(settings, load_step_types([]), stop=stop, serve_http=False)
            ),
        ]
        try:
            await asyncio.wait_for(ready.wait(), timeout=30)
            conn = await store.connect(settings.database_url)
            try:
                await store.register_definition(conn, definition)
                run = await enqueue(
                    conn, definition.name, {"order_id": order_id, "base_url": shop.base_url}
                )
                print(f"submitted run {run.id} of {definition.name} v{definition.version}")
                status = await follow_run(conn, run.id, out=sys.stdout, timeout=60)
            finally:
                await conn.close()
            print(f"run {run.id} {status}")
            return 0 if status == "completed" else 1
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
