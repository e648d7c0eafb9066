-- Cancellation: setting runs.cancel_requested tells every orchestrator at once.
--
--   UPDATE flowforge.runs SET cancel_requested = true WHERE id = '...';
--
-- The owner of a running run cancels it (pending steps never start, running ones are
-- aborted, every open step is recorded cancelled, the run ends `cancelled` with
-- `workflow.cancelled`); a pending run is cancelled by whichever orchestrator claims it.
-- The orchestrators' slow poll covers a lost notification. Setting it on a finished run
-- changes nothing.

CREATE FUNCTION flowforge.notify_cancel() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('flowforge_cancel', NEW.id::text);
    IF NEW.status = 'pending' THEN
        PERFORM pg_notify('flowforge_runs', '');
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER runs_cancel_requested
AFTER UPDATE OF cancel_requested ON flowforge.runs
FOR EACH ROW
WHEN (NEW.cancel_requested AND NOT OLD.cancel_requested
      AND NEW.status IN ('pending', 'running'))
EXECUTE FUNCTION flowforge.notify_cancel();

-- The owner's poll for requests it may have missed.
CREATE INDEX runs_cancel_requested_idx ON flowforge.runs (owner)
    WHERE cancel_requested AND status = 'running';
