"""ospo_fast: Object-centric Self-improving Preference Optimization (OSPO) for unified multimodal LLMs.

Importing the package is cheap: it touches no GPU, needs no compiled extension and loads no model code.
Submodules: ``config`` (dataclasses and presets), ``models`` (loader and offline model factory), ``ops``
(object masks, SimPO loss; each with a reference, Triton and C++ backend), ``engine`` (KV-cached generation),
``stages`` (the five OSPO stages), ``store`` (the atomic record store), ``pipeline`` (the orchestrator),
``train`` (the trainer), ``toy`` (the procedural world used to prove the method on a CPU).
"""

__version__ = "0.1.0"
