"""The chaos run's figures: what the audit and the HTTP server's counts add up to.

`Figures.line()` is the one line the chaos run prints; `details` are the reasons behind a
bad figure, and `suspects` the runs whose whole history goes to `findings.json`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from uuid import UUID

from tests.chaos.audit import Audit
from tests.chaos.cluster import Crash
from tests.chaos.probes import Recovery
from tests.chaos.server import FaultServer
from tests.chaos.workflows import BY_NAME, DESIGNED_TO_FAIL, problem_of

__all__ = ["Figures", "figures_of"]


@dataclass
class Figures:
    """The outcome; `line()` is what the chaos run prints."""

    seed: int
    submitted: int = 0
    completed: int = 0
    failed: int = 0
    designed_failures: int = 0  # failed runs of a workflow designed to fail
    wrong: list[str] = field(default_factory=list)  # unexpected status or output
    lost: int = 0
    duplicate_transitions: int = 0
    duplicate_events: int = 0
    broken_histories: int = 0
    extra_executions: int = 0
    extra_after_redis_loss: int = 0  # of those, after Redis lost the job (at-least-once)
    phantom_executions: int = 0  # of attempts the engine never recorded
    drain_s: float | None = None  # None: the deadline passed
    timed_out_attempts: int = 0  # evidence that faults hit work in flight
    adopted_runs: int = 0  # runs claimed more than once (epoch > 1)
    faults: Counter[str] = field(default_factory=Counter)
    crashes: list[Crash] = field(default_factory=list)
    unclean_stops: list[str] = field(default_factory=list)
    recovery: Recovery = field(default_factory=Recovery)  # measured, not judged
    details: list[str] = field(default_factory=list)
    suspects: list[UUID] = field(default_factory=list)  # runs whose history goes to findings

    @property
    def ok(self) -> bool:
        """Nothing lost, duplicated, broken, wrong or phantom; no crash, no unclean stop."""
        bad = self.lost + self.duplicate_transitions + self.duplicate_events
        bad += self.broken_histories + self.phantom_executions
        return not (bad or self.wrong or self.crashes or self.unclean_stops)

    def line(self) -> str:
        drain = f"{self.drain_s:.1f}s" if self.drain_s is not None else "timeout"
        designed = ",".join(DESIGNED_TO_FAIL)
        faults = " ".join(f"{k}={self.faults[k]}" for k in sorted(self.faults))
        return (
            f"chaos seed={self.seed} submitted={self.submitted} completed={self.completed} "
            f"failed={self.failed} (designed {self.designed_failures}: {designed}) "
            f"wrong={len(self.wrong)} lost={self.lost} "
            f"dup_transitions={self.duplicate_transitions} "
            f"dup_events={self.duplicate_events} broken_histories={self.broken_histories} "
            f"extra_executions={self.extra_executions} "
            f"(after_redis_loss={self.extra_after_redis_loss}) "
            f"phantom_executions={self.phantom_executions} drain={drain} "
            f"| faults: {faults} crashes={len(self.crashes)} "
            f"timed_out_attempts={self.timed_out_attempts} adopted_runs={self.adopted_runs} "
            f"unclean_stops={len(self.unclean_stops)} | recovery: {self.recovery.line()}"
        )


def _extra(
    served: list[float], attempts: int, since: float, losses: list[float]
) -> tuple[int, int]:
    """Executions beyond one per attempt, and how many of them a Redis data loss explains:
    one between the dispatch (`since`) and the last execution means the job, or the mark
    that a worker had it, was gone, and the attempt was sent again (at-least-once)."""
    extra = max(0, len(served) - attempts)
    lost = any(since < t < max(served) for t in losses) if served else False
    return extra, extra if lost else 0


def _executions(
    figures: Figures, found: Audit, server: FaultServer, losses: list[float], t0: float
) -> None:
    """Executions beyond one per attempt, from what the server served; the runs of those
    no Redis loss explains are suspects (their history goes to findings.json)."""
    dispatched = {str(a["id"]): a["dispatched_at"].timestamp() for a in found.attempts}
    phantoms = [a for a in server.tracked if a not in dispatched]
    figures.phantom_executions = len(phantoms)
    figures.details += [f"execution of an unrecorded attempt {a}" for a in phantoms[:10]]
    attempts: dict[tuple[str, str], list[float]] = {}
    for a in found.attempts:
        attempts.setdefault((str(a["run_id"]), a["step_id"]), []).append(dispatched[str(a["id"])])
    counted = [
        (t.run_id, f"attempt {a} ({t.step_id} #{t.attempt})", t.served, 1, dispatched.get(a))
        for a, t in server.tracked.items()
    ]
    for (run, step), served in server.plain.items():
        sent = attempts.get((run, step), [])
        what = f"{step} (http, {len(sent)} attempts)"
        counted.append((run, what, served, len(sent), min(sent, default=None)))
    unexplained = []
    for run_id, what, served, expected, since in counted:
        extra, after_loss = _extra(served, expected, since or min(served), losses)
        figures.extra_executions += extra
        figures.extra_after_redis_loss += after_loss
        if extra > after_loss:
            times = ", ".join(f"{t - t0:.2f}s" for t in served)
            unexplained.append(f"run {run_id} {what} served at {times}")
            figures.suspects.append(UUID(run_id))
    figures.details += [f"extra execution: {u}" for u in unexplained[:10]]


def _outcomes(figures: Figures, found: Audit, server: FaultServer) -> None:
    """Counts by status; runs with an unexpected status or output, or that ran a step their
    workflow must never reach, are wrong."""
    workflow_of = {str(r["id"]): r["workflow_name"] for r in found.runs}
    ran: dict[str, set[str]] = {}
    for t in server.tracked.values():
        workflow = BY_NAME.get(workflow_of.get(t.run_id, ""))
        if workflow is not None and t.step_id in workflow.forbidden_steps:
            ran.setdefault(t.run_id, set()).add(t.step_id)
    for run in found.runs:
        if run["status"] == "completed":
            figures.completed += 1
        elif run["status"] == "failed":
            figures.failed += 1
            figures.designed_failures += run["workflow_name"] in DESIGNED_TO_FAIL
        if run["status"] in ("pending", "running"):
            continue
        problem = problem_of(run["workflow_name"], run["status"], run["input"], run["output"])
        if str(run["id"]) in ran:
            problem = f"step(s) {', '.join(sorted(ran[str(run['id'])]))} ran but must not"
        if problem is not None:
            figures.suspects.append(run["id"])
            message = (run["error"] or {}).get("message", "")
            figures.wrong.append(f"run {run['id']} ({run['workflow_name']}): {problem} {message}")


def _details(figures: Figures, found: Audit) -> None:
    flawed = [*found.lost, *found.dup_transitions, *found.dup_events, *found.gaps, *found.ends]
    for row in flawed:
        run_id = row.get("run_id") or row["id"]
        if run_id not in figures.suspects:
            figures.suspects.append(run_id)
    for run in found.lost[:10]:
        figures.details.append(
            f"lost run {run['id']} ({run['workflow_name']}): {run['status']}, owner "
            f"{run['owner']}, epoch {run['epoch']}, lease until {run['lease_expires_at']}"
        )
    for row in found.dup_transitions[:10]:
        figures.details.append(f"duplicate transition {row}")
    for row in found.dup_events[:10]:
        figures.details.append(f"duplicate event {row}")
    for row in found.gaps[:10]:
        figures.details.append(f"broken history {row}")
    for row in found.ends[:10]:
        figures.details.append(f"start/end events {row}")
    figures.details += figures.wrong[:10]
    crashes = [f"crash: {c.node} {c.what} (log {c.log})" for c in figures.crashes]
    more = [f"... and {len(crashes) - 5} more crashes"] if len(crashes) > 5 else []
    figures.details += crashes[:5] + more
    figures.details += [f"unclean stop: {s}" for s in figures.unclean_stops]


def figures_of(
    found: Audit, server: FaultServer, figures: Figures, losses: list[float], t0: float
) -> Figures:
    """Fill `figures` from the audit and what the server served. `losses`: when Redis lost
    its data; `t0`: the start, for the times shown (all wall-clock)."""
    figures.submitted = len(found.runs)
    figures.lost = len(found.lost)
    figures.duplicate_transitions = found.duplicate_transitions
    figures.duplicate_events = found.duplicate_events
    figures.broken_histories = found.broken_histories
    figures.timed_out_attempts = sum(a["status"] == "timed_out" for a in found.attempts)
    figures.adopted_runs = sum(r["epoch"] > 1 for r in found.runs)
    _executions(figures, found, server, losses, t0)
    _outcomes(figures, found, server)
    _details(figures, found)
    return figures
