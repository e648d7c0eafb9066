"""A definition prepared for execution: compiled once per version, shared by all its runs.

Every step list of the definition (the top level, each `then`/`else`, each parallel branch,
a for_each template) becomes a `ListPlan`: its steps in order, who depends on whom, and its
final steps. The graph walks these plans; it never looks at the raw definition again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flowforge_orchestrator.core.definition.models import (
    ConditionStep,
    FailStep,
    ParallelStep,
    Step,
    SwitchStep,
    TaskStep,
    TransformStep,
    WorkflowDefinition,
    WorkflowStep,
)
from flowforge_orchestrator.core.definition.urls import UrlTemplate, url_string
from flowforge_orchestrator.core.expressions.templates import Expression, Template, compile_template

__all__ = ["SECRET_ROOTS", "CompiledWorkflow", "ListPlan"]

SECRET_ROOTS = frozenset({"secrets"})


@dataclass(frozen=True, eq=False)
class ListPlan:
    """One step list: a small DAG. `dependents[id]` are the steps waiting on `id`."""

    steps: tuple[Step, ...]
    dependents: dict[str, tuple[str, ...]]
    sinks: tuple[str, ...]  # steps nobody in the list depends on: the list's output

    @classmethod
    def of(cls, steps: list[Step]) -> ListPlan:
        dependents: dict[str, list[str]] = {s.id: [] for s in steps}
        for step in steps:
            for dep in step.depends_on:
                dependents[dep].append(step.id)
        return cls(
            steps=tuple(steps),
            dependents={k: tuple(v) for k, v in dependents.items()},
            sinks=tuple(s.id for s in steps if not dependents[s.id]),
        )


@dataclass(eq=False)
class CompiledWorkflow:
    """A definition with its expressions compiled and its step lists planned."""

    definition: WorkflowDefinition
    root: ListPlan = field(init=False)
    children: dict[str, tuple[ListPlan, ...]] = field(init=False)  # by composite step id
    handlers: dict[str, tuple[ListPlan, ...]] = field(init=False)  # catch handlers, by step
    compensations: dict[str, ListPlan] = field(init=False)  # by step id
    errors: dict[str, Template] = field(init=False)  # a fail step's `error`
    params: dict[str, Template] = field(init=False)
    outputs: dict[str, Template] = field(init=False)
    child_inputs: dict[str, Template] = field(init=False)  # a workflow step's `input`
    expressions: dict[tuple[str, str], Expression] = field(init=False)
    # Paths in `with` that read `secrets`: only the worker renders them, from its own
    # environment, so secret values never reach PostgreSQL, Redis, logs or events.
    secret_paths: dict[str, list[list[str | int]]] = field(init=False)
    # The templated `with.url` of http steps, rendered with every value URL-encoded (their
    # `params` template is then the rest of `with`). A URL that reads secrets is the
    # worker's to render, and stays in `params`.
    urls: dict[str, UrlTemplate] = field(init=False)
    run_output: Template | None = field(init=False)

    def __post_init__(self) -> None:
        definition = self.definition
        compiled = definition.compiled
        self.root = ListPlan.of(definition.steps)
        self.children, self.params, self.outputs, self.secret_paths = {}, {}, {}, {}
        self.urls, self.handlers, self.compensations, self.errors = {}, {}, {}, {}
        self.child_inputs = {}
        self.expressions = dict(compiled.expressions)
        for step in definition.all_steps():
            self._plan_lists(step)
            if isinstance(step, TaskStep):
                params = compiled.template(step.id, "with")
                self.params[step.id] = params
                deferred = params.deferred_paths(SECRET_ROOTS)
                if deferred:
                    self.secret_paths[step.id] = [list(path) for path in deferred]
                url = url_string(params) if step.type == "http" else None
                if url is not None and url.roots.isdisjoint(SECRET_ROOTS):
                    self.urls[step.id] = UrlTemplate.of(url, step.id)
                    rest = {k: v for k, v in step.with_.items() if k != "url"}
                    self.params[step.id] = compile_template(rest, step_id=step.id, field="with")
            elif isinstance(step, TransformStep):
                self.outputs[step.id] = compiled.template(step.id, "output")
            elif isinstance(step, FailStep):
                self.errors[step.id] = compiled.template(step.id, "error")
            elif isinstance(step, WorkflowStep):
                self.child_inputs[step.id] = compiled.template(step.id, "input")
        self.run_output = compiled.output

    def _plan_lists(self, step: Step) -> None:
        """The step lists `step` holds: its branches, its catch handlers, its compensation."""
        if step.catch:
            self.handlers[step.id] = tuple(ListPlan.of(h.steps) for h in step.catch)
        if step.compensate:
            self.compensations[step.id] = ListPlan.of(step.compensate)
        if isinstance(step, ConditionStep):
            self.children[step.id] = (ListPlan.of(step.then), ListPlan.of(step.else_))
        elif isinstance(step, ParallelStep):
            if step.step is not None:
                self.children[step.id] = (ListPlan.of([step.step]),)
            else:
                self.children[step.id] = tuple(ListPlan.of(b) for b in step.branches or ())
        elif isinstance(step, SwitchStep):
            lists = [case.steps for case in step.cases] + [step.default]
            self.children[step.id] = tuple(ListPlan.of(steps) for steps in lists)

    def expression(self, step_id: str, field_name: str) -> Expression:
        return self.expressions[(step_id, field_name)]
