"""Properties of ground truth, scorers, surrogates and pruning on tiny models."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from surrogate import GatedModel, build_graph, prune
from surrogate.evaluate import Subset, Task, evaluate_masks
from surrogate.masks import all_masks_with_removed, bernoulli_masks, prior_design, sparsity_masks
from surrogate.models import Block, RandomGraphConfig, RandomGraphNet, resnet20
from surrogate.plotting import draw_graph
from surrogate.profile import count_macs, count_params
from surrogate.pruning import Budget, CostModel, auto_prune, select_mask
from surrogate.methods import METHODS, AdditivePredictor, Context, Measured, fit_method, method_names
from surrogate.scorers import QuadraticPredictor, gate_derivatives
from surrogate.flow import FlowStructure
from surrogate.surrogates import (GraphFlowSurrogate, LinearSurrogate, MLPSurrogate, PriorGraphSurrogate,
                                  SuperpositionSurrogate)


@pytest.fixture(scope="module")
def small():
    """A small random-graph net, briefly trained on the teacher task: graph, gated model, scoring subset."""
    from surrogate.data import TeacherTaskConfig, make_teacher_task
    from surrogate.train import TrainConfig, train
    task = make_teacher_task(TeacherTaskConfig(num_classes=4, n_train=600, n_val=200, n_score=64, n_test=0))
    torch.manual_seed(0)
    net = RandomGraphNet(RandomGraphConfig(iterations=3, seed=2, num_classes=4))
    train(net, Subset("train", *task.train), Subset("val", *task.val), Task("classification"),
          TrainConfig(epochs=15, patience=None))
    x, y = task.score
    graph = build_graph(net, x[:4], vertices=(Block,), edges="all")
    gated = GatedModel(graph)
    ctx = Context(graph, gated, Subset("scoring", x, y), Task("classification"), seed=0, batch_size=32)
    return net, graph, gated, ctx


# ---------------------------------------------------------------------------------------------------
# ground truth

def test_evaluate_masks_matches_direct_computation(small):
    net, graph, gated, ctx = small
    masks = bernoulli_masks(graph.num_prunable, 7, 0.7, seed=0)
    res = evaluate_masks(gated, masks, ctx.scoring, ctx.task, batch_size=20, masks_per_pass=3)
    for m, loss, acc in zip(masks, res.loss, res.accuracy):
        with torch.no_grad():
            out = gated(ctx.scoring.inputs, mask=torch.tensor(m))
        ref = nn.functional.cross_entropy(out, ctx.scoring.targets).item()
        assert loss == pytest.approx(ref, rel=1e-5)
        assert acc == pytest.approx((out.argmax(1) == ctx.scoring.targets).float().mean().item())
    again = evaluate_masks(gated, masks, ctx.scoring, ctx.task, batch_size=64, masks_per_pass=7)
    np.testing.assert_allclose(again.loss, res.loss, rtol=1e-5)  # batching does not change S(m)


# ---------------------------------------------------------------------------------------------------
# gate-space derivatives

def test_gradient_and_hessian_match_finite_differences(small):
    net, graph, _, ctx = small
    net64 = RandomGraphNet(net.config).double().eval()
    net64.load_state_dict({k: v.double() for k, v in net.state_dict().items()})
    for block in net64.modules():  # smooth activations: finite differences across ReLU kinks are not
        if isinstance(block, Block) and isinstance(block.act, nn.ReLU):  # the (piecewise) Hessian
            block.act = nn.Tanh()
    g64 = build_graph(net64, ctx.scoring.inputs[:4].double(), vertices=(Block,), edges="all")
    gated = GatedModel(g64)
    data = Subset("scoring", ctx.scoring.inputs.double(), ctx.scoring.targets)
    s1, grad, hess = gate_derivatives(gated, data, ctx.task, batch_size=25)
    e, eps = g64.num_prunable, 1e-4

    def s(m: torch.Tensor) -> float:
        with torch.no_grad():
            out = gated(data.inputs, mask=m.double(), allow_extrapolation=True)  # finite differences step past 1
        return nn.functional.cross_entropy(out, data.targets).item()

    ones = torch.ones(e, dtype=torch.float64)
    assert s1 == pytest.approx(s(ones), rel=1e-10)
    fd = np.array([(s(ones + eps * torch.eye(e)[i]) - s(ones - eps * torch.eye(e)[i])) / (2 * eps) for i in range(e)])
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-8)
    for i in range(0, e, 3):
        ei, ej = torch.eye(e, dtype=torch.float64)[i], torch.eye(e, dtype=torch.float64)
        fd_row = np.array([(s(ones + eps * ei + eps * ej[j]) - s(ones + eps * ei - eps * ej[j])
                            - s(ones - eps * ei + eps * ej[j]) + s(ones - eps * ei - eps * ej[j])) / (4 * eps ** 2)
                           for j in range(e)])
        np.testing.assert_allclose(hess[i], fd_row, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(hess, hess.T)


class _GateLinear(nn.Module):
    """y = sum(stack(a(x), b(x), c(x))): one merge of three branches, so the output is linear in the three
    gates and the squared error is exactly quadratic. (A chain (a + b) + c would not be: its gates multiply.)"""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 2), nn.Linear(3, 2), nn.Linear(3, 2)

    def forward(self, x):
        return torch.stack([self.a(x), self.b(x), self.c(x)]).sum(0)


def test_quadratic_model_is_exact_when_loss_is_quadratic_in_gates():
    torch.manual_seed(0)
    model = _GateLinear().double()
    x, t = torch.randn(40, 3, dtype=torch.float64), torch.randn(40, 2, dtype=torch.float64)
    graph = build_graph(model, x[:2])
    assert graph.num_prunable == 3
    gated = GatedModel(graph)
    ctx = Context(graph, gated, Subset("s", x, t), Task("regression"), batch_size=16)
    quad = fit_method("taylor2", ctx)
    masks = np.vstack([all_masks_with_removed(3, k) for k in range(4)])
    truth = evaluate_masks(gated, masks, ctx.scoring, ctx.task).loss
    np.testing.assert_allclose(quad.predict(masks), truth, rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------------------------------------------
# scorers

@pytest.mark.parametrize("name", method_names(fitted=False))
def test_scorers_are_deterministic_and_shaped(small, name):
    _, graph, gated, ctx = small
    masks = bernoulli_masks(graph.num_prunable, 20, 0.6, seed=1)
    # fresh contexts: a second call on the same context would read the first one's cached quantities
    fresh = lambda: Context(graph, gated, ctx.scoring, ctx.task, seed=0, batch_size=32)  # noqa: E731
    a, b = fit_method(name, fresh()), fit_method(name, fresh())
    assert a.importance.shape == (graph.num_prunable,)
    assert np.array_equal(a.predict(masks), b.predict(masks))
    assert a.predict(masks).shape == (20,)


def test_loo_prediction_is_exact_on_single_edge_masks(small):
    _, graph, gated, ctx = small
    e = graph.num_prunable
    loo = fit_method("loo", ctx)
    singles = 1 - np.eye(e, dtype=np.float32)
    truth = evaluate_masks(gated, singles, ctx.scoring, ctx.task).loss
    np.testing.assert_allclose(loo.predict(singles), truth, rtol=1e-6)
    assert loo.predict(np.ones(e))[0] == pytest.approx(ctx.base_loss())


def test_connectivity_predictor(small):
    _, graph, _, _ = small
    pred = fit_method("connectivity", Context(graph, None, None, None))
    e = graph.num_prunable
    assert pred.predict(np.ones(e))[0] == 0 and pred.predict(np.zeros(e))[0] == 1


def test_param_l1_counts_exclusive_parameters():
    torch.manual_seed(0)
    net = resnet20().eval()
    graph = build_graph(net, torch.randn(2, 3, 32, 32))
    ctx = Context(graph, None, None, None)
    imp = fit_method("param_l1", ctx).importance
    for e, v in zip(graph.prunable, imp):
        if e.src.endswith("shortcut"):
            assert v == 0  # a skip connection owns no parameters
        else:
            blk = net.get_submodule(e.src.rsplit(".", 1)[0])
            ref = sum(p.abs().sum().item() for m in (blk.conv1, blk.bn1, blk.conv2, blk.bn2) for p in m.parameters())
            assert v == pytest.approx(ref, rel=1e-4)


# ---------------------------------------------------------------------------------------------------
# surrogates fit their training masks

def test_linear_surrogate_recovers_linear_losses(small):
    _, graph, _, ctx = small
    e = graph.num_prunable
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=e), 1.5
    masks = np.vstack([prior_design(e), bernoulli_masks(e, 30, 0.5, seed=3)])
    sur = LinearSurrogate(ctx).fit(Measured(masks, b + masks @ w))
    test = bernoulli_masks(e, 50, 0.5, seed=4)
    np.testing.assert_allclose(sur.predict(test), b + test @ w, atol=1e-6)
    np.testing.assert_allclose(sur.importance, -w, atol=1e-6)


def test_fcn_fits_its_training_masks(small):
    _, graph, _, ctx = small
    e = graph.num_prunable
    masks = prior_design(e)
    y = np.random.default_rng(1).normal(size=len(masks))
    sur = MLPSurrogate(ctx).fit(Measured(masks, y))
    assert sur.predict(masks).shape == (len(masks),)  # (M,), not (M, 1)
    assert np.abs(sur.predict(masks) - y).max() < 0.05 * np.ptp(y)


def test_prior_graph_surrogate_fits_targets_it_can_represent(small):
    _, graph, _, ctx = small
    e = graph.num_prunable
    teacher = PriorGraphSurrogate(ctx, epochs=1)
    teacher.fit(Measured(prior_design(e), np.arange(e + 2, dtype=float)))
    with torch.no_grad():
        teacher.theta.copy_(torch.randn(len(teacher.theta)))
    masks = np.vstack([prior_design(e), bernoulli_masks(e, 40, 0.8, seed=5)])
    g = teacher._g(torch.tensor(masks, dtype=torch.float32)).detach().numpy()
    y = 3.0 - 2.0 * g  # any decreasing affine map of G is representable through the min-max transform
    student = PriorGraphSurrogate(ctx, epochs=4000, lr=0.02).fit(Measured(masks, y))
    assert np.abs(student.predict(masks) - y).max() < 0.03 * np.ptp(y)


def test_prior_graph_is_pinned_at_all_ones_and_all_zeros(small):
    # the published model's flaw: G(1) = 1 and G(0) = 0 whatever the parameters
    _, graph, _, ctx = small
    e = graph.num_prunable
    sur = PriorGraphSurrogate(ctx, epochs=50).fit(Measured(prior_design(e), np.random.default_rng(0).random(e + 2)))
    g = sur._g(torch.tensor(np.vstack([np.ones(e), np.zeros(e)]), dtype=torch.float32)).detach().numpy()
    np.testing.assert_allclose(g, [1.0, 0.0], atol=1e-6)


def test_graph_flow_fits_measured_training_masks(small):
    _, graph, gated, ctx = small
    masks = np.vstack([prior_design(graph.num_prunable), bernoulli_masks(graph.num_prunable, 40, 0.7, seed=6)])
    y = evaluate_masks(gated, masks, ctx.scoring, ctx.task).loss
    full = dict(learn_shares=True, readout="mlp", bias_channel=True, steps=1500)
    sur = GraphFlowSurrogate(ctx, **full).fit(Measured(masks, y))
    assert np.abs(sur.predict(masks) - y).max() < 0.1 * np.ptp(y)
    again = GraphFlowSurrogate(ctx, **full).fit(Measured(masks, y))
    assert np.array_equal(sur.predict(masks), again.predict(masks))  # seeded


def test_graph_flow_on_the_prior_design_ranks_like_measured_flow(small):
    # few masks: an affine readout of the measured flow, so connected masks keep the zero-shot order
    _, graph, gated, ctx = small
    e = graph.num_prunable
    fit = prior_design(e)
    sur = GraphFlowSurrogate(ctx).fit(Measured(fit, evaluate_masks(gated, fit, ctx.scoring, ctx.task).loss))
    assert not sur.learn_shares and sur.readout_kind == "linear" and not sur.bias_channel
    test = sparsity_masks(graph, 30, 0.1, 0.3, seed=1)
    flow = fit_method("flow", ctx).predict(test)
    pred = sur.predict(test)
    assert abs(np.corrcoef(pred, flow)[0, 1]) > 0.999


class _TwoBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 2)

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_measured_flow_is_exact_for_one_sum_of_linear_branches():
    # y = a(x) + b(x): removing a branch removes exactly its share of y, so 1 - F_output(m) equals the
    # lost fraction <y - y(m), y> / <y, y>
    torch.manual_seed(0)
    model = _TwoBranch().double()
    x = torch.randn(50, 3, dtype=torch.float64)
    graph = build_graph(model, x[:2])
    gated = GatedModel(graph)
    ctx = Context(graph, gated, Subset("s", x, torch.zeros(50, 2)), Task("regression"), batch_size=16)
    flow = fit_method("flow", ctx)
    with torch.no_grad():
        y = model(x)
        for m in ([0.0, 1.0], [1.0, 0.0], [0.0, 0.0], [1.0, 1.0]):
            ym = gated(x, mask=torch.tensor(m))
            lost = float(((y - ym) * y).sum() / (y * y).sum())
            assert flow.predict(np.array(m))[0] == pytest.approx(lost, rel=1e-5)


@pytest.mark.parametrize("name", method_names(fitted=True))
def test_fitted_methods_reject_bad_fit_data(small, name):
    _, graph, _, ctx = small
    e = graph.num_prunable
    with pytest.raises(ValueError, match="masks"):
        fit_method(name, ctx.with_measured(Measured(np.ones((3, e + 1)), np.ones(3))))
    with pytest.raises(ValueError, match="losses"):
        Measured(np.ones((3, e)), np.ones(2))
    with pytest.raises(ValueError, match="NaN"):
        Measured(np.ones((3, e)), np.array([1.0, np.nan, 2.0]))
    with pytest.raises(ValueError, match="measured masks"):
        fit_method(name, ctx.with_measured(None))


def test_flow_structure_contraction_is_exact(small):
    _, graph, _, ctx = small
    full, small_ = FlowStructure.from_graph(graph, contract=False), FlowStructure.from_graph(graph, contract=True)
    assert small_.num_vertices <= full.num_vertices
    masks = torch.tensor(bernoulli_masks(graph.num_prunable, 30, 0.6, seed=0))
    paths = []  # number of surviving input->output paths of each mask
    for fs in (full, small_):
        paths.append(fs.propagate(masks, torch.ones(len(fs.src), 1), torch.ones(fs.num_vertices, 1))[:, fs.output, 0])
    assert torch.equal(paths[0], paths[1])
    assert torch.equal(paths[0] > 0, torch.tensor(graph.connected(masks.numpy())))


# ---------------------------------------------------------------------------------------------------
# masks

def test_mask_designs(small):
    _, graph, _, _ = small
    e = graph.num_prunable
    d = prior_design(e)
    assert d.shape == (e + 2, e) and d[0].all() and not d[1].any() and (d[2:].sum(1) == e - 1).all()
    s = sparsity_masks(graph, 40, 0.1, 0.3, seed=0, exclude=d)
    removed = (s == 0).sum(1)
    assert removed.min() >= 1 and removed.max() <= int(0.3 * e)
    assert graph.connected(s).all() and len(np.unique(s, axis=0)) == len(s)
    assert not any((row == d).all(1).any() for row in s)


# ---------------------------------------------------------------------------------------------------
# pruning

def test_budget_zero_returns_the_original_model(small):
    net, graph, _, ctx = small
    pred = fit_method("magnitude", ctx)
    mask = select_mask(pred, graph, Budget(edges=0))
    assert mask.all()
    pruned = prune(graph, mask)
    with torch.no_grad():
        assert torch.equal(pruned(ctx.scoring.inputs), net(ctx.scoring.inputs))
    assert count_params(pruned) == count_params(net)


def test_additive_selection_removes_least_important_edges(small):
    _, graph, _, _ = small
    e = graph.num_prunable
    imp = np.random.default_rng(0).permutation(e).astype(float)
    mask = select_mask(AdditivePredictor("x", imp), e, Budget(edges=3), allow_disconnected=True)
    assert set(np.flatnonzero(mask == 0)) == set(np.argsort(imp)[:3])


def test_beam_search_finds_the_exhaustive_optimum_of_a_quadratic(small):
    _, graph, _, _ = small
    e = graph.num_prunable
    rng = np.random.default_rng(0)
    h = rng.normal(size=(e, e)) * 0.2
    pred = QuadraticPredictor("q", 0.0, rng.normal(size=e), h + h.T)
    cand = all_masks_with_removed(e, 2)
    best = cand[np.argmin(pred.predict(cand))]
    mask = select_mask(pred, e, Budget(edges=2), search="beam", beam_width=e * e, allow_disconnected=True)
    assert np.array_equal(mask, best)


def test_cost_model_matches_physical_pruning():
    torch.manual_seed(0)
    net = resnet20().eval()
    x = torch.randn(2, 3, 32, 32)
    graph = build_graph(net, x)
    costs = CostModel(graph)
    masks = bernoulli_masks(graph.num_prunable, 6, 0.6, seed=0)
    params, macs = costs.cost(masks)
    for m, p, c in zip(masks, params, macs):
        small_ = prune(graph, m)
        assert p == count_params(small_) and c == count_macs(small_, x) // 2


def test_parameter_budget_is_met(small):
    net, graph, _, ctx = small
    costs = CostModel(graph)
    target = int(0.7 * count_params(net))
    mask = select_mask(fit_method("magnitude", ctx), graph, Budget(max_params=target), costs=costs)
    assert count_params(prune(graph, mask)) <= target


def test_auto_prune_one_call(small):
    net, graph, _, ctx = small
    res = auto_prune(net, ctx.scoring, ctx.task, Budget(edges=2), method="loo", vertices=(Block,), edges="all")
    assert (res.mask == 0).sum() == 2 and len(res.removed) == 2
    assert res.params[1] == count_params(res.model) <= res.params[0]
    res2 = auto_prune(net, ctx.scoring, ctx.task, Budget(edges=0), method="linear", vertices=(Block,), edges="all")
    assert res2.mask.all() and len(res2.fit_masks) == graph.num_prunable + 2
    with pytest.raises(ValueError, match="exactly one"):
        Budget(edges=1, max_params=10)


class _Residual(nn.Module):
    """x -> a -> (a + f(a)) -> out: cutting both inputs of the add leaves no input->output path."""
    def __init__(self):
        super().__init__()
        self.a, self.f, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = self.a(x)
        return self.out(h + self.f(h))


def test_picks_keep_the_network_connected_unless_asked():
    graph = build_graph(_Residual(), torch.randn(2, 4))
    assert graph.num_prunable == 2
    cheap = AdditivePredictor("cheap", np.zeros(2))  # removing either edge predicted free
    with pytest.raises(ValueError, match="input->output path"):
        select_mask(cheap, graph, Budget(edges=2))
    assert graph.connected(select_mask(cheap, graph, Budget(edges=1)))
    both = select_mask(cheap, graph, Budget(edges=2), allow_disconnected=True)
    assert not graph.connected(both)
    with pytest.raises(ValueError, match="needs the graph"):
        select_mask(cheap, 2, Budget(edges=1))
    # an additive pick that would disconnect falls back to a search among connected masks
    full = build_graph(_Residual(), torch.randn(2, 4), edges="all")
    into_add = [i for i, n in enumerate(full.edge_names) if "-> add" in n]
    assert len(into_add) == 2
    imp = np.ones(full.num_prunable)
    imp[into_add] = 0.0
    pick = select_mask(AdditivePredictor("x", imp), full, Budget(edges=2))
    assert full.connected(pick) and (pick == 0).sum() == 2


def test_auto_prune_reports_connectivity(small):
    net, graph, _, ctx = small
    res = auto_prune(net, ctx.scoring, ctx.task, Budget(edges=2), method="magnitude", vertices=(Block,), edges="all")
    assert res.connected and graph.connected(res.mask)


# ---------------------------------------------------------------------------------------------------
# flow attribution and the superposition surrogate

class _Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        return self.b(self.a(x))


def test_attribution_splits_the_lost_flow(small):
    _, graph, _, ctx = small
    fs = FlowStructure.from_graph(graph, weights=ctx.shares())
    masks = torch.tensor(np.vstack([bernoulli_masks(graph.num_prunable, 20, 0.5, seed=3),
                                    sparsity_masks(graph, 20, 0.1, 0.3, seed=4)]))
    for method in ("shapley", "last_cut"):
        phi = fs.attribution(masks, method)
        torch.testing.assert_close(phi.sum(1), fs.lost(masks), rtol=0, atol=1e-12)  # efficiency
        assert torch.all(phi[masks == 1] == 0)
    singles = torch.tensor(1 - np.eye(graph.num_prunable))
    for method in ("shapley", "last_cut"):  # one removed edge takes all of its own lost flow
        torch.testing.assert_close(fs.attribution(singles, method).sum(1), fs.lost(singles), rtol=0, atol=1e-12)


def test_attribution_of_two_cuts_in_series():
    # input -> a -> b: both edges cut the single path; Shapley splits it, last_cut charges the later cut
    graph = build_graph(_Chain(), torch.randn(2, 3), edges="all")
    assert graph.num_prunable == 2
    fs = FlowStructure.from_graph(graph)
    both = torch.zeros(1, 2)
    torch.testing.assert_close(fs.attribution(both, "shapley"), torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    torch.testing.assert_close(fs.attribution(both, "last_cut"), torch.tensor([[0.0, 1.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="shapley"):
        fs.attribution(both, "banzhaf")


def test_superposition_is_exact_for_parallel_linear_branches():
    # one merge of linear branches: output changes add up exactly, whatever is removed (all removed: zeros)
    torch.manual_seed(0)
    model = _GateLinear().double()
    x = torch.randn(40, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (40,))
    graph = build_graph(model, x[:2])
    gated = GatedModel(graph)
    ctx = Context(graph, gated, Subset("s", x, y), Task("classification"))
    fit = prior_design(3)
    sur = SuperpositionSurrogate(ctx).fit(Measured(fit, evaluate_masks(gated, fit, ctx.scoring, ctx.task).loss))
    every = all_masks_with_removed(3, 0)
    for k in (1, 2, 3):
        every = np.vstack([every, all_masks_with_removed(3, k)])
    truth = evaluate_masks(gated, every, ctx.scoring, ctx.task).loss
    np.testing.assert_allclose(sur.predict(every), truth, rtol=1e-10)


def test_superposition_reproduces_its_measurements(small):
    # nothing is fitted: the all-ones and single-edge masks are predicted as measured, and the all-zeros mask
    # exactly too, because the random graph's classifier is linear in the end blocks it sums
    _, graph, gated, ctx = small
    e = graph.num_prunable
    fit = prior_design(e)
    measured = evaluate_masks(gated, fit, ctx.scoring, ctx.task, keep_outputs=True)
    kctx = Context(graph, gated, ctx.scoring, ctx.task, Measured.of(fit, measured), memo={})
    sur = fit_method("superposition", kctx)
    np.testing.assert_allclose(sur.predict(fit), measured.loss, rtol=1e-5)
    np.testing.assert_allclose(sur.importance, measured.loss[2:] - measured.loss[0], atol=1e-5)
    # outputs reused from the fitting masks equal outputs measured by the context itself
    fresh = Context(graph, gated, ctx.scoring, ctx.task, memo={})
    for a, b in zip(kctx.single_edge_outputs(), fresh.single_edge_outputs()):
        torch.testing.assert_close(a, b)


def test_superposition_answers_repeated_masks_from_memory(small):
    # a mask asked again (in one call or a later one) is not recomputed, and gets the same prediction
    _, graph, gated, ctx = small
    e = graph.num_prunable
    fit = prior_design(e)
    measured = Measured.of(fit, evaluate_masks(gated, fit, ctx.scoring, ctx.task, keep_outputs=True))
    sur = fit_method("superposition", Context(graph, gated, ctx.scoring, ctx.task, measured, memo={}))
    masks = bernoulli_masks(e, 6, keep_prob=0.7, seed=1)
    calls = []
    inner = sur._predict
    sur._predict = lambda m: (calls.append(len(m)), inner(m))[1]
    first = sur.predict(np.vstack([masks, masks[:2]]))
    assert calls == [len(np.unique(masks, axis=0))]
    np.testing.assert_array_equal(first[:6][:2], first[6:])
    again = sur.predict(masks[::-1])
    assert calls == [len(np.unique(masks, axis=0))]
    np.testing.assert_array_equal(again, first[:6][::-1])
    fresh = fit_method("superposition", Context(graph, gated, ctx.scoring, ctx.task, measured, memo={}))
    np.testing.assert_allclose(fresh.predict(masks), first[:6], rtol=1e-12)


def test_superposition_prediction_of_disconnected_masks_is_a_constant_output(small):
    _, graph, gated, ctx = small
    e = graph.num_prunable
    sur = SuperpositionSurrogate(ctx).fit(Measured(prior_design(e), np.zeros(e + 2)))
    masks = bernoulli_masks(e, 200, 0.3, seed=5)
    disc = ~graph.connected(masks)
    assert disc.sum() > 5
    # a constant output's loss cannot be below the entropy of the labels (the best constant predictor)
    p = torch.bincount(ctx.scoring.targets, minlength=4).double() / len(ctx.scoring)
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
    assert (sur.predict(masks[disc]) >= entropy - 1e-9).all()


# ---------------------------------------------------------------------------------------------------
# attention heads as prunable edges (build_graph(heads=...)) in the consumers of the graph

GPT2_HEADS = {r"attn\.c_proj$": 2}  # gpt2_small_random(n_head=2): 2 heads of width 16


@pytest.fixture(scope="module")
def gpt2_heads():
    """A tiny random GPT-2 with its graph split into heads, and a few random token sequences."""
    from surrogate.models import CausalLMLogits, gpt2_small_random
    net = CausalLMLogits(gpt2_small_random(n_layer=2, n_head=2)).eval()
    ids = torch.randint(0, 128, (6, 12), generator=torch.Generator().manual_seed(0))
    return net, ids, build_graph(net, ids[:2], heads=GPT2_HEADS)


def _heads_of(graph, projection: str) -> list[int]:
    """Prunable indices of the head edges into the projection whose vertex name ends with ``projection``,
    in head order."""
    found = sorted((e.part[0], i) for i, e in enumerate(graph.prunable)
                   if e.part is not None and e.dst.endswith(projection))
    return [i for _, i in found]


class _HeadAttention(nn.Module):
    """Self-attention (fused qkv, 4 heads of width 4), an output projection with bias and a residual add;
    traceable by torch.fx."""

    def __init__(self, dim: int = 16, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.qkv, self.out, self.head = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, dim) -> (B, T, 3)
        b, t, d = x.shape[0], x.shape[1], x.shape[2]
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(b, t, d)
        return self.head(x + self.out(a))


def _head_attention() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The double-precision model, 10 inputs, and the output projection's input on them (via a hook)."""
    torch.manual_seed(0)
    model = _HeadAttention().double().eval()
    x = torch.randn(10, 5, 16, dtype=torch.float64)
    seen: list[torch.Tensor] = []
    handle = model.out.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    return model, x, seen[0]


def test_cost_model_counts_removed_heads_exactly(gpt2_heads):
    net, ids, graph = gpt2_heads
    x = ids[:2]
    h0, h1 = _heads_of(graph, "h.0.attn.c_proj"), _heads_of(graph, "h.1.attn.c_proj")
    branch0 = graph.edge_index("lm.transformer.h.0.attn.resid_dropout -> lm.transformer.h.0.add_4")
    mlp0 = graph.edge_index("lm.transformer.h.0.mlp.dropout -> lm.transformer.h.0.add_7")
    skip1 = graph.edge_index("lm.transformer.h.0.add_7 -> lm.transformer.h.1.add_8")
    removed = [[], [h0[0]], [h1[1]], h0, h0 + [h1[0]], h0 + h1,           # some heads, all of a layer, all
               [branch0, h0[0]], [branch0, h1[1]], [skip1, mlp0, h1[0]],  # mixed with merge edges
               [mlp0, h0[1], h1[0]]]
    masks = np.vstack([graph.mask_from_removed(r).numpy() for r in removed]
                      + [bernoulli_masks(graph.num_prunable, 4, 0.6, seed=1)])
    params, macs = CostModel(graph).cost(masks)
    for m, p, c in zip(masks, params, macs):
        small_ = prune(graph, m)
        assert p == count_params(small_) and c == count_macs(small_, x) // 2
    # one removed head of a surviving projection: exactly its columns of the (in, out) Conv1D weight
    cfg = net.lm.config
    assert params[0] - params[1] == cfg.n_embd // cfg.n_head * cfg.n_embd


def test_cost_model_counts_removed_heads_of_a_linear_projection():
    model, x, _ = _head_attention()
    graph = build_graph(model, x[:2], heads={r"^out$": 4})
    heads = _heads_of(graph, "out")
    masks = np.vstack([graph.mask_from_removed(r).numpy() for r in ([], heads[1:2], heads[:3], heads)]
                      + [bernoulli_masks(graph.num_prunable, 4, 0.5, seed=2)])
    params, macs = CostModel(graph).cost(masks)
    for m, p, c in zip(masks, params, macs):
        small_ = prune(graph, m)
        assert p == count_params(small_) and c == count_macs(small_, x[:2]) // 2
    assert params[0] - params[1] == 4 * 16  # head width x out_features of the (out, in) weight


def test_auto_prune_removes_heads(gpt2_heads):
    net, ids, _ = gpt2_heads
    task = Task("lm")
    scoring = Subset("scoring", ids, ids)  # a language model's targets are its inputs
    # only the head edges are prunable: one removed head takes its columns of c_proj
    res = auto_prune(net, scoring, task, Budget(edges=1), method="magnitude", edges=lambda e: False,
                     heads=GPT2_HEADS)
    assert len(res.removed) == 1 and "[head " in res.removed[0]
    assert res.params[1] == count_params(res.model) == res.params[0] - 16 * 32
    assert res.macs[1] == count_macs(res.model, ids) // len(ids) < res.macs[0]
    # heads and merge edges together, under a parameter budget
    target = res.params[0] - 600
    res = auto_prune(net, scoring, task, Budget(max_params=target), method="flow", heads=GPT2_HEADS)
    assert res.params[1] == count_params(res.model) <= target
    with torch.no_grad():
        assert res.model(ids).shape == net(ids).shape


def test_head_shares_are_the_heads_contributions_to_the_projection():
    model, x, a = _head_attention()
    graph = build_graph(model, x[:2], heads={r"^out$": 4})
    from surrogate.flow import measure_shares
    shares = measure_shares(graph, x, batch_size=3)  # several batches: sums of inner products accumulate
    into = [i for i, e in enumerate(graph.edges) if e.dst == "out"]
    assert [graph.edges[i].part for i in into] == [(k, 4) for k in range(4)]
    w = model.out.weight.detach()                                  # (out, in)
    terms = [a[..., 4 * k:4 * (k + 1)] @ w[:, 4 * k:4 * (k + 1)].T for k in range(4)]
    y0 = sum(terms)                                                # the output without its bias
    hand = [float((t * y0).sum() / (y0 * y0).sum()) for t in terms]
    np.testing.assert_allclose(shares[into], hand, rtol=1e-10)
    assert shares[into].sum() == pytest.approx(1.0, abs=1e-12)
    assert np.ptp(shares[into]) > 1e-3  # not the old equal split


def test_gpt2_flow_with_heads_is_finite(gpt2_heads):
    _, ids, graph = gpt2_heads
    ctx = Context(graph, None, Subset("scoring", ids, ids), Task("lm"), batch_size=4)
    shares = ctx.shares()
    for layer in (0, 1):
        into = [i for i, e in enumerate(graph.edges) if e.dst.endswith(f"h.{layer}.attn.c_proj")]
        assert len(into) == 2 and shares[into].sum() == pytest.approx(1.0, abs=1e-9)
    flow = fit_method("flow", ctx)
    masks = np.vstack([np.ones(graph.num_prunable), bernoulli_masks(graph.num_prunable, 10, 0.6, seed=0)])
    assert np.isfinite(flow.importance).all() and np.isfinite(flow.predict(masks)).all()
    assert flow.predict(np.ones(graph.num_prunable))[0] == pytest.approx(0.0, abs=1e-6)


def test_magnitude_scores_each_head_on_its_own_chunk():
    model, x, a = _head_attention()
    graph = build_graph(model, x[:2], heads={r"^out$": 4})
    ctx = Context(graph, None, Subset("scoring", x, torch.zeros(len(x))), Task("regression"), batch_size=5)
    imp = fit_method("magnitude", ctx).importance
    heads = _heads_of(graph, "out")
    hand = [float(a[..., 4 * k:4 * (k + 1)].abs().mean()) for k in range(4)]
    np.testing.assert_allclose(imp[heads], hand, rtol=1e-10)
    assert len(np.unique(imp[heads])) == 4


def test_magnitude_scores_differ_between_gpt2_heads(gpt2_heads):
    _, ids, graph = gpt2_heads
    imp = fit_method("magnitude", Context(graph, None, Subset("scoring", ids, ids), Task("lm"))).importance
    for layer in (0, 1):
        h = _heads_of(graph, f"h.{layer}.attn.c_proj")
        assert imp[h[0]] != imp[h[1]]


def test_draw_graph_shows_every_head_edge(gpt2_heads):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.text import Annotation
    _, _, graph = gpt2_heads
    ax = draw_graph(graph, importances=np.arange(graph.num_prunable, dtype=float))
    try:
        arrows = [t for t in ax.texts if isinstance(t, Annotation)]
        assert len(arrows) == len(graph.edges)  # one artist per edge
        ax.figure.canvas.draw()
        into = [i for i, e in enumerate(graph.edges) if e.dst.endswith("h.0.attn.c_proj")]
        paths = [arrows[i].arrow_patch.get_path().vertices for i in into]
        assert len(paths) == 2 and not np.allclose(paths[0], paths[1])  # parallel edges drawn apart
    finally:
        plt.close(ax.figure)


def test_auto_prune_default_removes_the_edge_whose_measured_removal_costs_least(small):
    # the superposition surrogate reproduces the measured single-edge losses exactly, so a budget of one edge
    # picks the single removal that was measured to cost least
    net, graph, gated, ctx = small
    res = auto_prune(net, ctx.scoring, ctx.task, Budget(edges=1), vertices=(Block,), edges="all")
    assert res.fit_masks.shape == (graph.num_prunable + 2, graph.num_prunable)
    singles = evaluate_masks(gated, 1 - np.eye(graph.num_prunable), ctx.scoring, ctx.task).loss
    assert res.removed == [graph.edge_names[int(np.argmin(singles))]]


def test_superposition_refuses_outputs_that_do_not_fit_in_memory(small):
    _, graph, gated, ctx = small
    fresh = Context(graph, gated, ctx.scoring, ctx.task, memo={})
    with pytest.raises(MemoryError, match="smaller scoring subset"):
        fresh._check_output_memory(graph.num_prunable + 1, limit=1000)
    fresh._check_output_memory(graph.num_prunable + 1)  # the real size is far below the default limit


def test_gate_derivatives_stay_within_a_memory_budget(small):
    # a budget far below one batch's autograd graph forces one sample per batch and one HVP at a time:
    # the derivatives are the same, only computed in more pieces
    _, graph, gated, ctx = small
    full = gate_derivatives(gated, ctx.scoring, ctx.task, hessian=True)
    tiny = gate_derivatives(gated, ctx.scoring, ctx.task, hessian=True, memory_budget=1, hvp_chunk=1)
    assert tiny[0] == pytest.approx(full[0], rel=1e-5)  # float32 model: summation order moves the last bits
    np.testing.assert_allclose(tiny[1], full[1], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(tiny[2], full[2], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# readout states: superposition where the network is additive, then the true tail

def test_readout_is_the_last_cut_merge_and_its_tail_is_exact():
    from surrogate.readout import Tail, find_readout
    torch.manual_seed(0)
    net = resnet20().eval()
    x = torch.randn(3, 3, 32, 32)
    gated = GatedModel(build_graph(net, x))
    node = find_readout(gated)
    assert node is not None and node.startswith("add")  # the last residual add, before the final ReLU
    mask = torch.ones(gated.num_edges)
    mask[[3, 10]] = 0
    with torch.no_grad():
        out, taps = gated(x, mask=mask, taps=(node,))
        assert torch.equal(out, gated(x, mask=mask))
        torch.testing.assert_close(Tail(gated, node)(taps[node], x), out)
    with pytest.raises(ValueError, match="bypass|not a readout"):
        Tail(gated, "relu")  # the stem's ReLU: the output depends on the input through the shortcuts too


def test_state_superposition_reproduces_measurements_and_equals_output_space_for_a_linear_tail():
    # a merge of linear branches feeding a linear head: superposing the state or the output is the same
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.head = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.a(x) + self.b(x) + self.c(x))

    model = Net().double()
    x = torch.randn(40, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (40,))
    graph = build_graph(model, x[:2])
    gated = GatedModel(graph)
    fit = prior_design(graph.num_prunable)
    task = Task("classification")
    res = evaluate_masks(gated, fit, Subset("s", x, y), task, keep_outputs=True, keep_state="add_1")
    ctx = Context(graph, gated, Subset("s", x, y), task, Measured.of(fit, res), batch_size=16)
    state = fit_method("superposition_state", ctx)
    assert state.node == "add_1" and state.tail is not None
    np.testing.assert_allclose(state.predict(fit[[0, *range(2, len(fit))]]), res.loss[[0, *range(2, len(fit))]],
                               rtol=1e-10)
    out = fit_method("superposition", ctx)
    masks = all_masks_with_removed(3, 1)
    for k in (2,):
        masks = np.vstack([masks, all_masks_with_removed(3, k)])
    np.testing.assert_allclose(state.predict(masks), out.predict(masks), rtol=1e-10)
    truth = evaluate_masks(gated, masks, Subset("s", x, y), task).loss
    np.testing.assert_allclose(state.predict(masks), truth, rtol=1e-10)  # additive: exact


def test_state_superposition_measures_states_itself_when_not_kept(small):
    _, graph, gated, ctx = small
    fit = prior_design(graph.num_prunable)
    measured = Measured.of(fit, evaluate_masks(gated, fit, ctx.scoring, ctx.task))
    sur = fit_method("superposition_state", Context(graph, gated, ctx.scoring, ctx.task, measured, batch_size=32))
    np.testing.assert_allclose(sur.predict(fit[:1]), measured.losses[:1], rtol=1e-5)


def test_pair_corrected_superposition_reproduces_singles_and_pairs_and_counts_its_passes():
    # a ResNet: nonlinear between the blocks, so pairs interact and the plain superposition misses them
    from surrogate.surrogates import pair_candidates
    torch.manual_seed(0)
    net = resnet20().eval()
    x, y = torch.randn(24, 3, 32, 32), torch.randint(0, 10, (24,))
    graph = build_graph(net, x[:2])
    gated = GatedModel(graph)
    task, data = Task("classification"), Subset("s", x, y)
    e = graph.num_prunable
    removable = np.array(["bn2" in n for n in graph.edge_names])  # the residual branches
    fit = prior_design(e)
    ctx = Context(graph, gated, data, task, Measured.of(fit, evaluate_masks(gated, fit, data, task)),
                  batch_size=12, removable=removable)
    pairs = pair_candidates(ctx)
    assert len(pairs) == 9 * 8 // 2 and removable[pairs].all()
    sur, plain = fit_method("superposition_pairs", ctx), fit_method("superposition_state", ctx)
    pm = np.ones((len(pairs), e), dtype=np.float32)
    pm[np.arange(len(pairs))[:, None], pairs] = 0
    truth = evaluate_masks(gated, pm, data, task).loss
    np.testing.assert_allclose(sur.predict(pm), truth, rtol=1e-4)            # measured pairs: exact
    assert np.abs(plain.predict(pm) - truth).max() > 1e-3                     # which the plain one is not
    np.testing.assert_allclose(sur.predict(fit[2:]), plain.predict(fit[2:]))  # singles: unchanged
    triple = np.ones((1, e), dtype=np.float32)
    triple[0, np.flatnonzero(removable)[:3]] = 0
    w = sur.pair_weights(triple)
    assert w.sum() == pytest.approx(3 * 2 / 3) and set(np.unique(w.numpy())) == {0.0, 2 / 3}
    assert METHODS["superposition_pairs"].passes_in(ctx) == {"forward": len(fit) + 1 + len(pairs), "backward": 0}


def test_heads_only_gpt2_has_a_readout_after_the_last_heads_and_its_tail_is_exact():
    # only the attention heads gated: no gated edge enters a cut (the residual stream bypasses the heads), so
    # the readout is the first cut after the last gated head; before, there was none and the state surrogate
    # fell back to the logits
    from surrogate.lm import HEAD_PROJECTIONS
    from surrogate.models import CausalLMLogits, gpt2_small_random
    from surrogate.readout import Tail, find_readout
    lm = CausalLMLogits(gpt2_small_random(n_layer=2, n_head=2, n_embd=16, vocab_size=64, n_positions=32, seed=3)).eval()
    x = torch.randint(0, 64, (6, 8), generator=torch.Generator().manual_seed(0))
    graph = build_graph(lm, x[:2], heads={HEAD_PROJECTIONS: 2}, exclude=r"^(?!.*\[head \d+\]$)")
    assert graph.num_prunable == 4
    gated = GatedModel(graph)
    node = find_readout(gated)
    assert node is not None
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0])
    with torch.no_grad():
        out, taps = gated(x, mask=mask, taps=(node,))
        assert taps[node].shape == (6, 8, 16)  # the residual stream, not the logits
        torch.testing.assert_close(Tail(gated, node)(taps[node], x), out)
    data = Subset("s", x[:, :-1], x[:, 1:])
    fit = prior_design(graph.num_prunable)
    res = evaluate_masks(gated, fit, data, Task("lm"), keep_state=node)
    ctx = Context(graph, gated, data, Task("lm"), Measured.of(fit, res), batch_size=8)
    sur = fit_method("superposition_pairs", ctx)
    assert sur.node == node
    np.testing.assert_allclose(sur.predict(fit), res.loss, rtol=1e-4)  # measured masks are reproduced


def test_the_machine_key_of_cached_timings_names_the_processor_and_thread_setting():
    from surrogate.profile import machine
    key = machine()
    assert key["device"] == "cpu" and key["name"] and key["threads"] == torch.get_num_threads()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert machine() != key  # another thread setting times differently: another cache entry
    finally:
        torch.set_num_threads(threads)
