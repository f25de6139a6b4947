"""Paired statistics for A/B runs, written here and tested against scipy on known cases.

- :func:`bootstrap_mean_ci`: percentile bootstrap CI of a mean;
- :func:`paired_difference`: mean difference of two arms on the same questions, its paired
  bootstrap CI, and a paired test — exact McNemar for 0/1 metrics, the exact sign test otherwise;
- :func:`interaction`: the 2x2 interaction (rag+ft - rag) - (ft - base) with its CI;
- :func:`bradley_terry`: ratings from pairwise votes (ties count half) with a prior on the strengths,
  credible intervals that stay wide at small counts, a minimum vote count before the top two are called
  separated, and an estimate of how many more votes that would take.
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


MIN_VOTES_TO_SEPARATE = 20  # below this many votes the leaderboard never claims the top two are separated
PRIOR_SD = 1.0  # prior sd of a log-strength (natural log): ~174 rating points, so one vote moves little


def _tally(players: list[str], votes: list[tuple[str, str, str]]) -> np.ndarray:
    """``wins[i, j]`` = times i beat j; a tie or "both bad" counts half a win each way."""
    index = {p: i for i, p in enumerate(players)}
    wins = np.zeros((len(players), len(players)))
    for a, b, outcome in votes:
        i, j = index[a], index[b]
        if outcome == "a":
            wins[i, j] += 1
        elif outcome == "b":
            wins[j, i] += 1
        else:
            wins[i, j] += 0.5
            wins[j, i] += 0.5
    return wins


def _fit_bt(wins: np.ndarray, prior_sd: float = PRIOR_SD, iterations: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Bayesian Bradley-Terry: the posterior mode of log-strengths ``theta`` under a N(0, prior_sd^2) prior
    (Newton's method; the log posterior is strictly concave) and its Laplace covariance.

    The prior is what keeps one vote from producing an infinite or zero-width rating: with a bootstrap
    and no prior, a single vote resamples to itself every time and gives intervals like [1131, 1131]."""
    n = wins.shape[0]
    games = wins + wins.T
    theta = np.zeros(n)
    precision = np.eye(n) / prior_sd**2
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(theta[:, None] - theta[None, :])))  # p[i, j] = P(i beats j)
        grad = (wins - games * p).sum(axis=1) - theta / prior_sd**2
        w = games * p * (1 - p)
        hessian = w - np.diag(w.sum(axis=1)) - precision  # negative definite
        step = np.linalg.solve(hessian, grad)
        theta = theta - step
        if np.max(np.abs(step)) < 1e-10:
            break
    p = 1.0 / (1.0 + np.exp(-(theta[:, None] - theta[None, :])))
    w = games * p * (1 - p)
    covariance = np.linalg.inv(np.diag(w.sum(axis=1)) - w + precision)
    # Only differences are identified by votes (the common level only by the prior): report each rating
    # relative to the mean of all arms, so intervals shrink with votes (theta already sums to zero).
    centre = np.eye(n) - 1.0 / n
    return theta, centre @ covariance @ centre


def bradley_terry(votes: list[tuple[str, str, str]], scale: float = 400.0, anchor: float = 1000.0,
                  min_votes: int = MIN_VOTES_TO_SEPARATE, prior_sd: float = PRIOR_SD, confidence: float = 0.95) -> dict:
    """Ratings from votes ``(a, b, outcome)`` with outcome in {"a", "b", "tie", "both_bad"}.

    Ratings are on an Elo-like scale (``anchor + scale * log10(strength)``), the posterior mode of a
    Bradley-Terry model with a normal prior on log-strengths, with 95% credible intervals from the
    Laplace approximation (never zero-width, wide at small counts). ``separated`` is True only when
    there are at least ``min_votes`` votes and the top two's difference excludes zero at the same level;
    ``votes_to_separate`` is roughly how many more votes that would take (by the 1/sqrt(n) shrinkage of
    the interval at the current gap, and at least up to ``min_votes``); None when the top two are tied.
    """
    players = sorted({p for a, b, _ in votes for p in (a, b)})
    if len(players) < 2:
        return {"ratings": [], "votes": len(votes), "votes_to_separate": None, "separated": False,
                "min_votes": min_votes}
    theta, cov = _fit_bt(_tally(players, votes), prior_sd)
    z = _normal_quantile(0.5 + confidence / 2)
    to_rating = scale / math.log(10)  # natural-log strength -> rating points
    sd = np.sqrt(np.diag(cov))
    order = np.argsort(-theta, kind="stable")
    table = [{"arm": players[i], "rating": float(anchor + to_rating * theta[i]),
              "ci_low": float(anchor + to_rating * (theta[i] - z * sd[i])),
              "ci_high": float(anchor + to_rating * (theta[i] + z * sd[i])),
              "votes": int(sum(1 for a, b, _ in votes if players[i] in (a, b)))} for i in order]
    top, second = order[0], order[1]
    gap = float(theta[top] - theta[second])
    gap_sd = math.sqrt(max(cov[top, top] + cov[second, second] - 2 * cov[top, second], 1e-18))
    separated = len(votes) >= min_votes and gap > z * gap_sd
    if separated:
        more: int | None = 0
    elif gap <= 1e-9:
        more = None
    else:
        needed = len(votes) * ((z * gap_sd / gap) ** 2 - 1)
        more = max(int(math.ceil(needed)), min_votes - len(votes), 1)
    return {"ratings": table, "votes": len(votes), "votes_to_separate": more, "separated": separated,
            "min_votes": min_votes, "gap": gap * to_rating, "gap_ci": (float((gap - z * gap_sd) * to_rating),
                                                                       float((gap + z * gap_sd) * to_rating))}


def _normal_quantile(q: float) -> float:
    """Inverse standard normal CDF (bisection on erf; exact enough for interval widths)."""
    lo, hi = -10.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2
