-- An unknown workflow is refused at insert, in the inserting transaction: the API learns at
-- once (its transaction aborts, nothing half-done), instead of a run accepted and failed
-- later with "no registered definition". Same for a version that is not registered.
--
-- The error is foreign_key_violation (23503): the row names a definition that does not
-- exist. Its message names the workflow; its HINT lists up to 5 registered names that
-- start alike or are close (the CLI and `client.enqueue` say "did you mean" before
-- inserting).

CREATE OR REPLACE FUNCTION flowforge.runs_pin_version() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    known text;
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
        IF NEW.workflow_version IS NULL THEN
            SELECT string_agg(quote_literal(name), ', ') INTO known FROM (
                SELECT DISTINCT name FROM flowforge.workflow_definitions
                WHERE lower(left(name, 3)) = lower(left(NEW.workflow_name, 3))
                   OR strpos(lower(name), lower(NEW.workflow_name)) > 0
                   OR strpos(lower(NEW.workflow_name), lower(name)) > 0
                ORDER BY name LIMIT 5) AS alike;
            RAISE EXCEPTION 'workflow % is not registered', quote_literal(NEW.workflow_name)
                USING ERRCODE = 'foreign_key_violation',
                      HINT = coalesce('registered workflows with a similar name: ' || known,
                                      'register it first: flowforge-orchestrator definitions apply FILE');
        END IF;
    ELSIF NOT EXISTS (SELECT FROM flowforge.workflow_definitions
                      WHERE name = NEW.workflow_name AND version = NEW.workflow_version) THEN
        RAISE EXCEPTION 'workflow % version % is not registered',
                        quote_literal(NEW.workflow_name), NEW.workflow_version
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NEW;
END $$;
