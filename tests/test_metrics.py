"""Properties of the ranking metrics and paired tests: parity with scipy, exact tie handling, edge cases."""
from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
from scipy import stats

from surrogate.metrics import evaluate_predictions, kendall, paired_test, spearman, topk_overlap, topk_size


def _brute_force_topk_overlap(pred: np.ndarray, true: np.ndarray, k: int) -> float:
    """Expected overlap over every tie-breaking order of pred and of true, enumerated (no formula):
    each permutation of the indices is a priority that breaks ties; pred and true break ties independently."""
    def top_sets(values: np.ndarray) -> Counter:
        sets: Counter = Counter()
        for priority in itertools.permutations(range(values.size)):
            order = np.lexsort((np.asarray(priority), values))  # by value, then by priority
            sets[frozenset(order[:k].tolist())] += 1
        return sets

    sp, st_ = top_sets(pred), top_sets(true)
    total = sum(sp.values()) * sum(st_.values())
    return sum(cp * ct * len(a & b) for a, cp in sp.items() for b, ct in st_.items()) / (k * total)


# --- rank correlations ---------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_correlations_match_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    true = rng.normal(size=50)
    pred = true + rng.normal(size=50)
    assert spearman(pred, true) == pytest.approx(stats.spearmanr(pred, true).statistic, abs=1e-12)
    assert kendall(pred, true) == pytest.approx(stats.kendalltau(pred, true).statistic, abs=1e-12)
    # with ties on both sides: tau-b is the variant that corrects for them
    pi, ti = rng.integers(0, 5, 40), rng.integers(0, 5, 40)
    assert spearman(pi, ti) == pytest.approx(stats.spearmanr(pi, ti).statistic, abs=1e-12)
    assert kendall(pi, ti) == pytest.approx(stats.kendalltau(pi, ti, variant="b").statistic, abs=1e-12)


def test_correlations_are_python_floats_and_rank_invariant() -> None:
    rng = np.random.default_rng(0)
    true = rng.normal(size=30)
    pred = true + 0.5 * rng.normal(size=30)
    for f in (spearman, kendall):
        r = f(pred, true)
        assert type(r) is float
        assert f(np.exp(pred), true) == pytest.approx(r, abs=1e-12)  # monotone transform keeps ranks
        assert f(true, true) == pytest.approx(1.0)
        assert f(-true, true) == pytest.approx(-1.0)


def test_constant_input_gives_zero() -> None:
    true = np.arange(10.0)
    for f in (spearman, kendall):
        assert f(np.full(10, 3.0), true) == 0.0
        assert f(true, np.ones(10)) == 0.0


def test_nan_and_shape_errors() -> None:
    good = np.arange(5.0)
    bad = good.copy()
    bad[2] = np.nan
    for f in (spearman, kendall, lambda p, t: topk_overlap(p, t, 0.4)):
        with pytest.raises(ValueError, match="NaN"):
            f(bad, good)
        with pytest.raises(ValueError, match="NaN"):
            f(good, bad)
        with pytest.raises(ValueError):
            f(good, np.arange(6.0))


def test_accepts_torch_tensors() -> None:
    torch = pytest.importorskip("torch")
    true = torch.arange(8.0, requires_grad=True)
    pred = true * 2
    assert spearman(pred, true) == pytest.approx(1.0)
    assert topk_overlap(pred, true.detach().numpy(), 0.25) == 1.0


# --- top-k overlap -------------------------------------------------------------------------------------

def test_topk_size() -> None:
    assert topk_size(100, 0.05) == 5
    assert topk_size(100, 0.10) == 10
    assert topk_size(10, 0.01) == 1  # at least one
    assert topk_size(7, 1.0) == 7
    for frac in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            topk_size(10, frac)


def test_topk_perfect_and_reversed() -> None:
    rng = np.random.default_rng(1)
    true = rng.normal(size=100)
    for frac in (0.05, 0.10, 0.3):
        assert topk_overlap(true, true, frac) == 1.0
        assert topk_overlap(2 * true + 7, true, frac) == 1.0
        assert topk_overlap(-true, true, frac) == 0.0  # k < n / 2: the predicted best are the truly worst
    assert topk_overlap(-true, true, 1.0) == 1.0  # k = n: every mask is in both sets


def test_topk_constant_predictor_is_exactly_random() -> None:
    rng = np.random.default_rng(2)
    for n, frac in ((20, 0.05), (20, 0.1), (37, 0.1), (100, 0.05)):
        true = rng.normal(size=n)
        expected = topk_size(n, frac) / n
        assert topk_overlap(np.zeros(n), true, frac) == pytest.approx(expected, abs=1e-15)


def test_topk_hand_computed_two_way_tie() -> None:
    # n = 7, frac = 0.43 -> k = round(3.01) = 3. pred ranks masks 0, 1 surely in its top 3; masks 2 and 3
    # tie (pred 2.0) for the last slot, each in with prob. 1/2. True top 3 = {0, 1, 2}.
    # Expected overlap = (1 + 1 + 1/2) / 3 = 5/6.
    pred = np.array([0.0, 1.0, 2.0, 2.0, 5.0, 6.0, 7.0])
    true = np.arange(7.0)
    assert topk_size(7, 0.43) == 3
    assert topk_overlap(pred, true, 0.43) == pytest.approx(5 / 6, abs=1e-15)
    assert _brute_force_topk_overlap(pred, true, 3) == pytest.approx(5 / 6, abs=1e-12)
    # Now true also ties: masks 2 and 4 share the 3rd-best true loss -> each in the true top 3 w.p. 1/2.
    # Overlap = (1*1 + 1*1 + 1/2*1/2 + 1/2*0 + 0*1/2) / 3 = 2.25 / 3 = 0.75.
    true_tied = np.array([0.0, 1.0, 2.0, 9.0, 2.0, 5.0, 6.0])
    assert topk_overlap(pred, true_tied, 0.43) == pytest.approx(0.75, abs=1e-15)
    assert _brute_force_topk_overlap(pred, true_tied, 3) == pytest.approx(0.75, abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_topk_matches_brute_force_enumeration(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 7
    pred = rng.integers(0, 3, n).astype(float)  # few distinct values: many ties, also at the boundary
    true = rng.integers(0, 4, n).astype(float)
    for frac in (0.15, 0.3, 0.43, 0.6):
        k = topk_size(n, frac)
        got = topk_overlap(pred, true, frac)
        assert 0.0 <= got <= 1.0
        assert got == pytest.approx(_brute_force_topk_overlap(pred, true, k), abs=1e-12)


# --- paired tests ------------------------------------------------------------------------------------

def test_paired_test_all_wins_hits_exact_floor() -> None:
    b = np.arange(10.0)
    res = paired_test(b + 1, b)
    assert res["n"] == 10 and res["sign_wins"] == 10 and res["sign_losses"] == 0
    assert res["mean_diff"] == 1.0
    assert res["wilcoxon_p"] == pytest.approx(2 / 1024, rel=1e-12)  # all signs equal: the exact floor
    assert res["ttest_p"] == 0.0  # constant nonzero difference: t is infinite
    # distinct positive differences: the exact branch, same floor
    res = paired_test(b + np.arange(1.0, 11.0), b)
    assert res["wilcoxon_p"] == pytest.approx(2 / 1024, rel=1e-12)


def test_paired_test_matches_scipy_and_is_symmetric() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=12), rng.normal(size=12)
    res = paired_test(a, b)
    assert res["wilcoxon_p"] == pytest.approx(stats.wilcoxon(a, b, method="exact").pvalue, rel=1e-12)
    assert res["ttest_p"] == pytest.approx(stats.ttest_rel(a, b).pvalue, rel=1e-12)
    assert res["mean_diff"] == pytest.approx(float(np.mean(a - b)))
    assert res["sign_wins"] + res["sign_losses"] == 12
    swapped = paired_test(b, a)
    assert swapped["sign_wins"] == res["sign_losses"] and swapped["sign_losses"] == res["sign_wins"]
    assert swapped["wilcoxon_p"] == pytest.approx(res["wilcoxon_p"])
    assert swapped["ttest_p"] == pytest.approx(res["ttest_p"])


def test_paired_test_degenerate_cases() -> None:
    a = np.array([0.3, 0.5, 0.7, 0.2])
    res = paired_test(a, a)
    assert res["wilcoxon_p"] == 1.0 and res["ttest_p"] == 1.0
    assert res["sign_wins"] == 0 and res["sign_losses"] == 0 and res["mean_diff"] == 0.0
    # zeros and tied |differences| take scipy's "auto" path and still give a valid p
    res = paired_test([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [1.0, 1.0, 2.0, 3.0, 5.0, 7.0])
    assert 0.0 < res["wilcoxon_p"] <= 1.0
    with pytest.raises(ValueError):
        paired_test([1.0], [2.0])


def test_evaluate_predictions_keys_and_values() -> None:
    rng = np.random.default_rng(5)
    true = rng.normal(size=200)
    pred = true + rng.normal(size=200)
    out = evaluate_predictions(pred, true)
    assert set(out) == {"spearman", "kendall", "top5", "top10"}
    assert out["spearman"] == spearman(pred, true)
    assert out["top10"] == topk_overlap(pred, true, 0.10)
    assert all(type(v) is float for v in out.values())


def test_bootstrap_ci_brackets_the_mean_and_narrows_with_agreement():
    from surrogate.metrics import bootstrap_ci
    lo, hi = bootstrap_ci([0.1, 0.5, 0.9], seed=1)
    assert lo < 0.5 < hi and lo >= 0.1 and hi <= 0.9
    lo2, hi2 = bootstrap_ci([0.49, 0.5, 0.51], seed=1)
    assert hi2 - lo2 < (hi - lo) / 10
    assert bootstrap_ci([0.3]) == (0.3, 0.3)
    assert bootstrap_ci([1, 2, 3], seed=4) == bootstrap_ci([1, 2, 3], seed=4)
