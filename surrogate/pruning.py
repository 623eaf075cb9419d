"""Pruning: choose a mask under a budget from any predictor, apply it physically, optionally fine-tune."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from .evaluate import Subset, Task
from .gating import GatedModel, prune
from .graph import ComputationGraph, HeadSplit, build_graph, run_nodes
from .masks import prior_design, sparsity_masks
from .measuring import measuring
from .methods import METHODS, AdditivePredictor, Context, Predictor, fit_method, measure_design
from .tasks import check_data

__all__ = ["Budget", "CostModel", "select_mask", "PruneResult", "auto_prune"]


@dataclass(frozen=True)
class Budget:
    """What may be spent: remove exactly ``edges`` prunable edges, or keep the parameter / MAC count at
    most ``max_params`` / ``max_macs`` (absolute numbers)."""
    edges: int | None = None
    max_params: int | None = None
    max_macs: int | None = None

    def __post_init__(self) -> None:
        given = [x is not None for x in (self.edges, self.max_params, self.max_macs)]
        if sum(given) != 1:
            raise ValueError("give exactly one of Budget(edges=...), Budget(max_params=...), Budget(max_macs=...)")


class CostModel:
    """Exact parameter and MAC counts of the physically pruned network of any mask, without building it.

    A vertex (and its parameters) survives pruning iff some path of kept edges leads from it to the output;
    the per-vertex MACs are measured once on the example inputs. A surviving attention output projection
    (``build_graph(heads=...)``) loses, per removed head, that head's input columns of its weight and the
    same share of its matmul, as ``prune`` does."""

    def __init__(self, graph: ComputationGraph):
        self.graph = graph
        names = [v.name for v in graph.vertices]
        self._index = {n: i for i, n in enumerate(names)}
        gate = {e.name: i for i, e in enumerate(graph.prunable)}
        self._edges = [(self._index[e.src], self._index[e.dst], gate.get(e.name, -1)) for e in graph.edges]
        module = graph.module
        nodes = list(module.graph.nodes)
        node_vertex = {n: self._index[v.name] for v in graph.vertices for n in v.nodes}
        # every node survives iff one of the vertices it (transitively) feeds survives; nodes outside the
        # vertices (constants, e.g. a position embedding) inherit the vertices of their users
        feeds: dict[str, frozenset[int]] = {}
        out_vertex = self._index[graph.output_vertex]
        for node in reversed(nodes):
            if node.name in node_vertex:
                feeds[node.name] = frozenset({node_vertex[node.name]})
            elif node.op == "output":
                feeds[node.name] = frozenset({out_vertex})
            else:
                feeds[node.name] = frozenset().union(*(feeds[u.name] for u in node.users))
        users: dict[int, tuple[int, set[int]]] = {}  # parameter id -> (numel, vertices it feeds)
        for node in nodes:
            tensors = list(module.get_submodule(node.target).parameters()) if node.op == "call_module" else []
            if node.op == "get_attr":
                t = _get_attr(module, node.target)
                tensors = [t] if isinstance(t, nn.Parameter) else []
            for t in tensors:
                users.setdefault(id(t), (t.numel(), set()))[1].update(feeds[node.name])
        self.total_params = int(sum(p.numel() for p in module.parameters()))
        groups: dict[tuple[int, ...], int] = {}
        for numel, vs in users.values():  # tied weights: alive if any user is alive
            groups[tuple(sorted(vs))] = groups.get(tuple(sorted(vs)), 0) + numel
        self._param_groups = [(np.array(k, dtype=np.int64), n) for k, n in groups.items()]
        self.fixed_params = self.total_params - sum(groups.values())  # parameters no node uses
        node_macs = self._measure_macs()
        macs: dict[tuple[int, ...], int] = {}
        for name, n in node_macs.items():
            key = tuple(sorted(feeds[name]))
            macs[key] = macs.get(key, 0) + n
        self._mac_groups = [(np.array(k, dtype=np.int64), n) for k, n in macs.items()]
        self._heads = [self._head_costs(split, gate, node_macs) for split in graph.head_splits.values()]
        self.batch = int(graph.example_inputs[0].shape[0])

    def _measure_macs(self) -> dict[str, int]:
        """MACs of every fx node (nodes without any left out) on the example inputs."""
        node_macs: dict[str, int] = {}

        def count(n: fx.Node, compute: Callable[[], Any]) -> Any:
            with FlopCounterMode(display=False) as fc:
                out = compute()
            macs = fc.get_total_flops() // 2
            if macs:
                node_macs[n.name] = macs
            return out

        with torch.no_grad(), measuring(self.graph.module):
            run_nodes(self.graph.module, self.graph.example_inputs, count)
        return node_macs

    def _head_costs(self, split: HeadSplit, gate: dict[str, int], node_macs: dict[str, int]
                    ) -> tuple[int, np.ndarray, int, int]:
        """(projection vertex, gate of each head (-1: not prunable), weight parameters per head, MACs per
        head). The projection's vertex is one Linear / Conv1D call whose only MACs are its matmul, which
        is linear in the number of input columns, so each head carries exactly 1/heads of both."""
        gates = np.full(split.heads, -1, dtype=np.int64)
        for e in self.graph.edges:
            if e.dst == split.vertex and e.part is not None:
                gates[e.part[0]] = gate.get(e.name, -1)
        weight = self.graph.module.get_submodule(split.vertex.split("@")[0]).weight
        macs = sum(node_macs.get(n, 0) for n in self.graph.vertex(split.vertex).nodes)
        return self._index[split.vertex], gates, weight.numel() // split.heads, macs // split.heads

    def alive(self, masks: np.ndarray) -> np.ndarray:
        """(M, V) whether each vertex still feeds the output under each mask."""
        m = np.atleast_2d(np.asarray(masks) > 0.5)
        live = np.zeros((len(m), len(self.graph.vertices)), dtype=bool)
        live[:, self._index[self.graph.output_vertex]] = True
        for s, d, g in sorted(self._edges, key=lambda t: -t[1]):  # reverse topological order of dst
            kept = m[:, g] if g >= 0 else True
            live[:, s] |= live[:, d] & kept
        return live

    def cost(self, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(parameters, MACs per example) of each mask's pruned network."""
        live = self.alive(masks)
        kept = np.atleast_2d(np.asarray(masks) > 0.5)
        params = np.full(len(live), self.fixed_params, dtype=np.int64)
        macs = np.zeros(len(live), dtype=np.int64)
        for vs, n in self._param_groups:
            params += n * live[:, vs].any(1)
        for vs, n in self._mac_groups:
            macs += n * live[:, vs].any(1)
        for v, gates, head_params, head_macs in self._heads:
            # a dead projection is already not counted; a live one drops its removed heads' columns
            removed = (~kept[:, gates[gates >= 0]]).sum(1) * live[:, v]
            params -= head_params * removed
            macs -= head_macs * removed
        return params, macs // max(1, self.batch)


def _get_attr(module: nn.Module, target: str) -> Any:
    obj: Any = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _over_budget(budget: Budget, costs: CostModel | None, masks: np.ndarray) -> np.ndarray:
    if budget.edges is not None:
        return (masks == 0).sum(1) < budget.edges
    params, macs = costs.cost(masks)
    return params > budget.max_params if budget.max_params is not None else macs > budget.max_macs


def select_mask(predictor: Predictor, graph: ComputationGraph | int, budget: Budget, *,
                search: Literal["auto", "greedy", "beam"] = "auto", beam_width: int = 8,
                costs: CostModel | None = None, allowed: np.ndarray | None = None,
                allow_disconnected: bool = False) -> np.ndarray:
    """The mask with the lowest predicted loss found under ``budget``.

    For an additive predictor and an edge budget the answer is exact (remove the b least important edges);
    otherwise edges are removed one at a time (greedy, or a beam of ``beam_width`` partial masks), each
    step taking the removal with the lowest predicted loss -- per unit of cost saved for parameter/MAC
    budgets. ``allowed``: optional (E,) boolean, which edges may be removed.

    The pick keeps an input->output path (a network cut off from its input computes a constant): partial
    masks that disconnect the network are never extended. ``allow_disconnected=True`` lifts this, and is
    required when only the number of edges (not the graph) is given."""
    if isinstance(graph, int):
        if not allow_disconnected:
            raise ValueError("select_mask needs the graph to keep the pick connected; pass the "
                             "ComputationGraph, or allow_disconnected=True with the number of edges")
        num_edges, check = graph, None
    else:
        num_edges = graph.num_prunable
        check = None if allow_disconnected else graph.connected
    if budget.edges is not None and not 0 <= budget.edges <= num_edges:
        raise ValueError(f"cannot remove {budget.edges} of {num_edges} edges")
    if budget.edges is None and costs is None:
        raise ValueError("a parameter or MAC budget needs a CostModel(graph)")
    allowed = np.ones(num_edges, dtype=bool) if allowed is None else np.asarray(allowed, dtype=bool)
    if allowed.shape != (num_edges,):
        raise ValueError(f"allowed must have one entry per prunable edge ({num_edges}), got shape {allowed.shape}")
    start = np.ones((1, num_edges), dtype=np.float32)
    if not _over_budget(budget, costs, start)[0]:
        return start[0]
    if search == "auto":
        search = "greedy" if isinstance(predictor, AdditivePredictor) else "beam"
    if isinstance(predictor, AdditivePredictor) and budget.edges is not None:
        order = [i for i in np.argsort(predictor.importance, kind="stable") if allowed[i]]
        if len(order) < budget.edges:
            raise ValueError(f"only {len(order)} edges may be removed, the budget asks for {budget.edges}")
        mask = start[0].copy()
        mask[order[:budget.edges]] = 0
        if check is None or check(mask):
            return mask
        search = "beam"  # the b least important edges cut the network: search among connected masks
    width = 1 if search == "greedy" else beam_width
    beam = start
    while True:
        children = []
        for m in beam:
            for i in np.flatnonzero((m == 1) & allowed):
                c = m.copy()
                c[i] = 0
                children.append(c)
        if children and check is not None:
            children = [c for c, ok in zip(children, check(np.stack(children))) if ok]
        if not children:
            raise ValueError("the budget cannot be met by removing allowed edges"
                             + ("" if check is None else " while keeping an input->output path "
                                "(allow_disconnected=True lifts this)"))
        children = np.unique(np.stack(children), axis=0)
        pred = predictor.predict(children)
        if budget.edges is None:  # rank by predicted loss per unit of cost saved
            base_cost = _cost_of(budget, costs, beam).min()
            saved = np.maximum(base_cost - _cost_of(budget, costs, children), 1e-9)
            rank = (pred - predictor.predict(beam).min()) / saved
        else:
            rank = pred
        order = np.argsort(rank, kind="stable")
        done = ~_over_budget(budget, costs, children)
        if done.any():
            best = [i for i in np.argsort(pred, kind="stable") if done[i]][0]
            return children[best]
        beam = children[order[:width]]


def _cost_of(budget: Budget, costs: CostModel, masks: np.ndarray) -> np.ndarray:
    params, macs = costs.cost(masks)
    return params if budget.max_params is not None else macs


@dataclass
class PruneResult:
    mask: np.ndarray             # (E,) 1 = kept
    removed: list[str]           # names of the removed edges
    model: nn.Module             # the physically pruned model
    predictor: Predictor         # what chose the mask
    fit_masks: np.ndarray        # masks measured to fit it (empty for zero-shot scorers)
    connected: bool              # whether the pruned network keeps an input->output path
    params: tuple[int, int]      # before, after
    macs: tuple[int, int]        # per example, before, after


def auto_prune(model: nn.Module, scoring: Subset, task: Task, budget: Budget, *,
               method: str = "superposition", edges: Any = "merge", vertices: Any = None,
               extra_masks: int = 0, search: Literal["auto", "greedy", "beam"] = "auto",
               finetune_steps: int = 0, train_data: Subset | None = None, seed: int = 0,
               batch_size: int = 256, heads: Mapping[str, int] | None = None,
               allow_disconnected: bool = False, progress: bool = False) -> PruneResult:
    """One call for the common case: build the graph, measure the fitting masks on the small scoring
    subset (|E|+2, plus ``extra_masks`` random masks removing 5-25% of the edges), fit ``method`` (a
    surrogate or a scorer name), choose the mask under ``budget``, remove it physically, and optionally
    fine-tune for ``finetune_steps`` on ``train_data``.

    ``vertices``, ``edges`` and ``heads`` are passed to ``build_graph``: ``heads={pattern: number of
    heads}`` adds one prunable edge per attention head of every output projection whose module path
    matches the pattern (e.g. ``{r"attn\\.c_proj$": 12}`` for GPT-2), so that whole heads can be removed.
    The pick keeps an input->output path unless ``allow_disconnected``; ``progress`` shows a progress bar
    while the fitting masks are measured. The model itself is not changed (measurements run in eval mode
    and restore every module's mode; pruning and fine-tuning work on a copy)."""
    from .train import finetune
    check_data(scoring, task, model)
    example = scoring[: min(2, len(scoring))].args(model)
    graph = build_graph(model, example, vertices=vertices, edges=edges, heads=heads)
    gated = GatedModel(graph)
    e = graph.num_prunable
    if method not in METHODS:
        raise KeyError(f"unknown method {method!r}; registered: {', '.join(METHODS)}")
    measured = None
    if METHODS[method].fitted:
        fit = prior_design(e)
        if extra_masks:
            fit = np.vstack([fit, sparsity_masks(graph, extra_masks, 0.05, 0.25, seed=seed, exclude=fit)])
        # a method built from the outputs (or readout states) of these passes gets them instead of
        # measuring the single-edge masks a second time
        measured = measure_design(gated, scoring, task, [method], fit, batch_size=batch_size, progress=progress)
    ctx = Context(graph, gated, scoring, task, measured, seed=seed, batch_size=batch_size)
    predictor = fit_method(method, ctx)
    costs = CostModel(graph)
    mask = select_mask(predictor, graph, budget, search=search, costs=costs, allow_disconnected=allow_disconnected)
    pruned = prune(graph, mask)
    if finetune_steps:
        if train_data is None:
            raise ValueError("finetune_steps > 0 needs train_data")
        pruned = finetune(pruned, train_data, task, finetune_steps, seed=seed)
    (p0, p1), (c0, c1) = costs.cost(np.vstack([np.ones(e), mask]))
    fit = measured.masks if measured is not None else np.zeros((0, e), dtype=np.float32)
    return PruneResult(mask, [n for n, k in zip(graph.edge_names, mask) if k == 0], pruned, predictor, fit,
                       bool(graph.connected(mask)), (int(p0), int(p1)), (int(c0), int(c1)))
