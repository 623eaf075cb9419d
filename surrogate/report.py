"""From experiment records to the paper's tables: summaries over models, wide tables, paired tests, the ranking
table, picks against the oracle, and macros from any of them.

Every helper takes the grouping column as an argument (the synthetic study groups by graph size, the ResNet
study by budget, the GPT-2 study by unit type) and returns numbers; formatting is the LaTeX writer's job
(``surrogate.paper``), except in ``wide_table`` whose cells are the "mean +- std" text a table prints.
Method order, labels and which methods are ours come from the registry (``surrogate.methods``).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import re

import numpy as np
import pandas as pd

from .methods import METHODS, label, method_names
from .metrics import paired_test
from .paper import fmt, format_mean_std, macro_name

__all__ = ["summarize", "wide_table", "paired_comparison", "paired_tests", "paired_table", "macros_from",
           "macros_of", "ordered", "ours", "baselines", "predicting", "ranking", "ranking_table", "ranking_macros",
           "family_macros", "cost_macros", "picks_against_oracle", "by_budget", "spearman_of", "readable"]

RANKING = ("spearman", "spearman_within_k", "kendall", "top10")  # rank agreement with the truth
PASSES = ("forward", "backward")                                   # a method's cost over the scoring subset


def ordered(names: Sequence[str]) -> list[str]:
    """Registered methods among ``names`` in registry order (unregistered names, e.g. "oracle", last)."""
    reg = method_names([n for n in names if n in METHODS])
    return reg + [n for n in dict.fromkeys(names) if n not in METHODS]


def ours(names: Sequence[str] | None = None) -> list[str]:
    return [n for n in ordered(names if names is not None else list(METHODS)) if n in METHODS and METHODS[n].ours]


def baselines(names: Sequence[str] | None = None) -> list[str]:
    return [n for n in ordered(names if names is not None else list(METHODS)) if n in METHODS and not METHODS[n].ours]


def predicting(names: Sequence[str]) -> list[str]:
    """The methods among ``names`` whose predictions rank masks (not search methods), in registry order."""
    return [m for m in ordered(names) if m in METHODS and METHODS[m].predicts]


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
    "mean +- std" (LaTeX; the value alone for one network); per column the best mean ("max" or "min"; None:
    no marking) is set in bold.
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
            mean, std = hit[f"{metric}_mean"].iloc[0], hit[f"{metric}_std"].iloc[0]
            one = hit["n"].iloc[0] <= 1  # one network: its value, no spread to show
            cell = str(fmt(mean, digits)) if one else format_mean_std(mean, std, digits)
            col = summary[(summary[column] == v) & summary.method.isin(methods)][f"{metric}_mean"].round(digits)
            if best and round(mean, digits) == (col.max() if best == "max" else col.min()):
                cell = f"\\textbf{{{cell}}}"
            row[header(v)] = cell
        rows.append(row)
    return pd.DataFrame(rows)


_TEXT = ((r"\ensuremath{\infty}", "inf"), (r"\ensuremath{-}", "-"), ("{,}", ","), (r"$\pm$", "±"),
         (r"$\Delta$", "Δ"))


def _text(cell: object) -> object:
    """One LaTeX cell of a table as plain text; a bold cell (the best of its column) ends with " *"."""
    if not isinstance(cell, str):
        return cell
    bold = re.fullmatch(r"\\textbf\{(.*)\}", cell)
    text = bold.group(1) if bold else cell
    for latex, plain in _TEXT:
        text = text.replace(latex, plain)
    return text + " *" if bold else text


def readable(table: pd.DataFrame) -> pd.DataFrame:
    """A table of LaTeX cells (``wide_table``, ``ranking_table``) as plain text for a notebook: "0.822 ± 0.013",
    the best of each column marked " *"; the LaTeX goes to the file (``surrogate.paper.write_table``)."""
    return table.rename(columns=_text).map(_text)


def ranking(protocols: pd.DataFrame, passes: bool = True) -> pd.DataFrame:
    """Rank agreement with the truth per mask family and method over the networks (``summarize`` of
    ``RANKING``, and the methods' passes over the scoring subset if ``passes``)."""
    return summarize(protocols, ["protocol", "method"], [*RANKING, *(PASSES if passes else ())])


def ranking_table(rank: pd.DataFrame, families: Sequence[str], methods: Sequence[str]) -> pd.DataFrame:
    """The paper's ranking table from ``ranking(...)``: methods as rows; per mask family the Spearman
    correlation over all its masks and within each number removed ("mean +- std" LaTeX, best in bold); then
    the passes each method costs (forward+backward, from the first family)."""
    parts = []
    for family in families:
        sub = rank[rank.protocol == family]
        for metric, what in (("spearman", "all"), ("spearman_within_k", "within k")):
            head = f"{family}: {what}"
            parts.append(wide_table(sub, metric, methods, "protocol", [family], header=lambda _, h=head: h)
                         .set_index("Method"))
    table = pd.concat(parts, axis=1).reset_index()
    passes = rank[rank.protocol == families[0]].set_index("method")
    table["Passes"] = [f"{int(passes.forward_mean[m])}+{int(passes.backward_mean[m])}" for m in methods]
    return table


def picks_against_oracle(regret: pd.DataFrame, unit: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each method's pick under each budget (``regret`` records) in the unit a reader expects, and the best
    mask found at each budget and network (the oracle) in the same unit: (picks, oracle).

    unit "accuracy": "accuracy" in percent, "gap" in points below the most accurate mask found;
    "perplexity": "ppl", "gap" above the best mask's perplexity and "ratio" (pick / best)."""
    if unit == "accuracy":
        picks = regret.assign(accuracy=100 * regret.chosen_accuracy,
                              gap=100 * (regret.best_accuracy - regret.chosen_accuracy))
        best = {"accuracy": lambda d: 100 * d.best_accuracy}
    elif unit == "perplexity":
        picks = regret.assign(ppl=np.exp(regret.chosen_loss), gap=np.exp(regret.chosen_loss) - np.exp(regret.best_loss),
                              ratio=np.exp(regret.chosen_loss - regret.best_loss))
        best = {"ppl": lambda d: np.exp(d.best_loss)}
    else:
        raise ValueError(f"unknown unit {unit!r}; use 'accuracy' (classification) or 'perplexity' (language models)")
    return picks, picks.drop_duplicates(["seed", "removed"]).assign(**best)


def by_budget(picks: pd.DataFrame, value: str) -> pd.DataFrame:
    """Mean ``value`` of each method's picks (rows, registry order) per number of edges removed (columns)."""
    return picks.pivot_table(index="method", columns="removed", values=value).loc[ordered(sorted(set(picks.method)))]


def spearman_of(protocols: pd.DataFrame, family: str, **network: Any) -> pd.Series:
    """Method -> Spearman correlation on mask family ``family`` of one network (its key columns, e.g. seed=0)."""
    rows = protocols[protocols.protocol == family]
    for column, value in network.items():
        rows = rows[rows[column] == value]
    return rows.set_index("method").spearman


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


def against_each(df: pd.DataFrame, metric: str, ours: str, *, pair_on: Sequence[str] = ("seed", "budget"),
                 higher_is_better: bool = True) -> pd.DataFrame:
    """``ours`` against every other method of ``df`` (column "method"), paired on the rows' ``pair_on`` values
    (e.g. network and budget; pairs one of them lacks are left out): one row per other method with both means,
    the mean difference (ours - other), the pairs where ours is better in the metric's direction ("wins"), the
    ties, the number of pairs and the two-sided Wilcoxon and paired-t p-values (``metrics.paired_test``)."""
    keys = list(pair_on)
    if ours not in set(df.method):
        raise ValueError(f"method {ours!r} has no rows; the methods are {sorted(set(df.method))}")
    sign = 1 if higher_is_better else -1
    mine = df[df.method == ours][[*keys, metric]]
    rows = []
    for other in [m for m in dict.fromkeys(df.method) if m != ours]:
        pairs = pd.merge(mine, df[df.method == other][[*keys, metric]], on=keys, suffixes=("_a", "_b"),
                         validate="one_to_one")
        if len(pairs) < 2:
            continue
        a, b = pairs[f"{metric}_a"].to_numpy(float), pairs[f"{metric}_b"].to_numpy(float)
        test = paired_test(a, b)
        rows.append({"ours": ours, "other": other, "ours_mean": float(a.mean()), "other_mean": float(b.mean()),
                     "mean_diff": float((a - b).mean()), "wins": int((sign * (a - b) > 0).sum()),
                     "ties": int((a == b).sum()), "n": len(a), "wilcoxon_p": test["wilcoxon_p"],
                     "ttest_p": test["ttest_p"]})
    return pd.DataFrame(rows)


def paired_tests(df: pd.DataFrame, protocols: Sequence[str], metrics: Sequence[str], group: str) -> pd.DataFrame:
    """``paired_comparison`` per mask family and metric, as one table led by "protocol" and "metric"."""
    tests = pd.concat([paired_comparison(df[df.protocol == p], metric, group).assign(protocol=p, metric=metric)
                       for p in protocols for metric in metrics], ignore_index=True)
    return tests[["protocol", "metric", *tests.columns[:-2]]]


def paired_table(tests: pd.DataFrame, group: str, name: Callable[[object], str] = str) -> pd.DataFrame:
    """``paired_tests`` as the paper prints them: method labels, the two means, wins out of the networks
    compared and the Wilcoxon p-value; the ``group`` column (capitalised header) named by ``name``."""
    return pd.DataFrame({"Protocol": tests.protocol, "Metric": tests.metric, group.capitalize(): tests[group].map(name),
                         "Ours": tests.ours.map(label), "Mean": tests.ours_mean, "Baseline": tests.baseline.map(label),
                         "Mean ": tests.baseline_mean, "Wins": [f"{w}/{n}" for w, n in zip(tests.wins, tests.n)],
                         "Wilcoxon p": tests.wilcoxon_p})


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


def macros_of(df: pd.DataFrame, keys: Sequence[str], values: dict[str, str | tuple[str, int]], *,
              names: dict[str, Callable[[object], object]] | None = None) -> dict[str, object]:
    """``macros_from`` for several value columns of one table: ``values`` maps a column to its macro prefix,
    or to (prefix, digits) (default 3 digits)."""
    out: dict[str, object] = {}
    for value, spec in values.items():
        prefix, digits = (spec, 3) if isinstance(spec, str) else spec
        out.update(macros_from(df, prefix, keys, value, digits=digits, names=names))
    return out


def ranking_macros(rank: pd.DataFrame, prefix: str, within_prefix: str | None = None,
                   keys: Sequence[str] = ("protocol", "method")) -> dict[str, object]:
    """The mean Spearman correlation of every row of ``ranking(...)`` (``<prefix><keys...>``) and within each
    number removed (``<within_prefix><keys...>``, default ``<prefix>WithinK``)."""
    return macros_of(rank, list(keys), {"spearman_mean": prefix,
                                        "spearman_within_k_mean": within_prefix or prefix + "WithinK"})


def family_macros(info: pd.DataFrame, prefix: str, families: Mapping[str, str]) -> dict[str, object]:
    """Per mask family (name -> its word in macro names): the number of test masks of the first network
    (``<prefix><word>Masks``) and the mean noise ceiling of the truth (``<prefix>Ceiling<family>``)."""
    out: dict[str, object] = {}
    for family, word in families.items():
        out[macro_name(prefix, word, "Masks")] = int(info[f"{family}_n_masks"].iloc[0])
        out[macro_name(prefix, "Ceiling", family)] = float(info[f"ceiling_{family}"].mean())
    return out


def cost_macros(cost: pd.DataFrame, prefix: str, ratios: Mapping[str, str]) -> dict[str, object]:
    """The largest pruning of a cost table (``surrogate.profile.pruned_costs``): edges removed
    (``<prefix>CostRemoved``) and each column of ``ratios`` (column -> name) relative to the dense network."""
    last = cost.iloc[-1]
    return {macro_name(prefix, "CostRemoved"): int(last.removed),
            **{macro_name(prefix, name): float(last[column]) for column, name in ratios.items()}}
