"""ospo_fast.train."""
