"""ospo_fast.engine."""
