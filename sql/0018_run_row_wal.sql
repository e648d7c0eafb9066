-- Less WAL per step from the run row.
--
-- 1. No BEFORE UPDATE row trigger on runs, again (sql/0008).
--
-- The wake-up of a hibernated run by its cancellation flag (sql/0016) was a BEFORE UPDATE
-- row trigger: with one on the table, PostgreSQL locks every row an UPDATE touches before
-- the trigger's column list and WHEN are looked at, so every group commit wrote a lock
-- record per run (~69 B of WAL per step at workload 1, one per commit). It becomes an
-- AFTER trigger, which fires only when cancel_requested is set on a hibernated run, and
-- sets wake_at with an update of its own in the same transaction. It runs as the owner of
-- the schema, because an API role may set cancel_requested but not `wake_at`.

DROP TRIGGER runs_wake_cancelled ON flowforge.runs;
DROP FUNCTION flowforge.runs_wake_cancelled();

CREATE FUNCTION flowforge.runs_wake_cancelled() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    UPDATE flowforge.runs SET wake_at = now() WHERE id = NEW.id AND wake_at IS NOT NULL;
    PERFORM pg_notify('flowforge_runs', '');
    RETURN NULL;
END $$;

CREATE TRIGGER runs_wake_cancelled AFTER UPDATE OF cancel_requested ON flowforge.runs
    FOR EACH ROW
    WHEN (NEW.cancel_requested AND NOT OLD.cancel_requested AND OLD.wake_at IS NOT NULL)
    EXECUTE FUNCTION flowforge.runs_wake_cancelled();

-- 2. No `runs_pending`: every run's insert added an entry to it (~13 B of WAL per step), and
--    nothing needs it. The claim reads `runs_claimable` (sql/0003); the gauge's count of
--    pending runs and `runs list --status pending` read `runs_status_created`, whose
--    leading column is the status.
DROP INDEX flowforge.runs_pending;
