-- Least-privilege database roles for FlowForge: four NOLOGIN group roles, each granted what
-- its processes need and nothing more.
--
-- Not a numbered migration: later migrations add tables, so run this script again after every
-- `flowforge-orchestrator migrate`. It is idempotent and converges: it creates what is missing,
-- hands every object of schema flowforge to the orchestrator's role, revokes everything from
-- the two other roles and grants again exactly what this version lists. Run it as a superuser,
-- or as a role with CREATEROLE that owns schema flowforge and is a member of
-- flowforge_orchestrator (ALTER ... OWNER needs that):
--
--     psql "$ADMIN_DSN" -v ON_ERROR_STOP=1 -f sql/roles.sql
--     # or from Python: await flowforge_orchestrator.store.apply_roles(admin_dsn)
--
-- Then give each process a login of its own inside its group role:
--
--     CREATE ROLE flowforge_orchestrator_app LOGIN PASSWORD '...' IN ROLE flowforge_orchestrator;
--     CREATE ROLE flowforge_worker_app LOGIN PASSWORD '...' IN ROLE flowforge_worker;
--     CREATE ROLE orders_api LOGIN PASSWORD '...' IN ROLE flowforge_api;
--
-- What each role may do:
--
-- flowforge_orchestrator  owns schema flowforge and every object in it: it runs the engine,
--                         registers definitions, may apply migrations (`run --migrate`), and
--                         alone may read the engine secret that attempt tokens derive from.
-- flowforge_worker        INSERT into step_results, its columns only (the trigger NOTIFYs the
--                         orchestrators; the insert names no conflict target, so it needs no
--                         SELECT: a worker cannot read any result, not even a token); upsert
--                         its row of step_types; read schema_migrations (the start-up check).
--                         It cannot read or change a run, a definition, an attempt, the
--                         history, the outbox or the engine secret: a compromised worker can
--                         only report results, and a result counts only with the token of its
--                         attempt, which the worker learns from the signed job (sql/0011).
-- flowforge_worker also   records heartbeats through flowforge.heartbeat() (token-checked).
-- flowforge_api           send events (INSERT into events) and complete handed-off steps
--                         (INSERT into step_completions, with the attempt's token); enqueue runs (INSERT of the enqueue contract's columns only: id,
--                         workflow_name, workflow_version, input, idempotency_key, traceparent,
--                         so it cannot forge a status, an owner or a checkpoint); read runs and
--                         definitions; request cancellation (INSERT into cancel_requests of
--                         run_id and reason). It may not update or lock a run row: without
--                         UPDATE on runs, `SELECT ... FOR UPDATE|SHARE` is refused too.
-- flowforge_relay         read the outbox feed (sql/0012): EXECUTE flowforge.outbox_next, which
--                         reads the CloudEvents view and moves the consumer's cursor (SELECT
--                         and UPDATE of the cursor columns of outbox_consumers); LISTEN needs
--                         nothing. A relay still marking `published_at` may do that too (and
--                         read the view and the outbox's keys). It cannot read runs, results,
--                         definitions or the engine secret, write an event, or register or drop
--                         a consumer: registering holds back retention, so the schema's owner
--                         does it (`flowforge_orchestrator.client.register_consumer`). Not
--                         checked by `doctor`, which checks the three roles above.
--
-- PUBLIC gets nothing in schema flowforge: no table, no sequence, and no EXECUTE on any
-- function (PostgreSQL grants EXECUTE to PUBLIC on every new function; this script takes it
-- back, so run it after each migration). Triggers do not need EXECUTE of whoever fires
-- them, and run with the rights of the statement that fires them; none needs SECURITY
-- DEFINER: runs_pin_version reads workflow_definitions and events_check_run reads runs
-- (which the API may read anyway), and the notify triggers only call pg_notify (NOTIFY
-- needs no privilege). One function is SECURITY DEFINER, on purpose: flowforge.heartbeat,
-- which records only heartbeats whose attempt token it verifies with the engine secret.

BEGIN;

DO $$
BEGIN
    -- Two runs at once on one database would race on the same ACLs; take turns.
    PERFORM pg_advisory_xact_lock(hashtext('flowforge_orchestrator roles.sql'));
    IF to_regclass('flowforge.runs') IS NULL THEN
        RAISE EXCEPTION 'schema flowforge is not migrated: run `flowforge-orchestrator migrate` first';
    END IF;
END $$;

-- The group roles. Roles belong to the whole cluster, so a run on another database may be
-- creating them at this very moment: losing that race is fine.
DO $$
DECLARE
    name text;
BEGIN
    FOREACH name IN ARRAY ARRAY['flowforge_orchestrator', 'flowforge_worker', 'flowforge_api',
                                'flowforge_relay'] LOOP
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = name) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', name);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;
            END;
        END IF;
    END LOOP;
END $$;

-- The orchestrator owns the schema and everything in it, including what later migrations
-- created (as whichever login ran them). Sequences that belong to a column (identity, serial)
-- and indexes follow their table.
DO $$
DECLARE
    obj record;
BEGIN
    ALTER SCHEMA flowforge OWNER TO flowforge_orchestrator;
    FOR obj IN
        SELECT c.oid::regclass AS name,
               CASE c.relkind WHEN 'S' THEN 'SEQUENCE' WHEN 'v' THEN 'VIEW'
                              WHEN 'm' THEN 'MATERIALIZED VIEW' WHEN 'f' THEN 'FOREIGN TABLE'
                              WHEN 'c' THEN 'TYPE' ELSE 'TABLE' END AS kind
        FROM pg_class c
        WHERE c.relnamespace = 'flowforge'::regnamespace
          AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S', 'c')
          AND NOT EXISTS (
              SELECT FROM pg_depend d
              WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i'))
    LOOP
        EXECUTE format('ALTER %s %s OWNER TO flowforge_orchestrator', obj.kind, obj.name);
    END LOOP;
    FOR obj IN
        SELECT p.oid::regprocedure AS name,
               CASE p.prokind WHEN 'p' THEN 'PROCEDURE' WHEN 'a' THEN 'AGGREGATE'
                              ELSE 'FUNCTION' END AS kind
        FROM pg_proc p WHERE p.pronamespace = 'flowforge'::regnamespace
    LOOP
        EXECUTE format('ALTER %s %s OWNER TO flowforge_orchestrator', obj.kind, obj.name);
    END LOOP;
    FOR obj IN
        SELECT t.oid::regtype AS name, CASE t.typtype WHEN 'd' THEN 'DOMAIN' ELSE 'TYPE' END AS kind
        FROM pg_type t
        WHERE t.typnamespace = 'flowforge'::regnamespace AND t.typtype IN ('d', 'e', 'r')
    LOOP
        EXECUTE format('ALTER %s %s OWNER TO flowforge_orchestrator', obj.kind, obj.name);
    END LOOP;
    -- Only needed where PUBLIC lost CONNECT; granted when this runner is allowed to.
    IF has_database_privilege(current_database(), 'CONNECT WITH GRANT OPTION') THEN
        EXECUTE format(
            'GRANT CONNECT ON DATABASE %I TO flowforge_orchestrator, flowforge_worker, flowforge_api, '
            'flowforge_relay',
            current_database());
    END IF;
END $$;

-- Start the two restricted roles (and PUBLIC) from nothing, so a re-run also takes back what
-- an older version of this script granted. Column privileges go with their table's.
REVOKE ALL ON ALL TABLES IN SCHEMA flowforge FROM PUBLIC, flowforge_worker, flowforge_api,
    flowforge_relay;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA flowforge FROM PUBLIC, flowforge_worker, flowforge_api,
    flowforge_relay;
REVOKE ALL ON ALL ROUTINES IN SCHEMA flowforge FROM PUBLIC, flowforge_worker, flowforge_api,
    flowforge_relay;
REVOKE ALL ON SCHEMA flowforge FROM PUBLIC, flowforge_worker, flowforge_api, flowforge_relay;
GRANT USAGE ON SCHEMA flowforge TO flowforge_worker, flowforge_api, flowforge_relay;

-- Workers: report results, register the step types they serve, check the schema version.
GRANT INSERT (attempt_id, run_id, step_id, outcome, output, error, worker, started_at,
              finished_at, token)
    ON flowforge.step_results TO flowforge_worker;
-- (An upsert reads the arbiter and the `excluded` columns: SELECT of the table, which only
-- lists step type names anyway.)
GRANT SELECT, INSERT (name, worker, last_seen), UPDATE (worker, last_seen)
    ON flowforge.step_types TO flowforge_worker;
GRANT SELECT ON flowforge.schema_migrations TO flowforge_worker;
-- Heartbeats go through a function that checks each attempt's token (sql/0013): no access
-- to the table itself.
GRANT EXECUTE ON FUNCTION flowforge.heartbeat(uuid[], uuid[], bytea[], jsonb[]) TO flowforge_worker;

-- The API: enqueue, read runs and definitions, request cancellation.
GRANT SELECT ON flowforge.runs, flowforge.workflow_definitions TO flowforge_api;
GRANT INSERT (id, workflow_name, workflow_version, input, idempotency_key, traceparent)
    ON flowforge.runs TO flowforge_api;
GRANT INSERT (run_id, reason) ON flowforge.cancel_requests TO flowforge_api;
-- Events and outside completions (sql/0013); reading events back is for people and `runs
-- show`, through the orchestrator's role.
-- (SELECT of the id column only: `INSERT ... RETURNING id` tells the sender its row's id.)
GRANT INSERT (run_id, name, key, payload), SELECT (id) ON flowforge.events TO flowforge_api;
GRANT INSERT (attempt_id, token, output, error), SELECT (id)
    ON flowforge.step_completions TO flowforge_api;

-- Relays: the outbox feed (and the older published_at marking).
GRANT EXECUTE ON FUNCTION flowforge.outbox_next(text, integer) TO flowforge_relay;
GRANT SELECT ON flowforge.outbox_cloudevents TO flowforge_relay;
GRANT SELECT (name, last_xid, last_position, read_at, events_read),
      UPDATE (last_xid, last_position, read_at, events_read)
    ON flowforge.outbox_consumers TO flowforge_relay;
GRANT SELECT (position, run_id, seq, published_at), UPDATE (published_at)
    ON flowforge.outbox TO flowforge_relay;
-- The rows under the views (sql/0017): what the CloudEvents view shows, packed; the feed and
-- the published_at trigger read them as the relay, and the views' functions run as it.
GRANT SELECT, UPDATE (published_at) ON flowforge.outbox_packed TO flowforge_relay;
GRANT EXECUTE ON FUNCTION flowforge.outbox_unpack(text, integer, bigint, timestamptz),
                          flowforge.outbox_envelope(uuid, integer, text, timestamptz, jsonb, text),
                          flowforge.outbox_word(text), flowforge.outbox_uuid(text),
                          flowforge.outbox_data(text, text), flowforge.outbox_parent(uuid),
                          flowforge.outbox_write()
    TO flowforge_relay;

COMMIT;
