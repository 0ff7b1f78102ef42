"""The run's evaluation step: judge the starting model, then each iteration's trained model and its pairs.

``run_ospo`` calls one ``Evaluation``, the kind the config selects (``evaluation_kind``), and only records what
it returns in the summary. Kinds (``EVALUATIONS``, kind -> constructor taking the resolved config and the run's
``heldout`` directory):

- ``"toy"``: the toy world's exact judge (``ospo_fast.toy.evaluate.ToyEvaluation``), when the prompts are the
  toy vocabulary and ``eval.toy_heldout_prompts`` > 0;
- ``"none"``: nothing to judge (every other run: no exact judge exists there).

A new kind is one more entry: a class with the three methods of ``Evaluation`` (structural: it need not import
this module, so the judge's code stays below the run in the layering).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from ospo_fast.config import OSPOConfig
from ospo_fast.toy.evaluate import ToyEvaluation


class Evaluation(Protocol):
    """One kind of evaluation of a run's models. ``name`` is "before" (the starting model) or "after_iter<i>"; the
    figures are keyed by a suffix per setting judged ("" for the run's own sampling settings, e.g. "@cfg1")."""

    def judge_model(self, model_path: str, name: str) -> dict[str, dict]:
        """Figures of the model at ``model_path`` (a path relative to the working directory), by suffix; the run
        records them as its summary's "alignment" entries ``name + suffix``."""

    def compare(self, before: str, after: str) -> dict[str, dict]:
        """The change from the model judged as ``before`` to the one judged as ``after``, by suffix."""

    def judge_pairs(self, synth_dir: Path) -> dict[str, dict]:
        """Figures of one iteration's synthesis run (``synth_dir``: its pairs, masks, answers), added to that
        iteration's summary entry."""


class NoEvaluation:
    """The ``"none"`` kind: judges nothing, so the summary holds no alignment figures."""

    def __init__(self, config: OSPOConfig, heldout_dir: Path) -> None:
        pass

    def judge_model(self, model_path: str, name: str) -> dict[str, dict]:
        return {}

    def compare(self, before: str, after: str) -> dict[str, dict]:
        return {}

    def judge_pairs(self, synth_dir: Path) -> dict[str, dict]:
        return {}


EVALUATIONS: dict[str, Callable[[OSPOConfig, Path], Evaluation]] = {"none": NoEvaluation, "toy": ToyEvaluation}


def evaluation_kind(config: OSPOConfig) -> str:
    """The kind of evaluation of ``config``'s run: "toy" on the toy world with held-out judging on, else "none"."""
    return "toy" if config.prompts.vocabulary == "toy" and config.eval.toy_heldout_prompts > 0 else "none"


def evaluation_for(config: OSPOConfig, heldout_dir: Path) -> Evaluation:
    """The evaluation of ``config``'s kind for one run; ``heldout_dir`` (``<run>/heldout``) is where it may keep
    what it judged for the report."""
    kind = evaluation_kind(config)
    if kind not in EVALUATIONS:
        raise ValueError(f"no evaluation of kind {kind!r}; known kinds: {sorted(EVALUATIONS)}")
    return EVALUATIONS[kind](config, heldout_dir)
