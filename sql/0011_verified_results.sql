-- Verified results, and cancellation that takes no lock on runs.
--
-- 1. An engine secret: 32 random bytes of this database, readable by the schema's owner
--    (the orchestrator's role) and no one else (sql/roles.sql). The token of an attempt is
--    the first 16 bytes of HMAC-SHA256(secret, attempt id as its 16 bytes); it travels to
--    the worker inside the signed job and comes back with the result. A result row counts
--    only with its attempt's token, and results are keyed by (attempt_id, token): a row
--    inserted by whoever guessed an attempt id (they are derived: UUIDv5 of run, step and
--    attempt) can neither displace nor impersonate the real one.
--    `flowforge.attempt_token(id)` computes a token in SQL (the backfill below, inline
--    results, reads for people); the orchestrator computes the same in Python.
--
-- 2. `cancel_requests`: an API cancels a run by inserting a row, which locks nothing but
--    that new row. (An UPDATE of runs.cancel_requested let the API role lock run rows:
--    `SELECT ... FOR UPDATE` on one running run froze every group commit that included it.)
--    A trigger NOTIFYs `flowforge_cancel` (the owner cancels a running run) and
--    `flowforge_runs` (a pending run is claimed and cancelled). Requests stay as the record
--    of who asked and why; `handled_at` is set once the run has ended (or is redriven).
--    runs.cancel_requested stays, honoured as before, but only the owner role may set it.
--
--    INSERT INTO flowforge.cancel_requests (run_id, reason) VALUES ($1, 'customer asked');

-- 1. The engine secret, and HMAC in SQL. The pads are the key XORed with HMAC's ipad/opad,
-- computed once here, so a token costs two sha256() calls.
CREATE TABLE flowforge.engine_secret (
    only_row  boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    secret    bytea   NOT NULL CHECK (octet_length(secret) = 32),
    inner_pad bytea   NOT NULL CHECK (octet_length(inner_pad) = 64),
    outer_pad bytea   NOT NULL CHECK (octet_length(outer_pad) = 64)
);

DO $$
DECLARE
    -- gen_random_uuid() draws from the server's strong random source: 2 x 122 bits.
    secret bytea := decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''),
                           'hex');
    block bytea := secret || decode(repeat('00', 32), 'hex');
    inner_pad bytea := block;
    outer_pad bytea := block;
BEGIN
    FOR i IN 0..63 LOOP
        inner_pad := set_byte(inner_pad, i, get_byte(block, i) # 54);  -- 0x36
        outer_pad := set_byte(outer_pad, i, get_byte(block, i) # 92);  -- 0x5c
    END LOOP;
    INSERT INTO flowforge.engine_secret (secret, inner_pad, outer_pad)
    VALUES (secret, inner_pad, outer_pad);
END $$;

CREATE FUNCTION flowforge.attempt_token(attempt uuid) RETURNS bytea
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT substring(sha256(outer_pad || sha256(inner_pad || uuid_send(attempt))) FROM 1 FOR 16)
    FROM flowforge.engine_secret
$$;

-- Results: the token, filled in for the rows already there, and the new key.
ALTER TABLE flowforge.step_results ADD COLUMN token bytea;
UPDATE flowforge.step_results SET token = flowforge.attempt_token(attempt_id);
ALTER TABLE flowforge.step_results
    ALTER COLUMN token SET NOT NULL,
    ADD CONSTRAINT step_results_token_length CHECK (octet_length(token) = 16),
    DROP CONSTRAINT step_results_pkey,
    ADD CONSTRAINT step_results_pkey PRIMARY KEY (attempt_id, token);

-- 2. Cancellation requests. No foreign key: checking one would lock the run's row (KEY
-- SHARE) for as long as the API's transaction lasts.
CREATE TABLE flowforge.cancel_requests (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id       uuid        NOT NULL,
    requested_at timestamptz NOT NULL DEFAULT now(),
    reason       text        CHECK (length(reason) <= 1000),
    handled_at   timestamptz
);
-- Claims and the orchestrators' poll look only at requests not handled yet.
CREATE INDEX cancel_requests_open ON flowforge.cancel_requests (run_id) WHERE handled_at IS NULL;

CREATE FUNCTION flowforge.cancel_requests_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('flowforge_cancel', NEW.run_id::text);
    PERFORM pg_notify('flowforge_runs', '');
    RETURN NULL;
END $$;

CREATE TRIGGER cancel_requests_notify AFTER INSERT ON flowforge.cancel_requests
    FOR EACH ROW EXECUTE FUNCTION flowforge.cancel_requests_notify();
