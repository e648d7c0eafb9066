-- FlowForge schema: definitions, runs, step attempts and results, transition history, outbox.
-- Applied by `flowforge-orchestrator migrate` in one transaction; readable and runnable with psql.

CREATE SCHEMA IF NOT EXISTS flowforge;

-- Workflow definitions: one row per (name, version); a run pins the version it started with.
CREATE TABLE flowforge.workflow_definitions (
    name            text        NOT NULL,
    version         integer     NOT NULL CHECK (version > 0),
    spec            jsonb       NOT NULL,
    max_concurrency integer     CHECK (max_concurrency > 0),
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, version)
);

-- Runs: current state in place; the checkpoint holds the run's graph state (no outputs: those
-- live in step_results, so a checkpoint stays small however large the outputs are).
CREATE TABLE flowforge.runs (
    id               uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    workflow_name    text        NOT NULL,
    workflow_version integer,
    status           text        NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'running', 'completed', 'failed', 'cancelled')),
    input            jsonb       NOT NULL DEFAULT '{}'::jsonb,
    output           jsonb,
    error            jsonb,
    checkpoint       jsonb,
    owner            text,
    lease_expires_at timestamptz,
    epoch            bigint      NOT NULL DEFAULT 0,
    idempotency_key  text,
    cancel_requested boolean     NOT NULL DEFAULT false,
    traceparent      text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now()
);

-- Idempotent enqueue: one run per key, across all workflows.
CREATE UNIQUE INDEX runs_idempotency_key ON flowforge.runs (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- Claiming pending runs in FIFO order.
CREATE INDEX runs_pending ON flowforge.runs (created_at) WHERE status = 'pending';
-- Adopting runs whose lease expired; renewing one owner's leases.
CREATE INDEX runs_running_lease ON flowforge.runs (lease_expires_at) WHERE status = 'running';
CREATE INDEX runs_running_owner ON flowforge.runs (owner) WHERE status = 'running';
-- `runs list` filters.
CREATE INDEX runs_workflow_created ON flowforge.runs (workflow_name, created_at DESC);
CREATE INDEX runs_status_created ON flowforge.runs (status, created_at DESC);

-- Pin the latest definition version at enqueue time when the API gives none. A run of an
-- unknown workflow is still accepted: the orchestrator fails it with a clear error.
CREATE FUNCTION flowforge.runs_pin_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.workflow_version IS NULL THEN
        SELECT max(version) INTO NEW.workflow_version
        FROM flowforge.workflow_definitions WHERE name = NEW.workflow_name;
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER runs_pin_version BEFORE INSERT ON flowforge.runs
    FOR EACH ROW EXECUTE FUNCTION flowforge.runs_pin_version();

-- One notification per inserting statement wakes the orchestrators; the payload is empty
-- because they claim with a query anyway.
CREATE FUNCTION flowforge.runs_notify_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('flowforge_runs', '');
    RETURN NULL;
END $$;

CREATE TRIGGER runs_notify_insert AFTER INSERT ON flowforge.runs
    FOR EACH STATEMENT EXECUTE FUNCTION flowforge.runs_notify_insert();

-- Attempts: one row per dispatch of a leaf step (the id is the arq job id).
CREATE TABLE flowforge.step_attempts (
    id            uuid        PRIMARY KEY,
    run_id        uuid        NOT NULL REFERENCES flowforge.runs (id) ON DELETE CASCADE,
    step_id       text        NOT NULL,
    attempt       integer     NOT NULL CHECK (attempt > 0),
    step_type     text        NOT NULL,
    status        text        NOT NULL
                  CHECK (status IN ('dispatched', 'succeeded', 'failed', 'timed_out', 'cancelled')),
    dispatched_at timestamptz NOT NULL,
    finished_at   timestamptz,
    error         jsonb,
    UNIQUE (run_id, step_id, attempt)
);

-- Results: written by workers (and by the orchestrator for inline steps), once per attempt.
-- No foreign key: the hot insert path of the workers stays a single-index insert.
CREATE TABLE flowforge.step_results (
    attempt_id  uuid        PRIMARY KEY,
    run_id      uuid        NOT NULL,
    step_id     text        NOT NULL,
    outcome     text        NOT NULL CHECK (outcome IN ('succeeded', 'failed')),
    output      jsonb,
    error       jsonb,
    worker      text,
    started_at  timestamptz,
    finished_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX step_results_run ON flowforge.step_results (run_id);

-- The NOTIFY is sent by the same transaction that stores the result; the payload is the
-- attempt id so the orchestrator fetches exactly what arrived.
CREATE FUNCTION flowforge.step_results_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('flowforge_results', NEW.attempt_id::text);
    RETURN NULL;
END $$;

CREATE TRIGGER step_results_notify AFTER INSERT ON flowforge.step_results
    FOR EACH ROW EXECUTE FUNCTION flowforge.step_results_notify();

-- Append-only history of every transition, one row per event, numbered per run.
CREATE TABLE flowforge.transitions (
    run_id      uuid        NOT NULL REFERENCES flowforge.runs (id) ON DELETE CASCADE,
    seq         integer     NOT NULL,
    step_id     text,
    attempt_id  uuid,
    from_status text,
    to_status   text        NOT NULL,
    at          timestamptz NOT NULL,
    PRIMARY KEY (run_id, seq)
);

-- Transactional outbox: one row per lifecycle event, in the transaction of its transition.
-- `position` orders the relay's reads; (run_id, seq) makes a double write impossible.
CREATE TABLE flowforge.outbox (
    position     bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id       uuid        NOT NULL,
    seq          integer     NOT NULL,
    type         text        NOT NULL,
    time         timestamptz NOT NULL,
    data         jsonb       NOT NULL,
    traceparent  text,
    published_at timestamptz,
    UNIQUE (run_id, seq)
);
CREATE INDEX outbox_unpublished ON flowforge.outbox (position) WHERE published_at IS NULL;

-- The outbox as CloudEvents 1.0 JSON: what a relay publishes. The id `<run id>/<seq>` is
-- unique and stable, so consumers can de-duplicate a republished event.
CREATE VIEW flowforge.outbox_cloudevents AS
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
       -- traceparent is optional in CloudEvents: present only when known. (Stripping nulls
       -- from the whole envelope would also delete nulls inside `data`.)
       ) || CASE WHEN o.traceparent IS NULL THEN '{}'::jsonb
                 ELSE jsonb_build_object('traceparent', o.traceparent) END AS event
FROM flowforge.outbox o;

-- Step types the workers serve, registered at worker start; definitions are checked against
-- them so a typo in `type` is caught before any run starts.
CREATE TABLE flowforge.step_types (
    name       text        PRIMARY KEY,
    worker     text        NOT NULL,
    last_seen  timestamptz NOT NULL DEFAULT now()
);
