"""From experiment records to the paper's tables: summaries over models, wide tables, paired tests.

Every helper takes the grouping column as an argument (the synthetic study groups by graph size, the ResNet
study by budget, the GPT-2 study by unit type) and returns numbers; formatting is the LaTeX writer's job
(``surrogate.paper``), except in ``wide_table`` whose cells are the "mean +- std" text a table prints.
Method order, labels and which methods are ours come from the registry (``surrogate.methods``).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import pandas as pd

from .methods import METHODS, label, method_names
from .metrics import paired_test
from .paper import fmt, format_mean_std, macro_name

__all__ = ["summarize", "wide_table", "paired_comparison", "macros_from", "ordered", "ours", "baselines"]


def ordered(names: Sequence[str]) -> list[str]:
    """Registered methods among ``names`` in registry order (unregistered names, e.g. "oracle", last)."""
    reg = method_names([n for n in names if n in METHODS])
    return reg + [n for n in dict.fromkeys(names) if n not in METHODS]


def ours(names: Sequence[str] | None = None) -> list[str]:
    return [n for n in ordered(names if names is not None else list(METHODS)) if n in METHODS and METHODS[n].ours]


def baselines(names: Sequence[str] | None = None) -> list[str]:
    return [n for n in ordered(names if names is not None else list(METHODS)) if n in METHODS and not METHODS[n].ours]


def summarize(df: pd.DataFrame, by: Sequence[str], metrics: Sequence[str]) -> pd.DataFrame:
    """One row per group with <metric>_mean, <metric>_std (ddof=1; NaN for one value) and n."""
    g = df.groupby(list(by), sort=True)
    out = g[list(metrics)].agg(["mean", "std"])
    out.columns = [f"{m}_{s}" for m, s in out.columns]
    out["n"] = g.size()
    return out.reset_index()


def wide_table(summary: pd.DataFrame, metric: str, methods: Sequence[str], column: str, values: Sequence,
               header: Callable[[object], str] = str, digits: int = 3, best: str | None = "max",
               labels: Callable[[str], str] = label) -> pd.DataFrame:
    """Methods as rows, one column per value of ``column`` (e.g. graph size, budget), cells
    "mean +- std" (LaTeX); per column the best mean ("max" or "min"; None: no marking) is set in bold.
    ``header`` names the columns, ``labels`` the rows (default: the registry's labels)."""
    if best not in ("max", "min", None):
        raise ValueError(f"best must be 'max', 'min' or None, got {best!r}")
    rows = []
    for m in methods:
        row = {"Method": labels(m)}
        for v in values:
            hit = summary[(summary.method == m) & (summary[column] == v)]
            if not len(hit):
                row[header(v)] = "--"
                continue
            mean = hit[f"{metric}_mean"].iloc[0]
            std = hit[f"{metric}_std"].iloc[0] if hit["n"].iloc[0] > 1 else 0.0
            cell = format_mean_std(mean, std, digits)
            col = summary[(summary[column] == v) & summary.method.isin(methods)][f"{metric}_mean"].round(digits)
            if best and round(mean, digits) == (col.max() if best == "max" else col.min()):
                cell = f"\\textbf{{{cell}}}"
            row[header(v)] = cell
        rows.append(row)
    return pd.DataFrame(rows)


def paired_comparison(df: pd.DataFrame, metric: str, group: str, *, pair_on: str = "seed",
                      ours_methods: Sequence[str] | None = None, baseline_methods: Sequence[str] | None = None,
                      higher_is_better: bool = True) -> pd.DataFrame:
    """Per value of ``group``: our best method against the best baseline (by mean), paired on ``pair_on``
    (the models both were measured on; models one of them lacks are left out), with a Wilcoxon signed-rank
    and a paired t-test. "wins" counts the models where ours is better in the metric's direction.

    The "best" of each side is chosen by its mean over the same models that are tested, as a reader would
    pick it from the table; the p-values do not correct for that choice."""
    rows = []
    sign = 1 if higher_is_better else -1
    for value, sub in df.groupby(group, sort=True):
        means = sub.groupby("method")[metric].mean()
        mine = [m for m in (ours_methods if ours_methods is not None else ours(list(means.index))) if m in means.index]
        base = [m for m in (baseline_methods if baseline_methods is not None else baselines(list(means.index)))
                if m in means.index]
        if not mine or not base:
            continue
        a = max(mine, key=lambda m: sign * means[m])
        b = max(base, key=lambda m: sign * means[m])
        pairs = pd.merge(sub[sub.method == a][[pair_on, metric]], sub[sub.method == b][[pair_on, metric]],
                         on=pair_on, suffixes=("_a", "_b"), validate="one_to_one").sort_values(pair_on)
        pa, pb = pairs[f"{metric}_a"].to_numpy(), pairs[f"{metric}_b"].to_numpy()
        if len(pa) >= 2:
            test = paired_test(pa, pb)
            wilcoxon_p, ttest_p = test["wilcoxon_p"], test["ttest_p"]
        else:
            wilcoxon_p = ttest_p = np.nan
        wins = int((sign * (pa - pb) > 0).sum())
        rows.append({group: value, "ours": a, "baseline": b, "ours_mean": float(pa.mean()),
                     "baseline_mean": float(pb.mean()), "mean_diff": float(pa.mean() - pb.mean()),
                     "wins": wins, "n": int(len(pa)), "wilcoxon_p": float(wilcoxon_p), "ttest_p": float(ttest_p)})
    return pd.DataFrame(rows)


def macros_from(df: pd.DataFrame, prefix: str, keys: Sequence[str], value: str, *, digits: int = 3,
                names: dict[str, Callable[[object], object]] | None = None, scale: float = 1.0) -> dict[str, object]:
    """One macro per row of ``df``: name = ``macro_name(prefix, *row[keys])`` (each key's value passed
    through ``names[key]`` if given, e.g. a size -> "Small"), value = ``fmt(row[value] * scale, digits)``.
    Rows must give distinct names (``KeyError`` otherwise)."""
    names = names or {}
    out: dict[str, object] = {}
    cols = {k: df[k].tolist() for k in [*keys, value]}  # per column: ints stay ints (iterrows upcasts)
    for i in range(len(df)):
        name = macro_name(prefix, *(names.get(k, lambda v: v)(cols[k][i]) for k in keys))
        if name in out:
            raise KeyError(f"rows {keys} give the macro name {name!r} twice; add a key that tells them apart")
        out[name] = fmt(float(cols[value][i]) * scale, digits)
    return out
