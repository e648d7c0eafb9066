"""The orchestrator daemon: claims runs, drives their graphs, group-commits their
transitions, dispatches their attempts, keeps its leases."""
