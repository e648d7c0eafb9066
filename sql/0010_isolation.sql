-- One run's rows never touch another's.
--
-- 1. A run is inserted pending, and nothing else: no status, owner, lease, epoch or
--    checkpoint of its own choosing. An inserted `running` row with no owner would wait
--    for a lease that nobody holds; an inserted checkpoint would be trusted at claim.
--    (A redrive makes a finished run pending again by UPDATE, which this does not touch.)
--
-- 2. A deleted run takes its history (outbox) and its results with it. A new run inserted
--    under the same id must not meet the old one's rows: its first transition would
--    collide with the old (run_id, seq) keys, and the old results would answer its
--    attempts. A statement trigger, so that deleting many runs (retention) costs one
--    pass; the hot insert paths keep no foreign key.

CREATE OR REPLACE FUNCTION flowforge.runs_pin_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status <> 'pending' OR NEW.owner IS NOT NULL OR NEW.lease_expires_at IS NOT NULL
       OR NEW.epoch <> 0 OR NEW.checkpoint IS NOT NULL OR NEW.output IS NOT NULL
       OR NEW.error IS NOT NULL OR NEW.finished_at IS NOT NULL THEN
        RAISE EXCEPTION 'a run is inserted pending, with no owner, lease, epoch, checkpoint, '
                        'output, error or finish time (run %, status %)', NEW.id, NEW.status
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.workflow_version IS NULL THEN
        SELECT max(version) INTO NEW.workflow_version
        FROM flowforge.workflow_definitions WHERE name = NEW.workflow_name;
    END IF;
    RETURN NEW;
END $$;

CREATE FUNCTION flowforge.runs_forget_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM flowforge.outbox o USING deleted_runs d WHERE o.run_id = d.id;
    DELETE FROM flowforge.step_results s USING deleted_runs d WHERE s.run_id = d.id;
    RETURN NULL;
END $$;

CREATE TRIGGER runs_forget_deleted AFTER DELETE ON flowforge.runs
    REFERENCING OLD TABLE AS deleted_runs
    FOR EACH STATEMENT EXECUTE FUNCTION flowforge.runs_forget_deleted();
