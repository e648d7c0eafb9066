-- One outbox row per run per commit, holding that commit's events of the run.
--
-- A step wrote about three outbox rows (`step.started`, `step.succeeded`, the next
-- `step.dispatched`), each a heap tuple and two index entries (the key and the feed's xid):
-- ~1.3 KB of WAL per step, more than half of it. The events of one run in one commit now
-- share a row of `outbox_packed` (one heap tuple, one entry in each index), in a compact
-- text form (below). `flowforge.outbox` becomes a view with the table's former columns, one
-- row per event, so the CloudEvents view, `transitions`, `step_attempts`, the feed and
-- every reader see what they saw; nothing about an event changes: its id `<run id>/<seq>`,
-- its `seq`, its transaction (`xid`: the row's), its time, data and traceparent.
--
-- Positions stay one per event, unique and increasing in a transaction: a row takes a block
-- of 1024 (the identity's increment) and its n-th event is `position + n - 1`; a commit with
-- more events for a run, or a gap in its seq, takes more rows. Rows written before this
-- migration keep their position (one event each) and the new blocks start above them, so
-- the consumers' cursors (`outbox_consumers`) stay valid as they are.
--
-- The key (run_id, seq) is the first event's: a commit written twice collides as before
-- (a run's events are written by its owner under the epoch fence, a commit after another).
--
-- The events text: one line per event (newline-separated, in seq order), seven fields
-- separated by tabs; no field can hold a tab or a newline (step ids are identifiers, data
-- is JSON text, which escapes control characters):
--   1 type          a number: the index of a frequent word in `outbox_word`; else the text
--   2 time          microseconds after the row's `time` (the first event's), may be negative
--   3 step_id       empty: none
--   4 attempt_id    the uuid's 16 bytes in base64 without padding (22 characters); empty: none
--   5 from_status   as the type; empty: none
--   6 to_status     as the type
--   7 data          JSON text; empty: {}; `+` then JSON: the object plus `step_id` (field 3)
-- `store/outbox_packing.py` writes it (its word list must be this one: append only).
--
-- Inserting into, updating `published_at` of, or deleting from `flowforge.outbox` still
-- works (INSTEAD OF triggers), one event per row; deletes are by run (retention).

CREATE FUNCTION flowforge.outbox_word(w text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN left(w, 1) BETWEEN '0' AND '9'
                THEN (ARRAY['step.dispatched', 'step.started', 'step.succeeded', 'pending',
                            'dispatched', 'running', 'succeeded', 'workflow.started',
                            'workflow.completed', 'completed', 'step.failed', 'step.retrying',
                            'step.timed_out', 'step.skipped', 'step.cancelled', 'failed',
                            'retrying', 'timed_out', 'skipped', 'cancelled', 'workflow.failed',
                            'workflow.cancelled', 'step.waiting', 'step.event_received',
                            'step.handed_off'])[w::integer]
                ELSE w END
$$;

CREATE FUNCTION flowforge.outbox_uuid(b text) RETURNS uuid
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN b = '' THEN NULL
                ELSE encode(decode(b || '==', 'base64'), 'hex')::uuid END
$$;

CREATE FUNCTION flowforge.outbox_data(d text, step_id text) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN d = '' THEN '{}'::jsonb
                WHEN left(d, 1) = '+'
                    THEN jsonb_build_object('step_id', step_id) || substr(d, 2)::jsonb
                ELSE d::jsonb END
$$;

-- The old table's rows move over; the views over it go with it and come back below.
ALTER TABLE flowforge.outbox RENAME TO outbox_before_0017;
ALTER TABLE flowforge.outbox_before_0017 RENAME CONSTRAINT outbox_pkey TO outbox_before_0017_pkey;
DROP TRIGGER outbox_notify ON flowforge.outbox_before_0017;

-- Column order packs the fixed-width columns without padding.
CREATE TABLE flowforge.outbox_packed (
    run_id       uuid        NOT NULL,
    position     bigint      NOT NULL GENERATED ALWAYS AS IDENTITY (INCREMENT BY 1024),
    xid          xid8        NOT NULL DEFAULT pg_current_xact_id(),
    time         timestamptz NOT NULL,
    seq          integer     NOT NULL,
    traceparent  text,
    published_at timestamptz,
    events       text        NOT NULL,
    CONSTRAINT outbox_pkey PRIMARY KEY (run_id, seq)  -- the name errors have always given
) WITH (fillfactor = 100);  -- rows are never updated in the engine's path

INSERT INTO flowforge.outbox_packed
    (run_id, position, xid, time, seq, traceparent, published_at, events)
OVERRIDING SYSTEM VALUE
SELECT o.run_id, o.position, o.xid, o.time, o.seq, o.traceparent, o.published_at,
       concat_ws(E'\t', o.type, '0', coalesce(o.step_id, ''),
                 coalesce(rtrim(encode(uuid_send(o.attempt_id), 'base64'), '='), ''),
                 coalesce(o.from_status, ''), o.to_status, o.data::text)
FROM flowforge.outbox_before_0017 o;

SELECT setval(pg_get_serial_sequence('flowforge.outbox_packed', 'position'), max(position))
FROM flowforge.outbox_packed HAVING max(position) IS NOT NULL;

DROP TABLE flowforge.outbox_before_0017 CASCADE;

-- The feed's indexes (sql/0012), on the rows.
CREATE INDEX outbox_feed ON flowforge.outbox_packed (xid);
CREATE INDEX outbox_feed_before ON flowforge.outbox_packed (position) WHERE xid = '0';

CREATE TRIGGER outbox_notify AFTER INSERT ON flowforge.outbox_packed
    FOR EACH STATEMENT EXECUTE FUNCTION flowforge.outbox_notify();

-- A row's events, one row each (what the view below and the feed unpack).
CREATE FUNCTION flowforge.outbox_unpack(events text, first_seq integer, first_position bigint,
                                        first_time timestamptz)
RETURNS TABLE ("position" bigint, seq integer, type text, "time" timestamptz, data jsonb,
               step_id text, attempt_id uuid, from_status text, to_status text)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT first_position + l.i - 1,
           (first_seq + l.i - 1)::integer,
           flowforge.outbox_word(l.f[1]),
           first_time + l.f[2]::bigint * interval '1 microsecond',
           flowforge.outbox_data(l.f[7], l.f[3]),
           nullif(l.f[3], ''),
           flowforge.outbox_uuid(l.f[4]),
           flowforge.outbox_word(nullif(l.f[5], '')),
           flowforge.outbox_word(l.f[6])
    FROM (SELECT t.i, string_to_array(t.line, E'\t') AS f
          FROM unnest(string_to_array(events, E'\n')) WITH ORDINALITY AS t(line, i)) l
$$;
-- (Inlined into the queries that use it. unnest of an array, not string_to_table: the
-- planner estimates 10 rows per call for the one, 1,000 for the other, which made plans
-- over the view look big enough to JIT-compile, a second or two per query.)

-- `{"parentrunid": ...}` for a child run, `{}` for another. SECURITY DEFINER: a relay reads
-- the events of runs, not the runs table; this is the one fact of a run row it gets, and only
-- for runs whose events it reads.
CREATE FUNCTION flowforge.outbox_parent(run uuid) RETURNS jsonb
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog AS $$
    SELECT coalesce((SELECT jsonb_build_object('parentrunid', r.parent_run_id::text)
                     FROM flowforge.runs r
                     WHERE r.id = run AND r.parent_run_id IS NOT NULL),
                    '{}'::jsonb)
$$;

-- An event as CloudEvents 1.0 JSON (sql/0001); traceparent is optional in CloudEvents:
-- present only when known; `parentrunid` only on a child run's events.
CREATE FUNCTION flowforge.outbox_envelope(run_id uuid, seq integer, type text,
                                          "time" timestamptz, data jsonb, traceparent text)
RETURNS jsonb LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT jsonb_build_object(
               'specversion', '1.0',
               'id', run_id::text || '/' || seq::text,
               'source', 'flowforge-orchestrator',
               'type', type,
               'subject', run_id::text,
               'time', to_char("time" AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
               'datacontenttype', 'application/json',
               'sequence', seq::text,
               'data', data
           ) || CASE WHEN traceparent IS NULL THEN '{}'::jsonb
                     ELSE jsonb_build_object('traceparent', traceparent) END
             -- A child run's events carry its parent's run id (sql/0015), in the view and
             -- in the feed alike.
             || flowforge.outbox_parent(run_id)
$$;

-- How many events a row holds.
CREATE FUNCTION flowforge.outbox_count(events text) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT length(events) - length(replace(events, E'\n', '')) + 1
$$;

-- A consumer's lag from its cursor, read from the rows without unpacking them: the events
-- after it (counting at most `cap` rows) and the time of the first of them (its row's).
CREATE FUNCTION flowforge.outbox_lag(last_xid xid8, last_position bigint, cap integer)
RETURNS TABLE (events bigint, oldest timestamptz) LANGUAGE sql STABLE AS $$
    WITH unread AS (
        SELECT p.xid, p.position, p.time,
               CASE WHEN p.xid = last_xid AND p.position <= last_position
                    THEN greatest(0, p.position + flowforge.outbox_count(p.events) - 1
                                     - last_position)
                    ELSE flowforge.outbox_count(p.events) END AS n
        FROM flowforge.outbox_packed p
        WHERE p.xid >= last_xid
          AND (p.xid, p.position) > (last_xid, last_position - 1024)
    )
    SELECT (SELECT least(coalesce(sum(u.n), 0), cap)::bigint
            FROM (SELECT n FROM unread LIMIT cap) u),
           (SELECT u.time FROM unread u WHERE u.n > 0 ORDER BY u.xid, u.position LIMIT 1)
$$;

-- One row per event, with the columns the table had. `run_id` and `xid` are the row's
-- columns, so a query by run (or by xid) uses the row's index.
CREATE VIEW flowforge.outbox AS
SELECT u.position, p.run_id, u.seq, u.type, u.time, u.data, p.traceparent, p.published_at,
       u.step_id, u.attempt_id, u.from_status, u.to_status, p.xid
FROM flowforge.outbox_packed p
CROSS JOIN LATERAL flowforge.outbox_unpack(p.events, p.seq, p.position, p.time) u;

CREATE FUNCTION flowforge.outbox_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO flowforge.outbox_packed (run_id, xid, time, seq, traceparent, published_at,
                                             events)
        VALUES (NEW.run_id, coalesce(NEW.xid, pg_current_xact_id()), NEW.time, NEW.seq,
                NEW.traceparent, NEW.published_at,
                concat_ws(E'\t', NEW.type, '0', coalesce(NEW.step_id, ''),
                          coalesce(rtrim(encode(uuid_send(NEW.attempt_id), 'base64'), '='), ''),
                          coalesce(NEW.from_status, ''), NEW.to_status,
                          coalesce(NEW.data, '{}'::jsonb)::text));
        RETURN NEW;
    ELSIF TG_OP = 'UPDATE' THEN
        IF (NEW.position, NEW.run_id, NEW.seq, NEW.type, NEW.time, NEW.data, NEW.traceparent,
            NEW.step_id, NEW.attempt_id, NEW.from_status, NEW.to_status, NEW.xid)
           IS DISTINCT FROM
           (OLD.position, OLD.run_id, OLD.seq, OLD.type, OLD.time, OLD.data, OLD.traceparent,
            OLD.step_id, OLD.attempt_id, OLD.from_status, OLD.to_status, OLD.xid) THEN
            RAISE EXCEPTION 'outbox events are not changed: only published_at may be set'
                USING ERRCODE = 'feature_not_supported';
        END IF;
        -- The row holding the event (the events of a row share published_at).
        UPDATE flowforge.outbox_packed p SET published_at = NEW.published_at
        WHERE p.run_id = OLD.run_id
          AND p.seq = (SELECT max(q.seq) FROM flowforge.outbox_packed q
                       WHERE q.run_id = OLD.run_id AND q.seq <= OLD.seq);
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'outbox events are deleted with their run (retention), not one by one'
        USING ERRCODE = 'feature_not_supported';
END $$;

CREATE TRIGGER outbox_write INSTEAD OF INSERT OR UPDATE OR DELETE ON flowforge.outbox
    FOR EACH ROW EXECUTE FUNCTION flowforge.outbox_write();

-- The views the old table took with it (sql/0006, 0007, 0012).
CREATE VIEW flowforge.transitions AS
SELECT run_id, seq, step_id, attempt_id, from_status, to_status, time AS at
FROM flowforge.outbox;

-- As sql/0007 defined it (an attempt's `step.dispatched` event and the first event after it
-- of the same attempt that ends it), found in one pass over the events sorted by attempt
-- instead of a search of the run's events per attempt: unpacking rows makes each search
-- cost the run's rows, which a fan-out of thousands of attempts cannot pay.
CREATE VIEW flowforge.step_attempts AS
SELECT d.attempt_id AS id,
       d.run_id,
       d.step_id,
       (d.data ->> 'attempt')::integer AS attempt,
       d.data ->> 'type' AS step_type,
       CASE
           WHEN d.end_status IS NULL THEN 'dispatched'
           WHEN d.end_status = 'retrying' THEN coalesce(d.end_data ->> 'outcome', 'failed')
           ELSE d.end_status
       END AS status,
       d.time AS dispatched_at,
       d.end_time AS finished_at,
       d.end_data -> 'error' AS error
FROM (
    SELECT o.run_id, o.type, o.time, o.data, o.step_id, o.attempt_id,
           (array_agg(o.to_status) FILTER (WHERE o.to_status IN ('succeeded', 'failed',
                'timed_out', 'cancelled', 'retrying')) OVER later)[1] AS end_status,
           (array_agg(o.time) FILTER (WHERE o.to_status IN ('succeeded', 'failed',
                'timed_out', 'cancelled', 'retrying')) OVER later)[1] AS end_time,
           (array_agg(o.data) FILTER (WHERE o.to_status IN ('succeeded', 'failed',
                'timed_out', 'cancelled', 'retrying')) OVER later)[1] AS end_data
    FROM flowforge.outbox o
    WHERE o.attempt_id IS NOT NULL
    WINDOW later AS (PARTITION BY o.run_id, o.attempt_id ORDER BY o.seq
                     ROWS BETWEEN 1 FOLLOWING AND UNBOUNDED FOLLOWING)
) d
WHERE d.type = 'step.dispatched';

CREATE VIEW flowforge.outbox_cloudevents AS
SELECT o.position,
       o.run_id,
       o.seq,
       o.published_at,
       flowforge.outbox_envelope(o.run_id, o.seq, o.type, o.time, o.data, o.traceparent)
           AS event,
       o.xid
FROM flowforge.outbox o;

-- The feed reads rows first, by the xid index, and unpacks only those it may return: the
-- row holding the cursor (its later events may be unread) and the rows after it.
CREATE OR REPLACE FUNCTION flowforge.outbox_next(consumer text, max_events integer)
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
    WITH held AS (
        -- The row holding the cursor.
        (SELECT p.* FROM flowforge.outbox_packed p
         WHERE p.xid = cursor_xid AND p.position <= cursor_pos
         ORDER BY p.position DESC LIMIT 1)
        UNION ALL
        -- Rows from before sql/0012 (xid 0, all committed), by their own index.
        (SELECT p.* FROM flowforge.outbox_packed p
         WHERE cursor_xid = '0'::xid8 AND p.xid = '0'::xid8 AND p.position > cursor_pos
         ORDER BY p.position
         LIMIT max_events)
        UNION ALL
        (SELECT p.* FROM flowforge.outbox_packed p
         WHERE p.xid > '0'::xid8 AND p.xid >= cursor_xid
           AND (p.xid, p.position) > (cursor_xid, cursor_pos)
           AND p.xid < pg_snapshot_xmin(pg_current_snapshot())
         ORDER BY p.xid, p.position
         LIMIT max_events)
    ),
    batch AS (
        SELECT u.position, h.run_id, u.seq,
               flowforge.outbox_envelope(h.run_id, u.seq, u.type, u.time, u.data,
                                         h.traceparent) AS event,
               h.xid
        FROM held h
        CROSS JOIN LATERAL flowforge.outbox_unpack(h.events, h.seq, h.position, h.time) u
        WHERE (h.xid, u.position) > (cursor_xid, cursor_pos)
        ORDER BY h.xid, u.position
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

CREATE OR REPLACE FUNCTION flowforge.runs_forget_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM flowforge.outbox_packed o USING deleted_runs d WHERE o.run_id = d.id;
    DELETE FROM flowforge.step_results s USING deleted_runs d WHERE s.run_id = d.id;
    DELETE FROM flowforge.cancel_requests c USING deleted_runs d WHERE c.run_id = d.id;
    RETURN NULL;
END $$;
