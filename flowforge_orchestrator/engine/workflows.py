"""Compiled definitions, by name and version, read from the database once each; a
definition that cannot be used is `Rejected`, with the reason its runs fail with."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import ValidationError

from flowforge_orchestrator import store
from flowforge_orchestrator.core.definition.parse import parse_definition
from flowforge_orchestrator.core.graph.run import CompiledWorkflow
from flowforge_orchestrator.errors import DefinitionError

__all__ = ["Rejected", "Workflows"]


@dataclass(frozen=True)
class Rejected:
    """No workflow to run: why (what the runs of it fail with)."""

    reason: str


class Workflows:
    """The cache of compiled definitions (a version, once registered, never changes)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, int], CompiledWorkflow | Rejected] = {}

    async def get(
        self, conn: store.Connection, name: str, version: int | None
    ) -> CompiledWorkflow | Rejected:
        """A compiled definition (cached), or the reason there is none."""
        if version is None:
            return Rejected(f"workflow '{name}' has no registered definition")
        key = (name, version)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        found = await store.get_definition(conn, name, version)
        result: CompiledWorkflow | Rejected
        if found is None:
            result = Rejected(f"workflow '{name}' version {version} is not registered")
        else:
            try:
                result = CompiledWorkflow(
                    parse_definition(found.spec, source=f"{name} v{version} (database)")
                )
            except (DefinitionError, ValidationError) as exc:
                result = Rejected(
                    f"the stored definition of '{name}' version {version} is invalid: {exc}"
                )
        self._cache[key] = result
        return result
