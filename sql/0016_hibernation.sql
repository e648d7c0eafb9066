-- Hibernation: a running run with nothing to do until a timer far away (a delay, a retry's
-- backoff, a wait's or the workflow's timeout) or an event leaves its orchestrator's memory.
--
-- 1. `runs.wake_at`: set, in the group commit that parks the run, to when its next timer is
--    due ('infinity' when only an event can wake it); the same statement releases the run
--    (no owner, no lease: no replica renews a lease for a run it does not hold). The status
--    stays `running`, and the run keeps its epoch, its checkpoint and its concurrency slots.
--    Any replica claims a hibernated run once `wake_at` is due (one indexed query for all
--    due runs), and the claim clears it. An event or a cancellation sets it to now().
--
-- 2. `parked_waits`: the wait steps of the hibernated runs, by (name, key), so that an event
--    finds the runs it wakes with an index probe, in the database, not in anyone's memory.
--    Written with the parking commit, deleted by the claim that wakes the run.

ALTER TABLE flowforge.runs ADD COLUMN wake_at timestamptz;

-- The due runs, earliest first; only hibernated runs have a wake-up time.
CREATE INDEX runs_wake_at ON flowforge.runs (wake_at) WHERE wake_at IS NOT NULL;

CREATE TABLE flowforge.parked_waits (
    run_id uuid NOT NULL,
    name   text NOT NULL,
    key    text
);
CREATE INDEX parked_waits_run ON flowforge.parked_waits (run_id, name);
CREATE INDEX parked_waits_key ON flowforge.parked_waits (name, key) WHERE key IS NOT NULL;

-- A run is inserted awake (0010 lists what else an insert may not choose).
CREATE FUNCTION flowforge.runs_insert_awake() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.wake_at IS NOT NULL THEN
        RAISE EXCEPTION 'a run is inserted with no wake-up time (run %)', NEW.id
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER runs_insert_awake BEFORE INSERT ON flowforge.runs
    FOR EACH ROW EXECUTE FUNCTION flowforge.runs_insert_awake();

-- Setting the cancellation flag (0002) on a hibernated run wakes it in the same update: the
-- flag's writer holds the row already, and no orchestrator holds the run to see the flag.
CREATE FUNCTION flowforge.runs_wake_cancelled() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.wake_at := now();
    PERFORM pg_notify('flowforge_runs', '');
    RETURN NEW;
END $$;

CREATE TRIGGER runs_wake_cancelled BEFORE UPDATE OF cancel_requested ON flowforge.runs
    FOR EACH ROW
    WHEN (NEW.cancel_requested AND NOT OLD.cancel_requested AND OLD.wake_at IS NOT NULL)
    EXECUTE FUNCTION flowforge.runs_wake_cancelled();

-- A deleted run takes its parked waits with it.
CREATE FUNCTION flowforge.runs_forget_parked() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM flowforge.parked_waits p USING deleted_runs d WHERE p.run_id = d.id;
    RETURN NULL;
END $$;

CREATE TRIGGER runs_forget_parked AFTER DELETE ON flowforge.runs
    REFERENCING OLD TABLE AS deleted_runs
    FOR EACH STATEMENT EXECUTE FUNCTION flowforge.runs_forget_parked();
