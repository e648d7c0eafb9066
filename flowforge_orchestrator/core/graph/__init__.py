"""One run's graph: which steps are ready, what a result or a timer changes, when the run
ends; its nodes and lists, the join arithmetic, restoring from a checkpoint."""
