"""The chaos run: `python -m tests.chaos` (`just chaos`); see `tests.chaos.harness`."""
