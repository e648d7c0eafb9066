"""Hand-written mutations of the engine's critical decisions: `python -m tests.mutants`
(`just mutants`; not in CI, it takes minutes).

Each mutation replaces an exact snippet (rarely two) with code that gets a decision
wrong, in a copy of the repository, and runs the few tests that must notice. It is
*killed* when they fail, and *survives* when they pass: then the suite would let that bug
through. The command prints every mutation with its verdict and the test that killed it,
and exits 1 when one survived, when a snippet no longer occurs exactly once (the code
moved on: update the table), or when the tests could not run at all.

The copy holds the working tree's files (tracked and untracked, not ignored), and
everything runs inside it: pytest's rootdir and PYTHONPATH are the copy, so the tests and
the daemons they start (which put their own REPO on PYTHONPATH) import the mutated
package, never the checkout. The two canaries at the head of the table prove it, one
in process and one in a subprocess: each breaks something trivially, and must be killed.

    python -m tests.mutants              # every mutation
    python -m tests.mutants -k epoch     # those whose name contains "epoch"
    python -m tests.mutants --list       # the table, nothing run
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MUTATIONS", "Edit", "Mutation", "main"]

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 900  # seconds for one mutation's tests


@dataclass(frozen=True)
class Edit:
    """`original`, which must occur exactly once in `file`, becomes `replacement`."""

    file: str
    original: str
    replacement: str


@dataclass(frozen=True)
class Mutation:
    """One wrong decision: its edits (usually one) are applied together; `tests` must fail."""

    name: str
    edits: tuple[Edit, ...]
    tests: tuple[str, ...]

    @property
    def files(self) -> str:
        return ", ".join(dict.fromkeys(e.file for e in self.edits))


def mutation(name: str, file: str, original: str, replacement: str, *tests: str) -> Mutation:
    """A mutation of one edit."""
    return Mutation(name, (Edit(file, original, replacement),), tests)


T_RECOVERY = "tests/integration/test_recovery.py"
T_STORE = "tests/integration/test_store.py"
T_WRITER = "tests/integration/test_result_writer.py"
T_FLOW = "tests/integration/test_control_flow.py"
T_FAILURES = "tests/integration/test_failures.py"
T_QUEUE = "tests/integration/test_queue_worker.py"
T_E2E = "tests/e2e/test_processes.py"
T_CHILDREN = "tests/integration/test_child_runs.py"
T_LIVENESS = "tests/integration/test_liveness.py"
T_ISOLATION = "tests/integration/test_isolation.py"
T_FAULTS = "tests/integration/test_engine_faults.py"
T_WORKER = "tests/integration/test_worker_faults.py"
T_SAGA = "tests/unit/test_saga_graph.py"
T_HANDLING = "tests/integration/test_handling_failures.py"
T_SAGA_E2E = "tests/e2e/test_saga_processes.py"

MUTATIONS: tuple[Mutation, ...] = (
    # -- canaries: the copy is what runs, in process and in the daemons ---------------------
    mutation(
        "canary: the tests import the copy (in process)",
        "flowforge_orchestrator/core/durations.py",
        "    return _checked(value, _parse_units(value, text))\n",
        "    return -1.0  # the mutated copy\n",
        "tests/unit/test_durations.py",
    ),
    mutation(
        "canary: the daemons the tests start run the copy (subprocess)",
        "flowforge_orchestrator/cli/daemons.py",
        "    types = load_step_types(args.types_module)\n    await require_schema(",
        '    raise ConfigError("the mutated copy runs in the worker daemon")\n'
        "    types = load_step_types(args.types_module)\n    await require_schema(",
        f"{T_E2E}::test_a_delay_survives_a_killed_orchestrator_and_fires_once_at_its_time",
    ),
    # -- the engine's critical decisions ---------------------------------------------------
    mutation(
        "the reconciler does not send again the jobs Redis lost",
        "flowforge_orchestrator/engine/reconciler.py",
        "            self._runs.deliver_again(lost)\n            await self.redeliver()\n",
        "            pass\n",
        f"{T_RECOVERY}::test_attempts_redis_lost_are_sent_again_and_runs_complete",
    ),
    mutation(
        "the group commit writes without the epoch fence",
        "flowforge_orchestrator/store/queries.py",
        "    WHERE r.id = u.id AND r.epoch = u.epoch{only_locked}\n",
        "    WHERE r.id = u.id{only_locked}\n",
        f"{T_STORE}::test_write_changes_is_fenced_by_the_epoch",
    ),
    mutation(
        "a worker's results are not batched (one transaction each)",
        "flowforge_orchestrator/worker/results.py",
        "MAX_BATCH = 500\n",
        "MAX_BATCH = 1\n",
        f"{T_WRITER}::test_results_finishing_together_share_transactions_and_each_waits_for_its_own",
    ),
    mutation(
        "the losers of a join are not aborted on the worker",
        "flowforge_orchestrator/engine/orchestrator.py",
        "        if changes.aborts:\n",
        "        if False:\n",
        f"{T_FLOW}::test_join_any_cancels_the_losers_and_aborts_them_on_the_worker",
    ),
    mutation(
        "an error that says retryable: false is retried",
        "flowforge_orchestrator/core/retry.py",
        '    if error.get("retryable", True) is False:\n',
        "    if False:\n",
        "tests/unit/test_retry.py",
        f"{T_FAILURES}::test_a_400_is_not_retried",
    ),
    mutation(
        "a result of an attempt that is no longer the step's current one is applied",
        "flowforge_orchestrator/core/graph/run.py",
        "        if node is None or node.attempt_id != result.attempt_id:\n",
        "        if node is None:\n",
        "tests/unit/test_graph.py::test_a_stale_attempt_is_ignored",
        f"{T_FAILURES}::test_an_attempt_no_worker_takes_times_out_and_a_late_result_is_ignored",
    ),
    mutation(
        "a cancellation whose notification was missed is never acted on",
        "flowforge_orchestrator/engine/cancels.py",
        "        for run_id in wanted:\n            self.cancel(run_id)\n",
        "        pass\n",
        f"{T_FAILURES}::test_a_cancellation_whose_notification_was_missed_is_found_by_the_slow_poll",
    ),
    mutation(
        "the orchestrator does not renew its leases",
        "flowforge_orchestrator/engine/leases.py",
        "                return await store.renew_leases(\n"
        "                    conn, self.node, lease, owned, renew_below=lease * 2 / 3\n"
        "                )\n",
        "                return self._runs.epochs()\n",
        "tests/integration/test_leases.py",
    ),
    Mutation(  # the fence itself still holds: runs complete, only the epoch tells
        "a claim does not move the run's epoch on (in the row and in the owner's fence)",
        (
            Edit(
                "flowforge_orchestrator/engine/claimer.py",
                "                write = owned_changes(owned, changes, new_epoch=row.epoch + 1, "
                "claimed=True)\n",
                "                write = owned_changes(owned, changes, new_epoch=row.epoch, "
                "claimed=True)\n",
            ),
            Edit(
                "flowforge_orchestrator/engine/claimer.py",
                "            owned.epoch = row.epoch + 1\n",
                "            owned.epoch = row.epoch\n",
            ),
        ),
        (f"{T_E2E}::test_two_orchestrators_share_a_burst_of_runs",),
    ),
    mutation(
        "a slot freed while a poll claims wakes no poll (the lost wake-up)",
        "flowforge_orchestrator/queue/woken.py",
        "        if left_behind and self._freed_meanwhile:\n",
        "        if False:\n",
        f"{T_QUEUE}::test_a_slot_freed_while_a_poll_claims_wakes_another_poll",
    ),
    mutation(
        "two workers may claim the same job",
        "flowforge_orchestrator/queue/woken.py",
        "    if redis.call('EXISTS', key) == 0 then\n",
        "    if true then\n",
        f"{T_QUEUE}::test_a_poll_claims_its_jobs_in_one_round_trip_and_two_workers_never_share_one",
    ),
    # -- one run's fault stays its own (the claim, the group commit, the leases) ------------
    mutation(
        "a claim the database refuses is not halved: no run of it is claimed",
        "flowforge_orchestrator/engine/claimer.py",
        "            if not store.is_member_fault(exc) or not tried:\n",
        "            if True:\n",
        f"{T_ISOLATION}::test_a_run_refused_at_claim_fails_alone_and_the_others_complete",
    ),
    mutation(
        "a group commit the database refuses fails every run of it",
        "flowforge_orchestrator/engine/committer.py",
        "                return _Verdict(failed=[(items[0], exc)])\n"
        "            half = len(items) // 2\n",
        "                return _Verdict(failed=[(items[0], exc)])\n"
        "            return _Verdict(failed=[(item, exc) for item in items])\n"
        "            half = len(items) // 2\n",
        f"{T_ISOLATION}::test_a_run_refused_mid_way_fails_after_its_last_stored_transition",
    ),
    mutation(
        "a run whose failure cannot be stored is claimed again and again",
        "flowforge_orchestrator/engine/faults.py",
        "    runs.set_apart(run_id)\n",
        "    pass\n",
        f"{T_ISOLATION}::test_a_run_whose_failure_cannot_be_stored_is_set_apart",
    ),
    mutation(
        "the orchestrator waits as long as it takes for a row locked elsewhere",
        "flowforge_orchestrator/engine/orchestrator.py",
        "            lock_timeout=settings.lock_timeout,\n",
        "            lock_timeout=None,\n",
        f"{T_ISOLATION}::test_a_row_locked_by_another_session_delays_only_its_own_run",
    ),
    mutation(
        "the lease renewal does not renew the others when one row is locked",
        "flowforge_orchestrator/engine/leases.py",
        "                if not store.is_lock_timeout(exc):\n                    raise\n",
        "                raise\n",
        f"{T_ISOLATION}::test_a_row_locked_by_another_session_delays_only_its_own_run",
    ),
    mutation(
        "an input over the context limit is not refused at claim",
        "flowforge_orchestrator/engine/admission.py",
        "                if size > limit:\n",
        "                if False:\n",
        f"{T_ISOLATION}::test_an_input_over_the_context_limit_is_refused_before_any_step",
    ),
    mutation(
        "a deleted run leaves its history and results behind",
        "sql/0010_isolation.sql",
        "CREATE TRIGGER runs_forget_deleted AFTER DELETE ON flowforge.runs\n"
        "    REFERENCING OLD TABLE AS deleted_runs\n"
        "    FOR EACH STATEMENT EXECUTE FUNCTION flowforge.runs_forget_deleted();\n",
        "",
        f"{T_ISOLATION}::test_a_deleted_run_takes_its_rows_and_its_id_starts_afresh",
    ),
    mutation(
        "attempt ids ignore the run's incarnation",
        "flowforge_orchestrator/core/graph/nodes.py",
        '    run = f"{run_id}@{incarnation}" if incarnation else str(run_id)\n',
        "    run = str(run_id)\n",
        f"{T_ISOLATION}::test_a_deleted_run_takes_its_rows_and_its_id_starts_afresh",
    ),
    mutation(
        "a run may be inserted running, with an owner or a checkpoint",
        "sql/0014_enqueue_checks.sql",  # the check's latest form (sql/0010 first)
        "    IF NEW.status <> 'pending' OR NEW.owner IS NOT NULL",
        "    IF false AND NEW.owner IS NOT NULL",
        f"{T_ISOLATION}::test_a_run_is_inserted_pending_and_nothing_else",
    ),
    # -- the orchestrator's error paths -------------------------------------------------------
    mutation(
        "a run the engine keeps failing on is never failed (no strike limit)",
        "flowforge_orchestrator/engine/claimer.py",
        "MAX_STRIKES = 3 ",
        "MAX_STRIKES = 10**9 ",
        f"{T_FAULTS}::test_a_run_whose_results_cannot_be_applied_fails_after_its_strikes",
    ),
    mutation(
        "a bug while starting one run fails the whole claim",
        "flowforge_orchestrator/engine/claimer.py",
        "                if store.is_database_error(exc):\n",
        "                if True:\n",
        f"{T_FAULTS}::test_a_bug_while_starting_one_run_fails_that_run_only",
    ),
    mutation(
        "a commit refused by the epoch is taken as written",
        "flowforge_orchestrator/engine/committer.py",
        "            else:\n                verdict.lost.append(item)\n",
        "            else:\n                verdict.written.append(item)\n",
        f"{T_FAULTS}::test_a_commit_after_the_epoch_moved_on_is_refused_and_the_run_resumes_once",
    ),
    mutation(
        "a lease lost to another owner is kept",
        "flowforge_orchestrator/engine/leases.py",
        '                self._drop(run_id, "lease lost")\n',
        "                pass\n",
        f"{T_FAULTS}::test_a_lease_lost_to_another_owner_is_dropped_and_the_run_adopted",
    ),
    # -- the worker's error paths --------------------------------------------------------------
    mutation(
        "a worker keeps the connections Redis closed in its pool",
        "flowforge_orchestrator/queue/woken.py",
        "                await self._pool.connection_pool.disconnect(inuse_connections=False)\n",
        "                pass\n",
        f"{T_RECOVERY}::test_after_each_redis_outage_steps_flow_within_seconds_and_no_socket_is_left",
    ),
    mutation(
        "a custom step's output over the limit is stored",
        "flowforge_orchestrator/worker/runtime.py",
        "        if size > self.settings.max_output_bytes:\n",
        "        if False:\n",
        f"{T_WORKER}::test_a_custom_steps_output_over_the_limit_fails_its_attempt",
    ),
    mutation(
        "a job for a type the worker lacks fails as a retryable TypeError",
        "flowforge_orchestrator/worker/runtime.py",
        "        if fn is None:\n",
        "        if False:\n",
        f"{T_WORKER}::test_a_job_for_a_type_this_worker_lacks_fails_without_retry",
    ),
    mutation(
        "results whose write failed unexpectedly are acknowledged unwritten",
        "flowforge_orchestrator/worker/results.py",
        "                    self._queue[:0] = batch\n"
        "                    await asyncio.sleep(1.0)\n",
        "                    for result in batch:\n"
        "                        result.done.set_result(None)\n",
        f"{T_WORKER}::test_a_result_write_failing_for_an_unforeseen_reason_is_tried_again",
    ),
    mutation(
        "bounded retries try once more than they are allowed",
        "flowforge_orchestrator/store/db.py",
        "            if attempts is not None and attempt >= attempts:\n",
        "            if attempts is not None and attempt > attempts:\n",
        f"{T_WORKER}::test_bounded_retries_give_up_with_a_transient_store_error",
    ),
    # -- what teardowns must not swallow ----------------------------------------------------
    mutation(  # everything is still closed: only the task's outcome tells
        "the orchestrator's shutdown lets its loops' cancellation out (in-process teardowns)",
        "flowforge_orchestrator/engine/orchestrator.py",
        "        await asyncio.gather(*tasks.values(), return_exceptions=True)\n"
        "        await self.leases.release_all()\n",
        "        await asyncio.gather(*tasks.values())\n        await self.leases.release_all()\n",
        f"{T_FLOW}::test_for_each_over_an_empty_list_completes_with_an_empty_output",
    ),
    mutation(
        "SIGTERM kills the daemons instead of stopping them (seen by e2e exit codes)",
        "flowforge_orchestrator/cli/daemons.py",
        "    for sig in (signal.SIGTERM, signal.SIGINT):\n",
        "    for sig in (signal.SIGINT,):\n",
        f"{T_E2E}::test_a_delay_survives_a_killed_orchestrator_and_fires_once_at_its_time",
    ),
    mutation(
        "a run takes an event it has taken already",
        "flowforge_orchestrator/store/events.py",
        "          WHERE c.run_id = w.run_id AND c.event_id = e.id)\n",
        "          WHERE false)\n",
        "tests/integration/test_events_store.py::test_waits_find_the_oldest_event_not_taken_by_their_run",
    ),
    mutation(
        "two waits of one run take the same event before it is committed",
        "flowforge_orchestrator/store/events.py",
        "      AND e.id <> ALL ($5::bigint[])\n",
        "      AND true\n",
        "tests/integration/test_events_store.py::test_waits_find_the_oldest_event_not_taken_by_their_run",
    ),
    mutation(
        "an attempt whose worker stopped beating is never timed out",
        "flowforge_orchestrator/engine/beats.py",
        "            self._missed(run_id, dispatch, age)\n",
        "            pass\n",
        "tests/integration/test_heartbeats.py",
    ),
    mutation(
        "a completion from outside counts without its attempt's token",
        "flowforge_orchestrator/store/events.py",
        '        if not hmac.compare_digest(expected, str(row["token"]).lower()):\n',
        "        if False:\n",
        "tests/integration/test_outside_completions.py",
    ),
    # -- handling failures: catch and compensation -----------------------------------------
    mutation(
        "compensations run in completion order, not in reverse",
        "flowforge_orchestrator/core/graph/compensation.py",
        "    nodes = (run._nodes.get(key) for key in reversed(run._completed))\n",
        "    nodes = (run._nodes.get(key) for key in run._completed)\n",
        f"{T_SAGA}::test_a_failed_saga_undoes_what_succeeded_in_reverse_order_then_fails",
        f"{T_HANDLING}::test_a_failed_saga_compensates_in_reverse_order_and_ends_failed",
    ),
    mutation(
        "a restored run forgets which compensations finished (ends them twice after a crash)",
        "flowforge_orchestrator/core/graph/restore.py",
        "    elif not scope.started:\n        return  # its turn, if any, comes when the run"
        " compensates\n",
        "    elif True:\n        return  # no compensation's state is restored\n",
        f"{T_SAGA}::test_a_restore_mid_compensation_goes_on_and_starts_nothing_twice",
        f"{T_SAGA_E2E}::test_an_orchestrator_killed_while_compensating_is_replaced_and_each_runs_once",
    ),
    mutation(
        "a run cancelled at its claim is handed back although it compensates",
        "flowforge_orchestrator/engine/claimer.py",
        "            if state.status.finished:\n",
        "            if True:\n",
        f"{T_HANDLING}::test_a_saga_cancelled_while_no_orchestrator_ran_compensates_when_claimed",
    ),
    mutation(
        "catch takes a failure before the step's retries are spent",
        "flowforge_orchestrator/core/graph/ending.py",
        "        if decision is not None and decision.retry:\n",
        "        if catch(run, node, error, status, now):\n"
        "            return\n"
        "        if decision is not None and decision.retry:\n",
        "tests/unit/test_catch_graph.py::test_a_matching_handler_runs_after_the_retries_and_dependents_see_its_output",
    ),
    mutation(
        "stopping a workflow step aborts a worker job instead of cancelling its child run",
        "flowforge_orchestrator/core/graph/ending.py",
        "    if isinstance(node.step, WorkflowStep):\n",
        "    if False:\n",
        f"{T_CHILDREN}::test_cancelling_the_parent_cancels_the_child_and_aborts_its_http_step",
    ),
    mutation(
        "an adopted parent sends its workflow steps to workers like leaf steps",
        "flowforge_orchestrator/core/graph/run.py",
        "                and not isinstance(node.step, WorkflowStep)"
        "  # its child run exists already\n",
        "",
        "tests/e2e/test_child_processes.py",
    ),
    mutation(
        "a child run that ends does not answer its parent's attempt",
        "flowforge_orchestrator/store/queries.py",
        "    WHERE parent_attempt_id IS NOT NULL"
        " AND status IN ('completed', 'failed', 'cancelled')\n",
        "    WHERE false\n",
        f"{T_CHILDREN}::test_a_parent_calls_a_three_step_child_and_uses_its_output",
    ),
    mutation(
        "liveness: an owner is judged dead although its node lock is held",
        "flowforge_orchestrator/store/liveness.py",
        "      AND hashtext(owner)::oid NOT IN (SELECT objid FROM held)\n",
        "      AND true\n",
        f"{T_LIVENESS}::test_a_dead_owner_s_leases_end_in_one_statement_and_the_claimers_are_woken",
    ),
    mutation(
        "liveness: a replica claims while it does not hold its node lock",
        "flowforge_orchestrator/engine/orchestrator.py",
        "            may_claim=lambda: self.liveness.held,\n",
        "            may_claim=lambda: True,\n",
        f"{T_LIVENESS}::test_an_orchestrator_claims_nothing_until_it_holds_its_node_lock",
    ),
    mutation(
        "liveness: the others are judged at once when the lock is taken again (no grace)",
        "flowforge_orchestrator/engine/liveness.py",
        "        return not self._lost or time.monotonic() - self._held_since >= self.grace\n",
        "        return True\n",
        f"{T_LIVENESS}::test_the_lock_is_taken_again_after_its_session_is_killed_and_others_judged_after_grace",
    ),
)


@dataclass(frozen=True)
class Outcome:
    verdict: str  # killed | survived | no match | error
    detail: str
    seconds: float


def _copy_repository(into: Path) -> Path:
    """The working tree's files (tracked and untracked, not ignored) under `into`."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        check=True,
        capture_output=True,
    ).stdout.decode()
    root = into / "repo"
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if not source.is_file():  # deleted in the working tree
            continue
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    return root


def _environment(root: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("FLOWFORGE_", "OTEL_", "COVERAGE_", "PYTEST_"))
    }
    env["PYTHONPATH"] = str(root)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


# pytest -rfE: "FAILED <node id> - <message>"; a parametrized id may hold spaces.
_FAILED = re.compile(r"^(?:FAILED|ERROR) (.+?)(?: - |$)", re.M)


def _run_tests(root: Path, tests: tuple[str, ...]) -> tuple[int, str]:
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-x",
        "-q",
        "-rfE",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:randomly",
        *tests,
    ]
    try:
        done = subprocess.run(
            command,
            cwd=root,
            env=_environment(root),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return -1, f"the tests ran past {TIMEOUT} s"
    return done.returncode, done.stdout + done.stderr


def run_mutation(root: Path, mutation: Mutation) -> Outcome:
    began = time.monotonic()
    originals = {e.file: (root / e.file).read_text(encoding="utf-8") for e in mutation.edits}
    mutated = dict(originals)
    for edit in mutation.edits:
        found = mutated[edit.file].count(edit.original)
        if found != 1:
            first = edit.original.strip().splitlines()[0]
            detail = f"{edit.file}: the snippet {first!r}... occurs {found} times"
            return Outcome("no match", detail, 0.0)
        mutated[edit.file] = mutated[edit.file].replace(edit.original, edit.replacement)
    try:
        for name, text in mutated.items():
            (root / name).write_text(text, encoding="utf-8")
        code, output = _run_tests(root, mutation.tests)
    finally:
        for name, text in originals.items():
            (root / name).write_text(text, encoding="utf-8")
    seconds = time.monotonic() - began
    if code == 1:  # pytest: some tests failed
        killers = _FAILED.findall(output)
        return Outcome("killed", killers[0] if killers else "(a test failed)", seconds)
    if code == 0:
        return Outcome("survived", "every selected test passed", seconds)
    tail = "\n".join(output.strip().splitlines()[-15:])
    return Outcome("error", f"pytest exited with {code}:\n{tail}", seconds)


def _baseline(root: Path, mutations: list[Mutation]) -> str | None:
    """The selected tests must pass on the unmutated copy, or no verdict means anything."""
    tests = tuple(dict.fromkeys(t for m in mutations for t in m.tests))
    code, output = _run_tests(root, tests)
    if code == 0:
        return None
    return "\n".join(output.strip().splitlines()[-30:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.mutants", description=__doc__)
    parser.add_argument("-k", dest="keyword", help="only mutations whose name contains this")
    parser.add_argument("--list", action="store_true", help="print the table and exit")
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip running the tests unmutated first"
    )
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.keyword or args.keyword in m.name]
    if args.list:
        for m in chosen:
            print(f"{m.name}\n    {m.files}\n    tests: {' '.join(m.tests)}")
        return 0
    if not chosen:
        print("no mutation matches", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="flowforge-mutants-") as tmp:
        root = _copy_repository(Path(tmp))
        print(f"copy: {root}", flush=True)
        if not args.no_baseline:
            failure = _baseline(root, chosen)
            if failure is not None:
                print(f"the selected tests fail without any mutation:\n{failure}")
                return 1
            print("baseline: the selected tests pass unmutated", flush=True)
        outcomes: list[tuple[Mutation, Outcome]] = []
        for mutation in chosen:
            outcome = run_mutation(root, mutation)
            outcomes.append((mutation, outcome))
            print(
                f"{outcome.verdict.upper():<9} {mutation.name}  [{outcome.seconds:.0f}s]\n"
                f"          {outcome.detail}",
                flush=True,
            )
    bad = [(m, o) for m, o in outcomes if o.verdict != "killed"]
    print(f"\n{len(outcomes) - len(bad)} of {len(outcomes)} mutations killed")
    for mutation, outcome in bad:
        print(f"  {outcome.verdict}: {mutation.name} ({mutation.files})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
