"""Paired statistics for A/B runs, written here and tested against scipy on known cases.

- :func:`bootstrap_mean_ci`: percentile bootstrap CI of a mean;
- :func:`paired_difference`: mean difference of two arms on the same questions, its paired
  bootstrap CI, and a paired test — exact McNemar for 0/1 metrics, the exact sign test otherwise;
- :func:`interaction`: the 2x2 interaction (rag+ft - rag) - (ft - base) with its CI;
- :func:`bradley_terry`: ratings from pairwise votes (ties count half), bootstrap CIs, and an
  estimate of how many more votes would separate the top two.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def _binom_two_sided(k: int, n: int) -> float:
    """Exact two-sided binomial test of k successes in n trials at p = 0.5 (as scipy.stats.binomtest)."""
    if n == 0:
        return 1.0
    pmf = [math.comb(n, i) / 2**n for i in range(n + 1)]
    observed = pmf[k]
    # sum the probabilities of outcomes no more likely than the observed one (scipy's rule, with its tolerance)
    return min(1.0, sum(p for p in pmf if p <= observed * (1 + 1e-7)))


def mcnemar_exact(a: Sequence[float], b: Sequence[float]) -> float:
    """Exact McNemar test on paired 0/1 outcomes: a binomial test on the discordant pairs."""
    a, b = np.asarray(a), np.asarray(b)
    only_a = int(np.sum((a == 1) & (b == 0)))
    only_b = int(np.sum((a == 0) & (b == 1)))
    return _binom_two_sided(min(only_a, only_b), only_a + only_b)


def sign_test(a: Sequence[float], b: Sequence[float]) -> float:
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    positive, negative = int(np.sum(diff > 0)), int(np.sum(diff < 0))
    return _binom_two_sided(min(positive, negative), positive + negative)


def bootstrap_mean_ci(values: Sequence[float], n_boot: int = 2000, confidence: float = 0.95,
                      seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high) with a percentile bootstrap."""
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return (float("nan"),) * 3
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    means = x[idx].mean(axis=1)
    alpha = (1 - confidence) / 2
    return float(x.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def is_binary(values: Sequence[float]) -> bool:
    return bool(len(values)) and set(np.unique(np.asarray(values, dtype=float))) <= {0.0, 1.0}


def paired_difference(a: Sequence[float], b: Sequence[float], n_boot: int = 2000, confidence: float = 0.95,
                      seed: int = 0) -> dict[str, float | str]:
    """Mean of a - b over the same questions, its paired bootstrap CI, and a paired test's p-value."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError("paired arms must score the same questions")
    mean, low, high = bootstrap_mean_ci(a - b, n_boot, confidence, seed)
    binary = is_binary(a) and is_binary(b)
    p = mcnemar_exact(a, b) if binary else sign_test(a, b)
    return {"mean": mean, "ci_low": low, "ci_high": high, "p_value": p,
            "test": "mcnemar_exact" if binary else "sign_test", "n": int(len(a))}


def interaction(base: Sequence[float], rag: Sequence[float], ft: Sequence[float], rag_ft: Sequence[float],
                n_boot: int = 2000, confidence: float = 0.95, seed: int = 0) -> dict[str, float]:
    """Does fine-tuning help more with retrieval than without? (rag+ft - rag) - (ft - base), paired."""
    per_question = (np.asarray(rag_ft, float) - np.asarray(rag, float)) - (np.asarray(ft, float) - np.asarray(base, float))
    mean, low, high = bootstrap_mean_ci(per_question, n_boot, confidence, seed)
    return {"mean": mean, "ci_low": low, "ci_high": high,
            "ft_effect_without_rag": float(np.mean(np.asarray(ft, float) - np.asarray(base, float))),
            "ft_effect_with_rag": float(np.mean(np.asarray(rag_ft, float) - np.asarray(rag, float)))}


def _fit_bt(players: list[str], wins: np.ndarray, iterations: int = 500) -> np.ndarray:
    """Bradley-Terry strengths by Hunter's (2004) MM algorithm; ``wins[i, j]`` = i beat j (ties as 0.5)."""
    n = len(players)
    games = wins + wins.T
    strength = np.ones(n)
    total_wins = wins.sum(axis=1) + 0.5  # a half-win prior keeps unbeaten/winless players finite
    for _ in range(iterations):
        denom = np.array([sum(games[i, j] / (strength[i] + strength[j]) for j in range(n) if j != i and games[i, j])
                          for i in range(n)])
        denom += 1.0 / (strength + 1.0)  # the prior's virtual game against a strength-1 opponent
        updated = total_wins / np.maximum(denom, 1e-12)
        updated /= np.exp(np.mean(np.log(updated)))
        if np.max(np.abs(updated - strength)) < 1e-9:
            strength = updated
            break
        strength = updated
    return strength


def bradley_terry(votes: list[tuple[str, str, str]], n_boot: int = 300, seed: int = 0,
                  scale: float = 400.0, anchor: float = 1000.0) -> dict:
    """Ratings from votes ``(a, b, outcome)`` with outcome in {"a", "b", "tie", "both_bad"}.

    Ratings are on an Elo-like scale (``anchor + scale * log10(strength)``). ``both_bad`` counts as a
    tie. Returns ratings with bootstrap CIs, sorted best first, and ``votes_to_separate``: roughly
    how many more votes (at the current rate of this pair's outcomes) would make the top two's CIs
    stop overlapping, by the 1/sqrt(n) shrinkage of the interval.
    """
    players = sorted({p for a, b, _ in votes for p in (a, b)})
    if len(players) < 2:
        return {"ratings": [], "votes": len(votes), "votes_to_separate": None}
    index = {p: i for i, p in enumerate(players)}

    def tally(sample: list[tuple[str, str, str]]) -> np.ndarray:
        wins = np.zeros((len(players), len(players)))
        for a, b, outcome in sample:
            i, j = index[a], index[b]
            if outcome == "a":
                wins[i, j] += 1
            elif outcome == "b":
                wins[j, i] += 1
            else:
                wins[i, j] += 0.5
                wins[j, i] += 0.5
        return wins

    def ratings(sample) -> np.ndarray:
        return anchor + scale * np.log10(_fit_bt(players, tally(sample)))

    point = ratings(votes)
    rng = np.random.default_rng(seed)
    boots = np.array([ratings([votes[i] for i in rng.integers(0, len(votes), len(votes))]) for _ in range(n_boot)])
    low, high = np.quantile(boots, 0.025, axis=0), np.quantile(boots, 0.975, axis=0)
    order = np.argsort(-point)
    table = [{"arm": players[i], "rating": float(point[i]), "ci_low": float(low[i]), "ci_high": float(high[i]),
              "votes": int(sum(1 for a, b, _ in votes if players[i] in (a, b)))} for i in order]
    top, second = order[0], order[1]
    gap = point[top] - point[second]
    diffs = boots[:, top] - boots[:, second]
    half_width = (np.quantile(diffs, 0.975) - np.quantile(diffs, 0.025)) / 2
    if gap <= 0:
        more = None
    elif half_width < gap:
        more = 0
    else:
        more = int(math.ceil(len(votes) * ((half_width / gap) ** 2 - 1)))
    return {"ratings": table, "votes": len(votes), "votes_to_separate": more}
