"""Aggregation of per-graph records into the paper's tables: mean +- std over graphs, paired tests."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from .metrics import paired_test
from .paper import format_mean_std

__all__ = ["SIZE_BUCKETS", "bucket_label", "summarize", "wide_table", "paired_comparison", "METHOD_LABELS",
           "OURS", "BASELINES"]

# the prior study's size buckets, keyed by generator iterations
SIZE_BUCKETS = {2: "10-15", 5: "20-40", 14: "50-100", 30: "over 100"}  # plain text (escaped in tables)
METHOD_LABELS = {
    "random": "Random", "magnitude": "Magnitude (activation L1)", "param_l1": "Magnitude (parameter L1)",
    "taylor1": "Taylor, 1st order", "taylor1_abs": "Taylor, 1st order, abs.", "taylor2": "Taylor, 2nd order",
    "connectivity": "Connectivity", "loo": "Leave-one-out", "linear": "Linear regression", "fcn": "FCN",
    "prior_graph": "Graph (prior)", "flow": "Flow (ours, zero-shot)", "graph_flow": "Graph-flow (ours)",
    "superposition": "Superposition (ours)"}
OURS = ("flow", "graph_flow", "superposition")
BASELINES = ("random", "magnitude", "param_l1", "taylor1", "taylor1_abs", "taylor2", "connectivity", "loo",
             "linear", "fcn", "prior_graph")


def bucket_label(size: int) -> str:
    return SIZE_BUCKETS.get(size, f"{size} it.")


def summarize(df: pd.DataFrame, by: Sequence[str], metrics: Sequence[str]) -> pd.DataFrame:
    """One row per group with <metric>_mean, <metric>_std (ddof=1) and n (graphs)."""
    g = df.groupby(list(by), sort=True)
    out = g[list(metrics)].agg(["mean", "std"])
    out.columns = [f"{m}_{s}" for m, s in out.columns]
    out["n"] = g.size()
    return out.reset_index()


def wide_table(summary: pd.DataFrame, metric: str, methods: Sequence[str], sizes: Sequence[int],
               digits: int = 3, best: str | None = "max") -> pd.DataFrame:
    """Methods as rows, size buckets as columns, cells "mean +- std" (LaTeX); the best mean of each column
    ("max" or "min"; None: no marking) is set in bold."""
    rows = []
    for m in methods:
        row = {"Method": METHOD_LABELS.get(m, m)}
        for s in sizes:
            hit = summary[(summary.method == m) & (summary["size"] == s)]
            if not len(hit):
                row[bucket_label(s)] = "--"
                continue
            mean = hit[f"{metric}_mean"].iloc[0]
            std = hit[f"{metric}_std"].iloc[0] if hit["n"].iloc[0] > 1 else 0.0
            cell = format_mean_std(mean, std, digits)
            sub = summary[(summary["size"] == s) & summary.method.isin(methods)][f"{metric}_mean"].round(digits)
            if best and round(mean, digits) == (sub.max() if best == "max" else sub.min()):
                cell = f"\\textbf{{{cell}}}"
            row[bucket_label(s)] = cell
        rows.append(row)
    return pd.DataFrame(rows)


def paired_comparison(df: pd.DataFrame, metric: str, ours: Sequence[str] = OURS,
                      baselines: Sequence[str] = BASELINES, higher_is_better: bool = True) -> pd.DataFrame:
    """Per size: our best method against the best baseline (by mean), paired over graphs (Wilcoxon, t-test).

    The "best" of each group is chosen by its mean over the same graphs that are tested, as a reader would
    pick it from the table; the p-values do not correct for that choice."""
    rows = []
    for size, sub in df.groupby("size", sort=True):
        means = sub.groupby("method")[metric].mean()
        sign = 1 if higher_is_better else -1
        mine = [m for m in ours if m in means.index]
        base = [m for m in baselines if m in means.index]
        if not mine or not base:
            continue
        a = max(mine, key=lambda m: sign * means[m])
        b = max(base, key=lambda m: sign * means[m])
        pa = sub[sub.method == a].sort_values("seed")[metric].to_numpy()
        pb = sub[sub.method == b].sort_values("seed")[metric].to_numpy()
        test = paired_test(pa, pb) if len(pa) >= 2 else {"wilcoxon_p": np.nan, "ttest_p": np.nan,
                                                          "sign_wins": int((pa > pb).sum()), "n": len(pa),
                                                          "mean_diff": float(np.mean(pa - pb))}
        wins = test["sign_wins"] if higher_is_better else test.get("sign_losses", 0)
        rows.append({"size": size, "ours": a, "baseline": b, "ours_mean": float(pa.mean()),
                     "baseline_mean": float(pb.mean()), "mean_diff": float(pa.mean() - pb.mean()),
                     "wins": int(wins), "n": int(test["n"]), "wilcoxon_p": float(test["wilcoxon_p"]),
                     "ttest_p": float(test["ttest_p"])})
    return pd.DataFrame(rows)
