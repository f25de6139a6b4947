"""Hand-written statistics and metrics against scipy and hand-checked cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from serving.ab import metrics, stats


@pytest.mark.parametrize("k,n", [(0, 5), (2, 10), (7, 20), (15, 30), (50, 100), (3, 3)])
def test_binomial_test_matches_scipy(k, n):
    assert stats._binom_two_sided(k, n) == pytest.approx(sps.binomtest(k, n, 0.5).pvalue, rel=1e-9)


def test_mcnemar_on_a_known_table():
    # 12 pairs where only a is right, 3 where only b is: exact McNemar = binomtest(3, 15)
    a = [1] * 12 + [0] * 3 + [1] * 20 + [0] * 5
    b = [0] * 12 + [1] * 3 + [1] * 20 + [0] * 5
    assert stats.mcnemar_exact(a, b) == pytest.approx(sps.binomtest(3, 15, 0.5).pvalue)
    assert stats.mcnemar_exact(a, a) == 1.0


def test_sign_test_matches_scipy():
    rng = np.random.default_rng(1)
    a, b = rng.random(40), rng.random(40) - 0.1
    d = a - b
    expected = sps.binomtest(int((d < 0).sum()), int((d != 0).sum()), 0.5).pvalue
    assert stats.sign_test(a, b) == pytest.approx(expected)


def test_bootstrap_ci_agrees_with_scipy_percentile_bootstrap():
    rng = np.random.default_rng(2)
    x = rng.normal(0.6, 0.2, 150)
    mean, low, high = stats.bootstrap_mean_ci(x, n_boot=4000)
    ref = sps.bootstrap((x,), np.mean, n_resamples=4000, method="percentile", random_state=3).confidence_interval
    assert mean == pytest.approx(x.mean())
    assert low == pytest.approx(ref.low, abs=0.01) and high == pytest.approx(ref.high, abs=0.01)
    assert low < mean < high


def test_paired_difference_detects_a_real_gap_and_not_a_null_one():
    rng = np.random.default_rng(3)
    a = (rng.random(200) < 0.7).astype(float)
    b = np.where(rng.random(200) < 0.8, a, 1 - a) * (rng.random(200) < 0.75)
    diff = stats.paired_difference(a, b)
    assert diff["test"] == "mcnemar_exact" and diff["ci_low"] > 0 and diff["p_value"] < 0.01
    null = stats.paired_difference(a, a)
    assert null["mean"] == 0 and null["ci_low"] == 0 == null["ci_high"] and null["p_value"] == 1.0
    assert stats.paired_difference([0.2, 0.5], [0.1, 0.4])["test"] == "sign_test"


def test_interaction_of_a_known_2x2():
    base, rag, ft = np.zeros(50), np.full(50, 0.6), np.full(50, 0.1)
    rag_ft = np.full(50, 0.8)
    result = stats.interaction(base, rag, ft, rag_ft)
    assert result["mean"] == pytest.approx(0.1) and result["ci_low"] == pytest.approx(0.1)
    assert result["ft_effect_with_rag"] == pytest.approx(0.2) and result["ft_effect_without_rag"] == pytest.approx(0.1)


def test_bradley_terry_orders_arms_and_estimates_votes_needed():
    votes = [("rag", "base", "a")] * 30 + [("rag", "base", "b")] * 5 + [("rag+ft", "rag", "a")] * 12 + \
            [("rag+ft", "rag", "b")] * 10 + [("rag+ft", "base", "a")] * 20 + [("ft", "base", "tie")] * 8 + \
            [("ft", "rag", "b")] * 15
    result = stats.bradley_terry(votes)
    arms = [r["arm"] for r in result["ratings"]]
    assert arms[:2] == ["rag+ft", "rag"] and arms[-1] in ("base", "ft")
    top = result["ratings"][0]
    assert top["ci_low"] <= top["rating"] <= top["ci_high"]
    assert result["votes_to_separate"] > 0  # 12 vs 10 does not separate the top two yet
    # two players, equal records: equal ratings
    even = stats.bradley_terry([("x", "y", "a"), ("x", "y", "b")])
    assert even["ratings"][0]["rating"] == pytest.approx(even["ratings"][1]["rating"])
    assert even["votes_to_separate"] is None and not even["separated"]


def test_bradley_terry_one_vote_claims_nothing_and_has_wide_intervals():
    one = stats.bradley_terry([("rag", "base", "a")])
    top, other = one["ratings"]
    assert top["arm"] == "rag" and top["rating"] > other["rating"]
    for r in one["ratings"]:  # non-degenerate: each interval is wide and holds its point estimate
        assert r["ci_high"] - r["ci_low"] > 300 and r["ci_low"] < r["rating"] < r["ci_high"]
    assert top["ci_low"] < other["ci_high"]  # the intervals overlap
    assert one["separated"] is False and one["votes_to_separate"] >= stats.MIN_VOTES_TO_SEPARATE - 1
    # the gap after one vote is modest (the prior), not the 262 points of an unregularised fit
    assert 0 < one["gap"] < 200


def test_bradley_terry_many_votes_separate_and_min_votes_gate():
    many = [("rag", "base", "a")] * 80 + [("rag", "base", "b")] * 20 + [("rag", "base", "tie")] * 10
    result = stats.bradley_terry(many)
    assert result["separated"] is True and result["votes_to_separate"] == 0
    top, other = result["ratings"]
    assert top["arm"] == "rag" and top["ci_low"] > other["ci_high"]
    widths = [r["ci_high"] - r["ci_low"] for r in result["ratings"]]
    one = stats.bradley_terry([("rag", "base", "a")])
    assert max(widths) < min(r["ci_high"] - r["ci_low"] for r in one["ratings"]) / 2  # intervals shrink with votes
    # a lopsided but small record is not called separated before the minimum vote count
    few = stats.bradley_terry([("rag", "base", "a")] * 12, min_votes=20)
    assert few["separated"] is False and few["votes_to_separate"] >= 8
    assert stats.bradley_terry([("rag", "base", "a")] * 12, min_votes=5)["separated"] is True


@pytest.mark.parametrize("pred,ref,em,f1", [
    ("The seven years.", "seven years", 1.0, 1.0),
    ("seven", "seven years", 0.0, 2 / 3),
    ("nothing alike", "seven years", 0.0, 0.0),
])
def test_squad_metrics(pred, ref, em, f1):
    assert metrics.exact_match(pred, ref) == em
    assert metrics.token_f1(pred, ref) == pytest.approx(f1)


def test_rouge_l_contains_and_choices():
    assert metrics.rouge_l("the cat sat on the mat", "the cat on mat") == pytest.approx(2 * 1 * (3 / 4) / (1 + 3 / 4))
    assert metrics.contains("It lasts 7 years from registration.", "7 years") == 1.0
    assert metrics.choose("Yes, it does.", ["yes", "no"]) == "yes"
    assert metrics.choose("It is 21 L/min, not 18 L/min", ["18 L/min", "21 L/min"]) == "21 L/min"
    row = {"answer": "The knowledge base does not say.", "kind": "unanswerable"}
    assert metrics.score_answer("The sources do not say.", row)["correct"] == 1.0
    assert metrics.score_answer("It is 42.", row)["correct"] == 0.0
    hits = [{"doc": "a.md", "text": "other"}, {"doc": "b.md", "text": "lasts 7 years"}]
    assert metrics.retrieval_hit(hits, {"answer": "7 years", "doc": "c.md"}, k=1) == 0.0
    assert metrics.retrieval_hit(hits, {"answer": "7 years", "doc": "c.md"}, k=2) == 1.0
    assert metrics.citation_correct(hits[:1], {"answer": "7 years"}) == 0.0
