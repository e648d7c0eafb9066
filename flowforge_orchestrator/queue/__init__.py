"""The only arq code: jobs (signed), their dispatch, and the worker woken by enqueues."""
