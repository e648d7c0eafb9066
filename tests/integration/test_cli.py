"""`flowforge-orchestrator` commands, run through `cli.main` (sync tests: it calls asyncio.run).

Settings come from `FLOWFORGE_*` variables set with monkeypatch. `submit --wait` and `runs`
follow runs driven by a real orchestrator and worker started as subprocesses, whose http steps
call `DemoShop`, a real HTTP server on localhost.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from flowforge_orchestrator.cli import main
from flowforge_orchestrator.cli.demo import DemoShop
from tests.conftest import TEST_JOB_KEY, Services, database_dsn, run_sync

REPO = Path(__file__).resolve().parents[2]
CLI = Path(sys.executable).with_name("flowforge-orchestrator")
UUID_LINE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
EXAMPLE = Path(str(resources.files("flowforge_orchestrator"))) / "examples" / "demo_order.yaml"

VALID = """
name: greet
version: 1
defaults: {timeout: 5s}
steps:
  - {id: user, type: http, with: {url: "http://svc.test/users/${{ input.user }}"}}
  - id: hello
    type: http
    depends_on: [user]
    with:
      method: POST
      url: http://svc.test/hello
      json: {to: "${{ steps.user.output.body.name }}"}
  - {id: shape, type: transform, depends_on: [hello], output: {ok: true}}
"""

# A step that the demo shop answers with 404: the run fails (4xx is not retried).
REFUND = """
name: refund
version: 1
steps:
  - id: refund
    type: http
    with: {method: POST, url: "${{ input.base_url }}/refunds", json: {order_id: "A-1"}}
  - {id: after, type: http, depends_on: [refund], with: {url: "${{ input.base_url }}/orders/A-1"}}
"""


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., Result]:
    """Run one command in-process; returns its exit code and what it printed."""

    def run(*argv: str) -> Result:
        capsys.readouterr()
        code = main(list(argv))
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No FLOWFORGE_* variable from the environment leaks into a test."""
    for name in list(os.environ):
        if name.startswith("FLOWFORGE_"):
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.fixture
def env(no_env: pytest.MonkeyPatch, db_url: str, redis_url: str) -> str:
    """The CLI pointed at this test's database and Redis; returns the database URL."""
    no_env.setenv("FLOWFORGE_DATABASE_URL", db_url)
    no_env.setenv("FLOWFORGE_REDIS_URL", redis_url)
    return db_url


def sql(dsn: str, query: str, *args: Any) -> list[asyncpg.Record]:
    async def go() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(dsn)
        try:
            return list(await conn.fetch(query, *args))
        finally:
            await conn.close()

    return run_sync(go())


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def one_step(workflow: str, step_id: str, step_type: str) -> str:
    return f"name: {workflow}\nversion: 1\nsteps:\n  - {{id: {step_id}, type: {step_type}}}\n"


def poll(predicate: Callable[[], Any], *, timeout: float, message: str) -> Any:
    """Check `predicate` until it is truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} (waited {timeout:g} s)")
        time.sleep(0.02)
    return value


# -- migrate ---------------------------------------------------------------------------------


@pytest.fixture
def empty_db(services: Services) -> Iterator[str]:
    """A brand-new database, not made from the migrated template."""
    name = f"empty_{uuid.uuid4().hex}"
    sql(services.database_url, f"CREATE DATABASE {name}")
    try:
        yield database_dsn(services.database_url, name)
    finally:
        sql(services.database_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_migrate_applies_every_migration_once(
    cli: Callable[..., Result], no_env: pytest.MonkeyPatch, empty_db: str
) -> None:
    no_env.setenv("FLOWFORGE_DATABASE_URL", empty_db)

    first = cli("migrate")
    second = cli("migrate")

    files = sorted(p.stem for p in (REPO / "sql").glob("[0-9][0-9][0-9][0-9]_*.sql"))
    assert files[0] == "0001_initial"
    assert (first.code, first.out.strip()) == (0, "applied: " + ", ".join(files))
    assert (second.code, second.out.strip()) == (0, "the schema is up to date")
    rows = sql(empty_db, "SELECT version, name FROM flowforge.schema_migrations")
    assert [tuple(r) for r in rows] == [(int(f[:4]), f[5:]) for f in files]
    assert sql(empty_db, "SELECT to_regclass('flowforge.outbox_cloudevents') IS NOT NULL")[0][0]

    roles = cli("migrate", "--roles")
    assert roles.code == 0, roles.err
    assert "roles: flowforge_orchestrator, flowforge_worker, flowforge_api" in roles.out
    owner = "SELECT tableowner FROM pg_tables WHERE schemaname = 'flowforge' AND tablename = 'runs'"
    assert sql(empty_db, owner)[0][0] == "flowforge_orchestrator"


@pytest.mark.parametrize("command", ["run", "worker"])
def test_run_and_worker_refuse_a_database_without_the_schema(
    cli: Callable[..., Result],
    no_env: pytest.MonkeyPatch,
    empty_db: str,
    redis_url: str,
    command: str,
) -> None:
    no_env.setenv("FLOWFORGE_DATABASE_URL", empty_db)
    no_env.setenv("FLOWFORGE_REDIS_URL", redis_url)

    result = cli(command)

    assert result.code == 3  # a server that cannot be used as it is
    assert "0001_initial" in result.err and "flowforge-orchestrator migrate" in result.err


# -- definitions -----------------------------------------------------------------------------


def test_definitions_schema_prints_a_json_schema(cli: Callable[..., Result]) -> None:
    result = cli("definitions", "schema")

    assert result.code == 0
    schema = json.loads(result.out)
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert {"name", "version", "steps"} <= set(schema["properties"])
    assert {"name", "version", "steps"} <= set(schema["required"])


def test_definitions_validate_accepts_a_valid_file(
    cli: Callable[..., Result], tmp_path: Path
) -> None:
    path = write(tmp_path / "greet.yaml", VALID)

    result = cli("definitions", "validate", path)

    assert result.code == 0, result.err
    assert result.out.strip() == f"{path}: greet version 1 is valid (3 steps)"


BROKEN = {
    "cycle": (
        """
  - {id: a, type: http, depends_on: [b], with: {url: "http://x.test/a"}}
  - {id: b, type: http, depends_on: [a], with: {url: "http://x.test/b"}}
""",
        "step 'a', field 'depends_on': dependency cycle: a -> b -> a",
    ),
    "unknown_dependency": (
        """
  - {id: a, type: http, with: {url: "http://x.test/a"}}
  - {id: b, type: http, depends_on: [nope], with: {url: "http://x.test/b"}}
""",
        "step 'b', field 'depends_on': depends on unknown step 'nope'",
    ),
    "bad_duration": (
        """
  - {id: a, type: http, timeout: 5 parsecs, with: {url: "http://x.test/a"}}
""",
        "step 'a', field 'timeout': invalid duration '5 parsecs'",
    ),
    "bad_cel": (
        """
  - {id: a, type: http, with: {url: "http://x.test/${{ input.( }}"}}
""",
        "step 'a', field 'with.url': invalid expression 'input.('",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_definitions_validate_names_file_step_and_field_of_a_problem(
    cli: Callable[..., Result], tmp_path: Path, case: str
) -> None:
    steps, expected = BROKEN[case]
    path = write(tmp_path / f"{case}.yaml", f"name: broken\nversion: 1\nsteps:{steps}")

    result = cli("definitions", "validate", path)

    assert result.code == 2
    assert result.out == ""
    assert f"error: file {path}, {expected}" in result.err


def test_definitions_validate_checks_types_only_against_allowed_ones(
    cli: Callable[..., Result], tmp_path: Path
) -> None:
    path = write(tmp_path / "sms.yaml", one_step("sms", "send", "sms_send"))

    assert cli("definitions", "validate", path).code == 0
    assert cli("definitions", "validate", path, "--allow-type", "sms_send").code == 0
    refused = cli("definitions", "validate", path, "--allow-type", "fax_send")
    assert refused.code == 2
    assert f"file {path}, step 'send', field 'type': unknown step type 'sms_send'" in refused.err


def test_definitions_apply_registers_once_and_refuses_a_changed_spec(
    cli: Callable[..., Result], env: str, tmp_path: Path
) -> None:
    path = write(tmp_path / "greet.yaml", VALID)

    first = cli("definitions", "apply", path)
    again = cli("definitions", "apply", path)
    write(tmp_path / "greet.yaml", VALID.replace("/hello", "/bonjour"))
    changed = cli("definitions", "apply", path)

    assert (first.code, first.out.strip()) == (0, "registered greet version 1")
    assert (again.code, again.out.strip()) == (0, "greet version 1 is already registered")
    assert changed.code == 2
    assert changed.err.strip() == (
        f"error: {path}: greet version 1 is already registered with a different spec; "
        "raise `version` to register a change"
    )
    rows = sql(env, "SELECT version, spec FROM flowforge.workflow_definitions")
    assert len(rows) == 1
    assert json.loads(rows[0]["spec"])["steps"][1]["with"]["url"] == "http://svc.test/hello"


def test_definitions_apply_refuses_unknown_step_types(
    cli: Callable[..., Result], env: str, tmp_path: Path
) -> None:
    sms = write(tmp_path / "sms.yaml", one_step("sms", "s", "sms_send"))
    fax = write(tmp_path / "fax.yaml", one_step("fax", "f", "fax_send"))

    refused = cli("definitions", "apply", sms)
    allowed = cli("definitions", "apply", sms, "--allow-type", "sms_send")
    before_worker = cli("definitions", "apply", fax)
    # What a worker started with `--types-module` does when it starts.
    sql(env, "INSERT INTO flowforge.step_types (name, worker) VALUES ('fax_send', 'worker-1')")
    after_worker = cli("definitions", "apply", fax)

    assert refused.code == 2
    assert f"file {sms}, step 's', field 'type': unknown step type 'sms_send'" in refused.err
    assert "known types:" in refused.err and "http" in refused.err
    assert (allowed.code, allowed.out.strip()) == (0, "registered sms version 1")
    assert before_worker.code == 2 and "unknown step type 'fax_send'" in before_worker.err
    assert (after_worker.code, after_worker.out.strip()) == (0, "registered fax version 1")


def test_definitions_list_shows_the_latest_version_of_each_workflow(
    cli: Callable[..., Result], env: str, tmp_path: Path
) -> None:
    assert cli("definitions", "apply", write(tmp_path / "v1.yaml", VALID)).code == 0
    v2 = VALID.replace("version: 1", "version: 2\nmax_concurrency: 3")
    assert cli("definitions", "apply", write(tmp_path / "v2.yaml", v2)).code == 0
    assert cli("definitions", "apply", str(EXAMPLE)).code == 0

    result = cli("definitions", "list")

    assert result.code == 0
    assert result.out.splitlines() == [
        "WORKFLOW    VERSION  MAX_CONCURRENCY",
        "demo-order  v1       -",
        "greet       v2       3",
    ]
    as_json = cli("definitions", "list", "--json")
    assert [(d["name"], d["version"]) for d in json.loads(as_json.out)] == [
        ("demo-order", 1),
        ("greet", 2),
    ]


# -- submit ----------------------------------------------------------------------------------


def test_submit_prints_the_run_id_and_honours_idempotency_keys(
    cli: Callable[..., Result], env: str, tmp_path: Path
) -> None:
    typo = cli("submit", "greet", "--input", "{}")  # nothing registered yet
    assert cli("definitions", "apply", write(tmp_path / "v1.yaml", VALID)).code == 0
    typo_after = cli("submit", "gret", "--input", "{}")
    old_version = cli("submit", "greet", "--version", "4")
    assert (typo.code, typo.err.strip()) == (
        2,
        "error: workflow 'greet' is not registered (see `definitions list`)",
    )
    assert (typo_after.code, typo_after.err.strip()) == (
        2,
        "error: workflow 'gret' is not registered: did you mean 'greet'?",
    )
    assert old_version.code == 2 and "'greet' has no version 4" in old_version.err
    assert sql(env, "SELECT count(*) FROM flowforge.runs")[0][0] == 0  # nothing inserted

    plain = cli("submit", "greet", "--input", '{"user": 42}')
    keyed = cli("submit", "greet", "--input", '{"user": 1}', "--idempotency-key", "k-1")
    again = cli("submit", "greet", "--input", '{"user": 2}', "--idempotency-key", "k-1")

    assert plain.code == 0 and UUID_LINE.match(plain.out.strip()), plain.out
    assert keyed.code == 0 and UUID_LINE.match(keyed.out.strip()), keyed.out
    assert again.code == 0
    assert again.out.strip() == f"{keyed.out.strip()} (existing run for this idempotency key)"
    rows = sql(env, "SELECT id::text, input FROM flowforge.runs ORDER BY created_at")
    assert [(r["id"], json.loads(r["input"])) for r in rows] == [
        (plain.out.strip(), {"user": 42}),
        (keyed.out.strip(), {"user": 1}),
    ]


def test_submit_refuses_input_that_is_not_json(cli: Callable[..., Result], env: str) -> None:
    result = cli("submit", "greet", "--input", "{user: 42}")

    assert result.code == 2
    assert result.out == ""
    assert result.err.startswith("error: --input is not valid JSON: ")
    assert sql(env, "SELECT count(*) FROM flowforge.runs")[0][0] == 0


def test_runs_cancel_and_retry_say_what_they_did_and_what_they_cannot(
    cli: Callable[..., Result], env: str, tmp_path: Path
) -> None:
    assert cli("definitions", "apply", write(tmp_path / "v1.yaml", VALID)).code == 0
    run_id = cli("submit", "greet", "--input", "{}").out.strip()

    cancelled = cli("runs", "cancel", run_id, "--reason", "ordered twice")
    assert cancelled.code == 0
    assert cancelled.out.strip() == f"run {run_id}: cancellation requested (it was pending)"
    requests = sql(env, "SELECT run_id::text, reason, handled_at FROM flowforge.cancel_requests")
    assert [tuple(r) for r in requests] == [(run_id, "ordered twice", None)]

    sql(env, "UPDATE flowforge.runs SET status = 'completed'")
    again = cli("runs", "cancel", run_id)
    assert (again.code, again.out.strip()) == (
        0,
        f"run {run_id} already ended (completed): nothing to cancel",
    )
    refused = cli("runs", "retry", run_id)
    assert refused.code == 1
    assert "completed: only a failed or cancelled run runs again" in refused.err

    missing = cli("runs", "cancel", "00000000-0000-4000-8000-000000000000")
    assert missing.code == 1 and "there is no run" in missing.err

    # A run cancelled while `user` ran: retried, it runs what was cancelled, and says so.
    sql(
        env,
        "UPDATE flowforge.runs SET status = 'cancelled',"
        """ checkpoint = '{"v": 2, "seq": 4, "steps": {"user": "C1"}}' WHERE id = $1""",
        run_id,
    )
    retried = cli("runs", "retry", run_id)
    assert (retried.code, retried.out.strip()) == (
        0,
        f"run {run_id}: runs again from the steps that failed or were cancelled (redrive 1)",
    )


# -- a real engine: orchestrator and worker subprocesses ------------------------------------


@dataclass
class Daemon:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait_ready(self, line: str) -> None:
        def ready() -> bool:
            if self.popen.poll() is not None:
                raise AssertionError(f"{self.name} exited early:\n{self.output()[-4000:]}")
            return line in self.output()

        poll(ready, timeout=30, message=f"{self.name} did not start")

    def stop(self) -> None:
        """SIGTERM; SIGKILL when it is still there after a deadline. It must have exited
        0: on its own it should not have exited at all, and SIGTERM is a clean stop."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=10)
        code = self.popen.returncode
        assert code == 0, f"{self.name} exited with {code}:\n{self.output()[-4000:]}"


@pytest.fixture
def daemons(env: str, redis_url: str, tmp_path: Path) -> Iterator[None]:
    """`flowforge-orchestrator run` and `worker` on this test's database and Redis."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWFORGE_", "OTEL_"))}
    child_env.update(
        PYTHONPATH=str(REPO),
        FLOWFORGE_DATABASE_URL=env,
        FLOWFORGE_REDIS_URL=redis_url,
        FLOWFORGE_POLL_INTERVAL="0.5",
        FLOWFORGE_WORKER_POLL_DELAY="0.01",
        FLOWFORGE_WORKER_SHUTDOWN_GRACE="1",
        FLOWFORGE_HTTP_ALLOW="127.0.0.0/8",  # the test's HTTP server is on 127.0.0.1
        FLOWFORGE_JOB_KEY=TEST_JOB_KEY,
    )
    with contextlib.ExitStack() as stack:
        for name, args, ready in (
            ("worker", ["worker"], "worker cli-worker serving step types: http"),
            ("orchestrator", ["run"], "orchestrator cli-orchestrator running"),
        ):
            log = tmp_path / f"{name}.log"
            with log.open("wb") as out:
                popen = subprocess.Popen(
                    [str(CLI), *args],
                    cwd=REPO,
                    env={**child_env, "FLOWFORGE_NODE_ID": f"cli-{name}"},
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            daemon = Daemon(name, popen, log)
            stack.callback(daemon.stop)  # on exit, the orchestrator first
            daemon.wait_ready(ready)
        yield


@pytest.fixture
def shop() -> Iterator[DemoShop]:
    with DemoShop() as server:
        yield server


def events_of(output: str) -> list[str]:
    """`type step_id` of each event line that `submit --wait` printed."""
    pattern = re.compile(
        r"^\d\d:\d\d:\d\d\.\d{3}  ([a-z_]+\.[a-z_]+)"  # time, type
        r"(?: ([A-Za-z_]\w*)(?: \(attempt \d+\))?)?(?:: .*)?$"  # step, attempt, error
    )
    found = (pattern.match(line) for line in output.splitlines())
    return [" ".join(filter(None, m.groups())) for m in found if m]


def submit_wait(cli: Callable[..., Result], workflow: str, input: Any) -> Result:
    return cli("submit", workflow, "--input", json.dumps(input), "--wait", "--timeout", "30")


def test_submit_wait_follows_the_run_and_prints_its_output(
    cli: Callable[..., Result], daemons: None, shop: DemoShop
) -> None:
    assert cli("definitions", "apply", str(EXAMPLE)).code == 0

    result = submit_wait(cli, "demo-order", {"order_id": "A-7", "base_url": shop.base_url})

    assert result.code == 0, result.out + result.err
    lines = result.out.splitlines()
    assert UUID_LINE.match(lines[0])
    expected = ["workflow.started"]
    for step in ("fetch_order", "charge", "notify"):
        expected += [f"step.dispatched {step}", f"step.started {step}", f"step.succeeded {step}"]
    expected += ["step.succeeded summary", "workflow.completed"]  # the transform is inline
    assert events_of(result.out) == expected, result.out
    output = result.out[result.out.index("output: ") + len("output: ") :]
    assert json.loads(output) == {
        "order": "A-7",
        "paid": 124.0,
        "payment": "pay-0001",
        "notified": True,
    }


def test_submit_wait_exits_1_when_the_run_fails(
    cli: Callable[..., Result], env: str, daemons: None, shop: DemoShop, tmp_path: Path
) -> None:
    assert cli("definitions", "apply", write(tmp_path / "refund.yaml", REFUND)).code == 0

    result = submit_wait(cli, "refund", {"base_url": shop.base_url})

    assert result.code == 1, result.out + result.err
    assert events_of(result.out) == [
        "workflow.started",
        "step.dispatched refund",
        "step.started refund",
        "step.failed refund",
        "step.cancelled after",  # can never run
        "workflow.failed",
    ], result.out
    assert re.search(
        r"  step\.failed refund \(attempt 1\): POST http://\S+/refunds returned HTTP 404$",
        result.out,
        re.M,
    )
    error = json.loads(result.out[result.out.index("error: ") + len("error: ") :])
    assert error["step_id"] == "refund"
    assert error["category"] == "http_404"


def test_runs_show_and_list(
    cli: Callable[..., Result], env: str, daemons: None, shop: DemoShop, tmp_path: Path
) -> None:
    assert cli("definitions", "apply", str(EXAMPLE)).code == 0
    assert cli("definitions", "apply", write(tmp_path / "refund.yaml", REFUND)).code == 0
    base = shop.base_url
    done = submit_wait(cli, "demo-order", {"order_id": "A-1", "base_url": base})
    failed = submit_wait(cli, "demo-order", {"order_id": "A-2", "base_url": f"{base}/nope"})
    other = submit_wait(cli, "refund", {"base_url": base})
    done_id, failed_id, other_id = (r.out.splitlines()[0] for r in (done, failed, other))
    assert (done.code, failed.code, other.code) == (0, 1, 1)

    text = cli("runs", "show", done_id)
    as_json = cli("runs", "show", done_id, "--json")
    missing_id = str(uuid.uuid4())
    missing = cli("runs", "show", missing_id)
    completed = cli("runs", "list", "--workflow", "demo-order", "--status", "completed")
    failures = cli("runs", "list", "--workflow", "demo-order", "--status", "failed")
    everything = cli("runs", "list")

    assert text.code == 0
    assert f"run       {done_id}" in text.out
    assert "workflow  demo-order v1" in text.out
    assert "status    completed" in text.out
    assert re.search(r"^output    \{.*\"payment\": \"pay-0001\"", text.out, re.M)
    for step in ("fetch_order", "charge", "notify"):
        assert re.search(rf"^  {step} +#1 http +succeeded +queued +\d", text.out, re.M), text.out

    assert as_json.code == 0
    details = json.loads(as_json.out)
    assert details["id"] == done_id and details["status"] == "completed"
    http_attempts = [a for a in details["attempts"] if a["step_type"] == "http"]
    assert [a["step_id"] for a in http_attempts] == ["fetch_order", "charge", "notify"]
    assert all(a["status"] == "succeeded" and a["attempt"] == 1 for a in http_attempts)
    seqs = [t["seq"] for t in details["transitions"]]
    assert seqs == list(range(1, len(seqs) + 1))
    assert details["transitions"][0]["to_status"] == "running"
    assert details["transitions"][-1]["to_status"] == "completed"

    assert missing.code == 2
    assert missing.err.strip() == f"error: no run with id {missing_id}"

    assert completed.code == 0
    assert completed.out.split()[:5] == ["RUN", "WORKFLOW", "STATUS", "CREATED", "TOOK"]
    assert [line.split()[0] for line in completed.out.splitlines()[1:]] == [done_id]
    assert "demo-order v1  completed" in completed.out
    assert [line.split()[0] for line in failures.out.splitlines()[1:]] == [failed_id]
    assert {line.split()[0] for line in everything.out.splitlines()[1:]} == {
        done_id,
        failed_id,
        other_id,
    }


def test_runs_show_refuses_a_malformed_run_id(cli: Callable[..., Result], env: str) -> None:
    result = cli("runs", "show", "not-a-uuid")

    assert result.code == 2
    assert "not-a-uuid" in result.err


# -- demo, and missing settings -------------------------------------------------------------


def test_demo_runs_the_example_to_completion(cli: Callable[..., Result], env: str) -> None:
    result = cli("demo", "--order-id", "B-9")

    assert result.code == 0, result.out + result.err
    assert "migrations: up to date" in result.out
    assert re.search(r"^demo endpoints on http://127\.0\.0\.1:\d+$", result.out, re.M)
    assert "workflow.completed" in result.out
    assert re.search(r"^run [0-9a-f-]{36} completed$", result.out, re.M)
    assert '"order": "B-9"' in result.out


@pytest.mark.parametrize(
    ("variables", "missing"),
    [
        ({}, "FLOWFORGE_DATABASE_URL"),
        ({"FLOWFORGE_DATABASE_URL": "postgresql://localhost/x"}, "FLOWFORGE_REDIS_URL"),
    ],
)
def test_worker_without_urls_exits_2_naming_the_variable(
    cli: Callable[..., Result], no_env: pytest.MonkeyPatch, variables: dict[str, str], missing: str
) -> None:
    for name, value in variables.items():
        no_env.setenv(name, value)

    result = cli("worker")

    assert result.code == 2
    assert result.err.startswith("error: the worker needs ")
    assert missing in result.err


@pytest.mark.parametrize(
    "argv",
    [("migrate",), ("definitions", "list"), ("submit", "greet"), ("runs", "list")],
)
def test_database_commands_without_a_database_url_exit_2(
    cli: Callable[..., Result], no_env: pytest.MonkeyPatch, argv: tuple[str, ...]
) -> None:
    result = cli(*argv)

    assert result.code == 2
    assert result.err.strip() == "error: set FLOWFORGE_DATABASE_URL (a PostgreSQL DSN)"


def test_an_invalid_setting_is_named(
    cli: Callable[..., Result], no_env: pytest.MonkeyPatch
) -> None:
    no_env.setenv("FLOWFORGE_LEASE_SECONDS", "soon")

    result = cli("migrate")

    assert result.code == 2
    assert "FLOWFORGE_LEASE_SECONDS" in result.err
