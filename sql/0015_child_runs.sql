-- Child runs: a `workflow` step's attempt starts a run of another workflow.
--
-- The child is an ordinary run (pending, claimed like any, under its own definition's
-- limits), inserted by the group commit that records the parent's attempt, under an id
-- derived from that attempt (`ON CONFLICT DO NOTHING`: a replay inserts no second one).
-- The commit that ends a child writes the result of its parent's attempt into
-- `step_results`, in the child's final transaction: the parent's owner is woken by the
-- results notification, as by a worker's result, and applies it exactly once.

ALTER TABLE flowforge.runs
    ADD COLUMN parent_run_id     uuid,
    ADD COLUMN parent_step       text,
    ADD COLUMN parent_attempt_id uuid,
    ADD COLUMN depth             integer NOT NULL DEFAULT 0 CHECK (depth >= 0),
    ADD CONSTRAINT runs_parent_whole CHECK (
        (parent_run_id IS NULL) = (parent_attempt_id IS NULL)
        AND (parent_run_id IS NULL) = (parent_step IS NULL));

-- `runs list --parent`, and a parent's children under its steps in `runs show`.
CREATE INDEX runs_parent ON flowforge.runs (parent_run_id, created_at)
    WHERE parent_run_id IS NOT NULL;

-- The error a parent's step fails with when its child failed or was cancelled: the
-- child's own error is in `details.error`. A failed child may be retried (per the step's
-- `retry_on`); a child cancelled on its own is not, unless `retry_on` names it.
CREATE FUNCTION flowforge.child_error(child uuid, workflow text, step text, status text,
                                      error jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
SELECT jsonb_build_object(
    'category', CASE WHEN status = 'cancelled' THEN 'child_cancelled' ELSE 'child_failed' END,
    'message', format('step %L: child run %s of workflow %L %s: %s', step, child, workflow,
                      CASE WHEN status = 'cancelled' THEN 'was cancelled' ELSE 'failed' END,
                      coalesce(error ->> 'message', status)),
    'retryable', status <> 'cancelled',
    'details', jsonb_build_object('child_run_id', child, 'workflow', workflow,
                                  'error', error))
$$;

-- The error of a workflow step whose workflow (or version) is not registered: written as
-- its attempt's result instead of a child run, so only that step fails.
CREATE FUNCTION flowforge.child_unknown(step text, workflow text, version integer)
RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
SELECT jsonb_build_object(
    'category', 'definition_error',
    'message', format('step %L: workflow %L%s is not registered (flowforge-orchestrator '
                      'definitions apply FILE)', step, workflow,
                      CASE WHEN version IS NULL THEN '' ELSE ' version ' || version END),
    'retryable', false,
    'details', jsonb_build_object('workflow', workflow, 'version', version))
$$;

-- The CloudEvents of a child run carry its parent's run id, as the extension attribute
-- `parentrunid` (absent for a run started on its own).
CREATE OR REPLACE VIEW flowforge.outbox_cloudevents AS
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
       ) || CASE WHEN o.traceparent IS NULL THEN '{}'::jsonb
                 ELSE jsonb_build_object('traceparent', o.traceparent) END
         || coalesce((SELECT jsonb_build_object('parentrunid', r.parent_run_id::text)
                      FROM flowforge.runs r
                      WHERE r.id = o.run_id AND r.parent_run_id IS NOT NULL),
                     '{}'::jsonb) AS event,
       o.xid
FROM flowforge.outbox o;
