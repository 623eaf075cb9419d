"""Surrogate models: mask -> predicted loss, each registered once.

One interface: ``Surrogate(ctx, **hparams).fit(measured)`` (a ``Measured``: masks and their losses, and
outputs where a surrogate needs them; default: ``ctx.measured``), ``predict(masks)``, ``importance`` (the
predicted loss increase of removing each edge alone). ``surrogate.methods.fit_method(name, ctx)`` selects
them by name, with the scorers.

- "linear": least squares on [1, m].
- "fcn": a small MLP on m.
- "prior_graph": the published graph surrogate, implemented as described (softmax over out-edges,
  unit flow from the inputs, MSE on 1 - minmax(loss)).
- "flow": this project's zero-shot model: the information flow measured in one pass (see FlowPredictor).
- "graph_flow": a graph surrogate on the measured flow with a learned readout (see GraphFlowSurrogate).
- "superposition": this project's surrogate: measured output changes superposed along the graph
  (see SuperpositionSurrogate); "superposition_state" at the readout state, "superposition_pairs" with the
  measured interactions of pairs.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .evaluate import evaluate_masks
from .flow import FlowStructure
from .graph import ComputationGraph
from .masks import mask_key
from .measuring import measuring, model_device
from .methods import Context, Measured, Method, Predictor, _as_masks, register_method
from .progress import Ticker
from .readout import Tail, find_readout

__all__ = ["Surrogate", "LinearSurrogate", "MLPSurrogate", "PriorGraphSurrogate", "FlowPredictor",
           "GraphFlowSurrogate", "SuperpositionSurrogate", "pair_candidates"]


class Surrogate(Predictor):
    """Base class: subclasses implement ``_fit(masks, losses)`` and ``predict``."""
    name = "surrogate"
    ctx: Context

    def fit(self, measured: Measured | None = None) -> "Surrogate":
        """Fit on ``measured`` (default: the context's measurements)."""
        measured = self.ctx.measured if measured is None else measured
        if measured is None or len(measured) == 0:
            raise ValueError(f"the {self.name!r} surrogate is fitted on measured masks: measure some with "
                             "evaluate_masks and pass Measured.of(masks, result) (in the Context or to fit)")
        m, y = _as_masks(measured.masks, self.num_edges), measured.losses  # losses checked by Measured
        self.measured = measured
        return self._fit(m, y)

    def _fit(self, masks: np.ndarray, losses: np.ndarray) -> "Surrogate":
        raise NotImplementedError

    @property
    def importance(self) -> np.ndarray:
        e = self.num_edges
        preds = self.predict(np.vstack([np.ones(e), 1 - np.eye(e)]))
        return preds[1:] - preds[0]


# ----------------------------------------------------------------------------------------------------
# linear and MLP

class LinearSurrogate(Surrogate):
    """S(m) = w0 + w.m by least squares (minimum-norm when under-determined)."""
    name = "linear"

    def __init__(self, ctx: Context, ridge: float = 1e-8):
        self.ctx = ctx
        self.num_edges, self.ridge = ctx.num_edges, ridge

    def _fit(self, m: np.ndarray, y: np.ndarray) -> "LinearSurrogate":
        x = np.hstack([np.ones((len(m), 1)), m])
        a = x.T @ x + self.ridge * np.eye(x.shape[1])
        self.coef = np.linalg.lstsq(a, x.T @ y, rcond=None)[0]
        return self

    def predict(self, masks: np.ndarray) -> np.ndarray:
        m = _as_masks(masks, self.num_edges)
        return self.coef[0] + m @ self.coef[1:]


def _minimise(objective: Callable[[], torch.Tensor], opt: torch.optim.Optimizer, steps: int,
              cosine: bool = False) -> None:
    """Full-batch gradient steps on ``objective`` (optionally with a cosine learning-rate schedule)."""
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if cosine else None
    for _ in range(steps):
        loss = objective()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()


def _standardise(y: np.ndarray) -> tuple[float, float]:
    mu, sd = float(y.mean()), float(y.std())
    return mu, sd if sd > 1e-12 else 1.0


class MLPSurrogate(Surrogate):
    """A small fully connected network on the mask ("FCN"), trained with MSE on standardised losses.
    Output shape (B,) matches the target (the published baseline broadcast (B, 1) against (B,))."""
    name = "fcn"

    def __init__(self, ctx: Context, hidden: int = 64, steps: int = 2000, lr: float = 3e-3,
                 weight_decay: float = 1e-4, seed: int | None = None):
        self.ctx = ctx
        self.num_edges, self.hidden, self.steps, self.lr, self.wd = ctx.num_edges, hidden, steps, lr, weight_decay
        self.seed = ctx.seed if seed is None else seed

    def _fit(self, m: np.ndarray, y: np.ndarray) -> "MLPSurrogate":
        self.mu, self.sd = _standardise(y)
        torch.manual_seed(self.seed)
        self.net = nn.Sequential(nn.Linear(self.num_edges, self.hidden), nn.ReLU(),
                                 nn.Linear(self.hidden, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 1))
        x = torch.tensor(m, dtype=torch.float32)
        t = torch.tensor((y - self.mu) / self.sd, dtype=torch.float32)
        opt = torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=self.wd)
        _minimise(lambda: F.mse_loss(self.net(x).squeeze(-1), t), opt, self.steps)
        return self

    @torch.no_grad()
    def predict(self, masks: np.ndarray) -> np.ndarray:
        x = torch.tensor(_as_masks(masks, self.num_edges), dtype=torch.float32)
        return self.net(x).squeeze(-1).double().numpy() * self.sd + self.mu


# ----------------------------------------------------------------------------------------------------
# the prior graph surrogate, as published

class PriorGraphSurrogate(Surrogate):
    """One parameter per edge; gamma = softmax of theta over the out-edges of each vertex; unit flow from
    the inputs h(v) = sum_in m * gamma * h(u); prediction G = h(output), fitted by MSE (Adam, lr 1e-3,
    3000 epochs) to y = 1 - minmax(loss). Predictions are mapped back to the loss scale by inverting that
    target transform (monotone decreasing in G)."""
    name = "prior_graph"

    def __init__(self, ctx: Context, epochs: int = 3000, lr: float = 1e-3, seed: int | None = None):
        self.ctx = ctx
        self.num_edges, self.epochs, self.lr = ctx.num_edges, epochs, lr
        self.flow = FlowStructure.from_graph(ctx.graph, contract=False)
        self.seed = ctx.seed if seed is None else seed

    def _gamma(self) -> torch.Tensor:
        # softmax over the out-edges of each source vertex
        src = self.flow.src
        with warnings.catch_warnings():  # torch flags index_reduce as beta on every call
            warnings.filterwarnings("ignore", message="index_reduce", category=UserWarning)
            peak = torch.zeros(self.flow.num_vertices).index_reduce(0, src, self.theta, "amax", include_self=False)
        logits = self.theta - peak[src]
        ex = logits.exp()
        return ex / torch.zeros(self.flow.num_vertices).index_add(0, src, ex)[src]

    def _g(self, masks: torch.Tensor) -> torch.Tensor:
        return self.flow.flow(masks, self._gamma())

    def _fit(self, m: np.ndarray, y: np.ndarray) -> "PriorGraphSurrogate":
        self.lo, self.hi = float(y.min()), float(y.max())
        span = self.hi - self.lo if self.hi > self.lo else 1.0
        target = torch.tensor(1 - (y - self.lo) / span, dtype=torch.float32)
        torch.manual_seed(self.seed)
        self.theta = torch.randn(len(self.flow.src)).mul_(0.01).requires_grad_()
        x = torch.tensor(m, dtype=torch.float32)
        _minimise(lambda: F.mse_loss(self._g(x), target), torch.optim.Adam([self.theta], lr=self.lr), self.epochs)
        return self

    @torch.no_grad()
    def predict(self, masks: np.ndarray) -> np.ndarray:
        g = self._g(torch.tensor(_as_masks(masks, self.num_edges), dtype=torch.float32)).double().numpy()
        return self.lo + (1 - g) * (self.hi - self.lo)


# ----------------------------------------------------------------------------------------------------
# this project's zero-shot flow

@dataclass
class FlowPredictor(Predictor):
    """1 - F_output(m): the fraction of the measured information flow that no longer reaches the output."""
    name: str
    graph: ComputationGraph
    shares: np.ndarray

    def __post_init__(self) -> None:
        self.structure = FlowStructure.from_graph(self.graph, weights=self.shares)

    def predict(self, masks: np.ndarray) -> np.ndarray:
        m = torch.tensor(_as_masks(masks, self.graph.num_prunable), dtype=torch.float32)
        with torch.no_grad():
            return 1.0 - self.structure.flow(m).double().numpy()

    @property
    def importance(self) -> np.ndarray:
        e = self.graph.num_prunable
        return self.predict(1 - np.eye(e))




def flow_scorer(ctx: Context) -> Predictor:
    # zero-shot: merge shares measured in one pass, propagated through the graph (surrogate.flow)
    return FlowPredictor("flow", ctx.graph, ctx.shares())


# ----------------------------------------------------------------------------------------------------
# this project's graph surrogate

class GraphFlowSurrogate(Surrogate):
    """This project's graph surrogate: measured information flow, corrected and read out by fitting.

    Backbone: the flow F_output(m) of ``surrogate.flow`` with the merge shares measured in one pass over the
    scoring subset (the zero-shot "flow" scorer). Fitting on the K measured masks learns a readout from
    (F_output, disconnected) to the loss -- so the direction and shape of the map from flow to loss are
    learned, and disconnected networks get their own level -- and, given enough masks:
    - one log-multiplier per flow edge, shrunk towards 0 (i.e. towards the measured shares);
    - a "constant" channel: every vertex emits a learned constant that keeps flowing when the vertex's
      inputs are cut, as a layer's bias does, so networks without an input->output path can be told apart.

    Capacity grows with the data (chosen on validation masks of development graphs): with at most 20 masks
    beyond the |E|+2 of the prior design, the readout is affine and the shares stay as measured; the constant
    channel is used once at least 20 fitting masks are disconnected. Training: Adam with a cosine schedule,
    300 steps (affine readout) or 1500 (full model).
    """
    name = "graph_flow"

    def __init__(self, ctx: Context, hidden: int = 16, steps: int | str = "auto", lr: float = 0.03, shrink: float = 1e-2,
                 learn_shares: bool | str = "auto", readout: str = "auto", bias_channel: bool | str = "auto",
                 seed: int | None = None):
        self.ctx, self.num_edges = ctx, ctx.num_edges
        self.hidden, self.steps, self.lr, self.shrink = hidden, steps, lr, shrink
        self.options = {"learn_shares": learn_shares, "readout": readout, "bias_channel": bias_channel}
        self.seed = ctx.seed if seed is None else seed

    def _configure(self, num_masks: int, num_disconnected: int) -> None:
        rich = num_masks - (self.num_edges + 2) > 20
        o = self.options
        self.learn_shares = rich if o["learn_shares"] == "auto" else bool(o["learn_shares"])
        self.readout_kind = ("mlp" if rich else "linear") if o["readout"] == "auto" else o["readout"]
        self.bias_channel = num_disconnected >= 20 if o["bias_channel"] == "auto" else bool(o["bias_channel"])
        self.num_steps = (1500 if rich else 300) if self.steps == "auto" else int(self.steps)

    def _disconnected(self, masks: torch.Tensor) -> torch.Tensor:
        return torch.tensor((~self.ctx.graph.connected(masks.numpy() > 0.5)).astype(np.float32))

    def _features(self, masks: torch.Tensor, disc: torch.Tensor) -> torch.Tensor:
        w = self.flow.base * torch.exp(self.delta) if self.learn_shares else self.flow.base
        if not self.bias_channel:
            return torch.stack([self.flow.flow(masks, w), disc], 1)
        # two channels in one pass: the flow (inputs emit 1) and the constant flow, in which every vertex
        # adds softplus(beta_v) to whatever reaches it -- it survives disconnection, as real biases do
        beta = F.softplus(self.beta)
        weight = torch.stack([w, F.softplus(self.omega)], 1)
        source = torch.stack([torch.ones_like(beta), beta], 1)
        added = torch.stack([torch.zeros_like(beta), beta], 1)
        out = self.flow.propagate(masks, weight, source, lambda inflow, t: inflow + added[t])[:, self.flow.output]
        return torch.stack([out[:, 0], disc, torch.log(out[:, 1] + 1e-6)], 1)

    def _forward(self, masks: torch.Tensor, disc: torch.Tensor) -> torch.Tensor:
        return self.readout(self._features(masks, disc)).squeeze(-1)

    def _fit(self, m: np.ndarray, y: np.ndarray) -> "GraphFlowSurrogate":
        x = torch.tensor(m, dtype=torch.float32)
        disc = self._disconnected(x)
        self._configure(len(m), int(disc.sum()))
        self.flow = FlowStructure.from_graph(self.ctx.graph, weights=self.ctx.shares())
        self.mu, self.sd = _standardise(y)
        torch.manual_seed(self.seed)
        self.delta = torch.zeros(len(self.flow.src), requires_grad=True)
        nin = 3 if self.bias_channel else 2
        self.beta = torch.full((self.flow.num_vertices,), -2.0).add_(torch.randn(self.flow.num_vertices) * 0.1).requires_grad_()
        self.omega = torch.zeros(len(self.flow.src)).requires_grad_()
        self.readout = (nn.Sequential(nn.Linear(nin, self.hidden), nn.Tanh(), nn.Linear(self.hidden, 1))
                        if self.readout_kind == "mlp" else nn.Linear(nin, 1))
        t = torch.tensor((y - self.mu) / self.sd, dtype=torch.float32)
        params = [*self.readout.parameters()] + ([self.delta] if self.learn_shares else []) \
            + ([self.beta, self.omega] if self.bias_channel else [])
        _minimise(lambda: F.mse_loss(self._forward(x, disc), t) + self.shrink * self.delta.pow(2).mean(),
                  torch.optim.Adam(params, lr=self.lr), self.num_steps, cosine=True)
        return self

    @torch.no_grad()
    def predict(self, masks: np.ndarray) -> np.ndarray:
        x = torch.tensor(_as_masks(masks, self.num_edges), dtype=torch.float32)
        return self._forward(x, self._disconnected(x)).double().numpy() * self.sd + self.mu


# ----------------------------------------------------------------------------------------------------
# this project's output-superposition surrogate

def pair_candidates(ctx: Context) -> np.ndarray:
    """(P, 2) the edge pairs a pair-corrected surrogate measures: every pair of removable edges
    (``ctx.removable``, default all edges)."""
    allowed = np.ones(ctx.num_edges, dtype=bool) if ctx.removable is None else np.asarray(ctx.removable, dtype=bool)
    idx = np.flatnonzero(allowed)
    out = [(i, j) for a, i in enumerate(idx) for j in idx[a + 1:]]
    return np.array(out, dtype=np.int64).reshape(-1, 2)


class SuperpositionSurrogate(Surrogate):
    """Measured output changes, superposed along the computation graph.

    The prior design measures the network with each single edge removed; this surrogate keeps what those
    passes output on the scoring subset, not only their mean loss. The output of a pruned network is predicted
    as the original output plus the measured output change of every removed edge, each weighted by the part of
    that edge's lost flow (``surrogate.flow``) which is not already lost through the other removed edges,

        y(m) ~ y(1) + sum over removed i of  phi_i(m) / l_i * (y(1 - e_i) - y(1)),    S(m) ~ loss(y(m)),

    where l_i = L(1 - e_i) is the flow lost by removing i alone and phi(m) splits the lost flow L(m) among the
    removed edges (FlowStructure.attribution). The loss of the predicted outputs is then computed exactly, so
    its curvature and the interactions of output changes within it come for free. Edges in series share the
    paths they cut; edges on disjoint paths add up in output space.

    A network with no input->output path computes a constant: its predicted output is the mean of the
    superposed output over the samples, and its lost paths are charged to the cuts closest to the output
    ("last_cut", which is exact for the biases of a linear network). A connected network shares every lost
    path among the cuts on it by their Shapley values ("shapley"). Both rules were chosen on development graphs.
    Nothing is fitted: single-edge masks and the all-ones mask are reproduced exactly. The measured outputs
    come from the context: the measured outputs (``Measured.outputs``) when the measured masks include the prior
    design's (keep them with ``evaluate_masks(..., keep_outputs=True)``), otherwise |E| + 1 passes over the scoring subset.
    """
    name = "superposition"

    def __init__(self, ctx: Context, connected: str = "shapley", disconnected: str = "last_cut",
                 chunk_elements: int = 2 ** 24, readout: str | None = None, pairs: bool = False):
        self.ctx, self.num_edges = ctx, ctx.num_edges
        self.rules = (connected, disconnected)
        self.chunk_elements = chunk_elements
        self.readout = readout
        self.pairs = pairs

    def _fit(self, m: np.ndarray, y: np.ndarray) -> "SuperpositionSurrogate":
        self.tail = None
        node = self.readout
        if node == "auto":
            node = find_readout(self.ctx.gated)
        self.node = node
        if node is None:
            self.y1, self.dy = self.ctx.single_edge_outputs()
        else:
            self.y1, self.dy, self.state_dtype = self.ctx.single_edge_states(node)
            self.tail = Tail(self.ctx.gated, node)
        self.flow = FlowStructure.from_graph(self.ctx.graph, weights=self.ctx.shares())
        single = self.flow.lost(torch.tensor(1 - np.eye(self.num_edges)))
        # an edge that carries no measured flow keeps its whole measured change
        self.inv_single = torch.where(single > 1e-12, 1.0 / single.clamp_min(1e-12), torch.zeros_like(single))
        self.no_flow = single <= 1e-12
        self.pair_index, self.interactions = np.zeros((0, 2), dtype=np.int64), None
        self._memo: dict[bytes, float] = {}  # mask -> predicted loss: searches and families ask again
        if self.pairs:
            self._fit_pairs()
        return self

    def _fit_pairs(self) -> None:
        """Measure every pair of removable edges removed together (one pass each over the scoring subset)
        and keep the part of its measured state that the superposition misses: the pair's interaction."""
        idx = pair_candidates(self.ctx)
        if len(idx) == 0:
            return
        masks = np.ones((len(idx), self.num_edges), dtype=np.float32)
        masks[np.arange(len(idx))[:, None], idx] = 0
        per_mask = self.y1.numel() * 4  # float32 interactions
        if per_mask * len(idx) > 8 * 2 ** 30:
            raise MemoryError(f"pair corrections keep {len(idx)} states of {per_mask / 2 ** 20:.0f} MiB each; use a "
                              "smaller scoring subset, fewer removable edges (Context.removable) or pairs=False")
        res = evaluate_masks(self.ctx.gated, masks, self.ctx.scoring, self.ctx.task, batch_size=self.ctx.batch_size,
                             masks_per_pass=1, keep_state=self.node, keep_outputs=self.node is None)
        measured = (res.outputs if self.node is None else res.extra["state"]).double()
        base = self.y1 + torch.tensordot(self.coefficients(masks), self.dy, dims=1)
        self.pair_index, self.interactions = idx, (measured - base).float()

    def pair_weights(self, masks: np.ndarray) -> torch.Tensor:
        """(M, P) weight of each measured pair interaction in each mask's prediction: 2 / r for a pair of
        which both edges are removed (r = number of removed edges), else 0. Exact for the pairs themselves;
        the interaction term is (r - 1) times the mean interaction of the removed pairs, so it grows linearly
        in r where the full second-order sum grows quadratically and overshoots (chosen on development networks)."""
        m = _as_masks(masks, self.num_edges) < 0.5
        both = m[:, self.pair_index[:, 0]] & m[:, self.pair_index[:, 1]]
        r = m.sum(1, keepdims=True).clip(min=2)
        return torch.tensor(both * (2.0 / r), dtype=torch.float64)

    def coefficients(self, masks: np.ndarray, disconnected: np.ndarray | None = None) -> torch.Tensor:
        """(M, E) weight of each edge's measured output change in the predicted output of each mask
        (``disconnected``: which masks leave no input->output path, if already known)."""
        m = torch.tensor(_as_masks(masks, self.num_edges))
        if disconnected is None:
            disconnected = ~self.ctx.graph.connected(m.numpy() > 0.5)
        disc = torch.tensor(disconnected)
        coef = torch.zeros_like(m)
        for rows, rule in ((~disc, self.rules[0]), (disc, self.rules[1])):
            if rows.any():
                coef[rows] = self.flow.attribution(m[rows], rule) * self.inv_single
        return torch.where(self.no_flow, 1.0 - m, coef)

    @torch.no_grad()
    def predict(self, masks: np.ndarray) -> np.ndarray:
        """Predicted loss of each mask. A mask predicted before is answered from memory (each prediction runs
        the loss, or the true tail, on every scoring sample; mask searches ask for the same masks repeatedly)."""
        m = _as_masks(masks, self.num_edges)
        keys = [mask_key(row) for row in m]
        first: dict[bytes, int] = {}  # each new mask once, even if asked several times in this call
        for i, k in enumerate(keys):
            if k not in self._memo:
                first.setdefault(k, i)
        if first:
            for k, v in zip(first, self._predict(m[list(first.values())])):
                self._memo[k] = float(v)
        return np.array([self._memo[k] for k in keys], dtype=np.float64)

    def _predict(self, m: np.ndarray) -> np.ndarray:
        disc = ~self.ctx.graph.connected(m > 0.5)
        coef = self.coefficients(m, disc)
        targets = self.ctx.scoring.targets
        out = np.empty(len(m))
        step = max(1, self.chunk_elements // max(1, self.y1.numel()))
        tick = Ticker(f"{self.name}: predicting {len(m)} masks", len(m))  # the readout tail: seconds per mask
        for c0 in range(0, len(m), step):
            y = self.y1 + torch.tensordot(coef[c0:c0 + step], self.dy, dims=1)  # (M, n, ...)
            if self.interactions is not None:
                y = y + torch.tensordot(self.pair_weights(m[c0:c0 + step]), self.interactions.double(), dims=1)
            for j, yj in enumerate(y):
                if disc[c0 + j]:
                    yj = yj.mean(0, keepdim=True).expand_as(yj)
                out[c0 + j] = self._loss(yj, targets)
                tick(c0 + j + 1)
        return out

    def _loss(self, y: torch.Tensor, targets: torch.Tensor) -> float:
        """Mean loss of superposed outputs, or of the outputs the true tail computes from superposed states."""
        if self.tail is None:
            return float(self.ctx.task.per_sample(y, targets)[0].mean())
        scoring, bs, total = self.ctx.scoring, self.ctx.batch_size, 0.0
        dev = model_device(self.ctx.gated)  # states are kept on the CPU
        with measuring(self.ctx.gated):
            for b0 in range(0, len(y), bs):
                x = (t.to(dev) for t in scoring[b0:b0 + bs].args(self.ctx.gated))
                o = self.tail(y[b0:b0 + bs].to(dev, self.state_dtype), *x)
                total += float(self.ctx.task.per_sample(o, targets[b0:b0 + bs].to(dev))[0].double().sum())
        return total / len(y)


# ----------------------------------------------------------------------------------------------------
# the registry's entries: the prior work's surrogates, then this project's methods

def _surrogate(cls: type) -> Callable[[Context], Predictor]:
    return lambda ctx: cls(ctx).fit(ctx.measured)


def _fitted(extra: int = 0) -> Callable[[int, int], tuple[int, int]]:
    return lambda e, k: (k + extra, 0)


for _m in (
    Method("linear", "Linear regression", _surrogate(LinearSurrogate), _fitted(), fitted=True),
    Method("fcn", "FCN", _surrogate(MLPSurrogate), _fitted(), fitted=True),
    Method("prior_graph", "Graph (prior)", _surrogate(PriorGraphSurrogate), _fitted(), fitted=True),
    Method("flow", "Flow (ours, zero-shot)", flow_scorer, lambda e, k: (1, 0), ours=True),
    Method("graph_flow", "Graph-flow (ours)", _surrogate(GraphFlowSurrogate), _fitted(1), ours=True,
           fitted=True),
    Method("superposition", "Superposition (ours)", _surrogate(SuperpositionSurrogate), _fitted(1), ours=True,
           fitted=True, needs_outputs=True),
    Method("superposition_state", "Superposition, readout state (ours)",
           lambda ctx: SuperpositionSurrogate(ctx, readout="auto").fit(ctx.measured), _fitted(1), ours=True,
           fitted=True, needs_state=True,
           description="measured changes superposed at the readout state (surrogate.readout), then the true "
                       "tail of the network; output space where the graph has no readout"),
    Method("superposition_pairs", "Superposition + pairs (ours)",
           lambda ctx: SuperpositionSurrogate(ctx, readout="auto", pairs=True).fit(ctx.measured), _fitted(1),
           ours=True, fitted=True, needs_state=True,
           cost_in=lambda ctx: (len(ctx.measured) + 1 + len(pair_candidates(ctx)), 0),
           description="readout-state superposition plus the measured interaction of every pair of removable "
                       "edges (one extra pass per pair), weighted 2/r in a mask with r edges removed"),
):
    register_method(_m)
