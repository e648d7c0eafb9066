-- Attempts are read from the outbox, not written a second time.
--
-- Every attempt already has its events in the outbox, in the same transactions: the
-- `step.dispatched` event (attempt number, step type, time) and the first event that ends
-- it (`step.succeeded|failed|timed_out|cancelled`, or `step.retrying`, whose data says how
-- the attempt ended in `outcome`). The table repeated them: an insert, an update and two
-- index entries per attempt, ~400 B of WAL per step under the throughput benchmark, and a
-- key-share lock on the run row for its foreign key. `step_attempts` is now a view with
-- the table's columns; reading one run's attempts uses the outbox's (run_id, seq) key.

DROP TABLE flowforge.step_attempts;

CREATE VIEW flowforge.step_attempts AS
SELECT d.attempt_id AS id,
       d.run_id,
       d.step_id,
       (d.data ->> 'attempt')::integer AS attempt,
       d.data ->> 'type' AS step_type,
       CASE
           WHEN f.to_status IS NULL THEN 'dispatched'
           WHEN f.to_status = 'retrying' THEN coalesce(f.data ->> 'outcome', 'failed')
           ELSE f.to_status
       END AS status,
       d.time AS dispatched_at,
       f.time AS finished_at,
       f.data -> 'error' AS error
FROM flowforge.outbox d
LEFT JOIN LATERAL (
    SELECT e.to_status, e.time, e.data
    FROM flowforge.outbox e
    WHERE e.run_id = d.run_id AND e.seq > d.seq AND e.attempt_id = d.attempt_id
      AND e.to_status IN ('succeeded', 'failed', 'timed_out', 'cancelled', 'retrying')
    ORDER BY e.seq
    LIMIT 1
) f ON true
WHERE d.type = 'step.dispatched';
