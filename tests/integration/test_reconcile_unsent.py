"""The reconciler looks in Redis only for attempts that were sent: one a big commit has not
enqueued yet is not lost (100,000 dispatched at once take seconds to send, and 69,000 of
them were counted lost and sent twice)."""

from __future__ import annotations

from uuid import uuid4

from flowforge_orchestrator.engine.owned import OwnedRuns
from flowforge_orchestrator.queue.dispatch import Dispatcher
from tests.integration.test_dispatch import KEYS, TOKENS
from tests.integration.test_reconcile_rotation import reconciler_for
from tests.unit.test_owned_runs import dispatch, owned


async def test_attempts_not_enqueued_yet_are_not_sent_again(redis_url: str) -> None:
    clock = [100.0]
    runs = OwnedRuns(monotonic=lambda: clock[0])
    run_id = uuid4()
    runs.adopt(run_id, owned(run_id))
    waiting = [dispatch(run_id) for _ in range(3)]
    runs.dispatched(run_id, waiting)
    dispatcher = await Dispatcher.connect(redis_url, KEYS, TOKENS)

    reconciler = reconciler_for(dispatcher, runs)
    try:
        clock[0] += 60  # long settled: were they sent, Redis would know them
        await reconciler.reconcile_jobs()
        assert all(runs.undelivered(d.attempt_id) for d in waiting)  # still to send, once
        assert await dispatcher.missing([d.attempt_id for d in waiting]) == [
            d.attempt_id for d in waiting
        ]

        await reconciler.redeliver()  # sent now
        assert not any(runs.undelivered(d.attempt_id) for d in waiting)
        assert await dispatcher.missing([d.attempt_id for d in waiting]) == []
    finally:
        await dispatcher.close()
