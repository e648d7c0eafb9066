"""Costly expressions evaluated in a child process that can be stopped (a deadline, a
memory cap, a result cap)."""
