-- Waiting on the outside world: events, steps completed from outside, heartbeats.
--
-- 1. `events`: an event arrives as a row, inserted in the sender's own transaction, so
--    "record the payment and wake the order workflow" commits or rolls back as one.
--    Addressed to one run (run_id) or, by correlation key (name + key), to every run that
--    waits or will wait on that name and key:
--
--        INSERT INTO flowforge.events (run_id, name, payload) VALUES ($1, 'approved', $2);
--        INSERT INTO flowforge.events (name, key, payload) VALUES ('paid', $1, $2);
--
--    An event for a run id that does not exist is refused in the inserting transaction. A
--    statement trigger NOTIFYs `flowforge_events` with the new ids' range when the
--    transaction commits; the orchestrators also look again at recent events on a slow
--    poll (a missed notification). Events are never updated: what a run took is recorded in
--    `event_consumptions`, so one keyed event can wake many runs, each once.
--
-- 2. `event_consumptions`: written by the orchestrator in the group commit that finishes the
--    wait step (the same transaction as its transition), one row per (run, event): an event
--    is taken by at most one wait step of a run, and a replay after a crash takes the same
--    event (the oldest the run has not taken), never a second one.
--
-- 3. `step_completions`: a step may hand its work to another system and return without a
--    result (the worker reports outcome `handed_off`); the attempt then waits, within its
--    step's timeout, for a completion row carrying its attempt id and its completion token
--    (the attempt's 16-byte token, given to the step as `ctx.completion_token`, hex). Attempt
--    ids are derived from run ids, so the id alone would let anyone who saw a run id finish
--    its steps: the token makes the completion unguessable. The first verified completion
--    wins; a late, duplicate or forged one changes nothing (and stays visible).
--
-- 4. `heartbeats`: the last heartbeat of an attempt (details and time), written by workers in
--    batches through `flowforge.heartbeat()`, which checks each attempt's token. Workers have
--    no SELECT on the table: the function is SECURITY DEFINER, owned by the orchestrator's
--    role, and verifies tokens with the engine secret that only that role can read.

CREATE TABLE flowforge.events (
    id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id     uuid,
    name       text        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    key        text        CHECK (length(key) <= 1000),
    payload    jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT events_one_address CHECK ((run_id IS NULL) <> (key IS NULL))
);
CREATE INDEX events_by_run ON flowforge.events (run_id, name, id) WHERE run_id IS NOT NULL;
CREATE INDEX events_by_key ON flowforge.events (name, key, id) WHERE key IS NOT NULL;
-- Expiry of keyed events (FLOWFORGE_EVENT_RETENTION) and the slow poll's recent window.
CREATE INDEX events_created ON flowforge.events (created_at);

-- No foreign key to runs: checking one would lock the run's row (KEY SHARE) for as long as
-- the sender's transaction lasts. A plain read refuses unknown ids without a lock.
CREATE FUNCTION flowforge.events_check_run() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.run_id IS NOT NULL
       AND NOT EXISTS (SELECT FROM flowforge.runs WHERE id = NEW.run_id) THEN
        RAISE EXCEPTION 'event %: there is no run %', NEW.name, NEW.run_id
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER events_check_run BEFORE INSERT ON flowforge.events
    FOR EACH ROW EXECUTE FUNCTION flowforge.events_check_run();

-- One notification per statement: "first-last" of the ids it inserted. Ids of other
-- transactions may fall inside the range; the orchestrator matches what it reads anyway.
CREATE FUNCTION flowforge.events_notify() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    first_id bigint;
    last_id bigint;
BEGIN
    SELECT min(id), max(id) INTO first_id, last_id FROM new_events;
    IF first_id IS NOT NULL THEN
        PERFORM pg_notify('flowforge_events', first_id || '-' || last_id);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER events_notify AFTER INSERT ON flowforge.events
    REFERENCING NEW TABLE AS new_events
    FOR EACH STATEMENT EXECUTE FUNCTION flowforge.events_notify();

CREATE TABLE flowforge.event_consumptions (
    run_id      uuid        NOT NULL,
    event_id    bigint      NOT NULL,
    step_id     text        NOT NULL,
    attempt_id  uuid        NOT NULL,
    consumed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, event_id)
);
CREATE INDEX event_consumptions_event ON flowforge.event_consumptions (event_id);

-- Steps completed from outside.
ALTER TABLE flowforge.step_results DROP CONSTRAINT step_results_outcome_check;
ALTER TABLE flowforge.step_results
    ADD CONSTRAINT step_results_outcome_check
    CHECK (outcome IN ('succeeded', 'failed', 'handed_off'));

CREATE TABLE flowforge.step_completions (
    id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    attempt_id uuid        NOT NULL,
    token      text        NOT NULL CHECK (length(token) <= 64),
    output     jsonb,
    error      jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT step_completions_one_outcome CHECK (output IS NULL OR error IS NULL)
);
CREATE INDEX step_completions_attempt ON flowforge.step_completions (attempt_id);

CREATE FUNCTION flowforge.step_completions_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('flowforge_completions', NEW.attempt_id::text);
    RETURN NULL;
END $$;

CREATE TRIGGER step_completions_notify AFTER INSERT ON flowforge.step_completions
    FOR EACH ROW EXECUTE FUNCTION flowforge.step_completions_notify();

-- Heartbeats: one row per attempt, the last one wins.
CREATE TABLE flowforge.heartbeats (
    attempt_id uuid        PRIMARY KEY,
    run_id     uuid        NOT NULL,
    details    jsonb,
    at         timestamptz NOT NULL DEFAULT now()
);

-- Records the heartbeats of many attempts in one call; a heartbeat whose token does not
-- match its attempt is dropped. Returns how many were recorded.
CREATE INDEX heartbeats_run ON flowforge.heartbeats (run_id);

CREATE FUNCTION flowforge.heartbeat(runs uuid[], attempts uuid[], tokens bytea[], details jsonb[])
RETURNS integer LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp AS $$
    WITH given AS (
        SELECT DISTINCT ON (g.attempt) g.run, g.attempt, g.details
        FROM unnest(runs, attempts, tokens, details) AS g(run, attempt, token, details)
        WHERE g.token = flowforge.attempt_token(g.attempt)
    ), written AS (
        INSERT INTO flowforge.heartbeats AS h (attempt_id, run_id, details, at)
        SELECT attempt, run, details, now() FROM given
        ON CONFLICT (attempt_id) DO UPDATE SET details = excluded.details, at = excluded.at
        RETURNING 1
    )
    SELECT count(*)::integer FROM written
$$;

-- A deleted run takes its events, what it consumed and its heartbeats with it (see 0010: a
-- new run under the same id starts afresh). Completions name only an attempt, and a new
-- run's attempt ids differ from the old one's.
CREATE FUNCTION flowforge.runs_forget_events() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM flowforge.events e USING deleted_runs d WHERE e.run_id = d.id;
    DELETE FROM flowforge.event_consumptions c USING deleted_runs d WHERE c.run_id = d.id;
    DELETE FROM flowforge.heartbeats h USING deleted_runs d WHERE h.run_id = d.id;
    RETURN NULL;
END $$;

CREATE TRIGGER runs_forget_events AFTER DELETE ON flowforge.runs
    REFERENCING OLD TABLE AS deleted_runs
    FOR EACH STATEMENT EXECUTE FUNCTION flowforge.runs_forget_events();
