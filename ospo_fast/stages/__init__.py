"""ospo_fast.stages: one module per OSPO stage; ``STAGES`` names the synthesis stages in order (light to import:
the command line lists them in its help)."""

STAGES = ("prompts", "perturb", "densify", "images", "questions", "vqa", "select")
