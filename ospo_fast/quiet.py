"""The one place where ospo_fast silences other libraries' messages on the command line, each by its exact text and
with the reason; the causes that were ours are fixed instead (peft's "Could not find a config file in builtin:..."
went with ``save_embedding_layers=False``, the compiler's C++20 warnings with ``-std=c++20`` in setup.py).
Only the CLI calls ``quiet_libraries``: a program that imports ospo_fast keeps every warning."""

from __future__ import annotations

import warnings

# (category, regex matched at the start of the message, why it is not ours to fix)
SILENCED: tuple[tuple[type[Warning], str, str], ...] = (
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated and will be removed in v6",
     "peft's PeftModel.__init__ reads transformers 5's deprecated alias on every LoRA wrap"),
)


def quiet_libraries() -> None:
    """Ignore the warnings in ``SILENCED`` (and nothing else)."""
    for category, message, _why in SILENCED:
        warnings.filterwarnings("ignore", message=message, category=category)
