"""Stage 4c: filter and select (SPEC stage 4).

s_k(y) = p_yes - p_no per question; S(y) = mean_k s_k(y). A pair (y_w, y_l) is dropped when
- S(y_w) < tau                       -> "chosen_below_tau"
- y_w got no "yes" (no s_k > 0)      -> "chosen_no_yes"
- every s_k(y_l) > 0                 -> "rejected_satisfies_prompt"
Among the surviving pairs of one prompt the one with the highest S(y_w) is kept (ties: the lower pair index n);
a prompt with no surviving pair is dropped ("no_surviving_pair").
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PairVerdict:
    keep: bool
    reason: str
    score_chosen: float
    score_rejected: float


def question_scores(probs: list[list[float]]) -> list[float]:
    """[[p_yes, p_no], ...] -> [s_k]."""
    return [p_yes - p_no for p_yes, p_no in probs]


def judge_pair(chosen_probs: list[list[float]], rejected_probs: list[list[float]], tau: float) -> PairVerdict:
    if not chosen_probs or len(chosen_probs) != len(rejected_probs):
        raise ValueError(f"a pair needs the same non-empty questions on both sides; got {len(chosen_probs)} and "
                         f"{len(rejected_probs)} answers")
    s_w, s_l = question_scores(chosen_probs), question_scores(rejected_probs)
    score_w, score_l = sum(s_w) / len(s_w), sum(s_l) / len(s_l)
    if score_w < tau:
        return PairVerdict(False, "chosen_below_tau", score_w, score_l)
    if not any(s > 0 for s in s_w):
        return PairVerdict(False, "chosen_no_yes", score_w, score_l)
    if all(s > 0 for s in s_l):
        return PairVerdict(False, "rejected_satisfies_prompt", score_w, score_l)
    return PairVerdict(True, "kept", score_w, score_l)


def select_best(candidates: list[dict]) -> dict | None:
    """The kept candidate with the highest chosen score (ties: lowest ``n``), or None."""
    kept = [c for c in candidates if c["verdict"]["keep"]]
    if not kept:
        return None
    return max(kept, key=lambda c: (c["verdict"]["score_chosen"], -c["n"]))


def best_vs_worst(candidates: list[dict]) -> dict | None:
    """The Best-of-N baseline (SILMM): among every image drawn for one prompt (both sides of every candidate), the
    highest S as chosen and the lowest as rejected; None when they tie. Returns a candidate-shaped record."""
    images = []
    for record in candidates:
        for side in ("chosen", "rejected"):
            scores = question_scores(record[side]["vqa"])
            images.append((sum(scores) / len(scores), record["n"], side, record))
    best = max(images, key=lambda x: (x[0], -x[1], x[2] == "chosen"))
    worst = min(images, key=lambda x: (x[0], x[1], x[2] == "chosen"))
    if best[0] <= worst[0]:
        return None
    first = candidates[0]
    verdict = {"keep": True, "reason": "best_of_n", "score_chosen": best[0], "score_rejected": worst[0]}
    return dict(first, id=f"{first['base_id']}-bon", n=best[1], chosen=best[3][best[2]], rejected=worst[3][worst[2]],
                verdict=verdict)
