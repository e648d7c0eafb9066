-- Redrive (`flowforge-orchestrator runs retry RUN_ID`) runs a failed or cancelled run again
-- under the same id. A fan-out's elements then start again at attempt 1, in a new
-- generation with new attempt ids: (run, step, attempt) no longer names one attempt, the id
-- does. The index keeps the lookups of a run's attempts by step.
ALTER TABLE flowforge.step_attempts DROP CONSTRAINT step_attempts_run_id_step_id_attempt_key;
CREATE INDEX step_attempts_run_step_idx ON flowforge.step_attempts (run_id, step_id, attempt);

-- How many times each run was redriven (the checkpoint's generation, kept for queries).
ALTER TABLE flowforge.runs ADD COLUMN redrives integer NOT NULL DEFAULT 0;
