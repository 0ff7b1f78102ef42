"""ospo_fast.stages."""
