"""Benchmarks: the engine against raw arq, in the same invocation (`just bench`).

    python -m tests.bench [--quick] [--repeat N] [--workloads NAME ...]

Modules: `harness` (command line, repeats, the report), `workloads` (the engine's side and
its definitions), `baseline` (the raw arq worker process and its enqueuer), `cluster`
(servers, database, processes, resets), `processes` (child processes, /proc), `report`
(figures, targets, the table), `steps` (the `noop` step type). Results of the last full
run: BENCHMARKS.md.
"""
