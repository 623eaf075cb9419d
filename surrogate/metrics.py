"""How well predicted losses of pruning masks rank the true losses, and how to compare methods over seeds.

Convention throughout: lower is better. A prediction is the predicted loss S(m) of a mask, or any score
where higher means predicted worse; the "best" masks are those with the LOWEST value. Inputs are 1-D
array-likes (numpy arrays, lists, or torch tensors); outputs are plain python floats / ints so they can go
straight into a results table or a LaTeX macro.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy import stats

__all__ = ["spearman", "kendall", "topk_size", "topk_overlap", "paired_test", "evaluate_predictions",
           "bootstrap_ci"]


def _as_1d(x: Any, name: str) -> np.ndarray:
    """A float64 vector from a numpy array, list or torch tensor; NaN is rejected because every metric here
    would silently turn it into a meaningless number (scipy propagates it, sorting puts it last)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim > 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    arr = arr.reshape(-1)
    if np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN")
    return arr


def _pair(pred: Any, true: Any, min_n: int = 2) -> tuple[np.ndarray, np.ndarray]:
    p, t = _as_1d(pred, "pred"), _as_1d(true, "true")
    if p.shape != t.shape:
        raise ValueError(f"pred and true differ in length: {p.size} vs {t.size}")
    if p.size < min_n:
        raise ValueError(f"need at least {min_n} values, got {p.size}")
    return p, t


def _is_constant(x: np.ndarray) -> bool:
    return bool(np.all(x == x[0]))


def spearman(pred: Any, true: Any) -> float:
    """Spearman rank correlation. A constant input gives 0.0 (scipy: nan): a constant predictor carries no
    ranking information, and 0.0 keeps means over seeds defined."""
    p, t = _pair(pred, true)
    if _is_constant(p) or _is_constant(t):
        return 0.0
    return float(stats.spearmanr(p, t).statistic)


def kendall(pred: Any, true: Any) -> float:
    """Kendall's tau-b (corrects for ties on either side). A constant input gives 0.0, as in ``spearman``."""
    p, t = _pair(pred, true)
    if _is_constant(p) or _is_constant(t):
        return 0.0
    return float(stats.kendalltau(p, t, variant="b").statistic)


def topk_size(n: int, frac: float) -> int:
    """k = max(1, round(frac * n)). Python's round is half-to-even (round(2.5) == 2); exposed so every
    caller uses the same k."""
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"frac must be in (0, 1], got {frac}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return max(1, round(frac * n))


def _topk_membership(values: np.ndarray, k: int) -> np.ndarray:
    """P(each entry is among the k lowest) when ties are broken uniformly at random.

    Entries strictly below the k-th smallest value are in for sure; the r entries equal to it compete for
    the s remaining slots, and by symmetry each gets s / r."""
    threshold = np.partition(values, k - 1)[k - 1]
    below = values < threshold
    tied = values == threshold
    s = k - int(below.sum())
    return below.astype(np.float64) + tied * (s / int(tied.sum()))


def topk_overlap(pred: Any, true: Any, frac: float) -> float:
    """Fraction of the k truly-best masks (lowest true loss) that are among the k predicted best (lowest
    prediction), k = ``topk_size(n, frac)``.

    Tie-aware and exact: with ties broken uniformly at random, independently for pred and true, the
    expected overlap is sum_i P(i in predicted top-k) * P(i in true top-k), divided by k. So a constant
    predictor scores exactly k / n, the expected overlap of a random predictor, instead of whatever the sort
    order happens to be."""
    p, t = _pair(pred, true, min_n=1)
    k = topk_size(p.size, frac)
    overlap = float(np.dot(_topk_membership(p, k), _topk_membership(t, k))) / k
    return min(1.0, max(0.0, overlap))  # clip float round-off only


def paired_test(a: Any, b: Any) -> dict[str, float | int]:
    """Compare two methods on paired results (same seeds / graphs), e.g. Spearman of method a vs method b.

    Returns n, mean_diff (mean of a - b), wilcoxon_p (signed-rank, two-sided), ttest_p (paired t, two-sided),
    sign_wins (# a > b) and sign_losses (# a < b); whether "a > b" is a win for a depends on the metric.

    The Wilcoxon p is exact when n <= 25 and there are no zero or tied |differences| (scipy "auto"
    otherwise). Its floor is 2 / 2^n: with n = 10 seeds the smallest attainable p is 2/1024 ~= 0.00195,
    reached only when all 10 differences have the same sign. Degenerate cases: all differences zero gives
    p = 1.0 for both tests (no evidence of a difference; scipy gives nan for the t-test); a constant nonzero
    difference gives ttest_p = 0.0 (t is infinite).
    """
    x, y = _pair(a, b)
    d = x - y
    n = int(d.size)
    if np.all(d == 0):
        wilcoxon_p, ttest_p = 1.0, 1.0
    else:
        abs_d = np.abs(d)
        exact = n <= 25 and not np.any(d == 0) and np.unique(abs_d).size == n
        wilcoxon_p = float(stats.wilcoxon(x, y, method="exact" if exact else "auto").pvalue)
        # a constant nonzero difference has zero variance: t is infinite (scipy agrees, with a warning)
        ttest_p = 0.0 if np.all(d == d[0]) else float(stats.ttest_rel(x, y).pvalue)
    return {"n": n, "mean_diff": float(d.mean()), "wilcoxon_p": wilcoxon_p, "ttest_p": ttest_p,
            "sign_wins": int(np.sum(d > 0)), "sign_losses": int(np.sum(d < 0))}


def evaluate_predictions(pred: Any, true: Any, fracs: Sequence[float] = (0.05, 0.10)) -> dict[str, float]:
    """Spearman, Kendall and top-k overlaps in one dict; keys top{int(100 * frac)}, e.g. top5, top10."""
    out = {"spearman": spearman(pred, true), "kendall": kendall(pred, true)}
    for frac in fracs:
        out[f"top{int(round(100 * frac))}"] = topk_overlap(pred, true, frac)
    return out


def bootstrap_ci(values: Any, level: float = 0.95, n_boot: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (e.g. one result per network): resample the values
    with replacement ``n_boot`` times (seeded). With one value the interval is that value (no spread is known)."""
    v = _as_1d(values, "values")
    if v.size == 0:
        raise ValueError("bootstrap of no values")
    if v.size == 1:
        return float(v[0]), float(v[0])
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)
