-- Results are notified once per statement, not once per row.
--
-- A worker stores the results that finish together in one INSERT, and the orchestrator
-- fetches them together; a notification per row cost PostgreSQL a trigger call and a
-- queued notification each, and the orchestrator a callback each. The payload is now the
-- comma-separated attempt ids of up to 200 rows (7.4 KB, under PostgreSQL's 8000-byte
-- limit); a statement of more rows sends one notification per 200. Only rows actually
-- inserted are named (ON CONFLICT DO NOTHING leaves the others out).

DROP TRIGGER step_results_notify ON flowforge.step_results;

CREATE OR REPLACE FUNCTION flowforge.step_results_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    ids text;
BEGIN
    FOR ids IN
        SELECT string_agg(attempt_id::text, ',')
        FROM (SELECT attempt_id, (row_number() OVER () - 1) / 200 AS chunk
              FROM new_results) numbered
        GROUP BY chunk
    LOOP
        PERFORM pg_notify('flowforge_results', ids);
    END LOOP;
    RETURN NULL;
END $$;

CREATE TRIGGER step_results_notify AFTER INSERT ON flowforge.step_results
    REFERENCING NEW TABLE AS new_results
    FOR EACH STATEMENT EXECUTE FUNCTION flowforge.step_results_notify();
