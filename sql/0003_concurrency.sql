-- Concurrency limits: `max_concurrency` (running runs of one workflow) and `concurrency:
-- {key, limit}` (running runs, of any workflow, whose key has the same value).
--
-- A limit is a key: `workflow:<name>` for max_concurrency, `key:<JSON of the value>` for a
-- concurrency key. The orchestrator computes a pending run's keys when it claims the run and
-- calls flowforge.acquire_concurrency() in the claim transaction: the run takes a slot of
-- every key, or of none and waits (`waiting`, skipped by the claim query) in the FIFO queue
-- of each key. When a run that has keys ends (completed, failed, cancelled, or its row is
-- deleted), the trigger below frees its slots and queue places, and un-blocks the runs that
-- now fit, in FIFO order, with a NOTIFY so that an orchestrator claims them at once.
--
-- Every change to a key's slots and queue happens under a transaction advisory lock on that
-- key. A claim takes the locks of all its keys at once, and so does a statement that ends
-- runs, in one global order (by lock id), so they do not deadlock each other; and a release
-- waits for a claim holding its key, so a run refused a slot is always woken when it frees.
--
--   -- who holds a key, who waits for it:
--   SELECT * FROM flowforge.concurrency_slots WHERE key = 'workflow:order-fulfilment';
--   SELECT * FROM flowforge.concurrency_queue WHERE key = 'key:"customer-42"'
--       ORDER BY created_at, run_id;

ALTER TABLE flowforge.runs
    ADD COLUMN concurrency_keys text[],                   -- set when it first tries to start
    ADD COLUMN waiting          boolean NOT NULL DEFAULT false;  -- blocked on a full key

-- The claim query reads only runs that may start; blocked ones never fill a claim batch.
CREATE INDEX runs_claimable ON flowforge.runs (created_at)
    WHERE status = 'pending' AND NOT waiting;

-- Slots held: one row per key per running run. A key's count is its running runs.
-- (No foreign key: the trigger below removes the rows of a run that ends or is deleted, and
-- a foreign key would make every delete of an old run scan these tables.)
CREATE TABLE flowforge.concurrency_slots (
    key    text NOT NULL,
    run_id uuid NOT NULL,
    PRIMARY KEY (key, run_id)
);

-- The wait queue of each key: pending runs that were refused a slot (whether blocked or
-- already un-blocked and about to be claimed), in FIFO order, with the limit each run's own
-- definition declares for that key.
CREATE TABLE flowforge.concurrency_queue (
    key        text        NOT NULL,
    run_id     uuid        NOT NULL,
    created_at timestamptz NOT NULL,
    max_slots  integer     NOT NULL CHECK (max_slots > 0),
    PRIMARY KEY (key, run_id)
);
CREATE INDEX concurrency_queue_fifo ON flowforge.concurrency_queue (key, created_at, run_id);

-- Serialize on keys, always in the order of their lock ids. The two-integer form keeps these
-- locks apart from the single-bigint ones (the migration runner's).
CREATE FUNCTION flowforge.lock_concurrency_keys(p_keys text[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    lock_id integer;
BEGIN
    FOR lock_id IN SELECT DISTINCT hashtext(k) FROM unnest(p_keys) AS k ORDER BY 1 LOOP
        PERFORM pg_advisory_xact_lock(1181115235, lock_id);  -- 0x46666363, "Ffcc"
    END LOOP;
END $$;

-- Take the slots of a batch of claimed pending runs (locked FOR UPDATE by the caller): the
-- arrays hold one element per (run, key, limit). Runs are served oldest first. A run gets a
-- slot of every key, or of none: it may take a key only while the runs holding it plus the
-- older runs queued for it are fewer than its limit, so a new run never overtakes an older
-- waiting one. A refused run joins the queue of each of its keys and is marked `waiting`.
CREATE FUNCTION flowforge.acquire_concurrency(p_run_ids uuid[], p_keys text[], p_limits integer[])
RETURNS TABLE (run_id uuid, admitted boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    r record;
    ok boolean;
    done_ids uuid[] := '{}';
    done_oks boolean[] := '{}';
BEGIN
    PERFORM flowforge.lock_concurrency_keys(p_keys);
    FOR r IN
        SELECT x.id, x.created_at,
               array_agg(k.key ORDER BY k.key) AS keys,
               array_agg(k.lim ORDER BY k.key) AS limits
        FROM unnest(p_run_ids, p_keys, p_limits) AS k(id, key, lim)
        JOIN flowforge.runs x ON x.id = k.id
        WHERE x.status = 'pending'
        GROUP BY x.id
        ORDER BY x.created_at, x.id
    LOOP
        -- Counting stops at the limit: a long queue costs no more than a short one.
        ok := NOT EXISTS (
            SELECT FROM unnest(r.keys, r.limits) AS k(key, lim)
            WHERE (SELECT count(*) FROM (SELECT FROM flowforge.concurrency_slots s
                                         WHERE s.key = k.key LIMIT k.lim) held)
                + (SELECT count(*) FROM (SELECT FROM flowforge.concurrency_queue q
                                         WHERE q.key = k.key
                                           AND (q.created_at, q.run_id) < (r.created_at, r.id)
                                         LIMIT k.lim) ahead)
                >= k.lim);
        IF ok THEN
            INSERT INTO flowforge.concurrency_slots (key, run_id)
            SELECT k, r.id FROM unnest(r.keys) AS k
            ON CONFLICT DO NOTHING;
            DELETE FROM flowforge.concurrency_queue q WHERE q.key = ANY (r.keys) AND q.run_id = r.id;
        ELSE
            INSERT INTO flowforge.concurrency_queue (key, run_id, created_at, max_slots)
            SELECT k.key, r.id, r.created_at, k.lim FROM unnest(r.keys, r.limits) AS k(key, lim)
            ON CONFLICT DO NOTHING;
        END IF;
        done_ids := done_ids || r.id;
        done_oks := done_oks || ok;
        run_id := r.id;
        admitted := ok;
        RETURN NEXT;
    END LOOP;
    -- One statement for the batch (each UPDATE of runs fires the release trigger once).
    UPDATE flowforge.runs x
    SET waiting = NOT d.ok,
        concurrency_keys = (SELECT array_agg(DISTINCT k.key ORDER BY k.key)
                            FROM unnest(p_run_ids, p_keys) AS k(id, key) WHERE k.id = d.id)
    FROM unnest(done_ids, done_oks) AS d(id, ok)
    WHERE x.id = d.id;
END $$;

-- Free the slots and queue places of runs that ended (or were deleted), then un-block, for
-- each freed key, the queued runs that now fit: walking the queue in FIFO order, the i-th
-- queued run fits while holders + i < its limit. The walk stops at the first that does not,
-- so a key's waiters are started in order and no run overtakes an older one.
CREATE FUNCTION flowforge.release_concurrency() RETURNS trigger
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    ended_ids uuid[];
    ended_keys text[];
    freed text[];
    wake uuid[] := '{}';
    k text;
    e record;
    held bigint;
    ahead integer;
BEGIN
    IF TG_OP = 'UPDATE' THEN
        SELECT array_agg(f.id), array_agg(f.key) INTO ended_ids, ended_keys
        FROM (SELECT n.id, unnest(n.concurrency_keys) AS key
              FROM new_runs n JOIN old_runs o ON o.id = n.id
              WHERE n.concurrency_keys IS NOT NULL
                AND n.status IN ('completed', 'failed', 'cancelled')
                AND o.status NOT IN ('completed', 'failed', 'cancelled')) f;
    ELSE
        SELECT array_agg(f.id), array_agg(f.key) INTO ended_ids, ended_keys
        FROM (SELECT o.id, unnest(o.concurrency_keys) AS key
              FROM old_runs o
              WHERE o.concurrency_keys IS NOT NULL
                AND o.status NOT IN ('completed', 'failed', 'cancelled')) f;
    END IF;
    IF ended_ids IS NULL THEN
        RETURN NULL;
    END IF;
    freed := ARRAY(SELECT DISTINCT f FROM unnest(ended_keys) AS f ORDER BY 1);
    PERFORM flowforge.lock_concurrency_keys(freed);
    DELETE FROM flowforge.concurrency_slots s USING unnest(ended_ids, ended_keys) AS f(id, key)
    WHERE s.key = f.key AND s.run_id = f.id;
    DELETE FROM flowforge.concurrency_queue q USING unnest(ended_ids, ended_keys) AS f(id, key)
    WHERE q.key = f.key AND q.run_id = f.id;
    FOREACH k IN ARRAY freed LOOP
        held := (SELECT count(*) FROM flowforge.concurrency_slots s WHERE s.key = k);
        ahead := 0;
        FOR e IN
            SELECT q.run_id, q.max_slots FROM flowforge.concurrency_queue q
            WHERE q.key = k ORDER BY q.created_at, q.run_id
        LOOP
            EXIT WHEN held + ahead >= e.max_slots;
            wake := wake || e.run_id;
            ahead := ahead + 1;
        END LOOP;
    END LOOP;
    -- (An ended run is no longer blocked either: a redrive makes it pending again.)
    UPDATE flowforge.runs x SET waiting = false
    WHERE (x.id = ANY (wake) OR x.id = ANY (ended_ids)) AND x.waiting;
    IF FOUND THEN
        PERFORM pg_notify('flowforge_runs', '');
    END IF;
    RETURN NULL;
END $$;

-- Statement triggers, so that one group commit frees all its keys under one ordered set of
-- locks. (Transition tables rule out `UPDATE OF status`: the function filters instead.)
CREATE TRIGGER runs_release_concurrency AFTER UPDATE ON flowforge.runs
    REFERENCING OLD TABLE AS old_runs NEW TABLE AS new_runs
    FOR EACH STATEMENT EXECUTE FUNCTION flowforge.release_concurrency();

CREATE TRIGGER runs_release_concurrency_deleted AFTER DELETE ON flowforge.runs
    REFERENCING OLD TABLE AS old_runs
    FOR EACH STATEMENT EXECUTE FUNCTION flowforge.release_concurrency();

-- A blocked run whose cancellation is requested must be claimed to be cancelled: un-block it
-- (0002's trigger sends the NOTIFY that wakes the claim).
CREATE FUNCTION flowforge.unblock_cancelled() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.waiting := false;
    RETURN NEW;
END $$;

CREATE TRIGGER runs_unblock_cancelled BEFORE UPDATE OF cancel_requested ON flowforge.runs
    FOR EACH ROW WHEN (NEW.cancel_requested AND NEW.waiting)
    EXECUTE FUNCTION flowforge.unblock_cancelled();
