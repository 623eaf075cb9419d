"""Zero-shot edge scorers: one pass over a small scoring subset, no mask sampling.

Each scorer returns a ``Predictor``: per-edge importances (higher = removing the edge costs more) and a
mask-level prediction derived from them in a principled way -- the predicted loss increase is the sum of
the removed edges' scores (additive scorers), the quadratic model in gate space (second-order Taylor), or
whether the network is disconnected (connectivity). No sign is ever flipped after the fact.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx

from .evaluate import Subset, Task, evaluate_masks, measuring
from .gating import GatedModel, prune
from .graph import ComputationGraph, run_nodes

__all__ = ["Measured", "Context", "Predictor", "AdditivePredictor", "QuadraticPredictor", "ConnectivityPredictor",
           "FlowPredictor", "gate_derivatives", "edge_activation_l1", "exclusive_param_l1"]


@dataclass(frozen=True, eq=False)
class Measured:
    """Masks measured on one data subset: their losses S(m) and, if kept, their outputs. Methods that are
    fitted (surrogates) or that reuse measured losses (leave-one-out) read them from here; it travels once,
    inside the ``Context``."""
    masks: np.ndarray                      # (K, E) float32, 1 = kept
    losses: np.ndarray                     # (K,) S(m) on the subset
    outputs: torch.Tensor | None = None    # (K, n, ...) the model's outputs under each mask, if kept
    subset: str = "scoring"
    state: torch.Tensor | None = None      # (K, n, ...) the value of fx node ``state_node`` under each mask
    state_node: str | None = None

    def __post_init__(self) -> None:
        m = np.asarray(self.masks, dtype=np.float32)
        m = m[None] if m.ndim == 1 else m
        y = np.asarray(self.losses, dtype=np.float64).reshape(-1)
        if m.ndim != 2:
            raise ValueError(f"measured masks must have shape (K, E), got {m.shape}")
        if len(y) != len(m):
            raise ValueError(f"{len(m)} measured masks but {len(y)} losses")
        if not np.isfinite(y).all():
            raise ValueError("measured losses contain NaN or infinite values")
        if self.outputs is not None and len(self.outputs) != len(m):
            raise ValueError(f"{len(m)} measured masks but outputs for {len(self.outputs)}")
        object.__setattr__(self, "masks", m)
        object.__setattr__(self, "losses", y)

    @classmethod
    def of(cls, masks: Any, result: Any) -> "Measured":
        """From the masks given to ``evaluate_masks`` and what it returned (a ``MaskEval``)."""
        return cls(np.asarray(masks), result.loss, result.outputs, result.subset, result.extra.get("state"),
                   result.extra.get("state_node"))

    def __len__(self) -> int:
        return len(self.masks)

    @property
    def num_edges(self) -> int:
        return self.masks.shape[1]

    def rows(self, wanted: np.ndarray) -> list[int] | None:
        """Row of each ``wanted`` mask among the measured ones, or None if any of them was not measured."""
        index = {row.tobytes(): i for i, row in enumerate(self.masks)}
        rows = [index.get(np.asarray(w, dtype=np.float32).tobytes()) for w in wanted]
        return None if any(r is None for r in rows) else rows

    def head(self, k: int) -> "Measured":
        """The first k measurements (nested fitting sets, e.g. for sample-efficiency curves)."""
        return Measured(self.masks[:k], self.losses[:k], None if self.outputs is None else self.outputs[:k],
                        self.subset, None if self.state is None else self.state[:k], self.state_node)


@dataclass
class Context:
    """What a method may use: the model, its graph, the small scoring subset, and the masks measured on it.

    ``memo`` caches expensive quantities (derivatives, shares, single-edge outputs) so that methods scored
    on one context share them; ``with_measured`` gives a context with other measurements and the same memo.
    """
    graph: ComputationGraph
    gated: GatedModel | None
    scoring: Subset | None
    task: Task | None
    measured: Measured | None = None
    seed: int = 0
    batch_size: int = 512
    removable: np.ndarray | None = None   # (E,) which edges a pick may remove (None: all); search methods use it
    max_removed: int | None = None        # the largest number of edges a pick will remove (None: all removable)
    memo: dict[str, Any] = field(default_factory=dict, repr=False)  # shared expensive quantities

    def __post_init__(self) -> None:
        if self.removable is not None:
            self.removable = np.asarray(self.removable, dtype=bool)
            if self.removable.shape != (self.graph.num_prunable,):
                raise ValueError(f"removable must have one entry per prunable edge ({self.graph.num_prunable})")
        if self.measured is not None and self.measured.num_edges != self.graph.num_prunable:
            raise ValueError(f"measured masks have {self.measured.num_edges} entries but the graph has "
                             f"{self.graph.num_prunable} prunable edges")

    def with_measured(self, measured: Measured | None) -> "Context":
        return replace(self, measured=measured, memo=self.memo)

    @property
    def num_edges(self) -> int:
        return self.graph.num_prunable

    def _known(self, wanted: np.ndarray) -> np.ndarray | None:
        rows = self.measured.rows(wanted) if self.measured is not None else None
        return None if rows is None else self.measured.losses[rows]

    def base_loss(self) -> float:
        """S(1) on the scoring subset."""
        if "S1" not in self.memo:
            ones = np.ones(self.num_edges, dtype=np.float32)
            known = self._known(ones[None])
            self.memo["S1"] = float(known[0]) if known is not None else float(
                evaluate_masks(self.gated, ones, self.scoring, self.task, batch_size=self.batch_size).loss[0])
        return self.memo["S1"]

    def single_edge_losses(self) -> np.ndarray:
        """S(1 - e_i) for every edge i (measured; reused from the measured masks when they include them)."""
        if "loo" not in self.memo:
            singles = 1 - np.eye(self.num_edges, dtype=np.float32)
            known = self._known(singles)
            self.memo["loo"] = known if known is not None else evaluate_masks(
                self.gated, singles, self.scoring, self.task, batch_size=self.batch_size).loss
        return self.memo["loo"]

    def single_edge_outputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Outputs on the scoring subset with all edges kept, (n, ...), and the change of the outputs when each
        edge alone is removed, (E, n, ...): taken from the measured outputs when the measured masks include
        them (the prior design does), otherwise measured here (|E| + 1 passes over the scoring subset)."""
        if "outputs" not in self.memo:
            e = self.num_edges
            wanted = np.vstack([np.ones(e), 1 - np.eye(e)]).astype(np.float32)
            m = self.measured
            rows = m.rows(wanted) if m is not None and m.outputs is not None else None
            if rows is not None:
                y = m.outputs[rows]
            else:
                self._check_output_memory(e + 1)
                y = evaluate_masks(self.gated, wanted, self.scoring, self.task, batch_size=self.batch_size,
                                   keep_outputs=True).outputs
            y = y.double()
            self.memo["outputs"] = (y[0], y[1:] - y[0])
        return self.memo["outputs"]

    def single_edge_states(self, node: str) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
        """As ``single_edge_outputs``, for the value of fx node ``node`` (a readout state, see
        ``surrogate.readout``), plus the dtype the model computes it in: from the measured states when the
        measurements kept that node's, else measured here (|E| + 1 passes)."""
        key = ("states", node)
        if key not in self.memo:
            e = self.num_edges
            wanted = np.vstack([np.ones(e), 1 - np.eye(e)]).astype(np.float32)
            m = self.measured
            rows = m.rows(wanted) if m is not None and m.state is not None and m.state_node == node else None
            if rows is not None:
                h = m.state[rows]
            else:
                h = evaluate_masks(self.gated, wanted, self.scoring, self.task, batch_size=self.batch_size,
                                   keep_state=node, masks_per_pass=1).extra["state"]
            dtype, h = h.dtype, h.double()
            self.memo[key] = (h[0], h[1:] - h[0], dtype)
        return self.memo[key]

    def _check_output_memory(self, num_masks: int, limit: float = 8 * 2 ** 30) -> None:
        """Refuse to keep outputs that would not fit in memory, with what to do instead."""
        with torch.no_grad():
            one = self.gated(self.scoring.inputs[:1])
        need = 8 * num_masks * len(self.scoring) * one.numel()  # float64 copies
        if need > limit:
            raise MemoryError(
                f"keeping the outputs of {num_masks} masks on {len(self.scoring)} scoring samples needs "
                f"{need / 2 ** 30:.1f} GiB (each sample's output has {one.numel()} values); use a smaller scoring "
                "subset (e.g. fewer sequences or shorter ones for a language model) or another surrogate")

    def shares(self) -> np.ndarray:
        """Measured merge shares of every vertex-graph edge (one pass over the scoring subset)."""
        if "shares" not in self.memo:
            from .flow import measure_shares
            self.memo["shares"] = measure_shares(self.graph, self.scoring.inputs, self.batch_size)
        return self.memo["shares"]

    def derivatives(self, hessian: bool) -> tuple[float, np.ndarray, np.ndarray | None]:
        key = "dH" if hessian else "d"
        if "dH" in self.memo:
            return self.memo["dH"]
        if key not in self.memo:
            self.memo[key] = gate_derivatives(self.gated, self.scoring, self.task, hessian=hessian,
                                              batch_size=self.batch_size)
        return self.memo[key]


# ----------------------------------------------------------------------------------------------------
# predictors

class Predictor:
    """Mask -> predicted loss (or a quantity monotone in it; higher = worse) plus per-edge importance
    (``importance``: the predicted cost of removing each edge alone; subclasses define both)."""

    def predict(self, masks: np.ndarray) -> np.ndarray:
        raise NotImplementedError


def _as_masks(masks: Any, e: int) -> np.ndarray:
    m = np.asarray(masks.detach().cpu() if isinstance(masks, torch.Tensor) else masks, dtype=np.float64)
    m = m[None] if m.ndim == 1 else m
    if m.ndim != 2 or m.shape[1] != e:
        raise ValueError(f"masks must have shape (M, {e}), got {m.shape}")
    return m


@dataclass
class AdditivePredictor(Predictor):
    """S(m) ~ base + sum over removed edges of importance."""
    name: str
    importance: np.ndarray
    base: float = 0.0

    def predict(self, masks: np.ndarray) -> np.ndarray:
        return self.base + (1 - _as_masks(masks, len(self.importance))) @ self.importance


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


@dataclass
class FlowPredictor(Predictor):
    """1 - F_output(m): the fraction of the measured information flow that no longer reaches the output."""
    name: str
    graph: ComputationGraph
    shares: np.ndarray

    def __post_init__(self) -> None:
        from .flow import FlowStructure
        self.structure = FlowStructure.from_graph(self.graph, weights=self.shares)

    def predict(self, masks: np.ndarray) -> np.ndarray:
        m = torch.tensor(_as_masks(masks, self.graph.num_prunable), dtype=torch.float32)
        with torch.no_grad():
            return 1.0 - self.structure.flow(m).double().numpy()

    @property
    def importance(self) -> np.ndarray:
        e = self.graph.num_prunable
        return self.predict(1 - np.eye(e))


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
    from torch.nn.attention import SDPBackend, sdpa_kernel
    e = gated.num_edges
    s1, grad = 0.0, torch.zeros(e, dtype=torch.float64)
    hess = torch.zeros(e, e, dtype=torch.float64) if hessian else None
    n = len(data)
    with measuring(gated):
        per_sample = _saved_bytes_per_sample(gated, data, task)
        factor = (2 + hvp_chunk) if hessian else 2
        batch_size = max(1, min(batch_size, memory_budget // max(1, per_sample * factor)))
        for b0 in range(0, n, batch_size):
            x, y = data.inputs[b0:b0 + batch_size], data.targets[b0:b0 + batch_size]
            gates = torch.ones(e, dtype=torch.float64, requires_grad=True)  # no rounding of g and H
            with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no double backward
                loss = task.per_sample(gated(x, mask=gates), y)[0].sum() / n
                (g,) = torch.autograd.grad(loss, gates, create_graph=hessian)
                if hessian:
                    hess += _hessian_rows(g, gates, hvp_chunk).double()
            s1 += float(loss.detach())
            grad += g.detach().double()
    if hess is not None:
        hess = 0.5 * (hess + hess.T)
        return s1, grad.numpy(), hess.numpy()
    return s1, grad.numpy(), None


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
            task.per_sample(gated(data.inputs[:k], mask=gates), data.targets[:k])[0].sum()
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

    for b0 in range(0, len(ctx.scoring), ctx.batch_size):
        x = ctx.scoring.inputs[b0:b0 + ctx.batch_size]
        weight = len(x)
        with measuring(graph.module):
            run_nodes(graph.module, (x,), record)
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
# the scorers (registered once, with their labels and pass counts, in surrogate.methods)

def random_scorer(ctx: Context) -> Predictor:
    rng = np.random.default_rng(ctx.seed)
    return AdditivePredictor("random", rng.random(ctx.num_edges))


def magnitude_scorer(ctx: Context) -> Predictor:
    return AdditivePredictor("magnitude", edge_activation_l1(ctx))


def param_l1_scorer(ctx: Context) -> Predictor:
    return AdditivePredictor("param_l1", exclusive_param_l1(ctx))


def taylor1_scorer(ctx: Context) -> Predictor:
    # removing edge i moves its gate from 1 to 0: first-order loss change -g_i
    s1, g, _ = ctx.derivatives(hessian=False)
    return AdditivePredictor("taylor1", -g, base=s1)


def taylor1_abs_scorer(ctx: Context) -> Predictor:
    # |g_i|: the first-order criterion of Molchanov et al. (2019), importance regardless of sign
    _, g, _ = ctx.derivatives(hessian=False)
    return AdditivePredictor("taylor1_abs", np.abs(g))


def taylor2_scorer(ctx: Context) -> Predictor:
    s1, g, h = ctx.derivatives(hessian=True)
    return QuadraticPredictor("taylor2", s1, g, h)


def connectivity_scorer(ctx: Context) -> Predictor:
    return ConnectivityPredictor("connectivity", ctx.graph)


def flow_scorer(ctx: Context) -> Predictor:
    # zero-shot: merge shares measured in one pass, propagated through the graph (surrogate.flow)
    return FlowPredictor("flow", ctx.graph, ctx.shares())


def loo_scorer(ctx: Context) -> Predictor:
    # the leave-one-out oracle: measured loss increase of each single-edge removal, summed
    s1 = ctx.base_loss()
    return AdditivePredictor("loo", ctx.single_edge_losses() - s1, base=s1)
