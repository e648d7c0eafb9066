-- Room on each page for the next version of a row, so that updates which change no indexed
-- column stay on the page (HOT) and write no index entries: a run row is updated at every
-- commit of its run, an attempt row once when it ends. Measured with pg_walinspect under
-- the throughput benchmark: index WAL of runs and step_attempts was ~40% of their WAL.
ALTER TABLE flowforge.runs SET (fillfactor = 50);
ALTER TABLE flowforge.step_attempts SET (fillfactor = 70);
