"""Workflow definitions: pydantic models, validation that reports every problem, loading.

Validation makes two passes over the same raw data so that one `DefinitionError` lists
everything wrong at once: pydantic checks shapes and values, then `checks` checks
ids, `depends_on`, step types and every CEL expression. Both locate each problem by step id and
field path (`with.url`, `retry.max_retries`): the innermost step (a dict with an `id` at a
step position) on the error's path names the step, the rest of the path is the field.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, overload
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from flowforge_orchestrator.core.definition.checks import (
    BUILTIN_STEP_TYPES,
    INLINE_STEP_TYPES,
    topological_order,
)
from flowforge_orchestrator.core.durations import ACCEPTED_FORMS, parse_duration
from flowforge_orchestrator.core.expressions.templates import (
    Expression,
    Template,
    compile_expression,
    compile_template,
)

__all__ = [
    "BUILTIN_STEP_TYPES",
    "INLINE_STEP_TYPES",
    "AtLeast",
    "CatchHandler",
    "CompiledExpressions",
    "Concurrency",
    "ConditionStep",
    "Defaults",
    "DelayStep",
    "Duration",
    "FailError",
    "FailStep",
    "HttpParams",
    "ParallelStep",
    "RetryPolicy",
    "Step",
    "StepBase",
    "SwitchCase",
    "SwitchStep",
    "TaskStep",
    "TransformStep",
    "WaitStep",
    "WorkflowDefinition",
    "WorkflowStep",
    "child_lists",
    "compile_definition",
    "definition_json_schema",
    "handler_lists",
    "step_tag",
    "topological_order",
]

DEFAULT_RETRY_ON = ("timeout", "connection_error", "http_5xx", "http_429")
DEFAULT_RESPONSE_HEADERS = ("content-type", "etag", "location", "retry-after")
STEP_ID_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
STEP_TYPE_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$"
# A retry_on entry: an HTTP status or class, or any other category (an exception class name);
# a misspelt HTTP one (HTTP_503, http_5XX, http_600) is refused rather than never matching.
RETRY_ON_PATTERN = r"^(http_[1-5]([0-9]{2}|xx)|(?![Hh][Tt][Tt][Pp]_)[A-Za-z_][A-Za-z0-9_]*)$"


def _seconds(value: Any) -> float:
    return parse_duration(value)


Duration = Annotated[
    float,
    BeforeValidator(_seconds),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "examples": ["250ms", "10s", "5m", "1h30m", "PT1H30M"]},
                {"type": "number", "minimum": 0},
            ],
            "description": f"A duration: {ACCEPTED_FORMS}.",
        },
        mode="validation",
    ),
]
"""Seconds as a float; accepts whatever `parse_duration` accepts."""
PositiveDuration = Annotated[Duration, Field(gt=0)]


def _pattern(pattern: str, what: str) -> Any:
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if not compiled.match(value):
            raise ValueError(f"{value!r} is not a valid {what}")
        return value

    return AfterValidator(check)


StepId = Annotated[
    str,
    _pattern(
        STEP_ID_PATTERN,
        "step id: use letters, digits and _, starting with a letter or _, at most 64 "
        "characters, so that `steps.<id>` works in expressions",
    ),
    WithJsonSchema({"type": "string", "pattern": STEP_ID_PATTERN}),
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _retry_category(value: str) -> str:
    if re.fullmatch(RETRY_ON_PATTERN, value):
        return value
    if value[:5].lower() == "http_":
        raise ValueError(
            f"{value!r} is not an HTTP category: use http_NNN for one status (100-599, "
            "e.g. http_503) or http_Nxx for a class (e.g. http_5xx)"
        )
    raise ValueError(
        f"{value!r} is not an error category: use timeout, connection_error, http_503, "
        "http_5xx, or the class name of an exception a step raises (without its module)"
    )


RetryCategory = Annotated[
    str,
    AfterValidator(_retry_category),
    WithJsonSchema({"type": "string", "pattern": RETRY_ON_PATTERN}),
]


class RetryPolicy(_Model):
    """When and how often a failed attempt is tried again (the arithmetic is in `retry`)."""

    max_retries: int = Field(default=0, ge=0)
    initial_interval: Duration = 1.0
    # Finite: definitions are stored as JSONB, which has no Infinity.
    backoff_factor: float = Field(default=2.0, ge=1.0, allow_inf_nan=False)
    max_interval: Duration = 60.0
    jitter: bool = True
    retry_on: list[RetryCategory] = Field(default_factory=lambda: list(DEFAULT_RETRY_ON))


class Defaults(_Model):
    """Values every step gets unless it sets its own."""

    timeout: PositiveDuration | None = None
    retry: RetryPolicy | None = None


def _upper(value: Any) -> Any:
    return value.upper() if isinstance(value, str) else value


def _header_text(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value) if isinstance(value, int | float) else value


class HttpParams(_Model):
    """The `with` of an http step. Workers validate the rendered params with this model."""

    method: Annotated[
        Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"],
        BeforeValidator(_upper),
    ] = "GET"
    url: str
    headers: dict[str, Annotated[str, BeforeValidator(_header_text)]] = Field(default_factory=dict)
    query: dict[str, Any] = Field(default_factory=dict)
    json_: Any = Field(default=None, alias="json")
    body: str | None = None
    timeout: PositiveDuration | None = None
    expected_status: list[Annotated[int, Field(ge=100, le=599)]] | None = Field(
        default=None, description="Statuses that count as success; none means any 2xx."
    )
    response_headers: list[Annotated[str, AfterValidator(str.lower)]] = Field(
        default_factory=lambda: list(DEFAULT_RESPONSE_HEADERS),
        description="Response headers copied into the step output.",
    )

    @field_validator("url")
    @classmethod
    def _absolute_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"{url!r} is not an absolute http:// or https:// URL")
        return url

    @model_validator(mode="after")
    def _one_body(self) -> HttpParams:
        if self.json_ is not None and self.body is not None:
            raise PydanticCustomError(
                "exclusive", "json and body are mutually exclusive", {"field": "body"}
            )
        return self

    def status_ok(self, status: int) -> bool:
        """Whether a response status counts as success."""
        if self.expected_status is None:
            return 200 <= status <= 299
        return status in self.expected_status


class StepBase(_Model):
    """Fields every step has."""

    id: StepId
    type: str
    name: str | None = None
    description: str | None = None
    depends_on: list[str] = Field(default_factory=list)
    timeout: PositiveDuration | None = None
    schedule_to_start: PositiveDuration | None = Field(
        default=None,
        description="How long an attempt may wait for a worker before it times out "
        "(default: as long as its timeout).",
    )
    retry: RetryPolicy | None = None
    continue_on_failure: bool = False
    catch: list[CatchHandler] | None = Field(
        default=None,
        description="Handlers tried in order once the step has failed for good (its retries "
        "spent): the first whose `errors` match runs its steps, which read `error`; the step "
        "then counts as done, with the handler's output.",
    )
    compensate: list[Step] | None = Field(
        default=None,
        min_length=1,
        description="Steps that undo this one: when the run fails or is cancelled, the "
        "compensations of the steps that succeeded run in reverse order of completion.",
    )


class CatchHandler(_Model):
    """One `catch` handler: `errors` are matched like `retry_on` (absent: every error)."""

    errors: list[RetryCategory] | None = Field(default=None, min_length=1)
    steps: list[Step] = Field(min_length=1)


class TaskStep(StepBase):
    """A leaf step run by a worker: `http` or any type a worker registers."""

    type: str = Field(
        pattern=STEP_TYPE_PATTERN,
        json_schema_extra={
            "not": {
                "enum": [
                    "condition",
                    "delay",
                    "fail",
                    "parallel",
                    "switch",
                    "transform",
                    "wait",
                    "workflow",
                ]
            }
        },
    )
    with_: dict[str, Any] = Field(default_factory=dict, alias="with")
    heartbeat_timeout: PositiveDuration | None = Field(
        default=None,
        description="The step must call ctx.heartbeat() at least this often once started; "
        "an attempt that stops beating fails with heartbeat_timeout (retried by policy).",
    )

    @field_validator("type")
    @classmethod
    def _not_inline(cls, value: str) -> str:
        if value in INLINE_STEP_TYPES:
            raise ValueError(f"'{value}' is not a worker step type")
        return value


def _exclusive(message: str, field_name: str) -> PydanticCustomError:
    return PydanticCustomError("exclusive", message, {"field": field_name})


class ConditionStep(StepBase):
    """Runs `then` when `if` (bare CEL) is true, else `else`; the branch not taken is skipped."""

    type: Literal["condition"]
    if_: str = Field(alias="if")
    then: list[Step]
    else_: list[Step] = Field(default_factory=list, alias="else")


class AtLeast(_Model):
    """Join policy: the parallel step succeeds once `at_least` branches succeeded."""

    at_least: int = Field(ge=1)


def _join_mode(value: Any) -> Any:
    if value not in ("all", "any"):
        raise ValueError("join is 'all', 'any' or {at_least: n}")
    return value


def _join_tag(value: Any) -> str:
    return "JoinAtLeast" if isinstance(value, dict | AtLeast) else "JoinMode"


JoinPolicy = Annotated[
    Annotated[Literal["all", "any"], BeforeValidator(_join_mode), Tag("JoinMode")]
    | Annotated[AtLeast, Tag("JoinAtLeast")],
    Discriminator(_join_tag),
]


class ParallelStep(StepBase):
    """Fork/join: fixed `branches`, or one copy of `step` per element of `for_each`."""

    type: Literal["parallel"]
    branches: list[Annotated[list[Step], Field(min_length=1)]] | None = None
    for_each: str | None = None
    step: Step | None = None
    max_parallel: int | None = Field(default=None, gt=0)
    join: JoinPolicy = "all"
    fail_fast: bool = True

    @model_validator(mode="after")
    def _one_form(self) -> ParallelStep:
        if self.branches is not None and (self.for_each is not None or self.step is not None):
            raise _exclusive("use either branches or for_each with step, not both", "branches")
        if self.branches is None and self.for_each is None and self.step is None:
            raise _exclusive("needs branches, or for_each with step", "branches")
        if self.branches is None and self.step is None:
            raise _exclusive("for_each needs a step to run for each element", "step")
        if self.branches is None and self.for_each is None:
            raise _exclusive("step needs for_each (the list to run it for)", "for_each")
        n = len(self.branches or ())
        if isinstance(self.join, AtLeast) and self.branches is not None and self.join.at_least > n:
            raise _exclusive(f"at_least {self.join.at_least} but only {n} branches", "join")
        return self


class DelayStep(StepBase):
    """Waits `duration`, or until the timestamp `until` (bare CEL) evaluates to."""

    type: Literal["delay"]
    duration: Duration | None = None
    until: str | None = None

    @model_validator(mode="after")
    def _one_form(self) -> DelayStep:
        if (self.duration is None) == (self.until is None):
            raise _exclusive("set exactly one of duration and until", "duration")
        return self


class WaitStep(StepBase):
    """Waits for the external event `event`: one sent to this run, or sent by correlation
    key when `key` (bare CEL, evaluated once when the step starts) is set. Its output is the
    event (name, key, payload, id, received_at). Without an event before `timeout` (its own:
    the workflow's default step timeout does not apply to waits) the step fails with
    `event_timeout`, which is not retried unless `retry_on` names it."""

    type: Literal["wait"]
    event: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:/-]+$")
    key: str | None = None


class TransformStep(StepBase):
    """Its output is the template `output` rendered against the context; no worker involved."""

    type: Literal["transform"]
    output: Any


class SwitchCase(_Model):
    """One case of a switch: `when` (bare CEL, true or false) and the steps it runs."""

    when: str
    steps: list[Step] = Field(min_length=1)


class SwitchStep(StepBase):
    """Runs the steps of the first case whose `when` is true, else `default`; every list
    not taken is skipped. Its output is `{case: <index or "default">, output}`."""

    type: Literal["switch"]
    cases: list[SwitchCase] = Field(min_length=1)
    default: list[Step] = Field(default_factory=list)


class FailError(_Model):
    """The error a fail step ends with; each field is a template (`${{ }}`)."""

    message: str = Field(min_length=1)
    category: str = "failed"
    details: Any = None


class FailStep(StepBase):
    """Ends with `error` (rendered from its templates): its list fails, unless caught."""

    type: Literal["fail"]
    error: FailError


class WorkflowStep(StepBase):
    """Starts a run of the workflow `workflow` (a child run: its own row, history and
    limits) with `input` (a template) and waits for it: the child's output is the step's
    output; a failed child fails the step (`child_failed`, its error in `details`), one
    cancelled on its own with `child_cancelled`. Each attempt starts a new child. `version`:
    absent, the latest registered when the attempt starts, pinned on the child's row. Only
    the step's own `timeout` applies (it cancels the child); the workflow's default step
    timeout does not."""

    type: Literal["workflow"]
    workflow: Annotated[
        str,
        _pattern(NAME_PATTERN, "workflow name (letters, digits, _ . -; at most 128)"),
        WithJsonSchema({"type": "string", "pattern": NAME_PATTERN}),
    ]
    version: int | None = Field(default=None, ge=1)
    input: Any = None


_STEP_TAGS = {
    "condition": "ConditionStep",
    "switch": "SwitchStep",
    "fail": "FailStep",
    "parallel": "ParallelStep",
    "delay": "DelayStep",
    "transform": "TransformStep",
    "wait": "WaitStep",
    "workflow": "WorkflowStep",
}


def step_tag(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return _STEP_TAGS.get(kind, "TaskStep") if isinstance(kind, str) else "TaskStep"


Step = Annotated[
    Annotated[TaskStep, Tag("TaskStep")]
    | Annotated[ConditionStep, Tag("ConditionStep")]
    | Annotated[ParallelStep, Tag("ParallelStep")]
    | Annotated[DelayStep, Tag("DelayStep")]
    | Annotated[TransformStep, Tag("TransformStep")]
    | Annotated[WaitStep, Tag("WaitStep")]
    | Annotated[SwitchStep, Tag("SwitchStep")]
    | Annotated[FailStep, Tag("FailStep")]
    | Annotated[WorkflowStep, Tag("WorkflowStep")],
    Discriminator(step_tag),
]
"""Any step; the `type` picks the model, every non-control type is a `TaskStep`."""


class Concurrency(_Model):
    """At most `limit` running runs share one value of `key` (bare CEL over input and run)."""

    key: str
    limit: int = Field(gt=0)


def child_lists(step: Step) -> list[list[Step]]:
    """The step lists nested directly in `step` (a for_each template is a one-step list),
    then its catch handlers' and its compensation (`handler_lists`)."""
    return _own_lists(step) + handler_lists(step)


def _own_lists(step: Step) -> list[list[Step]]:
    if isinstance(step, ConditionStep):
        return [step.then, step.else_]
    if isinstance(step, SwitchStep):
        return [case.steps for case in step.cases] + [step.default]
    if isinstance(step, ParallelStep):
        return list(step.branches or ()) + ([[step.step]] if step.step is not None else [])
    return []


def handler_lists(step: Step) -> list[list[Step]]:
    """The lists a step holds for when things go wrong: each catch handler's steps, in
    order, then its compensation (if any)."""
    lists = [handler.steps for handler in step.catch or ()]
    return lists + ([step.compensate] if step.compensate else [])


def _both_endings() -> list[Literal["failed", "cancelled"]]:
    return ["failed", "cancelled"]


class WorkflowDefinition(_Model):
    """A named, versioned workflow: a DAG of steps; a run pins the version it started with."""

    name: Annotated[
        str,
        _pattern(NAME_PATTERN, "workflow name (letters, digits, _ . -; at most 128)"),
        WithJsonSchema({"type": "string", "pattern": NAME_PATTERN}),
    ]
    version: int = Field(ge=1)
    description: str | None = None
    max_concurrency: int | None = Field(default=None, gt=0)
    timeout: PositiveDuration | None = None
    concurrency: Concurrency | None = None
    defaults: Defaults = Field(default_factory=Defaults)
    output: Any = None
    compensate_on: list[Literal["failed", "cancelled"]] = Field(
        default_factory=_both_endings,
        description="The run endings that run the compensations of the steps that succeeded.",
    )
    steps: list[Step] = Field(min_length=1)
    _index: dict[str, Step] | None = PrivateAttr(None)
    _compiled: CompiledExpressions | None = PrivateAttr(None)

    def all_steps(self) -> Iterator[Step]:
        """Every step at any depth, parents before their children, in definition order."""
        stack: list[Step] = list(reversed(self.steps))
        while stack:
            step = stack.pop()
            yield step
            for steps in reversed(child_lists(step)):
                stack.extend(reversed(steps))

    def step(self, step_id: str) -> Step:
        """The step with this id at any depth; KeyError if there is none."""
        if self._index is None:
            self._index = {s.id: s for s in self.all_steps()}
        return self._index[step_id]

    @overload
    def effective_timeout(self, step: Step, default: float) -> float: ...
    @overload
    def effective_timeout(self, step: Step, default: None = None) -> float | None: ...
    def effective_timeout(self, step: Step, default: float | None = None) -> float | None:
        """The step's timeout, else the definition's default, else `default`."""
        if step.timeout is not None:
            return step.timeout
        return self.defaults.timeout if self.defaults.timeout is not None else default

    def effective_retry(self, step: Step) -> RetryPolicy:
        """`defaults.retry` (or RetryPolicy()) with the fields the step's `retry` sets on top."""
        base = self.defaults.retry or RetryPolicy()
        if step.retry is None:
            return base
        return base.model_copy(
            update={k: getattr(step.retry, k) for k in step.retry.model_fields_set}
        )

    def __eq__(self, other: object) -> bool:
        """Equal fields make equal definitions; the compiled caches do not count."""
        if not isinstance(other, WorkflowDefinition):
            return NotImplemented
        return self.__dict__ == other.__dict__

    @property
    def compiled(self) -> CompiledExpressions:
        """Every expression and template of the definition, compiled once."""
        if self._compiled is None:
            self._compiled = compile_definition(self)
        return self._compiled


for _model in (
    StepBase,
    CatchHandler,
    TaskStep,
    ConditionStep,
    ParallelStep,
    DelayStep,
    WaitStep,
    TransformStep,
    SwitchCase,
    SwitchStep,
    FailStep,
    WorkflowStep,
    WorkflowDefinition,
):
    _model.model_rebuild()


@dataclass(frozen=True)
class CompiledExpressions:
    """Compiled expressions keyed by (step id, field): `if`, `for_each`, `until`, `key` are
    `Expression`s; `with` and `output` are `Template`s. Workflow-level ones are attributes."""

    expressions: Mapping[tuple[str, str], Expression] = field(default_factory=dict)
    templates: Mapping[tuple[str, str], Template] = field(default_factory=dict)
    output: Template | None = None
    concurrency_key: Expression | None = None

    def expression(self, step_id: str, field_name: str) -> Expression:
        return self.expressions[(step_id, field_name)]

    def template(self, step_id: str, field_name: str) -> Template:
        return self.templates[(step_id, field_name)]


def compile_definition(defn: WorkflowDefinition) -> CompiledExpressions:
    """Compile every expression of a validated definition (prefer `defn.compiled`)."""
    expressions: dict[tuple[str, str], Expression] = {}
    templates: dict[tuple[str, str], Template] = {}
    for step in defn.all_steps():
        bare = {
            "if": getattr(step, "if_", None),
            "for_each": getattr(step, "for_each", None),
            "until": getattr(step, "until", None),
            "key": step.key if isinstance(step, WaitStep) else None,
        }
        if isinstance(step, SwitchStep):
            for i, case in enumerate(step.cases):
                bare[f"cases.{i}.when"] = case.when
        for name, source in bare.items():
            if source is not None:
                expressions[(step.id, name)] = compile_expression(
                    source, step_id=step.id, field=name
                )
        if isinstance(step, TaskStep):
            templates[(step.id, "with")] = compile_template(
                step.with_, step_id=step.id, field="with"
            )
        elif isinstance(step, TransformStep):
            templates[(step.id, "output")] = compile_template(
                step.output, step_id=step.id, field="output"
            )
        elif isinstance(step, FailStep):
            templates[(step.id, "error")] = compile_template(
                step.error.model_dump(), step_id=step.id, field="error"
            )
        elif isinstance(step, WorkflowStep):
            templates[(step.id, "input")] = compile_template(
                step.input if step.input is not None else {}, step_id=step.id, field="input"
            )
    key = defn.concurrency.key if defn.concurrency else None
    return CompiledExpressions(
        expressions=expressions,
        templates=templates,
        output=compile_template(defn.output, field="output") if defn.output is not None else None,
        concurrency_key=compile_expression(key, field="concurrency.key") if key else None,
    )


def definition_json_schema() -> dict[str, Any]:
    """JSON Schema of a definition file, for editors (field names as written: `with`, `if`)."""
    schema = WorkflowDefinition.model_json_schema(by_alias=True, mode="validation")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
