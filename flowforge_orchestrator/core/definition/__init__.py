"""Workflow definitions: the pydantic models, the validation passes that name file, step
and field, and the plan a definition is compiled into once per version."""
