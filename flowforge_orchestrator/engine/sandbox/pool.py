"""Bounded CEL evaluation for the orchestrator: a sandbox process and the evaluator that
routes each evaluation inline, to it, or refuses it (the estimate is `expressions.cost`).

The CEL evaluator holds the GIL and cannot be interrupted, so a costly evaluation runs in a
child process (`sandbox.child`): the variables go over a pipe as JSON, the child's
address space is capped (FLOWFORGE_EXPRESSION_MEMORY_BYTES), its answer is capped
(FLOWFORGE_MAX_CONTEXT_BYTES), and past FLOWFORGE_EXPRESSION_TIMEOUT it is SIGKILLed and
replaced by a spare kept warm, so the next evaluation does not wait for a Python start-up.

The call is synchronous (the graph that evaluates is pure and synchronous): the event loop
waits at most the timeout, which is the point of the limit. Not thread-safe: one event loop
uses it.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from flowforge_orchestrator.core.expressions.cost import (
    Budget,
    Route,
    Weight,
    inline_ok,
    memory_text,
    result_text,
    route,
    timeout_text,
    weigh,
)
from flowforge_orchestrator.core.expressions.templates import Expression, to_json_value
from flowforge_orchestrator.errors import ExpressionError

__all__ = ["BoundedEvaluator", "Outcome", "Sandbox"]

log = logging.getLogger(__name__)

WEIGH_CAP = 200_000
"""Most values weighed for a routing decision (~40 ms); past it, `widest` is a lower bound."""
_HEADER = 4
_CHUNK = 1 << 20
_READY = b'{"kind":"ready"}'


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a sandboxed evaluation ended."""

    kind: Literal["value", "error", "timeout", "memory", "too_large", "crashed", "unavailable"]
    value: Any = None
    message: str = ""
    size: int = 0


class _Child:
    """One evaluator process and our ends of its pipes."""

    def __init__(self, argv: list[str]) -> None:
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            close_fds=True,
            start_new_session=True,  # a Ctrl-C at the terminal is the parent's to handle
        )
        assert self.process.stdin and self.process.stdout and self.process.stderr
        self.stdin = self.process.stdin.fileno()
        self.stdout = self.process.stdout.fileno()
        for fd in (self.stdin, self.stdout, self.process.stderr.fileno()):
            os.set_blocking(fd, False)
        self.ready = False
        self._pending = bytearray()  # read, not yet a whole frame (kept past a deadline)

    @property
    def pid(self) -> int:
        return self.process.pid

    def send(self, body: bytes, deadline: float) -> bool:
        data = memoryview(len(body).to_bytes(_HEADER, "big") + body)
        while data:
            if not _wait(self.stdin, select.POLLOUT, deadline):
                return False
            try:
                data = data[os.write(self.stdin, data) :]
            except BlockingIOError:
                continue
            except OSError:  # the child is gone (EPIPE)
                return False
        return True

    def receive(self, deadline: float) -> bytes | None:
        """One frame's body; None past the deadline (what was read is kept for the next
        call) or if the child is gone."""
        if not self._fill(_HEADER, deadline):
            return None
        size = _HEADER + int.from_bytes(self._pending[:_HEADER], "big")
        if not self._fill(size, deadline):
            return None
        body = bytes(self._pending[_HEADER:size])
        del self._pending[:size]
        return body

    def _fill(self, size: int, deadline: float) -> bool:
        while len(self._pending) < size:
            if not _wait(self.stdout, select.POLLIN, deadline):
                return False
            try:
                chunk = os.read(self.stdout, min(size - len(self._pending), _CHUNK))
            except BlockingIOError:
                continue
            if not chunk:
                return False  # end of file: the child died
            self._pending += chunk
        return True

    def starting(self) -> bool:
        """Still alive and not yet ready."""
        return not self.ready and self.process.poll() is None

    def kill(self) -> int | None:
        """SIGKILL it and reap it; its exit status."""
        if self.process.poll() is None:
            self.process.kill()
        try:
            code = self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - the kernel did not reap it
            code = None
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()
        return code

    def stderr_tail(self) -> str:
        assert self.process.stderr is not None
        try:
            data = os.read(self.process.stderr.fileno(), 4096)
        except (BlockingIOError, OSError, ValueError):
            return ""
        lines = data.decode("utf-8", "replace").strip().splitlines()
        return lines[-1] if lines else ""


def _wait(fd: int, event: int, deadline: float) -> bool:
    """Wait until `fd` is ready for `event` (or hung up) before `deadline`."""
    poller = select.poll()
    poller.register(fd, event)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        if poller.poll(remaining * 1000):
            return True


class Sandbox:
    """A CEL evaluator in a child process, with a spare kept warm to replace it."""

    def __init__(self, budget: Budget, *, python: str = sys.executable) -> None:
        self.budget = budget
        self.kills = 0  # children stopped at the deadline or found dead
        cpu = max(2, int(10 * budget.timeout) + 1)
        self._argv = [
            python,
            "-m",
            "flowforge_orchestrator.engine.sandbox.child",
            str(budget.memory_bytes),
            str(budget.max_result_bytes),
            str(cpu),
        ]
        self._current: _Child | None = self._spawn()
        self._spare: _Child | None = self._spawn()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        """The process that takes the next evaluation."""
        return self._current.pid if self._current is not None else None

    @property
    def spare_pid(self) -> int | None:
        """The process that replaces it."""
        return self._spare.pid if self._spare is not None else None

    def warm(self, timeout: float) -> bool:
        """Wait until both processes are started and ready: before the first evaluation,
        which waits at most its own timeout (run it in a thread; it blocks)."""
        deadline = time.monotonic() + timeout
        children = [c for c in (self._current, self._spare) if c is not None]
        for child in children:
            if not child.ready:
                child.ready = child.receive(deadline) == _READY
        return len(children) == 2 and all(child.ready for child in children)

    def evaluate(self, source: str, variables: Mapping[str, Any]) -> Outcome:
        """Evaluate `source` over `variables` within the budget."""
        try:
            body = _request(source, variables)
        except (TypeError, ValueError, RecursionError) as exc:
            return Outcome("error", message=f"the variables are not JSON: {exc}")
        # One deadline for all of it: waiting for a process that is still starting too.
        deadline = time.monotonic() + self.budget.timeout
        child = self._ready_child(deadline)
        if isinstance(child, str):
            return Outcome("unavailable", message=child)
        answer = child.receive(deadline) if child.send(body, deadline) else None
        if answer is None:
            return self._lost(child, timed_out=time.monotonic() >= deadline)
        try:
            data = json.loads(answer.decode("utf-8", "surrogatepass"))
            kind = data["kind"]
        except (ValueError, KeyError, TypeError):  # pragma: no cover - a broken child
            self._replace(child)
            return Outcome("crashed", message="the expression sandbox answered nonsense")
        if kind == "value":
            return Outcome("value", value=data["value"])
        if kind == "error":
            return Outcome("error", message=str(data["message"]))
        if kind == "too_large":
            return Outcome("too_large", size=int(data["size"]))
        # MemoryError in the child: its heap may be in any state; start afresh.
        self._replace(child)
        return Outcome("memory")

    def close(self) -> None:
        for child in (self._current, self._spare):
            if child is not None:
                child.kill()
        self._current = self._spare = None

    # -- processes -----------------------------------------------------------------------

    def _spawn(self) -> _Child | None:
        try:
            return _Child(self._argv)
        except OSError as exc:
            log.error("could not start an expression sandbox process: %s", exc)
            return None

    def _ready_child(self, deadline: float) -> _Child | str:
        """The current child once it said it is ready (waiting until `deadline` at most),
        or why there is none."""
        for _ in range(3):
            child = self._current
            if child is None:
                self._current = child = self._promote()
            if child is None:
                return "the expression sandbox could not start (see the log)"
            if child.process.poll() is not None:  # died while idle (killed from outside)
                self._replace(child)
                continue
            if child.ready:
                return child
            child.ready = child.receive(deadline) == _READY
            if child.ready:
                return child
            if child.starting():
                return (
                    "the expression sandbox was still starting after "
                    f"FLOWFORGE_EXPRESSION_TIMEOUT ({self.budget.timeout * 1000:g} ms)"
                )
            log.error(
                "an expression sandbox process did not start: %s",
                child.stderr_tail() or f"exit status {child.process.poll()}",
            )
            self._replace(child)
        return "the expression sandbox could not start (see the log)"

    def _promote(self) -> _Child | None:
        """The spare becomes current; a new spare starts warming up."""
        child, self._spare = self._spare, self._spawn()
        return child if child is not None else self._spawn()

    def _replace(self, child: _Child) -> int | None:
        self.kills += 1
        code = child.kill()
        if self._current is child:
            self._current = self._promote()
        return code

    def _lost(self, child: _Child, *, timed_out: bool) -> Outcome:
        """The child missed the deadline or died: replace it, say which."""
        tail = "" if timed_out else child.stderr_tail()
        code = self._replace(child)
        if timed_out:
            return Outcome("timeout")
        if code == -signal.SIGABRT or "memory allocation" in tail:
            return Outcome("memory", message=tail)
        log.error("an expression sandbox process died (exit status %s): %s", code, tail)
        return Outcome("crashed", message=f"the expression sandbox died (exit status {code})")


def _request(source: str, variables: Mapping[str, Any]) -> bytes:
    """A request frame's body. The graph's variables are JSON values already; anything else
    (a date in a hand-made context) is converted as a result would be."""
    text = json.dumps(
        {"s": source, "v": variables},
        ensure_ascii=False,
        separators=(",", ":"),
        default=to_json_value,
    )
    return text.encode("utf-8", "surrogatepass")


class BoundedEvaluator:
    """The orchestrator's `Evaluator`: inline when the estimate says cheap, in the sandbox
    otherwise, refused at once when far over budget. An expression that overran the timeout
    is refused at once for data at least as large, for `memo_seconds` (a flood of one bomb
    costs one timeout, not one per run). Each refusal is logged once, as an error."""

    def __init__(
        self,
        sandbox: Sandbox,
        *,
        memo_seconds: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.budget = sandbox.budget  # one budget: the estimate's and the deadline's
        self.sandbox = sandbox
        self.memo_seconds = memo_seconds
        self.clock = clock
        self.routes: dict[Route, int] = dict.fromkeys(Route, 0)  # evaluations by path
        self._overran: OrderedDict[str, tuple[Weight, float]] = OrderedDict()

    def evaluate(self, expression: Expression, context: Mapping[str, Any]) -> Any:
        variables = expression.variables(context)
        bound = expression.bound(context)
        if bound is not None and inline_ok(expression.shape, bound):
            self.routes[Route.INLINE] += 1
            return expression.run(variables)
        weight = weigh(variables, cap=WEIGH_CAP)
        verdict = route(expression.shape, weight, self.budget)
        reason = verdict.reason or self._overran_before(expression.source, weight)
        if reason:
            self.routes[Route.REFUSED] += 1
            raise self._refuse(expression, context, reason)
        self.routes[verdict.route] += 1
        if verdict.route is Route.INLINE:
            return expression.run(variables)
        outcome = self.sandbox.evaluate(expression.source, variables)
        if outcome.kind == "value":
            return outcome.value
        if outcome.kind == "error":
            raise expression.error(outcome.message)
        if outcome.kind == "timeout":
            self._remember(expression.source, weight)
            message = timeout_text(self.budget)
        elif outcome.kind == "memory":
            message = memory_text(self.budget)
        elif outcome.kind == "too_large":
            message = result_text(outcome.size, self.budget)
        else:
            message = outcome.message
        raise self._refuse(expression, context, message)

    def _refuse(
        self, expression: Expression, context: Mapping[str, Any], message: str
    ) -> ExpressionError:
        error = expression.error(message)
        run = context.get("run")
        run_id = str(run.get("id")) if isinstance(run, Mapping) else None
        log.error(
            "expression over its limits: %s",
            error,
            extra={"run_id": run_id, "step_id": expression.step_id},
        )
        return error

    def _overran_before(self, source: str, weight: Weight) -> str:
        seen = self._overran.get(source)
        if seen is None:
            return ""
        smaller, until = seen
        if self.clock() >= until:
            del self._overran[source]
            return ""
        if weight.nodes < smaller.nodes or weight.widest < smaller.widest:
            return ""
        return (
            f"refused before evaluation: over data as large it ran past "
            f"FLOWFORGE_EXPRESSION_TIMEOUT ({self.budget.timeout * 1000:g} ms) moments ago"
        )

    def _remember(self, source: str, weight: Weight) -> None:
        seen = self._overran.get(source)
        if seen is not None:  # the smallest data known to overrun
            weight = Weight(min(seen[0].nodes, weight.nodes), 0, min(seen[0].widest, weight.widest))
        self._overran[source] = (weight, self.clock() + self.memo_seconds)
        self._overran.move_to_end(source)
        while len(self._overran) > 256:
            self._overran.popitem(last=False)
