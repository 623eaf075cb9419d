"""Contracts of the shared experiment protocol, the method registry, the report helpers and the public API,
on tiny models that are not random graphs."""
from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn

import surrogate
from surrogate import (METHODS, Budget, Context, ExperimentConfig, GatedModel, MaskFamily, Measured, Subset, Task,
                       auto_prune, build_graph, evaluate_masks, fit_method, prior_design, run_experiment)
from surrogate.experiment import GraphView, within_k_spearman
from surrogate.masks import exhaustive_masks, mask_text
from surrogate.methods import (AdditivePredictor, Method, fitting_context, measure_design, method_names,
                               register_method)
from surrogate.paper import Macros, macro_name
from surrogate.plotting import draw_graph
from surrogate.report import against_each, macros_from, paired_comparison, wide_table, summarize
from surrogate.train import cached_model


class TinyResNet(nn.Module):
    """Three residual blocks (conv-BN-ReLU-conv-BN plus an identity shortcut) on 8x8 images, 4 classes."""

    def __init__(self, c: int = 6, blocks: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                          nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)) for _ in range(blocks))
        self.head = nn.Linear(c, 4)

    def forward(self, x):
        h = self.stem(x)
        for b in self.blocks:
            h = torch.relu(h + b(h))
        return self.head(h.mean((2, 3)))


def _data(n: int, seed: int) -> Subset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = (x[:, 0].mean((1, 2)) > 0).long() + 2 * (x[:, 1].mean((1, 2)) > 0).long()
    return Subset(f"data{seed}", x, y)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    net = TinyResNet()
    train = _data(256, 1)
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    for _ in range(30):  # a few steps so that BatchNorm statistics and predictions are not trivial
        loss = nn.functional.cross_entropy(net(train.inputs), train.targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    return net, _data(64, 2), _data(200, 3)


CONFIG = ExperimentConfig(
    methods=("loo", "taylor2", "superposition"),
    families=(MaskFamily("branches", "exhaustive", edges=r"blocks\.\d+\.4 ->"),
              MaskFamily("any", "removed", n=20, removed=(0.1, 0.5))),
    budgets=(1, 2), budget_unit="edges", budget_edges=r"blocks\.\d+\.4 ->", eval_batch=256, context_batch=64)


@pytest.fixture(scope="module")
def result(tiny):
    net, scoring, evaluation = tiny
    return run_experiment(net, scoring, evaluation, Task("classification"), CONFIG, seed=3, key={"model": "tiny"})


def test_experiment_records_have_one_row_per_method_and_protocol(result):
    prot = pd.DataFrame(result.protocols)
    assert len(prot) == 3 * 2 and set(prot.method) == {"loo", "taylor2", "superposition"}
    assert set(prot.protocol) == {"branches", "any"}
    for col in ("model", "edges", "spearman", "kendall", "top10", "spearman_connected", "spearman_within_k",
                "forward", "backward", "seconds"):
        assert col in prot.columns, col
    assert (prot.model == "tiny").all() and (prot.edges == 6).all()  # 3 branches + 3 shortcuts
    # pass counts come from the registry: taylor2 = 1 forward, 1 + E backward; superposition = K + 1
    t2 = prot[prot.method == "taylor2"].iloc[0]
    assert (t2.forward, t2.backward) == (1, 7)
    assert prot[prot.method == "superposition"].forward.iloc[0] == 6 + 2 + 1
    info = result.info
    assert info["branches_n_masks"] == 2 ** 3 - 3 - 1  # every branch mask except the fitted ones
    assert 0 <= info["ceiling_branches"] <= 1 and "test_acc" in info


def test_regret_is_measured_against_the_true_optimum(tiny, result):
    reg = pd.DataFrame(result.regret)
    assert len(reg) == 3 * 2 and reg.exhaustive.all()
    assert set(reg.removed) == {1, 2}
    # an independent search: every mask removing b of the 3 branches, measured here
    net, scoring, evaluation = tiny
    graph = build_graph(net, scoring.inputs[:4])
    branches = np.array([".4 ->" in n for n in graph.edge_names])
    for b, rows in reg.groupby("removed"):
        masks = exhaustive_masks(graph.num_prunable, (b,), branches)
        truth = evaluate_masks(GatedModel(graph), masks, evaluation, Task("classification"))
        loss_of = {mask_text(m): loss for m, loss in zip(masks, truth.loss)}
        assert rows.best_loss.unique() == pytest.approx([truth.loss.min()], rel=1e-6)
        assert rows.best_accuracy.unique() == pytest.approx([truth.accuracy.max()])
        for r in rows.itertuples():
            assert r.chosen_loss == pytest.approx(loss_of[r.mask], rel=1e-6)
            assert r.regret == pytest.approx(loss_of[r.mask] - truth.loss.min(), abs=1e-6)
    # picks only remove allowed (branch) edges
    names = result.example["edge_names"]
    for mask in reg["mask"]:
        removed = [names[i] for i, c in enumerate(mask) if c == "0"]
        assert all(".4 ->" in n for n in removed)


def test_experiment_is_reproducible(tiny, result):
    net, scoring, evaluation = tiny
    again = run_experiment(net, scoring, evaluation, Task("classification"), CONFIG, seed=3, key={"model": "tiny"})
    a, b = pd.DataFrame(result.protocols).drop(columns="seconds"), pd.DataFrame(again.protocols).drop(columns="seconds")
    pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(pd.DataFrame(result.regret), pd.DataFrame(again.regret))


def test_example_is_picklable_and_drawable(result):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ex = pickle.loads(pickle.dumps(result.example))
    assert isinstance(ex["graph"], GraphView) and ex["graph"].num_prunable == 6
    ax = draw_graph(ex["graph"], importances=ex["importance"]["loo"])
    plt.close(ax.figure)
    assert set(ex["predictions"]["any"]) == {"loo", "taylor2", "superposition"}


def test_within_k_spearman_ignores_differences_between_budgets():
    removed = np.array([1, 1, 1, 2, 2, 2])
    true = np.array([1.0, 2.0, 3.0, 10.0, 11.0, 12.0])
    pred = np.array([1.0, 2.0, 3.0, 0.1, 0.2, 0.3])  # right within each k, wrong across
    assert within_k_spearman(pred, true, removed) == pytest.approx(1.0)


def test_mask_families(tiny):
    net, scoring, _ = tiny
    graph = build_graph(net, scoring.inputs[:2])
    fit = prior_design(graph.num_prunable)
    fam = MaskFamily("b", "exhaustive", edges=r"blocks\.\d+\.4 ->", holdout=False)
    every = fam.draw(graph, seed=0)
    assert len(every) == 8 and len(np.unique(every, axis=0)) == 8
    held = MaskFamily("b", "exhaustive", edges=r"blocks\.\d+\.4 ->").draw(graph, seed=0, exclude=fit)
    assert not any((fit == row).all(1).any() for row in held)
    k2 = MaskFamily("k", "removed", n=50, counts=(2,), connected=True).draw(graph, seed=1, exclude=fit)
    assert ((k2 == 0).sum(1) == 2).all() and graph.connected(k2).all()
    with pytest.raises(ValueError, match="no prunable edge matches"):
        MaskFamily("x", "exhaustive", edges="nothing-like-this").draw(graph, seed=0)


def test_unknown_methods_fail_before_any_measurement():
    with pytest.raises(KeyError, match="unknown method"):
        ExperimentConfig(methods=("superposition", "nonsense"))
    with pytest.raises(ValueError, match="not fitted"):
        ExperimentConfig(methods=("loo",), extra_k=(0, 5), k_methods=("loo",))


# ---------------------------------------------------------------------------------------------------
# the registry

@pytest.mark.parametrize("name", list(METHODS))
def test_every_registered_method_fits_on_a_tiny_graph(tiny, name, quick_fits):
    net, scoring, _ = tiny
    graph = build_graph(net, scoring.inputs[:2])
    gated = GatedModel(graph)
    fit = prior_design(graph.num_prunable)
    measured = Measured.of(fit, evaluate_masks(gated, fit, scoring, Task("classification"), keep_outputs=True))
    pred = fit_method(name, Context(graph, gated, scoring, Task("classification"), measured, batch_size=32))
    masks = MaskFamily("m", "removed", n=10, removed=(0.1, 0.6), connected=False).draw(graph, 0)
    y = pred.predict(masks)
    assert y.shape == (len(masks),) and np.isfinite(y).all()
    assert np.asarray(pred.importance).shape == (graph.num_prunable,)
    m = METHODS[name]
    assert m.label and set(m.passes(6, 8)) == {"forward", "backward"}


def test_registry_metadata_and_registration():
    assert method_names(ours=True) == ["flow", "graph_flow", "superposition", "superposition_state",
                                      "superposition_pairs"]
    assert all(METHODS[n].fitted for n in ("linear", "fcn", "prior_graph", "graph_flow", "superposition"))
    assert METHODS["superposition"].needs_outputs and not METHODS["loo"].needs_outputs
    with pytest.raises(KeyError, match="registered already"):
        register_method(Method("loo", "again", lambda ctx: None, lambda e, k: (0, 0)))
    with pytest.raises(KeyError, match="unknown method"):
        fit_method("nonsense", None)


def test_a_registered_method_is_usable_everywhere(tiny):
    net, scoring, _ = tiny
    name = "first_edge_last"
    register_method(Method(name, "Test: first edge cheapest", lambda ctx: AdditivePredictor(
        name, np.arange(ctx.num_edges, dtype=float)), lambda e, k: (0, 0)), replace=True)
    try:
        res = auto_prune(net, scoring, Task("classification"), Budget(edges=1), method=name)
        assert res.mask[0] == 0 and res.mask[1:].all()
    finally:
        del METHODS[name]


# ---------------------------------------------------------------------------------------------------
# measurements never change the model

def _state(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()])


@pytest.mark.parametrize("name", list(METHODS))
def test_no_method_changes_a_batchnorm_model(tiny, name, quick_fits):
    net, scoring, _ = tiny
    model = TinyResNet()
    model.load_state_dict(net.state_dict())
    model.train()
    model.blocks[1].eval()  # a mix of modes, as a user may leave it: every module's own flag must survive
    before = _state(model)
    graph = build_graph(model, scoring.inputs[:2])
    gated = GatedModel(graph)
    fit = prior_design(graph.num_prunable)
    measured = Measured.of(fit, evaluate_masks(gated, fit, scoring, Task("classification"), keep_outputs=True))
    fit_method(name, Context(graph, gated, scoring, Task("classification"), measured, batch_size=32))
    after = _state(model)
    assert before[1] == after[1]
    for k in before[0]:
        assert torch.equal(before[0][k], after[0][k]), k


def test_auto_prune_does_not_change_a_batchnorm_model(tiny):
    net, scoring, _ = tiny
    model = TinyResNet()
    model.load_state_dict(net.state_dict())
    model.train()
    before = _state(model)
    res = auto_prune(model, scoring, Task("classification"), Budget(edges=1), finetune_steps=2, train_data=scoring)
    after = _state(model)
    assert before[1] == after[1] and res.connected
    for k in before[0]:
        assert torch.equal(before[0][k], after[0][k]), k


# ---------------------------------------------------------------------------------------------------
# report helpers and macros

def test_paired_comparison_pairs_on_seed_and_respects_direction():
    rows = []
    for seed, (a, b) in enumerate([(0.9, 0.5), (0.8, 0.6), (0.7, 0.65)]):
        rows += [{"seed": seed, "g": 1, "method": "superposition", "v": a}, {"seed": seed, "g": 1, "method": "loo", "v": b}]
    rows.append({"seed": 7, "g": 1, "method": "loo", "v": 0.0})  # a seed only the baseline has: not paired
    df = pd.DataFrame(rows).sample(frac=1.0, random_state=0)  # row order must not matter
    t = paired_comparison(df, "v", "g").iloc[0]
    assert t.n == 3 and t.wins == 3 and t.ours == "superposition" and t.baseline == "loo"
    assert t.ours_mean == pytest.approx(0.8) and t.baseline_mean == pytest.approx(np.mean([0.5, 0.6, 0.65]))
    # lower is better (e.g. regret), one seed only: wins count the lower values
    one = pd.DataFrame([{"seed": 0, "g": 1, "method": "superposition", "v": 0.1},
                        {"seed": 0, "g": 1, "method": "loo", "v": 0.3}])
    t1 = paired_comparison(one, "v", "g", higher_is_better=False).iloc[0]
    assert t1.wins == 1 and t1.n == 1 and np.isnan(t1.wilcoxon_p)


def test_against_each_pairs_on_network_and_budget():
    rows = [{"seed": s, "budget": b, "method": m, "v": v + 0.1 * s + b}
            for s in range(3) for b in (2, 3) for m, v in (("ours", 1.0), ("a", 0.5), ("b", 1.5))]
    rows.append({"seed": 9, "budget": 2, "method": "a", "v": 100.0})  # only the other has it: not paired
    t = against_each(pd.DataFrame(rows).sample(frac=1.0, random_state=1), "v", "ours").set_index("other")
    assert list(t.index) != [] and set(t.index) == {"a", "b"}
    assert t.loc["a", "n"] == 6 and t.loc["a", "wins"] == 6 and t.loc["a", "mean_diff"] == pytest.approx(0.5)
    assert t.loc["b", "wins"] == 0 and t.loc["b", "mean_diff"] == pytest.approx(-0.5)
    low = against_each(pd.DataFrame(rows), "v", "ours", higher_is_better=False).set_index("other")
    assert low.loc["b", "wins"] == 6 and 0 < low.loc["b", "wilcoxon_p"] < 0.05
    with pytest.raises(ValueError, match="no rows"):
        against_each(pd.DataFrame(rows), "v", "missing")


def test_wide_table_groups_by_any_column():
    df = pd.DataFrame([{"method": m, "budget": b, "v": v, "seed": s} for m, v0 in (("loo", 0.5), ("superposition", 0.7))
                       for b in (1, 2) for s, v in enumerate((v0, v0 + 0.1))])
    t = wide_table(summarize(df, ["method", "budget"], ["v"]), "v", ["loo", "superposition"], "budget", [1, 2],
                   header=lambda b: f"k={b}")
    assert list(t.columns) == ["Method", "k=1", "k=2"]
    assert t.Method.tolist() == ["Leave-one-out", "Superposition (ours)"]
    assert t["k=1"].iloc[1].startswith("\\textbf{0.750")
    one = wide_table(summarize(df[df.seed == 0], ["method", "budget"], ["v"]), "v", ["loo"], "budget", [1])
    assert one["1"].iloc[0] == "\\textbf{0.500}"  # one network: no "± 0.000"


def test_macro_names_never_collide_silently():
    assert macro_name("Syn", "prior", "taylor2", 14) == "SynPriorTaylorTwoOneFour"
    m = Macros(A=1)
    m["A"] = 1  # the same value again is fine
    with pytest.raises(KeyError, match="twice"):
        m["A"] = 2
    df = pd.DataFrame({"size": [3, 4], "v": [0.1, 0.2]})
    with pytest.raises(KeyError, match="twice"):
        macros_from(df, "Syn", ["size"], "v", names={"size": lambda s: "S"})
    assert macros_from(df, "Syn", ["size"], "v") == {"SynThree": "0.100", "SynFour": "0.200"}


def test_model_initialisation_is_seeded_whatever_the_global_rng_did(tmp_path):
    fits = []
    for noise in (1, 5):
        torch.manual_seed(noise)
        torch.randn(noise)  # another state of the global generator before the build
        model, _ = cached_model(({"what": "init"},), lambda: nn.Linear(3, 2), lambda m: fits.append(1) or {},
                                cache_dir=tmp_path / str(noise))
        fits.append(model.weight.detach().clone())
    assert torch.equal(fits[1], fits[3])


def test_public_api_is_small_and_importable():
    assert len(surrogate.__all__) <= 25
    for name in surrogate.__all__:
        assert hasattr(surrogate, name), name


def test_prefix_evaluation_gives_the_same_records(tiny, result):
    from dataclasses import replace
    net, scoring, evaluation = tiny
    prefix = run_experiment(net, scoring, evaluation, Task("classification"), replace(CONFIG, eval_strategy="prefix"),
                            seed=3, key={"model": "tiny"})
    pd.testing.assert_frame_equal(pd.DataFrame(result.protocols).drop(columns="seconds"),
                                  pd.DataFrame(prefix.protocols).drop(columns="seconds"))
    pd.testing.assert_frame_equal(pd.DataFrame(result.regret), pd.DataFrame(prefix.regret))


def test_fitting_context_measures_what_the_methods_need(tiny):
    net, scoring, _ = tiny
    graph = build_graph(net, scoring.inputs[:2])
    task, fit = Task("classification"), prior_design(graph.num_prunable)
    plain, state, outs = (fitting_context(graph, scoring, task, names, fit, batch_size=32).measured
                          for names in (["loo"], ["loo", "superposition_pairs"], ["superposition"]))
    assert np.array_equal(plain.masks, fit)
    assert np.array_equal(measure_design(GatedModel(graph), scoring, task, ["loo"], batch_size=32).masks, fit)
    assert np.allclose(plain.losses, state.losses) and np.allclose(plain.losses, outs.losses)
    assert plain.state is None and plain.outputs is None
    assert state.state is not None and len(state.state) == len(plain.masks) and state.outputs is None
    assert outs.outputs is not None and outs.state is None
    # the state-kept design is exactly what the pair-corrected surrogate would otherwise measure itself
    ctx = lambda m: Context(graph, GatedModel(graph), scoring, task, m, batch_size=32)  # noqa: E731
    masks = MaskFamily("m", "removed", n=12, removed=(0.1, 0.5)).draw(graph, 1)
    a, b = fit_method("superposition_pairs", ctx(state)).predict(masks), fit_method("superposition_pairs", ctx(plain)).predict(masks)
    assert np.allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(KeyError, match="unknown method"):
        fitting_context(graph, scoring, task, ["nonsense"], fit)
    # no masks: nothing measured (zero-shot methods); every edge removable is the same as no restriction
    some = np.arange(graph.num_prunable) % 2 == 0
    zero = fitting_context(graph, scoring, task, ["magnitude"], None, batch_size=32, context_batch=7,
                           removable=np.ones(graph.num_prunable, dtype=bool), max_removed=2)
    assert zero.measured is None and zero.removable is None and zero.batch_size == 7 and zero.max_removed == 2
    assert np.array_equal(fitting_context(graph, scoring, task, [], None, removable=some).removable, some)


def test_a_mask_in_two_families_is_measured_once_and_gets_one_truth(tiny, monkeypatch):
    # the second family repeats the first family's masks that remove two branches: the truth phase measures the
    # union once, and both families report the same loss for a shared mask
    from dataclasses import replace
    import surrogate.experiment as experiment
    net, scoring, evaluation = tiny
    branches = r"blocks\.\d+\.4 ->"
    config = replace(CONFIG, methods=("loo",), budgets=(), families=(
        MaskFamily("branches", "exhaustive", edges=branches),
        MaskFamily("two", "removed", n=3, counts=(2,), edges=branches)))
    sizes = []
    real = experiment.evaluate_masks
    monkeypatch.setattr(experiment, "evaluate_masks", lambda g, m, sub, *a, **k: (
        sizes.append((sub.name, len(m))), real(g, m, sub, *a, **k))[1])
    res = run_experiment(net, scoring, evaluation, Task("classification"), config, seed=3)
    truth = {p: dict(zip(map(bytes, (m > 0.5).astype(np.uint8)), res.example["truth"][p]))
             for p, m in res.example["masks"].items()}
    shared = set(truth["two"]) & set(truth["branches"])
    assert len(shared) == len(truth["two"]) == 3
    assert all(truth["two"][k] == truth["branches"][k] for k in shared)
    halves = [n for s, n in sizes if s.endswith("[:half]")]
    assert halves == [len(truth["branches"])]


def test_mask_from_text_inverts_mask_text_and_rejects_what_is_not_a_mask():
    from surrogate.masks import mask_from_text, mask_text
    m = np.array([1, 0, 0, 1, 1], dtype=np.float32)
    back = mask_from_text(mask_text(m), 5)
    assert back.dtype == np.float32 and np.array_equal(back, m)
    for bad in ("10x1", "", "1 0 1"):
        with pytest.raises(ValueError, match="string of 0 and 1"):
            mask_from_text(bad)
    with pytest.raises(ValueError, match="4 entries; the graph has 5"):
        mask_from_text("1011", 5)
