-- No planner statistics for the columns that hold payloads.
--
-- These columns are only ever read whole, by a row's key: no plan filters or joins on them,
-- so their statistics are never used. Yet each ANALYZE (autovacuum runs one on `runs` every
-- ~10% of its rows changed) stores up to 100 most common values and a 101-value histogram
-- of each, whole (values under 1 KB), in `pg_statistic` and its TOAST table: an ANALYZE of
-- 1,000 small benchmark runs wrote 11-13 KB of WAL with them, 6-9 KB without; payloads of
-- a few hundred bytes can make it up to ~100 KB a column (200 values).
-- A statistics target of 0 makes ANALYZE skip a column.

ALTER TABLE flowforge.runs
    ALTER COLUMN input SET STATISTICS 0,
    ALTER COLUMN output SET STATISTICS 0,
    ALTER COLUMN error SET STATISTICS 0,
    ALTER COLUMN checkpoint SET STATISTICS 0,
    ALTER COLUMN traceparent SET STATISTICS 0;

ALTER TABLE flowforge.step_results
    ALTER COLUMN output SET STATISTICS 0,
    ALTER COLUMN error SET STATISTICS 0,
    ALTER COLUMN token SET STATISTICS 0;

ALTER TABLE flowforge.outbox_packed
    ALTER COLUMN events SET STATISTICS 0,
    ALTER COLUMN traceparent SET STATISTICS 0;

ALTER TABLE flowforge.run_parts
    ALTER COLUMN letters SET STATISTICS 0,
    ALTER COLUMN attempts SET STATISTICS 0;

ALTER TABLE flowforge.events
    ALTER COLUMN payload SET STATISTICS 0;

-- Statistics gathered before stay in pg_statistic (ANALYZE leaves a skipped column's row
-- alone, so it is never written again); deleting them would take a superuser.
