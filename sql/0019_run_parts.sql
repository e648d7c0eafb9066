-- Big fan-outs: their element states in parts, each written only when it changes.
--
-- A running fan-out packs one letter per element into its run's checkpoint, and the run
-- row is rewritten by every commit of the run: a commit of one result in a fan-out of n
-- elements wrote n bytes, O(n^2) over the fan-out. A fan-out of more than one part keeps
-- its letters here instead, a row per part of (up to) 1,024 elements: `letters` one per
-- element, `attempts` the attempt numbers past 1 by element index (NULL: none). The
-- checkpoint's entry keeps the fan-out's size and the part size (`ic`); the store joins
-- the parts back in when it loads a run (core/graph/checkpoint.py, `with_parts`).
--
-- Written by the orchestrator only, in the group commit's one statement and under its
-- epoch fence: a new part is inserted, a changed one updated, those of a fan-out that
-- ended deleted. Deleting the run deletes its parts. Nothing is granted to the other
-- roles (sql/roles.sql): an API inserts no state, and neither it nor a worker reads this.
CREATE TABLE flowforge.run_parts (
    run_id   uuid    NOT NULL REFERENCES flowforge.runs (id) ON DELETE CASCADE,
    step     text    NOT NULL,  -- the fan-out's node key
    part     integer NOT NULL CHECK (part >= 0),
    letters  text    NOT NULL,
    attempts jsonb,
    PRIMARY KEY (run_id, step, part)
);

-- A part is updated many times while its elements run: room on the page for the next
-- version keeps the update in place (HOT), without a new index entry (as runs, sql/0005).
ALTER TABLE flowforge.run_parts SET (fillfactor = 50);
