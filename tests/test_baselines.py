"""The field's criteria (surrogate.baselines) on tiny models: their definitions against hand computations, their
pass counts, and that they leave the model as they found it."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import surrogate.baselines as B
from surrogate import GatedModel, build_graph
from surrogate.evaluate import Subset, Task, evaluate_masks
from surrogate.methods import METHODS, fit_method
from surrogate.pruning import Budget, select_mask
from surrogate.methods import Context

NEW = ("block_influence", "angular", "taylor_plus", "synflow", "sleb", "bonsai", "bonsai_10x")


class _Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.bn(self.conv(x)))


class _ResCNN(nn.Module):
    """Three residual blocks with BatchNorm on 8x8 inputs."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.blocks = nn.Sequential(*[_Block(4) for _ in range(3)])
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.blocks(F.relu(self.stem(x))), 1).flatten(1))


class _ResMLP(nn.Module):
    """h1 = h0 + f1(h0), h2 = h1 + f2(h1): two residual blocks on vectors."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.f1 = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))
        self.f2 = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))
        self.out = nn.Linear(6, 3)

    def streams(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h0 = self.inp(x)
        a = self.f1(h0)
        h1 = h0 + a
        b = self.f2(h1)
        return h0, a, h1, b, h1 + b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.streams(x)[-1])


class _Branches(nn.Module):
    """out = cat of five linear branches: with a squared error the loss is exactly linear in a binary mask."""

    def __init__(self):
        super().__init__()
        self.branches = nn.ModuleList(nn.Linear(3, 2) for _ in range(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([b(x) for b in self.branches], 1)


def _context(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: Task, edges: str = "merge") -> Context:
    graph = build_graph(model, x[:2], edges=edges)
    return Context(graph, GatedModel(graph), Subset("scoring", x, y), task, batch_size=8)


def _fresh(ctx: Context, **kw) -> Context:
    return Context(ctx.graph, ctx.gated, ctx.scoring, ctx.task, seed=ctx.seed, batch_size=ctx.batch_size, **kw)


def _edge(ctx: Context, src: str, dst_prefix: str = "") -> int:
    hits = [i for i, e in enumerate(ctx.graph.prunable) if e.src == src and e.dst.startswith(dst_prefix)]
    assert len(hits) == 1, (src, ctx.graph.edge_names)
    return hits[0]


@pytest.fixture(scope="module")
def cnn() -> tuple[nn.Module, Context]:
    torch.manual_seed(0)
    model = _ResCNN()
    for bn in model.modules():  # running statistics that are not the identity
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(bn.weight, 0.5, 1.5)
    model.eval()
    model.blocks[1].bn.train()  # a mixed mode that every measurement must restore
    x, y = torch.randn(12, 3, 8, 8), torch.randint(0, 5, (12,))
    return model, _context(model, x, y, Task("classification"))


@pytest.fixture(scope="module")
def gpt2() -> tuple[nn.Module, Context]:
    from surrogate.models import CausalLMLogits, gpt2_small_random
    model = CausalLMLogits(gpt2_small_random()).eval()
    ids = torch.randint(0, 128, (6, 8), generator=torch.Generator().manual_seed(0))
    return model, _context(model, ids, ids, Task("lm"))


@pytest.fixture(scope="module")
def mlp() -> tuple[_ResMLP, Context]:
    torch.manual_seed(1)
    model = _ResMLP().eval()
    x = torch.randn(10, 4)
    return model, _context(model, x, torch.randn(10, 3), Task("regression"))


def _state(model: nn.Module, ctx: Context) -> tuple[dict, list, list]:
    sd = {k: v.clone() for m in (model, ctx.graph.module) for k, v in m.state_dict().items()}
    flags = [m.training for root in (model, ctx.graph.module, ctx.gated) for m in root.modules()]
    grads = [p.grad for root in (model, ctx.graph.module) for p in root.parameters()]
    return sd, flags, grads


# ---------------------------------------------------------------------------------------------------
# every method on both models

@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("which", ["cnn", "gpt2"])
def test_every_method_fits_and_leaves_the_model_alone(name: str, which: str, request: pytest.FixtureRequest):
    model, ctx = request.getfixturevalue(which)
    sd, flags, grads = _state(model, ctx)
    pred = fit_method(name, _fresh(ctx))
    imp = np.asarray(pred.importance)
    assert imp.shape == (ctx.num_edges,) and np.isfinite(imp).all()
    sd2, flags2, grads2 = _state(model, ctx)
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert flags == flags2
    assert all(g is None for g in grads2)
    assert np.isfinite(pred.predict(np.ones((1, ctx.num_edges)))).all()


def test_registry_entries():
    for name in NEW:
        m = METHODS[name]
        assert not m.ours and not m.fitted and m.predicts == (name != "sleb")
    assert METHODS["block_influence"].passes(6) == {"forward": 1, "backward": 0}
    assert METHODS["taylor_plus"].passes(6) == {"forward": 1, "backward": 1}
    assert METHODS["bonsai"].passes(6) == {"forward": 8, "backward": 0}
    assert METHODS["bonsai_10x"].passes(6) == {"forward": 80, "backward": 0}
    assert METHODS["sleb"].passes(6) == {"forward": 21, "backward": 0}


# ---------------------------------------------------------------------------------------------------
# Block Influence and angular distance

def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.double(), b.double(), dim=-1)


@pytest.mark.parametrize("shape", [(10, 4), (5, 3, 4)], ids=["vectors", "tokens"])
def test_block_influence_and_angle_match_hand_computation(shape: tuple[int, ...]):
    torch.manual_seed(1)
    model = _ResMLP().eval()
    x = torch.randn(*shape)
    ctx = _context(model, x, torch.randn(*shape[:-1], 3), Task("regression"))
    with torch.no_grad():
        h0, a, h1, b, h2 = model.streams(x)
    bi = fit_method("block_influence", _fresh(ctx)).importance
    ang = fit_method("angular", _fresh(ctx)).importance
    branch1, skip1 = _edge(ctx, "f1.2"), _edge(ctx, "inp")
    branch2 = _edge(ctx, "f2.2")
    # BI: every position (token); the angle: the last token of a sequence (Gromov et al.)
    assert bi[branch1] == pytest.approx(1 - float(_cos(h0, h1).mean()), abs=1e-6)   # 1 - cos(h_in, h_out)
    assert bi[branch2] == pytest.approx(1 - float(_cos(h1, h2).mean()), abs=1e-6)
    assert bi[skip1] == pytest.approx(1 - float(_cos(a, h1).mean()), abs=1e-6)      # the block's output alone
    last = (lambda t: t[:, -1]) if len(shape) == 3 else (lambda t: t)
    assert ang[branch1] == pytest.approx(float(torch.arccos(_cos(last(h0), last(h1))).mean() / math.pi), abs=1e-6)


def test_block_influence_of_a_concatenation_is_its_energy_share():
    torch.manual_seed(0)
    model = _Branches().eval()
    ctx = _context(model, torch.randn(7, 3), torch.zeros(7, 10), Task("regression"))
    with torch.no_grad():
        parts = [br(ctx.scoring.inputs).double() for br in model.branches]
    total = sum(p.pow(2).sum(1) for p in parts)
    bi = fit_method("block_influence", _fresh(ctx)).importance
    for i, p in enumerate(parts):
        share = p.pow(2).sum(1) / total
        assert bi[i] == pytest.approx(float((1 - (1 - share).sqrt()).mean()), abs=1e-6)


# ---------------------------------------------------------------------------------------------------
# Taylor+ and SynFlow

def test_taylor_plus_matches_hand_computation(mlp):
    model, ctx = mlp
    tp = fit_method("taylor_plus", _fresh(ctx)).importance
    ref = copy.deepcopy(model)
    loss = (ref(ctx.scoring.inputs) - ctx.scoring.targets).pow(2).sum(1).mean()
    loss.backward()
    for name in ("f1", "f2"):
        branch = getattr(ref, name)
        hand = sum(float((p.detach().double() * p.grad.double()).abs().sum()) for p in branch.parameters())
        assert tp[_edge(ctx, f"{name}.2")] == pytest.approx(hand, rel=1e-5)
    assert tp[_edge(ctx, "inp")] == 0  # a skip connection owns no parameters
    assert all(p.grad is None for p in model.parameters())


def test_synflow_on_a_linear_chain_matches_the_formula():
    torch.manual_seed(0)
    chain = nn.Sequential(nn.Linear(4, 5, bias=False), nn.Linear(5, 3, bias=False), nn.Linear(3, 2, bias=False))
    ctx = _context(chain, torch.randn(4, 4), torch.zeros(4, 2), Task("regression"), edges="all")
    w0, w1, w2 = (layer.weight.detach().double().abs() for layer in chain)
    r = float(torch.ones(2, dtype=torch.float64) @ w2 @ w1 @ w0 @ torch.ones(4, dtype=torch.float64))
    u = torch.ones(2, dtype=torch.float64) @ w2 @ w1          # dR/d|W0|_ij = u_i
    sf = fit_method("synflow", _fresh(ctx)).importance
    e01, e12 = _edge(ctx, "0"), _edge(ctx, "1")
    assert sf[e01] == pytest.approx(float((w0 * u[:, None]).sum()), rel=1e-6)   # W0 only feeds edge 0 -> 1
    # each layer's scores sum to R (SynFlow's conservation); removing 1 -> 2 also kills layer 0, which only feeds 1
    assert sf[e01] == pytest.approx(r, rel=1e-6) and sf[e12] == pytest.approx(2 * r, rel=1e-6)
    assert sf[[i for i in range(3) if i not in (e01, e12)][0]] == 0   # the input edge removes no parameter


# ---------------------------------------------------------------------------------------------------
# SLEB

def _counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    seen: list[int] = []
    real = B.evaluate_masks

    def counted(gated, masks, *a, **kw):
        seen.append(len(masks))
        return real(gated, masks, *a, **kw)
    monkeypatch.setattr(B, "evaluate_masks", counted)
    return seen


def test_sleb_reproduces_brute_force_greedy(cnn, monkeypatch):
    _, base = cnn
    removable = np.array(["bn" in e.src for e in base.graph.prunable])  # the residual branches
    ctx = _fresh(base, removable=removable)
    assert METHODS["sleb"].passes_in(ctx) == {"forward": 3 + 2 + 1, "backward": 0}  # before: the bound
    seen = _counting(monkeypatch)
    pred = fit_method("sleb", ctx)
    assert sum(seen) == 6 and METHODS["sleb"].passes_in(ctx)["forward"] == 6
    mask, picks = np.ones(base.num_edges, dtype=np.float32), []
    for _ in range(3):  # the greedy loop by hand, one mask at a time
        left = [i for i in np.flatnonzero(removable) if mask[i] == 1]
        losses = []
        for i in left:
            m = mask.copy()
            m[i] = 0
            losses.append(evaluate_masks(base.gated, m, base.scoring, base.task).loss[0])
        mask[left[int(np.argmin(losses))]] = 0
        picks.append(mask.copy())
    for b, want in enumerate(picks, 1):
        got = select_mask(pred, base.graph, Budget(edges=b), allowed=removable)
        np.testing.assert_array_equal(got, want)
    assert pred.importance[~removable].min() > pred.importance[removable].max()


def test_sleb_skips_disconnecting_candidates_and_counts_them_out(cnn, monkeypatch):
    _, base = cnn
    ctx = _fresh(base)  # skips and branches: each block keeps one of its two, so 3 of 6 can go
    e = base.num_edges
    bound = sum(e - j for j in range(e))
    assert METHODS["sleb"].passes_in(ctx)["forward"] == bound
    seen = _counting(monkeypatch)
    order, measured = B.sleb_order(ctx)
    assert len(order) == 3 and sum(seen) == measured < bound
    assert METHODS["sleb"].passes_in(ctx)["forward"] == measured
    mask = np.ones(e)
    mask[order] = 0
    assert base.graph.connected(mask)
    assert not METHODS["sleb"].predicts


def test_sleb_respects_budget_of_interest(gpt2):
    _, base = gpt2
    removable = np.zeros(base.num_edges, dtype=bool)
    removable[[1, 3, 5]] = True
    order, measured = B.sleb_order(_fresh(base, removable=removable, max_removed=2))
    assert len(order) == 2 and set(order) <= {1, 3, 5} and measured == 3 + 2


# ---------------------------------------------------------------------------------------------------
# Bonsai

def test_bonsai_recovers_an_additive_loss(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(20, 3, dtype=torch.float64)
    ctx = _context(_Branches().double(), x, torch.randn(20, 10, dtype=torch.float64), Task("regression"))
    e = ctx.num_edges
    assert e == 5
    seen = _counting(monkeypatch)
    pred = fit_method("bonsai_10x", _fresh(ctx))
    assert sum(seen) == 10 * (e + 2) == METHODS["bonsai_10x"].passes_in(ctx)["forward"]
    singles = evaluate_masks(ctx.gated, np.vstack([np.ones(e), 1 - np.eye(e)]), ctx.scoring, ctx.task).loss
    np.testing.assert_allclose(pred.importance, singles[1:] - singles[0], rtol=1e-3, atol=1e-6)
    rng = np.random.default_rng(3)
    masks = (rng.random((30, e)) < 0.6).astype(np.float32)
    truth = evaluate_masks(ctx.gated, masks, ctx.scoring, ctx.task).loss
    np.testing.assert_allclose(pred.predict(masks), truth, rtol=1e-3, atol=1e-6)
    seen.clear()
    fit_method("bonsai", _fresh(ctx))
    assert sum(seen) == e + 2 == METHODS["bonsai"].passes_in(ctx)["forward"]


def test_bonsai_masks_and_fit_are_seeded(cnn):
    _, base = cnn
    removable = np.array([True, False, True, True, False, True])
    m = B.bonsai_masks(removable, 9, seed=4)
    assert m.shape == (9, 6) and (m[:, ~removable] == 1).all()
    np.testing.assert_array_equal(m[1::2, removable], 1 - m[0:-1:2, removable])  # complements
    np.testing.assert_array_equal(m, B.bonsai_masks(removable, 9, seed=4))
    assert not np.array_equal(m, B.bonsai_masks(removable, 9, seed=5))
    a = fit_method("bonsai", _fresh(base, removable=removable)).importance
    b = fit_method("bonsai", _fresh(base, removable=removable)).importance
    np.testing.assert_array_equal(a, b)
    assert a[~removable].min() >= a[removable].max()
