"""Every SQL statement of the engine, named, with bound parameters only.

Batch writes use `unnest` over parallel arrays: one statement and one round trip for any
number of rows, which is what makes a group commit cheap.
"""

from __future__ import annotations

# -- definitions ---------------------------------------------------------------------------

GET_DEFINITION = """
SELECT name, version, spec, max_concurrency, created_at
FROM flowforge.workflow_definitions WHERE name = $1 AND version = $2
"""

GET_LATEST_DEFINITION = """
SELECT name, version, spec, max_concurrency, created_at
FROM flowforge.workflow_definitions WHERE name = $1 ORDER BY version DESC LIMIT 1
"""

INSERT_DEFINITION = """
INSERT INTO flowforge.workflow_definitions (name, version, spec, max_concurrency)
VALUES ($1, $2, $3, $4)
ON CONFLICT (name, version) DO NOTHING
RETURNING version
"""

LIST_DEFINITIONS = """
SELECT DISTINCT ON (name) name, version, max_concurrency, created_at
FROM flowforge.workflow_definitions ORDER BY name, version DESC
"""

# -- enqueue (the contract documented in README) -------------------------------------------

ENQUEUE_RUN = """
INSERT INTO flowforge.runs (id, workflow_name, workflow_version, input, idempotency_key)
VALUES (coalesce($1::uuid, gen_random_uuid()), $2, $3, $4::text::jsonb, $5)
ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING id
"""

# Without a key nothing can conflict on it: a plain insert, without ON CONFLICT's
# confirmation record per row in the WAL.
ENQUEUE_RUN_WITHOUT_KEY = ENQUEUE_RUN.replace(
    "ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING\n", ""
)

RUN_BY_IDEMPOTENCY_KEY = "SELECT id FROM flowforge.runs WHERE idempotency_key = $1"

# -- claiming and leases -------------------------------------------------------------------

# A run's cancellation was asked for: an open request (sql/0011), or the flag the owner
# role may still set (sql/0002).
CANCEL_ASKED = """(cancel_requested OR EXISTS (
    SELECT FROM flowforge.cancel_requests c WHERE c.run_id = runs.id AND c.handled_at IS NULL))"""

# What a claim reads of a run. The input comes as text and is decoded run by run, so that
# one input the decoder cannot take (nested thousands deep) fails its run, not the claim.
# The parts of a run's checkpoint (sql/0019), for `checkpoint.with_parts`: none for all
# but runs with a big fan-out running. In the query that reads the run: one per batch.


def parts_of(runs: str) -> str:
    """A big fan-out's parts of the row `runs` (a table name or alias), as one jsonb array
    of [step, part, letters, attempts] (`checkpoint.with_parts` joins them in)."""
    return f"""(SELECT jsonb_agg(jsonb_build_array(p.step, p.part, p.letters, p.attempts))
    FROM flowforge.run_parts p WHERE p.run_id = {runs}.id)"""


RUN_PARTS = f"{parts_of('runs')} AS parts"

_CLAIM_COLUMNS = f"""
id, workflow_name, workflow_version, status, input::text AS input, checkpoint, epoch,
traceparent, {CANCEL_ASKED} AS cancel_requested, created_at, depth, wake_at, {RUN_PARTS}
"""

# Runs whose owner stopped renewing: adopted by whoever claims first. `$2`: runs this
# replica set apart because not even their failure could be written (never claimed again).
SELECT_EXPIRED_RUNS = f"""
SELECT {_CLAIM_COLUMNS}
FROM flowforge.runs
WHERE status = 'running' AND lease_expires_at < now() AND NOT id = ANY($2::uuid[])
ORDER BY lease_expires_at
LIMIT $1
FOR UPDATE SKIP LOCKED
"""

# Runs blocked on a full concurrency key (`waiting`) are left out: they never fill a batch.
SELECT_PENDING_RUNS = f"""
SELECT {_CLAIM_COLUMNS}
FROM flowforge.runs
WHERE status = 'pending' AND NOT waiting AND NOT id = ANY($2::uuid[])
ORDER BY created_at
LIMIT $1
FOR UPDATE SKIP LOCKED
"""

# Hibernated runs whose wake-up time is due, or within `$3` seconds (loaded a little early,
# so that their timers fire on time), earliest first (sql/0016). Their parked waits go: the
# run listens in memory again once claimed.
SELECT_WOKEN_RUNS = f"""
WITH woken AS (
    SELECT {_CLAIM_COLUMNS}
    FROM flowforge.runs
    WHERE status = 'running' AND wake_at <= now() + make_interval(secs => $3)
      AND NOT id = ANY($2::uuid[])
    ORDER BY wake_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
), unparked AS (
    DELETE FROM flowforge.parked_waits p USING woken w WHERE p.run_id = w.id
)
SELECT * FROM woken
"""

# The same, among given runs only: the halves of a claim that failed, searched for the run
# the database refuses.
SELECT_CLAIMABLE_AMONG = f"""
SELECT {_CLAIM_COLUMNS}
FROM flowforge.runs
WHERE id = ANY($1::uuid[])
  AND ((status = 'running' AND lease_expires_at < now()) OR (status = 'pending' AND NOT waiting)
       OR (status = 'running' AND wake_at <= now() + make_interval(secs => $2)))
ORDER BY created_at
FOR UPDATE SKIP LOCKED
"""

# Only the runs the owner still holds in memory: a run it gave back must expire.
# Only the leases with less than $4 seconds left are written: `lease_expires_at` is
# indexed, so each renewal is a non-HOT update of the row and its indexes (~170 B of WAL),
# and a run that ends before its lease gets old is never renewed. The others are read, to
# report them held. One snapshot decides which part looks at a row.
RENEW_LEASES = """
WITH renewed AS (
    UPDATE flowforge.runs SET lease_expires_at = now() + make_interval(secs => $2)
    WHERE owner = $1 AND status = 'running' AND id = ANY($3::uuid[])
      AND coalesce(lease_expires_at, '-infinity') < now() + make_interval(secs => $4)
    RETURNING id, epoch
)
SELECT id, epoch FROM renewed
UNION ALL
SELECT id, epoch FROM flowforge.runs
WHERE owner = $1 AND status = 'running' AND id = ANY($3::uuid[])
  AND lease_expires_at >= now() + make_interval(secs => $4)
"""

# When a row is locked by someone else (RENEW_LEASES ran into the lock timeout): renew the
# rows that can be locked, and report a locked one as ours if its committed row says so
# (its lease is renewed next time). Not the everyday statement: locking first writes a lock
# record per row to the WAL.
RENEW_LEASES_SKIP_LOCKED = """
WITH locked AS MATERIALIZED (
    SELECT id FROM flowforge.runs
    WHERE owner = $1 AND status = 'running' AND id = ANY($3::uuid[])
    FOR NO KEY UPDATE SKIP LOCKED
),
renewed AS (
    UPDATE flowforge.runs r SET lease_expires_at = now() + make_interval(secs => $2)
    FROM locked WHERE r.id = locked.id
    RETURNING r.id, r.epoch
)
SELECT id, epoch FROM renewed
UNION ALL
SELECT id, epoch FROM flowforge.runs
WHERE owner = $1 AND status = 'running' AND id = ANY($3::uuid[])
  AND id NOT IN (SELECT id FROM locked)
"""

RELEASE_LEASES = """
UPDATE flowforge.runs SET lease_expires_at = now()
WHERE id IN (SELECT id FROM flowforge.runs
             WHERE owner = $1 AND status = 'running' AND id = ANY($2::uuid[])
             FOR NO KEY UPDATE SKIP LOCKED)
"""

# The last transition stored for a run, whatever wrote it: a run failed because its rows
# could not be written takes the next number, so its failure lands after anything there.
LAST_SEQ = "SELECT coalesce(max(seq), 0) FROM flowforge.outbox WHERE run_id = $1"

# Which of these runs still exist (a run that was neither written nor found locked).
EXISTING_RUNS = "SELECT id FROM flowforge.runs WHERE id = ANY($1::uuid[])"

# -- cancellation --------------------------------------------------------------------------

# The enqueue contract's cancellation: an INSERT, which locks no run row. The run's status
# is read (no lock) so that a finished run gets no request.
REQUEST_CANCEL = """
WITH run AS (SELECT id, status FROM flowforge.runs WHERE id = $1),
asked AS (
    INSERT INTO flowforge.cancel_requests (run_id, reason)
    SELECT id, $2 FROM run WHERE status IN ('pending', 'running')
    RETURNING 1  -- no column: the API role may insert requests, not read them
)
SELECT status, EXISTS (SELECT FROM asked) AS requested FROM run
"""

# The owner's running runs with a cancellation asked for (its poll, for lost notifications).
CANCEL_REQUESTED = """
SELECT r.id FROM flowforge.cancel_requests c JOIN flowforge.runs r ON r.id = c.run_id
WHERE c.handled_at IS NULL AND r.owner = $1 AND r.status = 'running'
UNION
SELECT id FROM flowforge.runs WHERE owner = $1 AND cancel_requested AND status = 'running'
"""

# A pending run blocked on a concurrency key must be claimed to be cancelled: the
# orchestrator un-blocks the requested ones ($1: these runs; NULL: all), and wakes the claim.
UNBLOCK_CANCELLED = """
WITH unblocked AS (
    UPDATE flowforge.runs SET waiting = false
    WHERE status = 'pending' AND waiting
      AND ($1::uuid[] IS NULL OR id = ANY($1::uuid[]))
      AND id IN (SELECT run_id FROM flowforge.cancel_requests WHERE handled_at IS NULL)
    RETURNING id
)
SELECT count(*) AS unblocked,
       (SELECT pg_notify('flowforge_runs', '') WHERE EXISTS (SELECT FROM unblocked)) AS woken
FROM unblocked
"""

# Requests whose run has ended are handled; so are requests for a run that has not
# appeared within an hour (no foreign key refuses them).
SETTLE_CANCEL_REQUESTS = """
UPDATE flowforge.cancel_requests c SET handled_at = now()
WHERE c.handled_at IS NULL
  AND (EXISTS (SELECT FROM flowforge.runs r
               WHERE r.id = c.run_id AND r.status IN ('completed', 'failed', 'cancelled'))
       OR (c.requested_at < now() - interval '1 hour'
           AND NOT EXISTS (SELECT FROM flowforge.runs r WHERE r.id = c.run_id)))
"""

# A redriven run starts afresh: the requests that cancelled it are spent.
HANDLE_CANCEL_REQUESTS = """
UPDATE flowforge.cancel_requests SET handled_at = now() WHERE run_id = $1 AND handled_at IS NULL
"""

# -- concurrency limits (sql/0003_concurrency.sql) ----------------------------------------

# One element per (run, key, limit); returns every pending run of the batch with its verdict.
ACQUIRE_CONCURRENCY = """
SELECT run_id, admitted
FROM flowforge.acquire_concurrency($1::uuid[], $2::text[], $3::integer[])
"""

CONCURRENCY_SLOTS = """
SELECT run_id FROM flowforge.concurrency_slots WHERE key = $1 ORDER BY run_id
"""

CONCURRENCY_QUEUE = """
SELECT run_id FROM flowforge.concurrency_queue WHERE key = $1 ORDER BY created_at, run_id
"""

# -- redrive -------------------------------------------------------------------------------

LOCK_RUN = """
SELECT id, workflow_name, workflow_version, status, checkpoint
FROM flowforge.runs WHERE id = $1 FOR UPDATE
"""

REDRIVE_RUN = """
UPDATE flowforge.runs SET
    status = 'pending', checkpoint = $2, output = NULL, error = NULL, finished_at = NULL,
    cancel_requested = false, owner = NULL, lease_expires_at = NULL,
    redrives = redrives + 1, updated_at = now()
WHERE id = $1 AND status IN ('failed', 'cancelled')
RETURNING redrives
"""

NOTIFY_RUNS = "SELECT pg_notify('flowforge_runs', '')"

ENGINE_SECRET = "SELECT secret FROM flowforge.engine_secret"

# -- the group commit ----------------------------------------------------------------------

# The epoch is the fence: a row is written only if it still has the epoch this orchestrator
# read when it claimed the run. A claim moves the epoch on (new_epoch = epoch + 1) and takes
# the lease in the same statement. One statement, so one round trip and atomic without a
# transaction of its own: events and inline results are written only for the runs whose
# update matched. The answer names the runs written; one it does not name is no longer ours
# (its epoch moved on) or no longer exists.
_WRITE_CHANGES = """
WITH {locked}owned AS (
    UPDATE flowforge.runs AS r SET
        status = u.status,
        checkpoint = u.checkpoint::jsonb,
        output = u.output::jsonb,
        error = u.error::jsonb,
        epoch = u.new_epoch,
        owner = CASE WHEN u.parked THEN NULL ELSE $1 END,
        lease_expires_at = CASE
            WHEN u.status IN ('completed', 'failed', 'cancelled') OR u.parked THEN NULL
            WHEN u.claimed THEN now() + make_interval(secs => $2)
            ELSE r.lease_expires_at END,
        traceparent = coalesce(u.traceparent, r.traceparent),
        started_at = coalesce(r.started_at, u.started_at),
        finished_at = u.finished_at,
        wake_at = CASE WHEN u.parked THEN coalesce(u.wake_at, 'infinity') END,
        -- Moves with the status and the holder only: PostgreSQL logs an update from its
        -- first changed byte (in `checkpoint`) to its last, and a time near the row's end
        -- set by every commit logged owner, lease, epoch, traceparent and the times again
        -- (~100 B a commit; BENCHMARKS.md "updated_at").
        updated_at = CASE WHEN u.claimed OR u.parked OR u.status <> r.status
                          THEN now() ELSE r.updated_at END
    FROM unnest($3::uuid[], $4::bigint[], $5::bigint[], $6::boolean[], $7::text[],
                $8::text[], $9::text[], $10::text[], $11::timestamptz[], $12::text[],
                $13::timestamptz[], $41::boolean[], $42::timestamptz[])
        AS u(id, epoch, new_epoch, claimed, status, checkpoint, output, error, finished_at,
             traceparent, started_at, parked, wake_at)
    WHERE r.id = u.id AND r.epoch = u.epoch{only_locked}
    RETURNING r.id, r.status, r.output, r.error, r.started_at, r.finished_at, r.workflow_name,
              r.parent_run_id, r.parent_step, r.parent_attempt_id
),
-- The history and the relay's outbox at once (sql/0006): one row per run per commit
-- holding its events (sql/0017, store/outbox_packing.py).
events AS (
    INSERT INTO flowforge.outbox_packed (run_id, seq, time, traceparent, events)
    SELECT run_id, seq, time, traceparent, events
    FROM unnest($14::uuid[], $15::integer[], $16::timestamptz[], $17::text[], $18::text[])
        AS e(run_id, seq, time, traceparent, events)
    WHERE run_id IN (SELECT id FROM owned)
),
-- Outputs of the steps the orchestrator ran itself, stored like a worker's result; and of
-- the attempts completed from outside, which replace the worker's `handed_off` row.
inline AS (
    INSERT INTO flowforge.step_results (attempt_id, run_id, step_id, outcome, output, error,
                                        worker, started_at, finished_at, token)
    SELECT a, r, s, o, output::jsonb, error::jsonb, 'orchestrator', at, at,
           flowforge.attempt_token(a)
    FROM unnest($19::uuid[], $20::uuid[], $21::text[], $22::text[], $23::text[],
                $24::text[], $25::timestamptz[])
        AS x(a, r, s, o, output, error, at)
    WHERE r IN (SELECT id FROM owned)
    ON CONFLICT (attempt_id, token) DO UPDATE
        SET outcome = excluded.outcome, output = excluded.output, error = excluded.error,
            worker = excluded.worker, finished_at = excluded.finished_at
        WHERE flowforge.step_results.outcome = 'handed_off'
),
-- The events wait steps took (sql/0013): once per run, with the step's transition.
taken AS (
    INSERT INTO flowforge.event_consumptions (run_id, event_id, step_id, attempt_id)
    SELECT r, e, s, a
    FROM unnest($26::uuid[], $27::bigint[], $28::text[], $29::uuid[]) AS x(r, e, s, a)
    WHERE r IN (SELECT id FROM owned)
    ON CONFLICT DO NOTHING
),
-- Child runs of workflow steps (sql/0015), once each: their ids are derived from the
-- parent's attempt. A workflow that is not registered fails the attempt instead, through
-- its result (`unknown`), so only that step fails.
child AS MATERIALIZED (
    SELECT x.*, EXISTS (SELECT FROM flowforge.workflow_definitions d
                        WHERE d.name = x.w AND (x.v IS NULL OR d.version = x.v)) AS known
    FROM unnest($30::uuid[], $31::uuid[], $32::text[], $33::uuid[], $34::text[],
                $35::integer[], $36::text[], $37::integer[], $38::text[])
        AS x(c, p, s, a, w, v, i, d, tp)
    WHERE x.p IN (SELECT id FROM owned)
),
children AS (
    INSERT INTO flowforge.runs (id, workflow_name, workflow_version, input, parent_run_id,
                                parent_step, parent_attempt_id, depth, traceparent)
    SELECT c, w, v, i::jsonb, p, s, a, d, tp FROM child WHERE known
    ON CONFLICT (id) DO NOTHING
),
unknown AS (
    INSERT INTO flowforge.step_results (attempt_id, run_id, step_id, outcome, error, worker,
                                        started_at, finished_at, token)
    SELECT a, p, s, 'failed', flowforge.child_unknown(s, w, v), 'orchestrator', now(), now(),
           flowforge.attempt_token(a)
    FROM child WHERE NOT known
    ON CONFLICT DO NOTHING
),
-- Stopping a workflow step cancels its child run: a request, as `runs cancel` writes.
child_cancels AS (
    INSERT INTO flowforge.cancel_requests (run_id, reason)
    SELECT c, 'its parent run ' || p || ' stopped the step that started it'
    FROM unnest($39::uuid[], $40::uuid[]) AS x(p, c)
    WHERE p IN (SELECT id FROM owned)
),
-- A child run that ends answers its parent's attempt, in its final transaction: the
-- result wakes the parent as a worker's does, exactly once.
to_parent AS (
    INSERT INTO flowforge.step_results (attempt_id, run_id, step_id, outcome, output, error,
                                        worker, started_at, finished_at, token)
    SELECT parent_attempt_id, parent_run_id, parent_step,
           CASE WHEN status = 'completed' THEN 'succeeded' ELSE 'failed' END,
           CASE WHEN status = 'completed' THEN output END,
           CASE WHEN status <> 'completed'
                THEN flowforge.child_error(id, workflow_name, parent_step, status, error) END,
           'orchestrator', started_at, finished_at, flowforge.attempt_token(parent_attempt_id)
    FROM owned
    WHERE parent_attempt_id IS NOT NULL AND status IN ('completed', 'failed', 'cancelled')
    ON CONFLICT DO NOTHING
),
-- The wait steps of the runs this commit parks (sql/0016): what an event finds them by.
parked AS (
    INSERT INTO flowforge.parked_waits (run_id, name, key)
    SELECT r, n, k FROM unnest($43::uuid[], $44::text[], $45::text[]) AS x(r, n, k)
    WHERE r IN (SELECT id FROM owned)
),
-- The parts of big fan-outs' checkpoints that changed (sql/0019): a new part is inserted
-- (over one an earlier expansion left), a stored one updated in place; a fan-out that
-- ended takes its parts with it.
part AS MATERIALIZED (
    SELECT * FROM unnest($46::uuid[], $47::text[], $48::integer[], $49::text[], $50::text[],
                         $51::boolean[]) AS x(r, s, p, l, a, new)
    WHERE r IN (SELECT id FROM owned)
),
parts_new AS (
    INSERT INTO flowforge.run_parts (run_id, step, part, letters, attempts)
    SELECT r, s, p, l, a::jsonb FROM part WHERE new
    ON CONFLICT (run_id, step, part) DO UPDATE
        SET letters = excluded.letters, attempts = excluded.attempts
),
parts_changed AS (
    UPDATE flowforge.run_parts t SET letters = x.l, attempts = x.a::jsonb
    FROM part x WHERE NOT x.new AND t.run_id = x.r AND t.step = x.s AND t.part = x.p
),
parts_dropped AS (
    DELETE FROM flowforge.run_parts t USING unnest($52::uuid[], $53::text[]) AS x(r, s)
    WHERE t.run_id = x.r AND t.step = x.s AND x.r IN (SELECT id FROM owned)
)
{answer}
"""

WRITE_CHANGES = _WRITE_CHANGES.format(
    locked="", only_locked="", answer="SELECT id, true AS written FROM owned"
)

# The same when a row of the batch is locked by someone else (WRITE_CHANGES ran into the
# lock timeout): a locked row is skipped, not waited for, and its run is written by a later
# commit while the others go on. The answer names every run locked here, written or not
# (its epoch moved on); a run it does not name was locked elsewhere, or no longer exists.
# Not the everyday statement: locking first writes a lock record per row to the WAL.
WRITE_CHANGES_SKIP_LOCKED = _WRITE_CHANGES.format(
    locked="""locked AS MATERIALIZED (
    SELECT id FROM flowforge.runs WHERE id = ANY($3::uuid[])
    FOR NO KEY UPDATE SKIP LOCKED
),
""",
    only_locked=" AND r.id IN (SELECT id FROM locked)",
    answer="SELECT id, id IN (SELECT id FROM owned) AS written FROM locked",
)

# Keyed by (attempt_id, token): a duplicate delivery is skipped, and a row with another
# token never stands in the way of the real one. No conflict target, so the worker's role
# needs no SELECT on the table.
INSERT_RESULTS = """
INSERT INTO flowforge.step_results (attempt_id, run_id, step_id, outcome, output, error,
                                    worker, started_at, finished_at, token)
SELECT a, r, s, o, output::jsonb, error::jsonb, w, st, f, t
FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[],
            $7::text[], $8::timestamptz[], $9::timestamptz[], $10::bytea[])
    AS x(a, r, s, o, output, error, w, st, f, t)
ON CONFLICT DO NOTHING
"""

# The same without ON CONFLICT, tried first: a speculative insert writes a confirmation
# record per row to the WAL (48 B a step), and a result is almost always new. A duplicate
# fails the statement, and INSERT_RESULTS then skips it.
INSERT_NEW_RESULTS = INSERT_RESULTS.replace("ON CONFLICT DO NOTHING\n", "")

# -- results -------------------------------------------------------------------------------

# Output and error as text: each row is decoded (and its token checked) on its own, so one
# row that cannot be decoded never fails the fetch of the others (core/tokens.py).
RESULT_COLUMNS = (
    "attempt_id, run_id, step_id, outcome, output::text AS output, error::text AS error,"
    " token, worker, started_at, finished_at"
)

RESULTS_BY_ATTEMPT = f"""
SELECT {RESULT_COLUMNS} FROM flowforge.step_results WHERE attempt_id = ANY($1::uuid[])
"""

RESULTS_BY_RUN = f"""
SELECT {RESULT_COLUMNS} FROM flowforge.step_results WHERE run_id = ANY($1::uuid[])
"""

# Written by workers: the trigger NOTIFYs in the same transaction.
REGISTER_STEP_TYPES = """
INSERT INTO flowforge.step_types (name, worker, last_seen)
SELECT unnest($1::text[]), $2, now()
ON CONFLICT (name) DO UPDATE SET worker = excluded.worker, last_seen = excluded.last_seen
"""

LIST_STEP_TYPES = "SELECT name FROM flowforge.step_types ORDER BY name"

# -- reading runs (CLI) --------------------------------------------------------------------

RUN_COLUMNS = """
id, workflow_name, workflow_version, status, input, output, error, owner, epoch,
lease_expires_at, idempotency_key, created_at, started_at, finished_at, updated_at,
parent_run_id, parent_step, depth
"""

GET_RUN = f"SELECT {RUN_COLUMNS} FROM flowforge.runs WHERE id = $1"

LIST_RUNS = f"""
SELECT {RUN_COLUMNS} FROM flowforge.runs
WHERE ($1::text IS NULL OR workflow_name = $1) AND ($2::text IS NULL OR status = $2)
ORDER BY created_at DESC
LIMIT $3
"""

RUN_ATTEMPTS = """
SELECT a.id, a.step_id, a.attempt, a.step_type, a.status, a.dispatched_at, a.finished_at,
       a.error, r.started_at, r.worker
FROM flowforge.step_attempts a
LEFT JOIN flowforge.step_results r
    ON r.attempt_id = a.id AND r.token = flowforge.attempt_token(a.id)
WHERE a.run_id = $1
ORDER BY a.dispatched_at, a.step_id, a.attempt
"""

RUN_TRANSITIONS = """
SELECT seq, step_id, attempt_id, from_status, to_status, at
FROM flowforge.transitions WHERE run_id = $1 AND seq > $2 ORDER BY seq
"""

RUN_EVENTS = """
SELECT seq, type, time, data FROM flowforge.outbox WHERE run_id = $1 AND seq > $2 ORDER BY seq
"""

# -- operation (readiness, metrics) ----------------------------------------------------------

PING = "SELECT 1"

# The relay's backlog, sampled for /metrics: the slowest registered feed consumer's
# (sql/0012; `published_at` lost its index there and is no longer counted), 0 without one.
OUTBOX_BACKLOG = """
SELECT coalesce(max(l.events), 0) AS unpublished,
       extract(epoch FROM now() - min(l.oldest))::float8 AS oldest_age
FROM flowforge.outbox_consumers c
CROSS JOIN LATERAL flowforge.outbox_lag(c.last_xid, c.last_position, 1000000) l
"""

# Runs waiting and running across all replicas; both statuses have a partial index.
COUNT_OPEN_RUNS = """
SELECT (SELECT count(*) FROM flowforge.runs WHERE status = 'pending') AS pending,
       (SELECT count(*) FROM flowforge.runs WHERE status = 'running') AS running
"""
