"""The toy world that shows OSPO working end to end on a CPU.

- ``world``: procedural 64x64 scenes of one or two coloured shapes, captions, structures, a held-out split and a
  prompt sampler (``sample_scene``, ``render``, ``caption``, ``structure``, ``sample_prompts``).
- ``judge``: the exact judge of an image against a structure (``judge`` -> ``JudgeResult(strict, loose, details)``).
- ``evaluate``: judged alignment of a model's images on held-out prompts, and ``ToyEvaluation``: the run's
  evaluation step on the toy world (the summary's before/after, the paired change, what the pairs hold).

The recipe that builds and measures the shipped ``builtin:toy`` Janus is not part of the library:
``python recipes/toy_janus/build_model.py``.
"""

from ospo_fast.toy.judge import JudgeResult, judge, judge_batch
from ospo_fast.toy.world import caption, render, sample_prompts, sample_scene, structure

__all__ = ["JudgeResult", "caption", "judge", "judge_batch", "render", "sample_prompts", "sample_scene", "structure"]
