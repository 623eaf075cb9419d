"""Interactions between removed edges: how far the measured loss of removing several edges is from the sum of
removing each alone, and how well each method predicts it, from a study's exhaustive mask family.

For a set R of removed edges, the additivity ratio is (S(R) - S(none)) / sum over e in R of (S({e}) - S(none)):
1 is additive, above 1 super-additive (removing them together hurts more than the parts). A method's ratio is
the same quantity of its predictions: scale-free, so any score that orders masks by loss can be compared.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import combinations
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from .methods import METHODS
from .metrics import spearman
from .report import ordered, summarize
from .studies import Records

__all__ = ["Interactions", "additivity", "interactions", "super_additivity", "pair_ranking", "strongest_pairs",
           "pair_headers"]


def additivity(increase: float, singles: Sequence[float]) -> float:
    """The loss increase over the sum of the single increases (NaN when that sum is not positive)."""
    return increase / sum(singles) if sum(singles) > 0 else float("nan")


def _by_removed(example: dict[str, Any], family: str, branch: list[int]) -> dict[tuple[int, ...], int]:
    """Index of every mask of ``family`` by the tuple of ``branch`` edges it removes; every subset needed
    (none removed, each alone) must be there: the family must be exhaustive over those edges."""
    masks = np.asarray(example["masks"][family])
    index = {tuple(i for i in branch if m[i] == 0): k for k, m in enumerate(masks)}
    needed = [(), *((i,) for i in branch)]
    if any(r not in index for r in needed):
        raise ValueError(f"mask family {family!r} lacks the dense mask or a single removal of the chosen edges; "
                         "interactions need an exhaustive family over them (holdout=False)")
    return index


@dataclass
class Interactions:
    """masks: one row per network x mask removing at least two of the edges ("removed", the measured
    "increase" over the dense network and its additivity "ratio"); pairs: one row per network x pair ("pair":
    the two edges' names, each one's single increase, "pair_increase", "ratio", and for each method its
    predicted "increase_<m>" and "ratio_<m>"); per_k: ``super_additivity(masks)``; pair_rank:
    ``pair_ranking(pairs)``; strongest: ``strongest_pairs(pairs)``; methods: the methods compared."""
    masks: pd.DataFrame
    pairs: pd.DataFrame
    per_k: pd.DataFrame
    pair_rank: pd.DataFrame
    strongest: pd.DataFrame
    methods: list[str]

    @property
    def headers(self) -> dict[str, str]:
        """LaTeX headers of the ``strongest`` table (``pair_headers`` of the methods compared)."""
        return pair_headers(self.methods)


def interactions(records: Records, family: str, edges: str, methods: Sequence[str],
                 name: Callable[[str], str] = str) -> Interactions:
    """The interactions (``Interactions``) of the edges whose name matches ``edges`` from the exhaustive mask
    ``family`` of every network's records, measured and as predicted by each of ``methods`` that was run (in
    registry order); pairs are named by ``name`` of their edges."""
    run = set(next(iter(records.examples.values()))["predictions"][family])
    methods = ordered([m for m in methods if m in run])
    masks, pairs = _measured(records, family, edges, methods, name)
    return Interactions(masks, pairs, super_additivity(masks), pair_ranking(pairs, methods),
                        strongest_pairs(pairs, methods), methods)


def _measured(records: Records, family: str, edges: str, methods: Sequence[str],
              name: Callable[[str], str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(masks, pairs) of ``Interactions``."""
    inter, pairs = [], []
    for s, ex in records.examples.items():
        names = ex["edge_names"]
        branch = [i for i, n in enumerate(names) if re.search(edges, n)]
        index = _by_removed(ex, family, branch)
        loss = np.asarray(ex["truth"][family])
        truth = {r: loss[k] for r, k in index.items()}
        base = truth[()]
        single = {i: truth[(i,)] - base for i in branch}
        inter += [{"seed": s, "removed": len(r), "increase": v - base,
                   "ratio": additivity(v - base, [single[i] for i in r])} for r, v in truth.items() if len(r) >= 2]
        predicted = {m: {r: ex["predictions"][family][m][k] for r, k in index.items()} for m in methods}
        for i, j in combinations(branch, 2):
            row = {"seed": s, "pair": f"{name(names[i])} + {name(names[j])}", "single_i": single[i],
                   "single_j": single[j], "pair_increase": truth[(i, j)] - base,
                   "ratio": additivity(truth[(i, j)] - base, [single[i], single[j]])}
            for m, p in predicted.items():
                row[f"increase_{m}"] = p[(i, j)] - p[()]
                row[f"ratio_{m}"] = additivity(p[(i, j)] - p[()], [p[(i,)] - p[()], p[(j,)] - p[()]])
            pairs.append(row)
    return pd.DataFrame(inter), pd.DataFrame(pairs)


def super_additivity(masks: pd.DataFrame) -> pd.DataFrame:
    """Per number of edges removed: the median additivity ratio, the share of super-additive masks (ratio
    above 1) and the number of masks."""
    return masks.groupby("removed").agg(median_ratio=("ratio", "median"),
                                        super_additive=("ratio", lambda r: float((r > 1).mean())),
                                        n=("ratio", "size")).reset_index()


def pair_ranking(pairs: pd.DataFrame, methods: Sequence[str]) -> pd.DataFrame:
    """How well each method orders the pairs by their measured loss increase: Spearman per network,
    summarised over networks."""
    rows = [{"method": m, "seed": s, "spearman": spearman(g[f"increase_{m}"], g.pair_increase)}
            for m in methods for s, g in pairs.groupby("seed")]
    return summarize(pd.DataFrame(rows), ["method"], ["spearman"])


def strongest_pairs(pairs: pd.DataFrame, methods: Sequence[str], n: int = 6) -> pd.DataFrame:
    """The ``n`` pairs with the largest mean measured additivity ratio over networks: pair, measured loss
    increase, measured ratio and each method's predicted ratio."""
    strongest = pairs.groupby("pair", as_index=False).mean(numeric_only=True).nlargest(n, "ratio")
    return strongest[["pair", "pair_increase", "ratio"] + [f"ratio_{m}" for m in methods]]


def pair_headers(methods: Sequence[str]) -> dict[str, str]:
    """LaTeX headers of the ``strongest_pairs`` table of ``methods`` (by their short labels)."""
    return {"pair": "pair removed", "pair_increase": "$\\Delta$ loss", "ratio": "measured",
            **{f"ratio_{m}": METHODS[m].label.split(" (")[0].replace("Superposition", "Sup.") for m in methods}}
