"""The reconciler looks for at most `check_batch` attempts in Redis per poll, in rotation,
and for all of them at once when one is missing (real Redis; the dispatcher only records
what it is asked)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from uuid import UUID, uuid4

import pytest
from arq.constants import job_key_prefix

from flowforge_orchestrator.core.records import Dispatch, StepResult
from flowforge_orchestrator.engine.owned import OwnedRuns
from flowforge_orchestrator.engine.reconciler import CHECK_BATCH, Reconciler
from flowforge_orchestrator.ops import metrics
from flowforge_orchestrator.queue.dispatch import Dispatcher
from tests.integration.test_dispatch import KEYS, TOKENS
from tests.unit.test_owned_runs import dispatch, owned


class Recording(Dispatcher):
    """A real dispatcher that remembers which attempts each lookup asked about."""

    looked: list[list[UUID]]

    async def missing(self, attempt_ids: Sequence[UUID]) -> list[UUID]:
        self.looked.append(list(attempt_ids))
        return await super().missing(attempt_ids)


@dataclass
class Setup:
    reconciler: Reconciler
    dispatcher: Recording
    sent: list[Dispatch]
    measures: metrics.OrchestratorMetrics

    def resent(self) -> float:
        value = self.measures.registry.get_sample_value(
            "flowforge_reconciler_actions_total", {"action": "redelivered"}
        )
        return value or 0.0


def reconciler_for(
    dispatcher: Dispatcher,
    runs: OwnedRuns,
    measures: metrics.OrchestratorMetrics | None = None,
    *,
    check_batch: int = CHECK_BATCH,
) -> Reconciler:
    """A reconciler of `runs` alone: no stored results, nothing to commit or drop."""

    async def no_results(attempts: list[UUID]) -> list[tuple[UUID, StepResult]]:
        return []

    return Reconciler(
        dispatcher,
        measures or metrics.OrchestratorMetrics(metrics.new_registry(process=False)),
        runs,
        poll_interval=5.0,
        fetch=no_results,
        clock=lambda: datetime.now(UTC),
        changed=lambda run_id: None,
        drop=lambda run_id, why, give_back=False: None,
        spawn=lambda coroutine: coroutine.close(),
        check_batch=check_batch,
    )


@pytest.fixture
async def setup(redis_url: str) -> AsyncIterator[Setup]:
    """Five attempts of one run, sent to Redis and long settled; batches of two."""
    clock = [100.0]
    runs = OwnedRuns(monotonic=lambda: clock[0])
    run_id = uuid4()
    runs.adopt(run_id, owned(run_id))
    sent = [dispatch(run_id) for _ in range(5)]
    runs.dispatched(run_id, sent)
    dispatcher = await Recording.connect(redis_url, KEYS, TOKENS)
    assert isinstance(dispatcher, Recording)
    dispatcher.looked = []
    measures = metrics.OrchestratorMetrics(metrics.new_registry(process=False))

    reconciler = reconciler_for(dispatcher, runs, measures, check_batch=2)
    try:
        await reconciler.redeliver()
        clock[0] += 60
        yield Setup(reconciler, dispatcher, sent, measures)
    finally:
        await dispatcher.close()


async def test_each_poll_looks_for_a_batch_and_a_round_covers_every_attempt(
    setup: Setup,
) -> None:
    for _ in range(4):
        await setup.reconciler.reconcile_jobs()
    looked = setup.dispatcher.looked
    assert [len(batch) for batch in looked] == [2, 2, 1, 2]
    first_round = [a for batch in looked[:3] for a in batch]
    assert sorted(first_round) == sorted(d.attempt_id for d in setup.sent)  # each once
    assert setup.resent() == 0


async def test_a_lost_job_is_found_within_a_round_and_sent_again(setup: Setup) -> None:
    await setup.reconciler.reconcile_jobs()  # the first batch: all there
    unchecked = {d.attempt_id for d in setup.sent} - set(setup.dispatcher.looked[0])
    lost = sorted(unchecked)[0]
    await setup.dispatcher.redis.delete(job_key_prefix + str(lost))

    for _ in range(2):  # the rest of the round
        await setup.reconciler.reconcile_jobs()
    assert setup.resent() == 1
    assert await setup.dispatcher.missing([lost]) == []  # its job is back


async def test_once_one_is_missing_every_attempt_is_looked_for_at_once(setup: Setup) -> None:
    ids = [d.attempt_id for d in setup.sent]
    await setup.dispatcher.redis.delete(*(job_key_prefix + str(a) for a in ids))  # Redis lost all

    await setup.reconciler.reconcile_jobs()
    assert [len(batch) for batch in setup.dispatcher.looked] == [2, 3]
    assert setup.resent() == 5
    assert await setup.dispatcher.missing(ids) == []
