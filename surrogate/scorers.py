"""Zero-shot edge scorers: one pass over a small scoring subset, no mask sampling; each registered once.

Each scorer returns a ``Predictor``: per-edge importances (higher = removing the edge costs more) and a
mask-level prediction derived from them in a principled way -- the predicted loss increase is the sum of
the removed edges' scores (additive scorers), the quadratic model in gate space (second-order Taylor), or
whether the network is disconnected (connectivity). No sign is ever flipped after the fact.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx
from torch.nn.attention import SDPBackend, sdpa_kernel

from .evaluate import Subset, Task
from .gating import GatedModel, prune
from .graph import ComputationGraph, run_nodes
from .measuring import measuring
from .methods import AdditivePredictor, Context, Method, Predictor, _as_masks, register_method

__all__ = ["QuadraticPredictor", "ConnectivityPredictor", "gate_derivatives", "edge_activation_l1",
           "exclusive_param_l1"]


# ----------------------------------------------------------------------------------------------------
# predictors

@dataclass
class QuadraticPredictor(Predictor):
    """S(m) ~ S(1) + g.(m-1) + 1/2 (m-1)^T H (m-1): the second-order Taylor model in gate space."""
    name: str
    base: float
    grad: np.ndarray
    hess: np.ndarray

    @property
    def importance(self) -> np.ndarray:  # predicted loss increase when removing one edge
        return -self.grad + 0.5 * np.diag(self.hess)

    def predict(self, masks: np.ndarray) -> np.ndarray:
        d = _as_masks(masks, len(self.grad)) - 1
        return self.base + d @ self.grad + 0.5 * np.einsum("mi,ij,mj->m", d, self.hess, d)


@dataclass
class ConnectivityPredictor(Predictor):
    """1 if no input->output path survives, else 0 (the parameter-free rule of the re-analysis)."""
    name: str
    graph: ComputationGraph

    @property
    def importance(self) -> np.ndarray:  # bridges: edges whose removal alone disconnects the network
        e = self.graph.num_prunable
        return (~self.graph.connected(1 - np.eye(e))).astype(float)

    def predict(self, masks: np.ndarray) -> np.ndarray:
        return (~self.graph.connected(_as_masks(masks, self.graph.num_prunable) > 0.5)).astype(float)


# ----------------------------------------------------------------------------------------------------
# gate-space derivatives

def gate_derivatives(gated: GatedModel, data: Subset, task: Task, hessian: bool = True,
                     batch_size: int = 512, memory_budget: int = 2 ** 30, hvp_chunk: int = 4
                     ) -> tuple[float, np.ndarray, np.ndarray | None]:
    """S(1), the exact gradient g = dS/dm and (optionally) Hessian H = d2S/dm2 at m = 1, on ``data``.

    Cost: one forward and one backward pass over ``data`` for g; H adds E Hessian-vector products (E backward
    passes through the double-backward graph), ``hvp_chunk`` of them batched at a time (vmap; one at a time
    where an op has no batching rule). Memory: the autograd graph of one batch is kept for the Hessian-vector
    products, so the batch is capped such that the tensors autograd saves for it (measured on two samples),
    times 2 + ``hvp_chunk``, stay under ``memory_budget`` bytes, whatever the size of ``data``.
    """
    e = gated.num_edges
    s1, grad = 0.0, torch.zeros(e, dtype=torch.float64)
    hess = torch.zeros(e, e, dtype=torch.float64) if hessian else None
    n = len(data)
    with measuring(gated):
        per_sample = _saved_bytes_per_sample(gated, data, task)
        factor = (2 + hvp_chunk) if hessian else 2
        batch_size = max(1, min(batch_size, memory_budget // max(1, per_sample * factor)))
        for x, y in data.batches(batch_size, gated):
            gates = torch.ones(e, dtype=torch.float64, requires_grad=True)  # no rounding of g and H
            with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no double backward
                loss = task.per_sample(gated(*x, mask=gates), y)[0].sum() / n
                (g,) = torch.autograd.grad(loss, gates, create_graph=hessian)
                if hessian:
                    hess += _hessian_rows(g, gates, hvp_chunk).double()
            s1 += float(loss.detach())
            grad += g.detach().double()
    if hess is not None:
        hess = 0.5 * (hess + hess.T)
        return s1, grad.numpy(), hess.numpy()
    return s1, grad.numpy(), None


def derivatives(ctx: Context, hessian: bool) -> tuple[float, np.ndarray, np.ndarray | None]:
    """``gate_derivatives`` on the context's scoring subset, shared by the scorers of one context (its memo;
    the Hessian's computation gives the gradient too)."""
    key = "dH" if hessian else "d"
    if "dH" in ctx.memo:
        return ctx.memo["dH"]
    if key not in ctx.memo:
        ctx.memo[key] = gate_derivatives(ctx.gated, ctx.scoring, ctx.task, hessian=hessian,
                                         batch_size=ctx.batch_size)
    return ctx.memo[key]


def _saved_bytes_per_sample(gated: GatedModel, data: Subset, task: Task) -> int:
    """Bytes autograd saves for one more sample in a gated forward pass (the difference of 2 and 1 samples,
    so parameters saved once per pass do not count)."""
    def saved(k: int) -> int:
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t
        gates = torch.ones(gated.num_edges, dtype=torch.float64, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            task.per_sample(gated(*data[:k].args(gated), mask=gates), data.targets[:k])[0].sum()
        return total
    if len(data) < 2:
        return saved(1)
    return max(1, saved(2) - saved(1))


def _hessian_rows(g: torch.Tensor, gates: torch.Tensor, chunk: int) -> torch.Tensor:
    e = len(gates)
    eye = torch.eye(e, dtype=gates.dtype)
    rows = []
    for c0 in range(0, e, chunk):
        vs = eye[c0:c0 + chunk]
        try:
            (r,) = torch.autograd.grad(g, gates, grad_outputs=vs, is_grads_batched=True, retain_graph=True)
        except RuntimeError:  # some ops have no batching rule: one Hessian-vector product at a time
            r = torch.stack([torch.autograd.grad(g, gates, v, retain_graph=True)[0] for v in vs])
        rows.append(r)
    return torch.cat(rows)


# ----------------------------------------------------------------------------------------------------
# edge magnitudes

@torch.no_grad()
def edge_activation_l1(ctx: Context) -> np.ndarray:
    """Mean absolute value of each prunable edge's tensor over the scoring subset (summed over links). A
    head edge (``e.part = (k, n)``) only carries chunk k of the n chunks of the last dimension: its score is
    that chunk's mean absolute value."""
    graph = ctx.graph
    parts: dict[str, set[tuple[int, int] | None]] = {}  # producer node -> parts of it that edges carry
    for e in graph.prunable:
        for p, _ in e.links:
            parts.setdefault(p, set()).add(e.part)
    sums = {(p, part): 0.0 for p, ps in parts.items() for part in ps}
    weight = 0

    def record(n: fx.Node, compute: Callable[[], Any]) -> Any:
        out = compute()
        if n.name in parts and isinstance(out, torch.Tensor):
            a = out.detach().abs().double()
            for part in parts[n.name]:
                x = a if part is None else a.unflatten(-1, (part[1], -1))[..., part[0], :]
                sums[(n.name, part)] += float(x.mean()) * weight
        return out

    for x, _ in ctx.scoring.batches(ctx.batch_size, graph.module):
        weight = len(x[0])
        with measuring(graph.module):
            run_nodes(graph.module, x, record)
    n = len(ctx.scoring)
    return np.array([sum(sums[(p, e.part)] for p in {p for p, _ in e.links}) / n for e in graph.prunable])


def exclusive_param_l1(ctx: Context) -> np.ndarray:
    """L1 norm of the parameters that disappear when the edge alone is removed (they only feed it)."""
    def l1(module: torch.nn.Module) -> float:
        return float(sum(p.detach().abs().sum() for p in module.parameters()))
    full = l1(ctx.graph.module)
    return np.array([full - l1(prune(ctx.graph, ctx.graph.mask_from_removed([i])))
                     for i in range(ctx.num_edges)])


# ----------------------------------------------------------------------------------------------------
# the scorers, registered with their labels and pass counts

def random_scorer(ctx: Context) -> Predictor:
    rng = np.random.default_rng(ctx.seed)
    return AdditivePredictor("random", rng.random(ctx.num_edges))


def magnitude_scorer(ctx: Context) -> Predictor:
    return AdditivePredictor("magnitude", edge_activation_l1(ctx))


def param_l1_scorer(ctx: Context) -> Predictor:
    return AdditivePredictor("param_l1", exclusive_param_l1(ctx))


def taylor1_scorer(ctx: Context) -> Predictor:
    # removing edge i moves its gate from 1 to 0: first-order loss change -g_i
    s1, g, _ = derivatives(ctx, hessian=False)
    return AdditivePredictor("taylor1", -g, base=s1)


def taylor1_abs_scorer(ctx: Context) -> Predictor:
    # |g_i|: the first-order criterion of Molchanov et al. (2019), importance regardless of sign
    _, g, _ = derivatives(ctx, hessian=False)
    return AdditivePredictor("taylor1_abs", np.abs(g))


def taylor2_scorer(ctx: Context) -> Predictor:
    s1, g, h = derivatives(ctx, hessian=True)
    return QuadraticPredictor("taylor2", s1, g, h)


def connectivity_scorer(ctx: Context) -> Predictor:
    return ConnectivityPredictor("connectivity", ctx.graph)


def loo_scorer(ctx: Context) -> Predictor:
    # the leave-one-out oracle: measured loss increase of each single-edge removal, summed
    s1 = ctx.base_loss()
    return AdditivePredictor("loo", ctx.single_edge_losses() - s1, base=s1)


for _m in (
    Method("random", "Random", random_scorer, lambda e, k: (0, 0)),
    Method("magnitude", "Magnitude (activation L1)", magnitude_scorer, lambda e, k: (1, 0)),
    Method("param_l1", "Magnitude (parameter L1)", param_l1_scorer, lambda e, k: (0, 0)),
    Method("taylor1", "Taylor, 1st order", taylor1_scorer, lambda e, k: (1, 1)),
    Method("taylor1_abs", "Taylor, 1st order, abs.", taylor1_abs_scorer, lambda e, k: (1, 1)),
    Method("taylor2", "Taylor, 2nd order", taylor2_scorer, lambda e, k: (1, 1 + e),
           description="S(1) + g.(m-1) + (m-1)^T H (m-1) / 2; H from E Hessian-vector products"),
    Method("connectivity", "Connectivity", connectivity_scorer, lambda e, k: (0, 0)),
    Method("loo", "Leave-one-out", loo_scorer, lambda e, k: (e + 1, 0),
           description="measured single-removal losses, summed (reused from the measured masks if there)"),
):
    register_method(_m)
