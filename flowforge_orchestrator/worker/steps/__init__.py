"""The built-in step types a worker runs."""
