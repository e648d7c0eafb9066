"""Validating a definition: loaded data or text in, a `WorkflowDefinition` or one
`DefinitionError` listing every problem out.

Two passes over the same raw data, so that one error lists everything wrong at once:
pydantic checks shapes and values (`models`), then `checks` checks ids, `depends_on`, step
types and every CEL expression, and `reads` what each `for_each` may read. Pure: text in,
models out; reading a file is the caller's (`cli.definitions.load_definition`).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from flowforge_orchestrator.core.definition import checks
from flowforge_orchestrator.core.definition.models import (
    ConditionStep,
    DelayStep,
    FailStep,
    HttpParams,
    ParallelStep,
    SwitchStep,
    TaskStep,
    TransformStep,
    WaitStep,
    WorkflowDefinition,
    WorkflowStep,
    step_tag,
)
from flowforge_orchestrator.core.definition.reads import for_each_problems, upstream_problems
from flowforge_orchestrator.errors import DefinitionError

__all__ = ["parse_definition", "parse_definition_text"]


def _fields_for(step: dict[str, Any] | None) -> set[str]:
    """Field names (as written) of the model for a raw step, or of the workflow for None."""
    model = _model_for(step)
    return {info.alias or name for name, info in model.model_fields.items()}


def _model_for(step: dict[str, Any] | None) -> type[BaseModel]:
    """The model of a raw step, or of the workflow for None."""
    models: dict[str, type[BaseModel]] = {
        "TaskStep": TaskStep,
        "ConditionStep": ConditionStep,
        "ParallelStep": ParallelStep,
        "DelayStep": DelayStep,
        "TransformStep": TransformStep,
        "WaitStep": WaitStep,
        "SwitchStep": SwitchStep,
        "FailStep": FailStep,
        "WorkflowStep": WorkflowStep,
    }
    return WorkflowDefinition if step is None else models[step_tag(step)]


def parse_definition(
    data: Any, *, source: str | None = None, known_types: Collection[str] | None = None
) -> WorkflowDefinition:
    """Validate loaded data; raises one DefinitionError listing every problem found.

    `known_types`, when given, are the worker step types besides the built-in ones; a step of
    any other type is then an error.
    """
    if isinstance(data, BaseModel):
        data = data.model_dump(by_alias=True, exclude_unset=True)
    problems = checks.Problems(source)
    definition: WorkflowDefinition | None = None
    if data is None:
        problems.add("the definition is empty")
    elif not checks.check_bounds(data, problems):
        raise DefinitionError(problems.items)  # nothing below may walk data this shape
    else:
        try:
            definition = WorkflowDefinition.model_validate(data)
        except ValidationError as exc:
            checks.translate(exc, data, problems, _fields_for, _model_for)
        checks.check_raw(data, problems, known_types=known_types, http_params=HttpParams)
    if problems.items or definition is None:
        raise DefinitionError(problems.items)
    late = for_each_problems(definition, source) + upstream_problems(definition, source)
    if late:
        raise DefinitionError(late)
    return definition


def parse_definition_text(
    text: str,
    *,
    format: Literal["yaml", "json"] = "yaml",
    source: str | None = None,
    known_types: Collection[str] | None = None,
) -> WorkflowDefinition:
    """Parse YAML or JSON text; syntax errors are a DefinitionError naming the line."""
    return parse_definition(
        checks.load_text(text, format, source), source=source, known_types=known_types
    )
