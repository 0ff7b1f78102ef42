"""ospo_fast.toy."""
