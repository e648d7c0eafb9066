-- A gap-free outbox feed for relays, and what retention needs.
--
-- 1. The feed. `position` is taken at INSERT, not at COMMIT: a transaction holding position
--    10 can commit after one holding 11 was read, so "everything after the last position I
--    saw" skips 10. Each row now records its inserting transaction (`xid`), and
--    `flowforge.outbox_next(consumer, max_events)` returns, in (xid, position) order, only
--    rows whose transaction is older than every transaction still in flight
--    (`pg_snapshot_xmin(pg_current_snapshot())`): every transaction that may still commit
--    an event has an xid at or above that bound, so the cursor never passes one. The cursor
--    is a row of `outbox_consumers`, moved by one UPDATE per read in the caller's
--    transaction: publish, then commit, and delivery is at-least-once with stable ids
--    (`<run id>/<seq>`); a rollback re-reads the same events; a read that returns nothing
--    writes nothing. Within one run the order is `seq` order: a run's events are written
--    by its owner under the epoch fence, one commit after the other, so a later commit of
--    the run takes a later xid. A statement trigger NOTIFYs `flowforge_outbox`.
--    A long writing transaction anywhere in the cluster (xids are cluster-wide) holds the
--    feed back until it ends; the consumer's lag shows it.
--
-- 2. `published_at` stays, and a relay may still set it, but nothing reads it any more:
--    its partial index (every row of a feed-reading deployment) is replaced by the feed's
--    index, so an event costs one index entry as before. A relay that still polls
--    `WHERE published_at IS NULL` should move to `outbox_next` (README, Outbox feed), or
--    recreate `outbox_unpublished` CONCURRENTLY while it moves.
--
-- 3. Retention (`FLOWFORGE_RUN_RETENTION`) deletes finished runs in small batches; the
--    trigger of sql/0010 takes their history and results with them (and now their
--    cancellation requests). It stays: retention deletes a run only once every registered
--    consumer has read all its events (or after `FLOWFORGE_OUTBOX_MAX_AGE` more, counting
--    what was lost in `lost_events` of each consumer that had not read it), so no event a
--    consumer has not read is lost silently, and a run id reused later meets no old row.
--    `runs_finished` finds the oldest finished runs without reading the others.
--
-- Partitioning, measured and declined (README, "Outbox feed and retention"): dropping a
-- day's partition took 16 ms here, but (a) the outbox's key (run_id, seq), which makes a
-- transition exactly-once, would have to include the partition column and so stop being
-- unique per run, and the wider key costs WAL on every event (382 vs 368 B per row);
-- (b) a run's events span partitions, while retention is per run (its finish time) and per
-- consumer cursor, so a long run or a slow consumer pins a whole partition; (c) batched
-- deletes by the (run_id, seq) key measured 171,000 rows/s (12,000 runs/s, 500-run batches
-- of at most 67 ms; half that under a load of 4) on this 2-core machine, far above the rate
-- this engine writes them.
--
-- Safe on a large outbox: adding `xid` with a constant default rewrites nothing (old rows
-- read as xid 0: committed before any consumer existed), and the default is then changed.
-- The index build locks out writers for its duration; on a big table create it first,
-- outside this migration (the same names, IF NOT EXISTS here skips them):
--     CREATE INDEX CONCURRENTLY outbox_feed ON flowforge.outbox (xid);
--     CREATE INDEX CONCURRENTLY outbox_feed_before ON flowforge.outbox (position) WHERE xid = '0';
-- (after adding the column: run the two ALTER TABLE statements below first).

ALTER TABLE flowforge.outbox ADD COLUMN IF NOT EXISTS xid xid8 NOT NULL DEFAULT '0';
ALTER TABLE flowforge.outbox ALTER COLUMN xid SET DEFAULT pg_current_xact_id();

-- By xid alone: one transaction's rows share it, so B-tree deduplication packs them, and
-- the few rows of one xid are sorted by position after the index scan. An event costs 8 B
-- of heap (the column) and about as much index as the partial index it replaces.
CREATE INDEX IF NOT EXISTS outbox_feed ON flowforge.outbox (xid);
-- The rows written before this migration all have xid 0: one group the xid index would sort
-- whole at every read. Their own index, by position; no later row enters it.
CREATE INDEX IF NOT EXISTS outbox_feed_before ON flowforge.outbox (position) WHERE xid = '0';
DROP INDEX IF EXISTS flowforge.outbox_unpublished;

CREATE TABLE flowforge.outbox_consumers (
    name          text        PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$'),
    last_xid      xid8        NOT NULL DEFAULT '0',
    last_position bigint      NOT NULL DEFAULT 0,
    registered_at timestamptz NOT NULL DEFAULT now(),
    read_at       timestamptz,
    events_read   bigint      NOT NULL DEFAULT 0,
    -- Events retention deleted (past FLOWFORGE_OUTBOX_MAX_AGE) before this consumer read them.
    lost_events   bigint      NOT NULL DEFAULT 0,
    lost_at       timestamptz
);

-- The CloudEvents view gains the feed's order (a column added at the end).
CREATE OR REPLACE VIEW flowforge.outbox_cloudevents AS
SELECT o.position,
       o.run_id,
       o.seq,
       o.published_at,
       jsonb_build_object(
           'specversion', '1.0',
           'id', o.run_id::text || '/' || o.seq::text,
           'source', 'flowforge-orchestrator',
           'type', o.type,
           'subject', o.run_id::text,
           'time', to_char(o.time AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
           'datacontenttype', 'application/json',
           'sequence', o.seq::text,
           'data', o.data
       ) || CASE WHEN o.traceparent IS NULL THEN '{}'::jsonb
                 ELSE jsonb_build_object('traceparent', o.traceparent) END AS event,
       o.xid
FROM flowforge.outbox o;

-- The next events for `consumer`, its cursor moved past them in the caller's transaction.
-- Call it in a READ COMMITTED transaction (the default): each statement then sees what the
-- previous reader under this name committed.
CREATE FUNCTION flowforge.outbox_next(consumer text, max_events integer)
RETURNS TABLE ("position" bigint, run_id uuid, seq integer, type text, event jsonb)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    cursor_xid xid8;
    cursor_pos bigint;
BEGIN
    IF max_events IS NULL OR max_events < 1 THEN
        RAISE EXCEPTION 'outbox_next(%, %): max_events must be at least 1', consumer, max_events
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Two readers under one name take turns. An advisory lock, not FOR UPDATE: a row lock
    -- is written to the WAL, and an idle relay's reads should write nothing.
    PERFORM pg_advisory_xact_lock(hashtextextended('flowforge_outbox_consumer:' || consumer, 0));
    SELECT c.last_xid, c.last_position INTO cursor_xid, cursor_pos
    FROM flowforge.outbox_consumers c WHERE c.name = consumer;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'outbox consumer % is not registered', quote_literal(consumer)
            USING ERRCODE = 'no_data_found',
                  HINT = 'INSERT INTO flowforge.outbox_consumers (name) VALUES (...) first';
    END IF;
    -- An empty batch updates no row: idle reads write nothing.
    RETURN QUERY
    WITH batch AS (
        -- Rows from before this migration (xid 0, all committed), by their own index.
        (SELECT e.position, e.run_id, e.seq, e.event, e.xid
         FROM flowforge.outbox_cloudevents e
         WHERE cursor_xid = '0'::xid8 AND e.xid = '0'::xid8 AND e.position > cursor_pos
         ORDER BY e.position
         LIMIT max_events)
        UNION ALL
        (SELECT e.position, e.run_id, e.seq, e.event, e.xid
         FROM flowforge.outbox_cloudevents e
         WHERE e.xid > '0'::xid8 AND (e.xid, e.position) > (cursor_xid, cursor_pos)
           AND e.xid < pg_snapshot_xmin(pg_current_snapshot())
         ORDER BY e.xid, e.position
         LIMIT max_events)
        ORDER BY 5, 1
        LIMIT max_events
    ),
    moved AS (
        UPDATE flowforge.outbox_consumers c
        SET last_xid = l.xid, last_position = l.position, read_at = now(),
            events_read = c.events_read + l.n
        FROM (SELECT b.xid, b.position, (SELECT count(*) FROM batch) AS n
              FROM batch b ORDER BY b.xid DESC, b.position DESC LIMIT 1) l
        WHERE c.name = consumer
    )
    SELECT b.position, b.run_id, b.seq, b.event ->> 'type', b.event
    FROM batch b ORDER BY b.xid, b.position;
END $$;

CREATE FUNCTION flowforge.outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('flowforge_outbox', '');
    RETURN NULL;
END $$;

CREATE TRIGGER outbox_notify AFTER INSERT ON flowforge.outbox
    FOR EACH STATEMENT EXECUTE FUNCTION flowforge.outbox_notify();

-- Retention finds the oldest finished runs by this index (set once, when a run ends).
CREATE INDEX runs_finished ON flowforge.runs (finished_at)
    WHERE status IN ('completed', 'failed', 'cancelled');

-- A deleted run's cancellation requests go with it (handled ones are not in the partial
-- index of sql/0011, hence an index by run).
CREATE INDEX cancel_requests_run ON flowforge.cancel_requests (run_id);

CREATE OR REPLACE FUNCTION flowforge.runs_forget_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM flowforge.outbox o USING deleted_runs d WHERE o.run_id = d.id;
    DELETE FROM flowforge.step_results s USING deleted_runs d WHERE s.run_id = d.id;
    DELETE FROM flowforge.cancel_requests c USING deleted_runs d WHERE c.run_id = d.id;
    RETURN NULL;
END $$;
