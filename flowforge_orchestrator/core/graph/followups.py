"""The follow-up queue's records: what is left to decide after a step or a list moved.

Every entry point of `RunState` changes some nodes; each change that may set more in motion
queues one of these, and `flow.drain` works them off in order until nothing is left.
"""

from __future__ import annotations

from dataclasses import dataclass

from flowforge_orchestrator.core.graph.nodes import Node, Scope

__all__ = ["Check", "Finished", "FollowUp", "Launch"]


@dataclass(frozen=True, slots=True)
class Finished:
    """A step reached a final status: start its dependents, or close its list."""

    node: Node


@dataclass(frozen=True, slots=True)
class Launch:
    """A parallel step may start its next branch (as `max_parallel` allows)."""

    node: Node


@dataclass(frozen=True, slots=True)
class Check:
    """A list started or was restored: start what is ready, close it if nothing is left."""

    scope: Scope


FollowUp = Finished | Launch | Check
