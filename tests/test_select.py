"""Filter and selection rules (SPEC stage 4) on hand-made Self-VQA answers."""

import pytest

from ospo_fast.stages.select import judge_pair, select_best

YES, NO, HALF = [0.9, 0.05], [0.05, 0.9], [0.5, 0.5]


def test_kept_pair():
    verdict = judge_pair([YES, YES], [YES, NO], tau=0.6)
    assert verdict.keep and verdict.reason == "kept"
    assert verdict.score_chosen == pytest.approx(0.85) and verdict.score_rejected == pytest.approx(0.0)


def test_tau_edge_is_inclusive():
    # S(y_w) == tau exactly is kept (the rule drops S < tau)
    exact = judge_pair([[0.8, 0.2], [0.8, 0.2]], [NO, NO], tau=0.6)
    assert exact.score_chosen == pytest.approx(0.6)
    assert exact.keep
    below = judge_pair([[0.8, 0.2], [0.79, 0.2]], [NO, NO], tau=0.6)
    assert not below.keep and below.reason == "chosen_below_tau"


def test_chosen_with_no_yes_is_dropped_even_with_low_tau():
    verdict = judge_pair([HALF, NO], [NO, NO], tau=-1.0)
    assert not verdict.keep and verdict.reason == "chosen_no_yes"


def test_rejected_that_already_satisfies_prompt_is_dropped():
    verdict = judge_pair([YES, YES], [[0.6, 0.4], YES], tau=0.6)
    assert not verdict.keep and verdict.reason == "rejected_satisfies_prompt"
    # one question not answered yes (s_k == 0 is not > 0) keeps the pair informative
    assert judge_pair([YES, YES], [HALF, YES], tau=0.6).keep


def test_mismatched_questions_are_an_error():
    with pytest.raises(ValueError, match="same non-empty questions"):
        judge_pair([YES], [YES, NO], tau=0.6)


def _cand(n, keep, score):
    return {"n": n, "verdict": {"keep": keep, "score_chosen": score}}


def test_select_highest_chosen_score_among_survivors():
    best = select_best([_cand(0, True, 0.7), _cand(1, False, 0.99), _cand(2, True, 0.9)])
    assert best["n"] == 2


def test_select_ties_take_the_lower_index():
    assert select_best([_cand(2, True, 0.8), _cand(0, True, 0.8), _cand(1, True, 0.8)])["n"] == 0


def test_no_survivor():
    assert select_best([_cand(0, False, 0.9), _cand(1, False, 0.95)]) is None


def _bon(n, chosen, rejected):
    return {"n": n, "base_id": "p0", "chosen": {"vqa": chosen, "tag": f"w{n}"}, "rejected": {"vqa": rejected,
                                                                                            "tag": f"l{n}"}}


def test_best_of_n_takes_best_and_worst_over_all_images():
    from ospo_fast.stages.select import best_vs_worst

    pair = best_vs_worst([_bon(0, [YES, HALF], [NO, NO]), _bon(1, [YES, YES], [HALF, NO])])
    assert pair["chosen"]["tag"] == "w1" and pair["rejected"]["tag"] == "l0"
    assert pair["verdict"]["score_chosen"] == pytest.approx(0.85)
    assert pair["verdict"]["score_rejected"] == pytest.approx(-0.85)
    assert best_vs_worst([_bon(0, [HALF], [HALF])]) is None  # all images tie: no pair
