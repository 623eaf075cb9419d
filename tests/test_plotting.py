"""The figure theme prints readably: the study figures, drawn as the notebooks draw them and included at the width
they were drawn for (``TEXT`` or ``COLUMN``), show no text below 7 pt. Counts get whole-number ticks (one tick for
one budget), a reference at a single budget stays visible, picks are drawn only for methods that made them."""
import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from pdf_fonts import page_width, text_sizes  # noqa: E402
from surrogate.methods import METHODS  # noqa: E402
from surrogate.paper import save_figure  # noqa: E402
from surrogate.plotting import (COLUMN, FONT, TEXT, against_dense, heatmap, lines, picks_figure, scatter_grid,  # noqa: E402
                                set_theme)

MIN_PT = 7.0
LONGEST = sorted(METHODS, key=lambda m: -len(METHODS[m].label))  # the widest legends the registry can make


def printed_sizes(fig, tmp_path, width_in: float) -> np.ndarray:
    """Text sizes once the saved figure is scaled to ``width_in`` inches."""
    path = tmp_path / "f.pdf"
    save_figure(fig, path)
    return np.array(text_sizes(path)) * width_in * 72 / page_width(path)


def curves(methods, panels=(2, 5, 14, 30), xs=(5, 20, 30), seeds=2, low=1e-3, high=0.9):
    rng = np.random.default_rng(0)
    return pd.DataFrame([{"method": m, "size": p, "x": x, "seed": s, "y": float(rng.uniform(low, high))}
                         for m in methods for p in panels for x in xs for s in range(seeds)])


@pytest.fixture(autouse=True)
def theme():
    set_theme()


@pytest.mark.parametrize("logy", [None, "symlog"])
def test_full_width_panels_print_at_least_7pt(tmp_path, logy):
    methods = LONGEST[:9]  # the synthetic study's regret and efficiency figures: 4 panels, 9 methods
    fig = lines(curves(methods), "x", "y", methods, panel="size", xlabel="edges removed (%)",
                ylabel="regret (true loss)", logy=logy, height=2.2)
    sizes = printed_sizes(fig, tmp_path, TEXT)
    assert sizes.min() >= MIN_PT, f"smallest text {sizes.min():.1f} pt"


@pytest.mark.parametrize("logy", [None, "log"])
def test_half_width_figure_with_reference_prints_at_least_7pt(tmp_path, logy):
    methods = LONGEST[:6]  # the CIFAR accuracy and GPT-2 perplexity figures: one panel, 6 methods and the oracle
    df = curves(methods, panels=(0,), xs=(1, 2, 3, 4, 5, 6), low=200, high=5000)
    oracle = df.groupby("x", as_index=False).y.min()
    fig = lines(df, "x", "y", methods, reference=oracle, reference_label="exhaustive oracle", width=COLUMN,
                height=2.4, xlabel="residual branches removed", ylabel="test perplexity", logy=logy)
    sizes = printed_sizes(fig, tmp_path, COLUMN)
    assert sizes.min() >= MIN_PT, f"smallest text {sizes.min():.1f} pt"


def test_scatter_grid_prints_at_least_7pt(tmp_path):
    rng = np.random.default_rng(1)
    truth = rng.uniform(0, 2, 50)
    methods = LONGEST[:6]
    fig = scatter_grid({m: truth + rng.normal(0, 0.1, 50) for m in methods}, truth, methods,
                       rho={m: 0.9 for m in methods}, width=TEXT, height=1.6)
    sizes = printed_sizes(fig, tmp_path, TEXT)
    assert sizes.min() >= MIN_PT, f"smallest text {sizes.min():.1f} pt"


def test_theme_has_one_text_size():
    import matplotlib as mpl
    keys = ["font.size", "axes.titlesize", "axes.labelsize", "xtick.labelsize", "ytick.labelsize", "legend.fontsize"]
    assert {mpl.rcParams[k] for k in keys} == {FONT} and FONT >= MIN_PT


def _picks(removed: list[int]) -> tuple[pd.DataFrame, pd.DataFrame]:
    rows = [{"seed": s, "removed": r, "method": m, "ppl": 300.0 + 10 * r + 5 * i + s}
            for s in (0, 1) for r in removed for i, m in enumerate(("loo", "taylor2", "superposition_pairs"))]
    picks = pd.DataFrame(rows)
    return picks, picks.drop_duplicates(["seed", "removed"]).assign(ppl=250.0)


def _ticks(ax) -> list[float]:
    lo, hi = ax.get_xlim()
    return [t for t in ax.get_xticks() if lo <= t <= hi]


def test_counts_get_whole_number_ticks():
    picks, oracle = _picks([1, 2, 3])
    fig = picks_figure(picks, oracle, "perplexity", xlabel="edges removed")
    assert _ticks(fig.axes[0]) == [1, 2, 3] and fig.axes[0].get_yscale() == "linear"  # 250-345: a narrow range
    wide = picks.assign(ppl=picks.ppl * 10.0 ** picks.removed)  # perplexities up to 300,000: a log scale
    assert picks_figure(wide, oracle, "perplexity", xlabel="edges removed").axes[0].get_yscale() == "log"
    frac = picks.assign(pct=picks.removed / 4)
    assert any(t % 1 for t in _ticks(lines(frac, "pct", "ppl", ["loo"]).axes[0]))  # not a count: any ticks


def test_one_budget_gets_one_tick_and_a_visible_reference():
    picks, oracle = _picks([2])
    fig = picks_figure(picks, oracle, "perplexity", xlabel="heads removed", reference_label="best found")
    ax = fig.axes[0]
    assert _ticks(ax) == [2]
    reference = [line for line in ax.get_lines() if line.get_label() == "best found"]
    assert reference and reference[0].get_marker() == "_"  # a point of a line would not show


def test_picks_figure_draws_the_methods_that_made_picks_in_registry_order():
    picks, oracle = _picks([1, 2])
    fig = picks_figure(picks, oracle, "perplexity", xlabel="x", methods=("superposition_pairs", "sleb", "loo"))
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert len(labels) == 3 and labels[-1] == "exhaustive oracle"  # sleb made no pick: left out
    with pytest.raises(ValueError, match="unknown unit"):
        picks_figure(picks, oracle, "bits", xlabel="x")


def test_before_after_draws_both_stages_without_the_dense_network():
    from surrogate.plotting import before_after
    rows = [{"method": m, "removed": r, "seed": s, "accuracy_before": 50.0 - 10 * r + s, "accuracy": 80.0 - r - s}
            for m in ("loo", "superposition_pairs", "oracle") for r in (2, 3) for s in (0, 1)]
    rows.append({"method": "dense", "removed": 0, "seed": 0, "accuracy_before": 90.0, "accuracy": 90.0})
    fig = before_after(pd.DataFrame(rows), ["superposition_pairs", "loo", "sleb"], xlabel="branches")
    assert [ax.get_title() for ax in fig.axes] == ["zero-shot", "fine-tuned"]
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert len(labels) == 3 and labels[-1] == "zero-shot oracle"          # sleb has no rows; the dense one is no pick
    assert all(_ticks(ax) == [2, 3] for ax in fig.axes)
    with pytest.raises(ValueError, match="no pruned network"):
        before_after(pd.DataFrame(rows[-1:]), ["loo"], xlabel="branches")


def test_heatmap_and_cost_curves():
    fig = heatmap(np.arange(6.0).reshape(2, 3), xlabel="head", ylabel="layer", title="t", label="loss")
    assert fig.axes[0].get_xlabel() == "head" and len(fig.axes) == 2  # the map and its colour bar
    cost = pd.DataFrame({"removed": [0, 1, 2], "macs_rel": [1.0, 0.8, 0.6], "a_rel": [1.0, 0.9, 0.7],
                         "b_rel": [1.0, 0.85, 0.65]})
    fig = against_dense(cost, "macs_rel", {"a_rel": "batch 1", "b_rel": "batch 8"}, xlabel="MACs", ylabel="latency")
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["batch 1", "batch 8", "proportional"]


def test_panels_share_one_axis_label_and_titles_do_not_overlap():
    fig = lines(curves(LONGEST[:4]), "x", "y", LONGEST[:4], panel="size", panel_title=lambda s: f"{s} edges",
                xlabel="masks beyond the prior design", ylabel="Spearman (realistic)")
    assert [ax.get_xlabel() for ax in fig.axes] == [""] * 4 and fig.get_supxlabel() == "masks beyond the prior design"
    fig.canvas.draw()
    boxes = [ax.title.get_window_extent() for ax in fig.axes]
    assert all(a.x1 <= b.x0 for a, b in zip(boxes, boxes[1:]))
    single = lines(curves(LONGEST[:2], panels=(2,)), "x", "y", LONGEST[:2], xlabel="edges removed")
    assert single.axes[0].get_xlabel() == "edges removed"


def test_scatter_draws_the_diagonal_only_on_the_truth_scale():
    truth = np.linspace(1.0, 3.0, 50)
    fig = scatter_grid({"loss_model": truth + 0.1, "score": truth * 1e-3}, truth, ["loss_model", "score"])
    on_scale, other = fig.axes[:2]
    assert len(on_scale.lines) == 1 and len(other.lines) == 0  # 1e-3..3e-3 never meets 1..3
    fig.canvas.draw()
    for ax in fig.axes[:2]:
        labels = [t.get_window_extent() for t in ax.get_xticklabels() if t.get_text()]
        assert len(labels) <= 4 and all(a.x1 <= b.x0 for a, b in zip(labels, labels[1:]))


def test_regret_curves_tell_every_method_apart_and_hide_no_curve(tmp_path):
    from matplotlib.colors import to_hex
    from surrogate.plotting import regret_curves
    searches = ["random", "greedy", "evolution", "linear", "pairwise", "loss_space", "sequential"]
    criteria = ["block_influence", "loo", "magnitude", "taylor1_abs", "taylor2"]
    rows = [{"k": 3, "P": p, "method": m, "mean": 0.0, "lo": 0.0, "hi": 0.0, "spent": p}  # all on one curve
            for p in (20, 36, 72) for m in searches]
    rows += [{"k": 3, "P": p, "method": m, "mean": 0.5 + i, "lo": 0.4 + i, "hi": 0.6 + i, "spent": 1 + i}
             for p in (20, 36, 72) for i, m in enumerate(criteria)]
    summary = pd.DataFrame(rows)
    fig = regret_curves(summary, searches + criteria, {m: m for m in searches + criteria}, ours=["sequential"])
    ax = fig.axes[0]
    handles, names = ax.get_legend_handles_labels()
    assert sorted(names) == sorted(searches + criteria)
    styles = set()
    for h in handles:
        line = h.lines[0] if hasattr(h, "lines") else h  # an errorbar container's data line
        styles.add((to_hex(line.get_color()), line.get_marker()))
    assert len(styles) == len(names)                             # no two methods drawn alike
    xs = [tuple(np.round(l.get_xdata(), 6)) for l in ax.get_lines() if l.get_label() in searches]
    assert len(set(xs)) == len(searches)                         # equal curves are shifted apart along x
    assert {int(t) for t in ax.get_xticks()} >= {1, 10, 20, 36, 72}
    assert printed_sizes(fig, tmp_path, TEXT).min() >= MIN_PT


def test_equal_picks_are_shifted_apart_not_drawn_over_each_other():
    picks, oracle = _picks([1, 2, 3])
    same = picks.assign(ppl=300.0)  # every method picks equally well
    fig = picks_figure(same, oracle, "perplexity", xlabel="x", methods=("superposition_pairs", "loo"))
    ax = fig.axes[0]
    xs = {l.get_label(): tuple(l.get_xdata()) for l in ax.get_lines() if l.get_label() in {"Leave-one-out",
                                                                                          "Superposition + pairs (ours)"}}
    assert len(xs) == 2 and len(set(xs.values())) == 2
    assert max(abs(a - b) for a, b in zip(*xs.values())) < 0.2 and _ticks(ax) == [1, 2, 3]
