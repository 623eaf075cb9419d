"""Information flow through the computation graph, measured in one forward pass.

At a merge vertex v the inputs x_e (e into v) combine into y. The *share* of input e is the part of y it
carries: c_e = <x_e, y> / <y, y> for a sum (the shares sum to 1), c_e = <x_e, x_e> / <y, y> for a
concatenation, 1/k for other k-input combinations (products, attention), and 1 for a vertex with one input;
the heads of a head-split output projection (``build_graph(heads=...)``) are the terms x_k W_k of a sum.
With the flow of the inputs set to 1, the flow of a pruned network is

    F_v(m) = sum over in-edges e = (u, v) of  m_e * c_e * F_u(m),

an estimate of the fraction of the original signal that still reaches v through kept paths: for a single
sum of linear branches it is exactly the projection <y(m), y> / <y, y>; across nested merges and nonlinear
layers the shares are composed multiplicatively, which is the model's approximation. F_output(m) = 0
exactly when no input->output path survives. The shares are averaged over a data subset (no mask is
evaluated), which makes F a zero-shot importance model. (A ``stack`` is treated like a concatenation.)

``FlowStructure.attribution`` splits the flow lost under a mask among the removed edges (Shapley values of
the multilinear lost flow, or every lost path charged to its cut closest to the output); the superposition
surrogate weights measured output changes by it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx

from .graph import ComputationGraph, _canonical_op, run_nodes
from .measuring import measuring
from .tasks import Subset

__all__ = ["FlowStructure", "measure_shares"]


@dataclass(frozen=True)
class FlowStructure:
    """The vertex graph prepared for flow computations. Chains of always-kept edges are contracted: an
    always-kept edge s -> d out of a vertex s with no other out-edge is removed and s's in-edges are
    attached to d, their multipliers multiplied by its own (exact for the linear flow above)."""
    num_vertices: int
    src: torch.Tensor        # (F,) source vertex of each flow edge
    dst: torch.Tensor        # (F,) destination vertex
    gate: torch.Tensor       # (F,) prunable-edge index, or -1 for an edge that is always kept
    base: torch.Tensor       # (F,) fixed multiplier (product of the weights of contracted edges)
    levels: tuple[torch.Tensor, ...]  # flow-edge indices grouped by the depth of their destination
    inputs: tuple[int, ...]
    output: int
    edge_of: tuple[int, ...]  # for each flow edge, the index in graph.edges it descends from

    @staticmethod
    def from_graph(graph: ComputationGraph, weights: np.ndarray | None = None,
                   contract: bool = True) -> "FlowStructure":
        """weights: one multiplier per edge of ``graph.edges`` (default 1)."""
        names = [v.name for v in graph.vertices]
        gate_of = {e.name: i for i, e in enumerate(graph.prunable)}
        w = np.ones(len(graph.edges)) if weights is None else np.asarray(weights, dtype=np.float64)
        # [src, dst, gate, multiplier, original edge index]
        edges = [[e.src, e.dst, gate_of.get(e.name, -1), float(w[i]), i] for i, e in enumerate(graph.edges)]
        keep = set(graph.input_vertices) | {graph.output_vertex}
        if contract:
            out_deg: dict[str, int] = {}
            for s, *_ in edges:
                out_deg[s] = out_deg.get(s, 0) + 1
            changed = True
            while changed:
                changed = False
                for edge in edges:
                    s, d, g, k, _ = edge
                    if g != -1 or s in keep or out_deg.get(s, 0) != 1:
                        continue
                    edges.remove(edge)  # s only feeds d, through an always-kept edge: merge s into d
                    out_deg[s] = 0
                    for x in edges:
                        if x[1] == s:
                            x[1], x[3] = d, x[3] * k
                    changed = True
                    break
        alive = sorted({x for s, d, *_ in edges for x in (s, d)} | keep, key=names.index)
        idx = {n: i for i, n in enumerate(alive)}
        depth = {n: 0 for n in alive}
        for n in alive:  # alive is in topological order
            for s, d, *_ in edges:
                if d == n:
                    depth[n] = max(depth[n], depth[s] + 1)
        edges.sort(key=lambda x: depth[x[1]])
        levels: dict[int, list[int]] = {}
        for i, x in enumerate(edges):
            levels.setdefault(depth[x[1]], []).append(i)
        return FlowStructure(
            len(alive), torch.tensor([idx[x[0]] for x in edges]), torch.tensor([idx[x[1]] for x in edges]),
            torch.tensor([x[2] for x in edges]), torch.tensor([x[3] for x in edges], dtype=torch.float32),
            tuple(torch.tensor(levels[k]) for k in sorted(levels)),
            tuple(idx[n] for n in graph.input_vertices), idx[graph.output_vertex], tuple(x[4] for x in edges))

    def edge_mask(self, masks: torch.Tensor) -> torch.Tensor:
        """(M, E) prunable-edge masks -> (M, F) flow-edge masks (always-kept edges get 1)."""
        ones = torch.ones(masks.shape[0], 1, dtype=masks.dtype)
        return torch.cat([masks, ones], 1)[:, torch.where(self.gate >= 0, self.gate, masks.shape[1])]

    def propagate(self, masks: torch.Tensor, weight: torch.Tensor, source: torch.Tensor,
                  transfer: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Vertex states (M, V, d): state(v) = transfer(sum over in-edges f of mask_f * weight_f * state(src_f)).

        weight: (F, d) per-flow-edge weights (``base`` is NOT applied here: multiply it in if wanted);
        source: (V, d) states of the input vertices (other rows ignored); transfer: applied to the summed
        inflow of each level's vertices (identity if None)."""
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

    def linear(self, masks: torch.Tensor, weight: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """All vertex states of the linear flow h = source + A(m) h, A[v, u] = sum of mask_f * weight_f over
        flow edges u -> v (every vertex may emit a source term): one batched triangular solve, vertices
        being in topological order. (M, V). (For sources at the inputs only, ``propagate`` is faster.)"""
        m = self.edge_mask(masks.to(weight.dtype))
        v = self.num_vertices
        a = torch.zeros(m.shape[0], v * v, dtype=weight.dtype).index_add(1, self.dst * v + self.src, m * weight)
        eye = torch.eye(v, dtype=weight.dtype)
        rhs = source.to(weight.dtype).expand(m.shape[0], v).unsqueeze(-1)
        return torch.linalg.solve_triangular(eye - a.view(-1, v, v), rhs, upper=False).squeeze(-1)

    def flow(self, masks: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """F_output(m) for (M, E) masks with per-flow-edge weights (default: ``base``); inputs emit 1."""
        w = self.base if weight is None else weight
        source = torch.ones(self.num_vertices, 1, dtype=w.dtype)
        return self.propagate(masks.to(w.dtype), w[:, None], source)[:, self.output, 0]

    def lost(self, masks: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """L(m) = 1 - F_output(m) / F_output(1): the fraction of the flow lost under each mask, (M,) float64."""
        w = (self.base if weight is None else weight).double()
        m = masks.double()
        full = self.flow(torch.ones(1, m.shape[1], dtype=torch.float64), w)[0]
        return 1.0 - self.flow(m, w) / full

    def attribution(self, masks: torch.Tensor, method: str = "shapley", points: int = 16) -> torch.Tensor:
        """Split the lost flow L(m) of each mask among its removed edges: (M, E) with rows summing to L(m)
        and zeros at kept edges.

        "shapley": the Shapley value of edge i in the game "flow lost when this subset of the removed edges is
        removed". L is multilinear in m, so Owen's formula phi_i = int_0^1 dF/dm_i (1 - t r) / F(1) dt
        (r = 1 - m) is a polynomial integral, evaluated by Gauss-Legendre quadrature with ``points`` nodes
        (exact while no path crosses more than 2 * points removed edges).
        "last_cut": every lost path is charged to the removed edge closest to the output on it; removing the
        edges from the output backwards, each is credited with the flow its removal takes away."""
        m = masks.double()
        r = 1.0 - m
        w = self.base.double()
        if method == "shapley":
            nodes, weights = np.polynomial.legendre.leggauss(points)
            full = self.flow(torch.ones(1, m.shape[1], dtype=torch.float64), w)[0]
            phi = torch.zeros_like(m)
            for t, a in zip((nodes + 1) / 2, weights / 2):
                x = (1.0 - float(t) * r).requires_grad_(True)
                with torch.enable_grad():
                    (g,) = torch.autograd.grad(self.flow(x, w).sum(), x)
                phi += float(a) * g
            return (phi / full * r).detach()
        if method == "last_cut":
            # prunable edges are numbered in topological order of their destination, so an edge downstream of
            # another on some path has the larger index: walking the indices backwards removes it first
            phi = torch.zeros_like(m)
            cur = torch.ones_like(m)
            before = torch.zeros(len(m), dtype=torch.float64)
            for i in reversed(range(m.shape[1])):
                if not bool((r[:, i] > 0).any()):
                    continue
                cur = cur.clone()
                cur[:, i] = m[:, i]
                after = self.lost(cur, w)
                phi[:, i] = after - before
                before = after
            return phi
        raise ValueError(f"attribution method must be 'shapley' or 'last_cut', got {method!r}")


_SUM = {"add", "sub", "_keep"}
_CAT = {"cat", "concat", "concatenate", "stack"}


class ShareMeter:
    """Accumulates the merge shares of ``graph``'s edges (``measure_shares``) from the values of the nodes in
    ``nodes`` (names in ``graph.module``), one batch at a time: any forward pass that taps them (e.g. the dense
    network's measured pass) yields the shares at no extra pass."""

    def __init__(self, graph: ComputationGraph):
        self.graph = graph
        self.by_dst: dict[str, list[int]] = {}
        for i, e in enumerate(graph.edges):
            self.by_dst.setdefault(e.dst, []).append(i)
        nodes = {n.name: n for n in graph.module.graph.nodes}
        self.kinds: dict[str, str] = {}
        for v, idx in self.by_dst.items():
            if len(idx) < 2:
                self.kinds[v] = "single"
            elif v in graph.head_splits:
                self.kinds[v] = "heads"
            else:
                ops = {_canonical_op(nodes[c]) for i in idx for _, c in graph.edges[i].links}
                self.kinds[v] = "sum" if ops <= _SUM else "cat" if ops <= _CAT else "equal"
        wanted = {p for v, idx in self.by_dst.items() if self.kinds[v] in ("sum", "cat")
                  for i in idx for p, _ in graph.edges[i].links}
        wanted |= {graph.head_splits[v].input for v, k in self.kinds.items() if k == "heads"}
        self.nodes = tuple(sorted(wanted))
        self.num = np.zeros(len(graph.edges))
        self.den = {v: 0.0 for v in self.by_dst}

    def _head_terms(self, v: str, x: torch.Tensor) -> list[torch.Tensor]:
        """The contribution x_k W_k of each head k to the output of projection ``v`` (no bias)."""
        split = self.graph.head_splits[v]
        weight = self.graph.module.get_submodule(split.vertex.split("@")[0]).weight.detach().double()
        if split.layout == "linear":  # weight (out, in); Conv1D's is (in, out)
            weight = weight.T
        chunks = x.unflatten(-1, (split.heads, -1))      # (..., heads, head dim)
        rows = weight.unflatten(0, (split.heads, -1))    # (heads, head dim, out)
        return [chunks[..., k, :] @ rows[k] for k in range(split.heads)]

    @torch.no_grad()
    def add(self, acts: dict[str, torch.Tensor]) -> None:
        """One batch: the value of every node in ``nodes``."""
        acts = {k: v.detach().double() for k, v in acts.items()}
        edges, num, den = self.graph.edges, self.num, self.den
        for v, idx in self.by_dst.items():
            if self.kinds[v] == "heads":
                terms = self._head_terms(v, acts[self.graph.head_splits[v].input])
                y = torch.stack(terms).sum(0)
                den[v] += float((y * y).sum())
                for i in idx:
                    num[i] += float((terms[edges[i].part[0]] * y).sum())
                continue
            if self.kinds[v] not in ("sum", "cat"):
                continue
            xs = [sum(acts[p] for p in dict.fromkeys(p for p, _ in edges[i].links)) for i in idx]
            if self.kinds[v] == "sum" and len({x.shape for x in xs}) == 1:
                y = torch.stack(xs).sum(0)
                den[v] += float((y * y).sum())
                for i, x in zip(idx, xs):
                    num[i] += float((x * y).sum())
            else:  # concatenation (or a broadcasting sum): energy shares
                energies = [float((x * x).sum()) for x in xs]
                den[v] += sum(energies)
                for i, en in zip(idx, energies):
                    num[i] += en

    def shares(self) -> np.ndarray:
        shares = np.ones(len(self.graph.edges))
        for v, idx in self.by_dst.items():
            if self.kinds[v] == "equal":
                shares[idx] = 1.0 / len(idx)
            elif self.kinds[v] in ("sum", "cat", "heads"):
                shares[idx] = self.num[idx] / self.den[v] if self.den[v] > 0 else 1.0 / len(idx)
        return shares


@torch.no_grad()
def measure_shares(graph: ComputationGraph, inputs: Any, batch_size: int = 512) -> np.ndarray:
    """The share c_e of every edge of ``graph.edges`` in its destination's combined input (see module doc),
    averaged over ``inputs`` (a Subset, or the model's input tensor; one forward pass, no masks).

    An attention output projection split into heads (``graph.head_splits``) is linear in its input,
    y = sum_k x_k W_k + b, so it is treated as a sum whose terms are the heads' contributions x_k W_k (the
    bias is no input edge): c_k = <x_k W_k, y0> / <y0, y0> with y0 = sum_k x_k W_k."""
    meter = ShareMeter(graph)
    wanted = set(meter.nodes)
    acts: dict[str, torch.Tensor] = {}

    def record(n: fx.Node, compute: Callable[[], Any]) -> Any:
        out = compute()
        if n.name in wanted and isinstance(out, torch.Tensor):
            acts[n.name] = out.detach().double()
        return out

    data = inputs if isinstance(inputs, Subset) else Subset("inputs", inputs, torch.zeros(len(inputs)))
    for x, _ in data.batches(batch_size, graph.module):
        acts.clear()
        with measuring(graph.module):
            run_nodes(graph.module, x, record)
        meter.add(acts)
    return meter.shares()
