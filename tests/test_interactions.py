"""Interactions of removed edges from an exhaustive mask family: additive losses give ratio 1, an interacting
pair stands out, and a method that predicts the truth orders the pairs perfectly."""
from __future__ import annotations

from itertools import product

import numpy as np
import pandas as pd
import pytest

from surrogate.interactions import additivity, interactions
from surrogate.studies import Records

SINGLE = {0: 0.3, 1: 0.2, 2: 0.1}  # loss increase of removing each branch alone
BOTH = 0.25                        # extra loss when branches 0 and 1 are removed together


def _records(drop_single: bool = False) -> Records:
    names = ["h.0.attn -> add", "h.0.mlp -> add", "h.1.attn -> add", "stream -> add"]
    masks = np.array([[*m, 1] for m in product([1, 0], repeat=3)], dtype=np.float32)  # the stream stays
    removed = [{i for i in range(3) if m[i] == 0} for m in masks]
    truth = np.array([1.0 + sum(SINGLE[i] for i in r) + BOTH * ({0, 1} <= r) for r in removed])
    additive = np.array([1.0 + sum(SINGLE[i] for i in r) for r in removed])
    if drop_single:
        keep = [len(r) != 1 or r != {2} for r in removed]
        masks, truth, additive = masks[keep], truth[keep], additive[keep]
    example = {"edge_names": names, "masks": {"ex": masks}, "truth": {"ex": truth},
               "predictions": {"ex": {"loo": truth.copy(), "taylor2": additive}}}
    empty = pd.DataFrame()
    return Records(empty, empty, empty, empty, empty, {0: example})


def test_additive_losses_give_ratio_one_and_the_interacting_pair_stands_out():
    inter = interactions(_records(), "ex", r"^h\.", ["taylor2", "loo", "flow"], name=lambda n: n.split(" ")[0])
    assert inter.methods == ["taylor2", "loo"]  # registry order; flow was not run
    pairs = inter.pairs.set_index("pair")
    assert len(pairs) == 3 and pairs.loc["h.0.attn + h.0.mlp", "ratio"] == pytest.approx((0.5 + BOTH) / 0.5)
    assert pairs.loc["h.0.attn + h.1.attn", "ratio"] == pytest.approx(1.0)
    assert np.allclose(pairs.ratio_taylor2, 1.0) and np.allclose(pairs.ratio_loo, pairs.ratio)
    assert inter.strongest.pair.iloc[0] == "h.0.attn + h.0.mlp"
    assert list(inter.per_k.removed) == [2, 3] and inter.per_k.n.tolist() == [3, 1]
    assert inter.per_k.super_additive.tolist() == [pytest.approx(1 / 3), 1.0]
    rank = inter.pair_rank.set_index("method").spearman_mean
    assert rank["loo"] == pytest.approx(1.0)  # predicting the truth orders the pairs as measured
    assert set(inter.headers) == {"pair", "pair_increase", "ratio", "ratio_taylor2", "ratio_loo"}


def test_a_family_without_every_single_removal_is_refused():
    with pytest.raises(ValueError, match="exhaustive family"):
        interactions(_records(drop_single=True), "ex", r"^h\.", ["loo"])


def test_additivity_is_nan_without_a_positive_sum():
    assert additivity(0.4, [0.1, 0.1]) == pytest.approx(2.0)
    assert np.isnan(additivity(0.4, [0.1, -0.2]))
