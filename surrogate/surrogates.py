"""Surrogate models: mask -> predicted loss, fitted on K measured masks.

One interface: ``fit(masks, losses)``, ``predict(masks)``, ``importance`` (the predicted loss increase of
removing each edge alone), selected by name with ``make_surrogate(name, ctx)``.

- "linear": least squares on [1, m].
- "fcn": a small MLP on m.
- "prior_graph": the published graph surrogate, implemented as described (softmax over out-edges,
  unit flow from the inputs, MSE on 1 - minmax(loss)).
- "graph_flow": this project's graph surrogate (see GraphFlowSurrogate).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .graph import ComputationGraph
from .scorers import Context, Predictor, _as_masks

__all__ = ["Surrogate", "FlowStructure", "LinearSurrogate", "MLPSurrogate", "PriorGraphSurrogate",
           "GraphFlowSurrogate", "SURROGATES", "make_surrogate", "register_surrogate"]


class Surrogate(Predictor):
    """Base class: subclasses implement fit and predict."""
    name = "surrogate"

    def fit(self, masks: np.ndarray, losses: np.ndarray) -> "Surrogate":
        raise NotImplementedError

    @property
    def importance(self) -> np.ndarray:
        e = self.num_edges
        preds = self.predict(np.vstack([np.ones(e), 1 - np.eye(e)]))
        return preds[1:] - preds[0]


def _check_fit(masks: Any, losses: Any, e: int) -> tuple[np.ndarray, np.ndarray]:
    m = _as_masks(masks, e)
    y = np.asarray(losses, dtype=np.float64).reshape(-1)
    if len(y) != len(m):
        raise ValueError(f"{len(m)} masks but {len(y)} losses")
    if not np.isfinite(y).all():
        raise ValueError("losses contain NaN or infinite values")
    return m, y


# ----------------------------------------------------------------------------------------------------
# linear and MLP

class LinearSurrogate(Surrogate):
    """S(m) = w0 + w.m by least squares (minimum-norm when under-determined)."""
    name = "linear"

    def __init__(self, ctx: Context, ridge: float = 1e-8):
        self.num_edges, self.ridge = ctx.num_edges, ridge

    def fit(self, masks: np.ndarray, losses: np.ndarray) -> "LinearSurrogate":
        m, y = _check_fit(masks, losses, self.num_edges)
        x = np.hstack([np.ones((len(m), 1)), m])
        a = x.T @ x + self.ridge * np.eye(x.shape[1])
        self.coef = np.linalg.lstsq(a, x.T @ y, rcond=None)[0]
        return self

    def predict(self, masks: np.ndarray) -> np.ndarray:
        m = _as_masks(masks, self.num_edges)
        return self.coef[0] + m @ self.coef[1:]


def _standardise(y: np.ndarray) -> tuple[float, float]:
    mu, sd = float(y.mean()), float(y.std())
    return mu, sd if sd > 1e-12 else 1.0


class MLPSurrogate(Surrogate):
    """A small fully connected network on the mask ("FCN"), trained with MSE on standardised losses.
    Output shape (B,) matches the target (the published baseline broadcast (B, 1) against (B,))."""
    name = "fcn"

    def __init__(self, ctx: Context, hidden: int = 64, steps: int = 2000, lr: float = 3e-3,
                 weight_decay: float = 1e-4, seed: int | None = None):
        self.num_edges, self.hidden, self.steps, self.lr, self.wd = ctx.num_edges, hidden, steps, lr, weight_decay
        self.seed = ctx.seed if seed is None else seed

    def fit(self, masks: np.ndarray, losses: np.ndarray) -> "MLPSurrogate":
        m, y = _check_fit(masks, losses, self.num_edges)
        self.mu, self.sd = _standardise(y)
        torch.manual_seed(self.seed)
        self.net = nn.Sequential(nn.Linear(self.num_edges, self.hidden), nn.ReLU(),
                                 nn.Linear(self.hidden, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 1))
        x = torch.tensor(m, dtype=torch.float32)
        t = torch.tensor((y - self.mu) / self.sd, dtype=torch.float32)
        opt = torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=self.wd)
        for _ in range(self.steps):
            loss = F.mse_loss(self.net(x).squeeze(-1), t)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return self

    @torch.no_grad()
    def predict(self, masks: np.ndarray) -> np.ndarray:
        x = torch.tensor(_as_masks(masks, self.num_edges), dtype=torch.float32)
        return self.net(x).squeeze(-1).double().numpy() * self.sd + self.mu


# ----------------------------------------------------------------------------------------------------
# flow structure shared by the graph surrogates

@dataclass(frozen=True)
class FlowStructure:
    """The vertex graph reduced for flow computations: chains of always-kept edges are contracted
    (exact for flow models: a kept out-degree-1 edge passes its flow on unchanged)."""
    num_vertices: int
    src: torch.Tensor        # (F,) source vertex of each flow edge
    dst: torch.Tensor        # (F,) destination vertex
    gate: torch.Tensor       # (F,) prunable-edge index, or -1 for an edge that is always kept
    levels: tuple[torch.Tensor, ...]  # flow-edge indices grouped by the depth of their destination
    inputs: tuple[int, ...]
    output: int

    @staticmethod
    def from_graph(graph: ComputationGraph, contract: bool = True) -> "FlowStructure":
        names = [v.name for v in graph.vertices]
        gate_of = {e.name: i for i, e in enumerate(graph.prunable)}
        edges = [[e.src, e.dst, gate_of.get(e.name, -1)] for e in graph.edges]
        keep = set(graph.input_vertices) | {graph.output_vertex}
        if contract:
            changed = True
            while changed:
                changed = False
                for s, d, g in list(edges):
                    if g != -1 or s in keep:
                        continue
                    outs = [x for x in edges if x[0] == s]
                    if len(outs) == 1:  # s only feeds d through an always-kept edge: merge s into d
                        edges.remove([s, d, g])
                        for x in edges:
                            if x[1] == s:
                                x[1] = d
                        changed = True
                        break
        alive = sorted({x for s, d, _ in edges for x in (s, d)} | keep, key=names.index)
        idx = {n: i for i, n in enumerate(alive)}
        depth = {n: 0 for n in alive}
        for n in alive:  # alive is in topological order
            for s, d, _ in edges:
                if d == n:
                    depth[n] = max(depth[n], depth[s] + 1)
        order = sorted(range(len(edges)), key=lambda i: depth[edges[i][1]])
        edges = [edges[i] for i in order]
        levels: dict[int, list[int]] = {}
        for i, (_, d, _) in enumerate(edges):
            levels.setdefault(depth[d], []).append(i)
        return FlowStructure(
            len(alive), torch.tensor([idx[s] for s, _, _ in edges]), torch.tensor([idx[d] for _, d, _ in edges]),
            torch.tensor([g for _, _, g in edges]), tuple(torch.tensor(levels[k]) for k in sorted(levels)),
            tuple(idx[n] for n in graph.input_vertices), idx[graph.output_vertex])

    def edge_mask(self, masks: torch.Tensor) -> torch.Tensor:
        """(M, E) prunable-edge masks -> (M, F) flow-edge masks (always-kept edges get 1)."""
        ones = torch.ones(masks.shape[0], 1, dtype=masks.dtype)
        return torch.cat([masks, ones], 1)[:, torch.where(self.gate >= 0, self.gate, masks.shape[1])]

    def propagate(self, masks: torch.Tensor, weight: torch.Tensor, source: torch.Tensor,
                  transfer: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Vertex states (M, V, d): state(v) = transfer(sum over in-edges f of mask_f * weight_f * state(src_f), v).

        weight: (F, d) per-edge weights; source: (V, d) the state of input vertices (rows of other
        vertices are ignored); transfer: applied to the summed inflow of each level's vertices (identity
        if None). Vertices with no kept in-edge receive a zero inflow."""
        m = self.edge_mask(masks)
        mdim, d = masks.shape[0], weight.shape[1]
        state = torch.zeros(mdim, self.num_vertices, d, dtype=weight.dtype)
        inputs = torch.tensor(self.inputs)
        state = state.index_copy(1, inputs, source[inputs].unsqueeze(0).expand(mdim, -1, -1))
        for lvl in self.levels:
            contrib = m[:, lvl, None] * weight[lvl] * state[:, self.src[lvl]]        # (M, |lvl|, d)
            targets = torch.unique(self.dst[lvl])
            inflow = torch.zeros(mdim, self.num_vertices, d, dtype=weight.dtype).index_add(1, self.dst[lvl], contrib)
            inflow = inflow[:, targets]
            new = transfer(inflow, targets) if transfer is not None else inflow
            state = state.index_copy(1, targets, new)
        return state


# ----------------------------------------------------------------------------------------------------
# the prior graph surrogate, as published

class PriorGraphSurrogate(Surrogate):
    """One parameter per edge; gamma = softmax of theta over the out-edges of each vertex; unit flow from
    the inputs h(v) = sum_in m * gamma * h(u); prediction G = h(output), fitted by MSE (Adam, lr 1e-3,
    3000 epochs) to y = 1 - minmax(loss). Predictions are mapped back to the loss scale by inverting that
    target transform (monotone decreasing in G)."""
    name = "prior_graph"

    def __init__(self, ctx: Context, epochs: int = 3000, lr: float = 1e-3, seed: int | None = None):
        self.num_edges, self.epochs, self.lr = ctx.num_edges, epochs, lr
        self.flow = FlowStructure.from_graph(ctx.graph, contract=False)
        self.seed = ctx.seed if seed is None else seed

    def _gamma(self) -> torch.Tensor:
        # softmax over the out-edges of each source vertex
        src = self.flow.src
        logits = self.theta - torch.zeros(self.flow.num_vertices).index_reduce(0, src, self.theta, "amax",
                                                                                include_self=False)[src]
        ex = logits.exp()
        return ex / torch.zeros(self.flow.num_vertices).index_add(0, src, ex)[src]

    def _g(self, masks: torch.Tensor) -> torch.Tensor:
        source = torch.ones(self.flow.num_vertices, 1)
        state = self.flow.propagate(masks, self._gamma()[:, None], source)
        return state[:, self.flow.output, 0]

    def fit(self, masks: np.ndarray, losses: np.ndarray) -> "PriorGraphSurrogate":
        m, y = _check_fit(masks, losses, self.num_edges)
        self.lo, self.hi = float(y.min()), float(y.max())
        span = self.hi - self.lo if self.hi > self.lo else 1.0
        target = torch.tensor(1 - (y - self.lo) / span, dtype=torch.float32)
        torch.manual_seed(self.seed)
        self.theta = torch.randn(len(self.flow.src)).mul_(0.01).requires_grad_()
        opt = torch.optim.Adam([self.theta], lr=self.lr)
        x = torch.tensor(m, dtype=torch.float32)
        for _ in range(self.epochs):
            loss = F.mse_loss(self._g(x), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return self

    @torch.no_grad()
    def predict(self, masks: np.ndarray) -> np.ndarray:
        g = self._g(torch.tensor(_as_masks(masks, self.num_edges), dtype=torch.float32)).double().numpy()
        return self.lo + (1 - g) * (self.hi - self.lo)


# ----------------------------------------------------------------------------------------------------
# this project's graph surrogate

class GraphFlowSurrogate(Surrogate):
    """A small "shadow network" with the computation graph's topology.

    Every vertex v carries a d-dimensional state: z_v = softplus(k_v * sum_in m_e * w_e * z_u + c_v), where
    w_e >= 0 are per-edge channel weights, and k_v, c_v per-vertex transfer parameters. The bias c_v keeps
    flowing when a vertex's inputs are cut -- as a real layer's bias does -- so disconnected networks get
    their own (learned) outputs. The loss is read out from the output state by a small MLP, together with
    an exact disconnection indicator: the direction from flow to loss is learned, not assumed.
    """
    name = "graph_flow"

    def __init__(self, ctx: Context, channels: int = 4, hidden: int = 16, steps: int = 1500, lr: float = 0.02,
                 weight_decay: float = 1e-3, seed: int | None = None):
        self.ctx, self.num_edges = ctx, ctx.num_edges
        self.d, self.hidden, self.steps, self.lr, self.wd = channels, hidden, steps, lr, weight_decay
        self.flow = FlowStructure.from_graph(ctx.graph)
        self.seed = ctx.seed if seed is None else seed

    def _features(self, masks: torch.Tensor) -> torch.Tensor:
        p = self.params
        w = F.softplus(p["w"])
        source = F.softplus(p["c"])  # input vertices emit softplus(c)

        def transfer(inflow: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return F.softplus(p["k"][targets] * inflow + p["c"][targets])

        state = self.flow.propagate(masks, w, source, transfer)
        out = state[:, self.flow.output]
        disc = torch.tensor((~self.ctx.graph.connected(masks.numpy() > 0.5)).astype(np.float32))[:, None]
        return torch.cat([torch.log(out + 1e-6), disc], 1)

    def _forward(self, masks: torch.Tensor) -> torch.Tensor:
        return self.readout(self._features(masks)).squeeze(-1)

    def fit(self, masks: np.ndarray, losses: np.ndarray) -> "GraphFlowSurrogate":
        m, y = _check_fit(masks, losses, self.num_edges)
        self.mu, self.sd = _standardise(y)
        torch.manual_seed(self.seed)
        nf, nv, d = len(self.flow.src), self.flow.num_vertices, self.d
        self.params = {"w": torch.randn(nf, d).mul_(0.1).requires_grad_(),
                       "k": torch.ones(nv, d).add_(torch.randn(nv, d).mul_(0.1)).requires_grad_(),
                       "c": torch.randn(nv, d).mul_(0.1).requires_grad_()}
        self.readout = nn.Sequential(nn.Linear(d + 1, self.hidden), nn.Tanh(), nn.Linear(self.hidden, 1))
        x = torch.tensor(m, dtype=torch.float32)
        t = torch.tensor((y - self.mu) / self.sd, dtype=torch.float32)
        opt = torch.optim.Adam([*self.params.values(), *self.readout.parameters()], lr=self.lr)
        for _ in range(self.steps):
            reg = sum(v.pow(2).sum() for v in self.params.values()) * self.wd / len(x)
            loss = F.mse_loss(self._forward(x), t) + reg
            opt.zero_grad()
            loss.backward()
            opt.step()
        return self

    @torch.no_grad()
    def predict(self, masks: np.ndarray) -> np.ndarray:
        x = torch.tensor(_as_masks(masks, self.num_edges), dtype=torch.float32)
        return self._forward(x).double().numpy() * self.sd + self.mu


# ----------------------------------------------------------------------------------------------------
# registry

SURROGATES: dict[str, Callable[..., Surrogate]] = {}


def register_surrogate(name: str, cls: Callable[..., Surrogate]) -> None:
    SURROGATES[name] = cls


for _cls in (LinearSurrogate, MLPSurrogate, PriorGraphSurrogate, GraphFlowSurrogate):
    register_surrogate(_cls.name, _cls)


def make_surrogate(name: str, ctx: Context, **hparams: Any) -> Surrogate:
    """A new, unfitted surrogate registered as ``name`` (see SURROGATES)."""
    if name not in SURROGATES:
        raise KeyError(f"unknown surrogate {name!r}; choose one of {sorted(SURROGATES)}")
    return SURROGATES[name](ctx, **hparams)
