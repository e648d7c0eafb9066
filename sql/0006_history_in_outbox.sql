-- One row per transition, not two: the outbox row IS the history row.
--
-- Each transition used to be written twice in its commit, to `transitions` (history) and
-- to `outbox` (for the relay), with an index each; that was half the WAL of a step. The
-- outbox now carries the step, attempt and statuses of the transition, and `transitions`
-- is a view over it with the columns it always had. A relay marks rows published
-- (`published_at`); it must not delete them: they are the run's history (a retention job
-- may delete published rows of finished runs older than what audits need).
--
-- The outbox's key becomes (run_id, seq), which is what makes a transition exactly-once;
-- `position` stays the relay's order (its partial index finds unpublished rows).

ALTER TABLE flowforge.outbox
    ADD COLUMN step_id     text,
    ADD COLUMN attempt_id  uuid,
    ADD COLUMN from_status text,
    ADD COLUMN to_status   text;

UPDATE flowforge.outbox o
SET step_id = t.step_id, attempt_id = t.attempt_id,
    from_status = t.from_status, to_status = t.to_status
FROM flowforge.transitions t
WHERE t.run_id = o.run_id AND t.seq = o.seq;

UPDATE flowforge.outbox SET to_status = split_part(type, '.', 2) WHERE to_status IS NULL;
ALTER TABLE flowforge.outbox ALTER COLUMN to_status SET NOT NULL;

DROP TABLE flowforge.transitions;

ALTER TABLE flowforge.outbox
    DROP CONSTRAINT outbox_pkey,
    DROP CONSTRAINT outbox_run_id_seq_key,
    ADD CONSTRAINT outbox_pkey PRIMARY KEY (run_id, seq);

CREATE VIEW flowforge.transitions AS
SELECT run_id, seq, step_id, attempt_id, from_status, to_status, time AS at
FROM flowforge.outbox;
