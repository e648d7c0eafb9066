-- No BEFORE UPDATE row trigger on runs.
--
-- With any BEFORE UPDATE row trigger on a table, PostgreSQL locks every row an UPDATE
-- touches before the trigger's column list and WHEN are even looked at: a lock WAL record
-- per row, at every group commit of every run (~70 B per step, and the work of the lock).
-- The un-blocking of a cancelled waiting run (sql/0003) becomes an AFTER trigger, which
-- fires only when cancel_requested changes. It runs as the owner of the schema, because
-- an API role may set cancel_requested but not `waiting`.

DROP TRIGGER runs_unblock_cancelled ON flowforge.runs;
DROP FUNCTION flowforge.unblock_cancelled();

CREATE FUNCTION flowforge.unblock_cancelled() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    UPDATE flowforge.runs SET waiting = false WHERE id = NEW.id AND waiting;
    RETURN NULL;
END $$;

CREATE TRIGGER runs_unblock_cancelled AFTER UPDATE OF cancel_requested ON flowforge.runs
    FOR EACH ROW WHEN (NEW.cancel_requested AND NEW.waiting)
    EXECUTE FUNCTION flowforge.unblock_cancelled();
