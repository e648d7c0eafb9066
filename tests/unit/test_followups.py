"""The follow-up queue: first in, first out, across a long drain and after it."""

from __future__ import annotations

import pytest

from flowforge_orchestrator.core.definition.plan import ListPlan
from flowforge_orchestrator.core.graph.followups import Check, FollowUps
from flowforge_orchestrator.core.graph.nodes import Frame, Scope


def _checks(n: int) -> list[Check]:
    return [Check(Scope(ListPlan.of([]), Frame(None), None)) for _ in range(n)]


def test_items_come_out_in_the_order_they_went_in_even_through_a_long_drain() -> None:
    queue, items = FollowUps(), _checks(5000)
    queue.extend(items[:3000])
    out = [queue.popleft() for _ in range(2500)]
    queue.extend(items[3000:])
    while queue:
        out.append(queue.popleft())
    assert [id(i) for i in out] == [id(i) for i in items]
    assert len(queue) == 0 and not queue
    with pytest.raises(IndexError):
        queue.popleft()


def test_append_after_clear_starts_afresh() -> None:
    queue, (a, b) = FollowUps(), _checks(2)
    queue.append(a)
    queue.clear()
    queue.append(b)
    assert len(queue) == 1 and queue.popleft() is b
