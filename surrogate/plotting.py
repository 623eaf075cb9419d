"""Figures: one seaborn theme for every figure, the studies' recurring plots (metric against a budget or a
count over seeds, predicted against true loss), and a layered drawing of a computation graph with its
prunable edges (and their importances).

Sizes are in inches at the size printed: ``TEXT`` is the paper's text width (a NeurIPS-style single column,
5.5 in) and ``COLUMN`` half of it (two figures side by side, or one narrow figure). Every text of the theme is 8 pt,
so a figure included at the width it was drawn for prints its text at 8 pt; the paper's tests check at least 7 pt.
"""
from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from .methods import METHODS
from .methods import label as default_label
from .report import ordered

if TYPE_CHECKING:
    import pandas as pd
    from .graph import ComputationGraph

__all__ = ["COLUMN", "TEXT", "set_theme", "method_palette", "lines", "scatter_grid", "picks_figure", "before_after",
           "heatmap", "against_dense", "layered_layout", "draw_graph"]

COLUMN, TEXT = 2.7, 5.5   # inches: half the text width and the text width of the paper (paper/main.tex)
FONT = 8                  # points, every text of the theme
# the methods a figure of picks shows (those that were run): the field's strongest criteria and ours
PICK_METHODS = ("taylor2", "loo", "block_influence", "sleb", "superposition", "superposition_state",
                "superposition_pairs")


def set_theme() -> None:
    """The project's figure style: seaborn "paper" context, white grid, every text at ``FONT`` pt (one size, so
    that nothing prints below 7 pt when a figure is included at the width it was drawn for), vector PDFs."""
    import matplotlib
    import seaborn as sns
    sizes = ("font.size", "axes.titlesize", "axes.labelsize", "xtick.labelsize", "ytick.labelsize",
             "legend.fontsize", "legend.title_fontsize", "figure.titlesize")
    sns.set_theme(context="paper", style="whitegrid", font_scale=1.0,
                  rc={**dict.fromkeys(sizes, FONT), "lines.linewidth": 1.2, "lines.markersize": 3.5,
                      "pdf.fonttype": 42, "savefig.bbox": "tight", "savefig.pad_inches": 0.02})
    matplotlib.rcParams["axes.titleweight"] = "normal"


def method_palette(methods: Sequence[str]) -> dict[str, Any]:
    """One colour per method, stable across figures: ours in strong colours first, baselines after."""
    import seaborn as sns
    colours = sns.color_palette("tab10", 10) + sns.color_palette("Set2", 8)
    ranked = sorted(methods, key=lambda m: (not (m in METHODS and METHODS[m].ours), list(METHODS).index(m)
                                           if m in METHODS else len(METHODS)))
    return {m: colours[i % len(colours)] for i, m in enumerate(ranked)}


def lines(df: "pd.DataFrame", x: str, y: str, methods: Sequence[str], *, panel: str | None = None,
          panels: Sequence[Any] | None = None, panel_title: Callable[[Any], str] = str, xlabel: str | None = None,
          ylabel: str | None = None, width: float = TEXT, height: float = 2.0, logy: str | None = None,
          reference: "pd.DataFrame | None" = None, reference_label: str = "reference", legend: bool = True,
          labels: Callable[[str], str] | None = None, max_panels: int = 8, dodge: float = 0.0):
    """Mean of ``y`` against ``x`` per method (one row per model in ``df``; error bars: standard error over
    models), one panel per value of ``panel``; ours drawn thicker; ``dodge``: the methods' curves shifted this
    far apart along x (a fraction of the smallest step between x values), so that equal curves stay visible.
    ``reference``: rows with ``x``, ``y`` (and ``panel``) drawn as a dashed black line (e.g. the oracle). An integer ``x`` (a count) gets whole-number
    ticks. Returns the figure."""
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns
    from matplotlib.ticker import LogFormatter, MaxNLocator
    labels = labels or default_label
    values = list(panels) if panels is not None else (sorted(df[panel].unique()) if panel else [None])
    if len(values) > max_panels:
        raise ValueError(f"{len(values)} panels are too many for one readable figure (at most {max_panels}); "
                         "split the figure")
    fig, axes = plt.subplots(1, len(values), figsize=(width, height), squeeze=False, sharey=False)
    pal = method_palette(methods)
    steps = np.diff(np.unique(df[x].to_numpy(dtype=float))) if dodge else []
    step = float(np.min(steps)) if len(steps) else 1.0
    for ax, v in zip(axes[0], values):
        sub = df if panel is None else df[df[panel] == v]
        for j, m in enumerate(methods):
            d = sub[sub.method == m]
            if not len(d):
                continue
            if dodge:
                d = d.assign(**{x: d[x] + dodge * step * (j - (len(methods) - 1) / 2)})
            thick = m in METHODS and METHODS[m].ours
            sns.lineplot(data=d, x=x, y=y, ax=ax, color=pal[m], errorbar="se", marker="o", err_style="bars",
                         err_kws={"capsize": 1.5}, lw=2.0 if thick else 1.0, label=labels(m), legend=False)
        if reference is not None:
            r = reference if panel is None else reference[reference[panel] == v]
            if len(r):  # at a single x a line has no length: a wide dash marks the level instead
                point = {"marker": "_", "markersize": 14, "mec": "black", "mew": 1.2} if r[x].nunique() == 1 else {}
                sns.lineplot(data=r, x=x, y=y, ax=ax, color="black", ls="--", lw=1.0, errorbar="se",
                             label=reference_label, legend=False, **point)
        if logy:
            log_kw = {"linthresh": 0.01} if logy == "symlog" else {}
            ax.set_yscale(logy, **log_kw)
            # plain tick labels (300, 1e-02): mathtext's 3x10^2 prints its exponent at 70% of the font size
            ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False, **log_kw))
            ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.4), **log_kw))
        if pd.api.types.is_integer_dtype(df[x]):  # matplotlib's default steps, whole numbers only, one tick for one x
            ax.xaxis.set_major_locator(MaxNLocator("auto", steps=[1, 2, 2.5, 5, 10], integer=True, min_n_ticks=1))
        ax.set_title(panel_title(v) if panel else "")
        ax.set_xlabel(xlabel or x if len(values) == 1 else "")
        ax.set_ylabel(ylabel or y if ax is axes[0, 0] else "")
    if len(values) > 1:  # one label under all panels: one per panel collides when it is wider than a panel
        fig.supxlabel(xlabel or x, fontsize=plt.rcParams["axes.labelsize"])
    if legend:
        handles, names = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, names, loc="upper center", bbox_to_anchor=(0.5, 0.0),
                   ncol=_legend_columns(names, width), frameon=False)
    fig.tight_layout()
    return fig


def _legend_columns(names: Sequence[str], width: float) -> int:
    """As many legend columns as fit in ``width`` inches: a legend wider than its figure widens the saved PDF,
    which then prints smaller, text included (a character of the theme's font is about 0.6 of its size wide;
    each entry also has a line sample and a gap of about four characters)."""
    per_column = 0.6 * FONT * (max(map(len, names), default=1) + 4) / 72
    return max(1, min(len(names), 5, int(width // per_column)))


def picks_figure(picks: "pd.DataFrame", oracle: "pd.DataFrame", unit: str, *, xlabel: str,
                 methods: Sequence[str] = PICK_METHODS, reference_label: str = "exhaustive oracle", height: float = 2.4):
    """The quality of each method's pick against the number of edges removed, with the best mask found as a
    dashed reference (``surrogate.report.picks_against_oracle``: unit "accuracy" or "perplexity"; perplexity on a
    log scale when it spans more than a factor of three, else linear); ``methods`` that made no pick are left out;
    the methods' curves are shifted 8% of a step apart along x, so that equal picks stay visible."""
    units = {"accuracy": ("accuracy", "test accuracy (%)", None), "perplexity": ("ppl", "test perplexity", "log")}
    if unit not in units:
        raise ValueError(f"unknown unit {unit!r}; use one of {sorted(units)} (as in picks_against_oracle)")
    y, ylabel, logy = units[unit]
    values = np.concatenate([np.asarray(picks[y], dtype=float), np.asarray(oracle[y], dtype=float)])
    values = values[np.isfinite(values) & (values > 0)]
    if logy and (not len(values) or values.max() <= 3 * values.min()):
        logy = None  # a log scale over a narrow range reads as linear but labels badly
    shown = ordered([m for m in methods if m in set(picks.method)])
    return lines(picks, "removed", y, shown, reference=oracle, reference_label=reference_label, xlabel=xlabel,
                 ylabel=ylabel, width=COLUMN, height=height, logy=logy, dodge=0.08)


def before_after(finetuned: "pd.DataFrame", methods: Sequence[str], *, xlabel: str, reference: str = "oracle",
                 reference_label: str = "zero-shot oracle", height: float = 2.2):
    """Each method's pick before ("zero-shot" panel) and after fine-tuning ("fine-tuned" panel) against the number
    of units it removes: the rows of ``scenarios.finetune_picks`` in accuracy (percent; "accuracy_before",
    "accuracy", "method", "removed"; rows with nothing removed, the dense network, are left out). The rows of
    method ``reference`` are drawn dashed; ``methods`` without rows are left out. Returns the figure."""
    import pandas as pd
    pruned = finetuned[finetuned.removed > 0]
    if not len(pruned):
        raise ValueError("no pruned network among the fine-tuned rows (only the dense one?); fine-tune picks first")
    stages = pd.concat([pruned.assign(stage=stage, acc=pruned[column]) for stage, column in
                        (("zero-shot", "accuracy_before"), ("fine-tuned", "accuracy"))], ignore_index=True)
    shown = [m for m in methods if m in set(pruned.method) and m != reference]
    return lines(stages[stages.method != reference], "removed", "acc", shown, panel="stage",
                 panels=["zero-shot", "fine-tuned"], reference=stages[stages.method == reference],
                 reference_label=reference_label, xlabel=xlabel, ylabel="test accuracy (%)", height=height, dodge=0.08)


def scatter_grid(predictions: Mapping[str, np.ndarray], truth: np.ndarray, methods: Sequence[str], *,
                 rho: Mapping[str, float] | None = None, width: float = TEXT, height: float = 1.7,
                 ylabel: str = "true loss", labels: Callable[[str], str] | None = None, max_panels: int = 8):
    """Predicted against true loss, one panel per method (methods with a constant prediction are left out:
    an empty panel says nothing), with the diagonal where predictions are on the loss's scale. ``rho``: a
    correlation shown in each title. Returns the figure."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    labels = labels or default_label
    shown = [m for m in methods if m in predictions and np.ptp(np.asarray(predictions[m])) > 0][:max_panels]
    if not shown:
        raise ValueError("no method has a non-constant prediction to plot")
    fig, axes = plt.subplots(1, len(shown), figsize=(width, height), squeeze=False)
    for ax, m in zip(axes[0], shown):
        ax.scatter(predictions[m], truth, s=4, alpha=0.5, lw=0, color="tab:blue")
        _diagonal(ax, predictions[m], truth)
        # long labels are wrapped to the panel's width (about 16 characters per inch at 8 pt)
        title = textwrap.fill(labels(m).split(" (")[0], max(8, int(16 * width / len(shown))))
        ax.set_title(title + (f"\n$\\rho$ = {float(rho[m]):.2f}" if rho is not None and m in rho else ""))
        ax.set_xlabel("prediction")
        ax.xaxis.set_major_locator(MaxNLocator(3))  # narrow panels: more tick labels run into each other
        ax.yaxis.set_major_locator(MaxNLocator(4))
    axes[0, 0].set_ylabel(ylabel)
    fig.tight_layout()
    return fig


def _diagonal(ax, x: np.ndarray, y: np.ndarray) -> None:
    """The line prediction = truth, dotted, over the range where the two overlap (a loss model's predictions
    lie on it; a score on another scale, e.g. a Taylor importance, does not reach it and gets no line)."""
    lo = max(np.min(x), np.min(y))
    hi = min(np.max(x), np.max(y))
    if hi > lo:
        ax.plot([lo, hi], [lo, hi], color="0.3", lw=0.7, ls=":", zorder=3)


def heatmap(values: np.ndarray, *, xlabel: str, ylabel: str, title: str, label: str, width: float = COLUMN,
            annotate: bool | None = None):
    """A (rows, columns) array as a heatmap with a colour bar named ``label``; cells annotated when there are
    at most 12 columns (unless ``annotate`` says otherwise). Returns the figure."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    rows, columns = np.shape(values)
    fig, ax = plt.subplots(figsize=(width, 0.4 + 0.3 * rows))
    sns.heatmap(values, ax=ax, cmap="viridis", annot=columns <= 12 if annotate is None else annotate, fmt=".2g",
                cbar_kws={"label": label})
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    return fig


def against_dense(cost: "pd.DataFrame", x: str, series: Mapping[str, str], *, xlabel: str, ylabel: str,
                  width: float = COLUMN, height: float = 2.2):
    """Columns of a cost table (``surrogate.profile.pruned_costs``: one row per pruned network, ``*_rel``
    columns relative to the dense network) against column ``x``, one line per ``series`` (column -> legend
    label), with the proportional diagonal. Returns the figure."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    long = cost.melt(id_vars=["removed", x], value_vars=list(series), var_name="series", value_name="value")
    long["series"] = long.series.map(series)
    fig, ax = plt.subplots(figsize=(width, height))
    sns.lineplot(long, x=x, y="value", hue="series", style="series", markers=True, ax=ax)
    ax.plot([0.3, 1], [0.3, 1], color="k", lw=0.6, ls=":", label="proportional")
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.legend(frameon=False)
    return fig


def layered_layout(graph: "ComputationGraph") -> dict[str, tuple[float, float]]:
    """x = longest-path depth from the inputs; y = order within a layer (barycentre of predecessors)."""
    depth: dict[str, int] = {}
    preds: dict[str, list[str]] = {v.name: [] for v in graph.vertices}
    for e in graph.edges:
        preds[e.dst].append(e.src)
    for v in graph.vertices:  # topological order
        depth[v.name] = 1 + max((depth[p] for p in preds[v.name]), default=-1)
    layers: dict[int, list[str]] = {}
    for v in graph.vertices:
        layers.setdefault(depth[v.name], []).append(v.name)
    y: dict[str, float] = {}
    for d in sorted(layers):
        names = layers[d]
        bary = [np.mean([y[p] for p in preds[n]]) if preds[n] else i for i, n in enumerate(names)]
        order = [n for _, n in sorted(zip(bary, names), key=lambda t: t[0])]
        for i, n in enumerate(order):
            y[n] = i - (len(order) - 1) / 2
    return {n: (float(depth[n]), y[n]) for n in depth}


def _short(name: str, parts: int = 2) -> str:
    return ".".join(name.split(".")[-parts:])


def _fan_out(graph: "ComputationGraph", spread: float = 0.5) -> dict[int, float]:
    """Arc curvature of every edge that shares both of its vertices with other edges (the heads of an
    attention output projection), so that each stays visible: the k parallel edges fan out evenly over
    [-spread/2, spread/2]. Keyed by the edge's index in ``graph.edges``; other edges are left out."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i, e in enumerate(graph.edges):
        groups.setdefault((e.src, e.dst), []).append(i)
    return {i: spread * (j / (len(idx) - 1) - 0.5)
            for idx in groups.values() if len(idx) > 1 for j, i in enumerate(idx)}


def draw_graph(graph: "ComputationGraph", ax=None, importances: Sequence[float] | None = None,
               label_vertices: bool = True, cmap: str = "viridis", label: Callable[[str], str] | None = None):
    """Draw the vertex graph left to right. Prunable edges are thick (coloured by ``importances`` if
    given, one value per prunable edge), the other edges thin and grey; ``label`` maps a vertex name to its
    text (default: the last two parts of its path). Returns the matplotlib axes."""
    import matplotlib.pyplot as plt
    from matplotlib import cm, colors

    pos = layered_layout(graph)
    if ax is None:
        width = min(18.0, 2.0 + 0.35 * max(x for x, _ in pos.values()))
        height = min(10.0, 1.5 + 0.5 * (max(abs(y) for _, y in pos.values()) * 2 + 1))
        _, ax = plt.subplots(figsize=(width, height))
    gate = {e.name: i for i, e in enumerate(graph.prunable)}
    if importances is not None:
        imp = np.asarray(importances, dtype=float)
        if imp.shape != (graph.num_prunable,):
            raise ValueError(f"importances must have one value per prunable edge ({graph.num_prunable}), "
                             f"got shape {imp.shape}")
        norm = colors.Normalize(vmin=float(imp.min()), vmax=float(imp.max()) + 1e-12)
        mapper = cm.ScalarMappable(norm=norm, cmap=cmap)
    fan = _fan_out(graph)
    for i, e in enumerate(graph.edges):
        (x0, y0), (x1, y1) = pos[e.src], pos[e.dst]
        if e.name in gate:
            color = mapper.to_rgba(imp[gate[e.name]]) if importances is not None else "tab:red"
            ax.annotate("", xy=(x1, y1), xytext=(x0, y0), zorder=2,
                        arrowprops=dict(arrowstyle="-|>", color=color, lw=2.2, shrinkA=6, shrinkB=6,
                                        connectionstyle=f"arc3,rad={fan.get(i, 0.08)}"))
        else:
            ax.annotate("", xy=(x1, y1), xytext=(x0, y0), zorder=1,
                        arrowprops=dict(arrowstyle="-", color="0.75", lw=0.8, shrinkA=4, shrinkB=4,
                                        connectionstyle=f"arc3,rad={fan.get(i, 0.0)}"))
    style = {"input": ("tab:green", "s"), "output": ("tab:blue", "s"), "module": ("0.3", "o"),
             "op": ("tab:orange", "D")}
    for v in graph.vertices:
        c, mk = style[v.kind]
        x, y = pos[v.name]
        ax.scatter([x], [y], s=40, c=c, marker=mk, zorder=3)
        if label_vertices and len(graph.vertices) <= 60:
            ax.text(x, y + 0.18, (label or _short)(v.name), fontsize=7, ha="center", va="bottom", zorder=4)
    if importances is not None:
        ax.figure.colorbar(mapper, ax=ax, fraction=0.03, pad=0.01, label="edge importance")
    ax.set_axis_off()
    ax.margins(0.05, 0.12)  # room above the top labels for a title
    return ax


DODGE = 1.04  # regret_curves: neighbouring curves drawn 4% apart in passes (a log axis), so none hides another


def regret_curves(summary: "pd.DataFrame", methods: Sequence[str], labels: Mapping[str, str], *,
                  ours: Sequence[str] = (), panel: str = "k", width: float = TEXT, height: float = 2.2,
                  ylabel: str = "true-loss regret"):
    """Mean regret against passes (log x) per method, one panel per ``panel`` value: a line with a band (the
    bootstrap interval over networks) for methods with several budgets, each dodged along x by a factor
    ``DODGE`` per method so that equal curves stay visible, a marker for a criterion with one cost;
    ``ours`` drawn thicker. ``summary``: rows of (panel, P, method, mean, lo, hi), e.g. bench.regret_summary."""
    import matplotlib.pyplot as plt
    values = sorted(summary[panel].unique())
    fig, axes = plt.subplots(1, len(values), figsize=(width, height), squeeze=False, sharey=False)
    curve = [m for m in methods if summary[summary.method == m].spent.nunique() > 1]  # spent more with more P
    point = [m for m in methods if m not in curve]
    # searches: tab10 colours, dodged a little along x so that curves on the same values stay visible;
    # one-cost criteria: other colours and a marker each (never the searches' circles)
    line_colors, point_colors = plt.get_cmap("tab10").colors, plt.get_cmap("Dark2").colors
    markers = "sD^vPX<>"
    for ax, v in zip(axes[0], values):
        sub = summary[summary[panel] == v]
        for j, m in enumerate(curve):
            d = sub[sub.method == m].sort_values("spent")
            if d.empty:
                continue
            c, lw = line_colors[j % 10], 2.2 if m in ours else 1.0
            x = d.spent * DODGE ** (j - (len(curve) - 1) / 2)
            ax.plot(x, d["mean"], marker="o", ms=3, lw=lw, color=c, label=labels.get(m, m),
                    zorder=3 if m in ours else 2)
            ax.fill_between(x, d.lo, d.hi, color=c, alpha=0.12, lw=0)
        for j, m in enumerate(point):
            d = sub[sub.method == m]
            if d.empty:
                continue
            row = d.iloc[0]
            ax.errorbar([row.spent], [row["mean"]], yerr=[[row["mean"] - row.lo], [row.hi - row["mean"]]],
                        fmt=markers[j % len(markers)], ms=6 if m in ours else 4, color=point_colors[j % 8],
                        mec="black" if m in ours else None, capsize=2, label=labels.get(m, m))
        ax.set_xscale("log")
        ticks = sorted({int(p) for p in sub.P} | ({1, 10} if point else set()))
        ax.set_xticks(ticks, [str(t) for t in ticks])      # the budgets (and 1, 10 for the criteria), plain numbers
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_title(f"{panel} = {v}")
        ax.set_xlabel("forward passes")
        ax.set_ylabel(ylabel if ax is axes[0, 0] else "")
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(2, len(names)), frameon=False)
    fig.tight_layout()
    return fig
