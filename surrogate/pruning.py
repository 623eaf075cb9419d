"""Pruning: choose a mask under a budget from any predictor, apply it physically, optionally fine-tune."""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils import _pytree as pytree
from torch.utils.flop_counter import FlopCounterMode

from .evaluate import Subset, Task
from .gating import prune
from .graph import ComputationGraph, HeadSplit, build_graph, run_nodes
from .masks import prior_design, sparsity_masks
from .measuring import measuring, model_device
from .methods import METHODS, AdditivePredictor, Predictor, fit_method, fitting_context
from .progress import reporting
from .tasks import check_data

__all__ = ["Budget", "CostModel", "select_mask", "PruneResult", "auto_prune"]


@dataclass(frozen=True)
class Budget:
    """What may be spent, one of: remove exactly ``edges`` prunable edges (free ones too: an identity
    shortcut saves nothing); keep at most a fraction ``params`` / ``macs`` (in (0, 1]) of the unpruned
    network's parameters / MACs per example; or at most ``max_params`` / ``max_macs`` (absolute numbers).
    ``Budget(params=0.8)``: prune a fifth of the parameters."""
    edges: int | None = None
    max_params: float | None = None
    max_macs: float | None = None
    params: float | None = None
    macs: float | None = None

    def __post_init__(self) -> None:
        given = {k: v for k, v in vars(self).items() if v is not None}
        if len(given) != 1:
            raise ValueError("give exactly one of Budget(edges=...), Budget(params=fraction), Budget(macs=fraction), "
                             "Budget(max_params=...), Budget(max_macs=...)")
        (kind, value), = given.items()
        number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
        if kind == "edges" and not (isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 0):
            raise ValueError(f"Budget(edges={value!r}): give a whole number of edges to remove (>= 0)")
        if kind in ("params", "macs") and not (number and 0 < value <= 1):
            raise ValueError(f"Budget({kind}={value!r}): give the fraction of the network's "
                             f"{'parameters' if kind == 'params' else 'MACs'} to keep, in (0, 1] "
                             f"(Budget(max_{kind}=...) takes an absolute number)")
        if kind.startswith("max_") and not (number and np.isfinite(value) and value >= 0):
            raise ValueError(f"Budget({kind}={value!r}): give a non-negative number")

    def __repr__(self) -> str:
        return "Budget(" + ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if v is not None) + ")"

    def absolute(self, costs: CostModel) -> Budget:
        """This budget with a fraction of parameters or MACs turned into an absolute number for ``costs``."""
        if self.params is None and self.macs is None:
            return self
        e = costs.graph.num_prunable
        params, macs = costs.cost(np.ones((1, e)))
        if self.params is not None:
            return Budget(max_params=float(self.params * params[0]))
        return Budget(max_macs=float(self.macs * macs[0]))


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
    budget = budget.absolute(costs) if costs is not None else budget
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
            saved = base_cost - _cost_of(budget, costs, children)
            rank = (pred - predictor.predict(beam).min()) / np.maximum(saved, 1e-9)
            # a removal that saves nothing never helps meet the budget (and may lead the search into cuts)
            rank = np.where(saved > 0, rank, np.inf) if (saved > 0).any() else pred
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


def auto_prune(model: nn.Module, scoring: Subset, task: Task, budget: Budget = Budget(params=0.8), *,
               method: str = "superposition", edges: Any = "merge", vertices: Any = None,
               extra_masks: int = 0, search: Literal["auto", "greedy", "beam"] = "auto",
               finetune_steps: int = 0, train_data: Subset | None = None, seed: int = 0,
               batch_size: int = 256, heads: Mapping[str, int] | None = None,
               allow_disconnected: bool = False,
               log: Callable[[str], None] | None = None, progress: bool | None = None) -> PruneResult:
    """One call for the common case: build the graph, measure the fitting masks on the small scoring
    subset (|E|+2, plus ``extra_masks`` random masks removing 5-25% of the edges), fit ``method`` (a
    surrogate or a scorer name), choose the mask under ``budget``, remove it physically, and optionally
    fine-tune for ``finetune_steps`` on ``train_data``.

    budget: by default ``Budget(params=0.8)``, at most 80% of the parameters kept; a parameter or MAC budget
    always saves what it says, while ``Budget(edges=k)`` removes k edges, and the cheapest to remove may be
    free ones (an identity shortcut saves no parameters). The request is checked before anything is
    measured: the method's name, the budget (edges within the prunable ones; a parameter or MAC budget
    above what remains with every prunable edge removed), the data (``tasks.check_data``). A warning says
    when the pick saves neither parameters nor MACs, and when the pruned network's output no longer
    depends on its input (its outputs on different samples of ``scoring`` are equal).

    ``vertices``, ``edges`` and ``heads`` are passed to ``build_graph``: ``heads={pattern: number of
    heads}`` adds one prunable edge per attention head of every output projection whose module path
    matches the pattern (e.g. ``{r"attn\\.c_proj$": 12}`` for GPT-2), so that whole heads can be removed.
    The pick keeps an input->output path unless ``allow_disconnected``. ``log``: a callable receiving a
    line per phase and, within a long measurement, every few minutes (as ``run_experiment(log=...)``);
    ``progress=True`` is deprecated (it means ``log=print``). The model itself is not changed (measurements run in
    eval mode and restore every module's mode; pruning and fine-tuning work on a copy)."""
    if progress is not None:
        warnings.warn("auto_prune(progress=...) is deprecated: pass log=print (one line per phase, and every few "
                      "minutes within a long measurement)", DeprecationWarning, stacklevel=2)
        log = print if progress and log is None else log
    _check_request(method, budget, finetune_steps, train_data)
    check_data(scoring, task, model)
    with reporting(log) if log is not None else contextlib.nullcontext():
        return _auto_prune(model, scoring, task, budget, method, edges, vertices, extra_masks, search,
                           finetune_steps, train_data, seed, batch_size, heads, allow_disconnected,
                           log or (lambda msg: None))


def _auto_prune(model: nn.Module, scoring: Subset, task: Task, budget: Budget, method: str, edges: Any,
                vertices: Any, extra_masks: int, search: Any, finetune_steps: int, train_data: Subset | None,
                seed: int, batch_size: int, heads: Mapping[str, int] | None, allow_disconnected: bool,
                say: Callable[[str], None]) -> PruneResult:
    from .train import finetune
    graph = build_graph(model, scoring[: min(2, len(scoring))].args(model), vertices=vertices, edges=edges,
                        heads=heads)
    e = graph.num_prunable
    costs = CostModel(graph)
    _check_budget(budget, graph, costs)
    fit = None
    if METHODS[method].fitted:
        fit = prior_design(e)
        if extra_masks:
            fit = np.vstack([fit, sparsity_masks(graph, extra_masks, 0.05, 0.25, seed=seed, exclude=fit)])
        # a method built from the outputs (or readout states) of these passes gets them instead of
        # measuring the single-edge masks a second time
        say(f"auto_prune: {e} prunable edges; measuring {len(fit)} masks on {len(scoring)} {scoring.name} samples")
    ctx = fitting_context(graph, scoring, task, [method], fit, seed=seed, batch_size=batch_size)
    say(f"auto_prune: fitting {method}")
    predictor = fit_method(method, ctx)
    mask = select_mask(predictor, graph, budget, search=search, costs=costs, allow_disconnected=allow_disconnected)
    pruned = prune(graph, mask)
    (p0, p1), (c0, c1) = costs.cost(np.vstack([np.ones(e), mask]))
    say(f"auto_prune: removed {int((mask == 0).sum())} edges: {p0} -> {p1} parameters, {c0} -> {c1} MACs per example")
    if (mask == 0).any() and p1 == p0 and c1 == c0:
        warnings.warn(f"the pick removes {int((mask == 0).sum())} edge(s) but saves neither parameters nor MACs "
                      "(free edges: identity shortcuts, branches without parameters); ask for what should be saved, "
                      "e.g. Budget(params=0.8) or Budget(macs=0.5)", UserWarning, stacklevel=3)
    _warn_if_constant(model, pruned, scoring)
    if finetune_steps:
        say(f"auto_prune: fine-tuning for {finetune_steps} steps")
        pruned = finetune(pruned, train_data, task, finetune_steps, seed=seed)
    fit = ctx.measured.masks if ctx.measured is not None else np.zeros((0, e), dtype=np.float32)
    return PruneResult(mask, [n for n, k in zip(graph.edge_names, mask) if k == 0], pruned, predictor, fit,
                       bool(graph.connected(mask)), (int(p0), int(p1)), (int(c0), int(c1)))


def _check_request(method: str, budget: Budget, finetune_steps: int, train_data: Subset | None) -> None:
    """What auto_prune can check before building or measuring anything."""
    if method not in METHODS:
        raise KeyError(f"unknown method {method!r}; registered: {', '.join(METHODS)}")
    if not isinstance(budget, Budget):
        raise TypeError(f"budget must be a Budget, e.g. Budget(edges=3) or Budget(max_params=100_000); got {budget!r}")
    if finetune_steps and train_data is None:
        raise ValueError("finetune_steps > 0 needs train_data")


def _check_budget(budget: Budget, graph: ComputationGraph, costs: CostModel) -> None:
    """Raise if ``budget`` cannot be met on ``graph`` (before any measurement); warn if it is met already."""
    e = graph.num_prunable
    if budget.edges is not None:
        if budget.edges > e:
            raise ValueError(f"Budget(edges={budget.edges}) asks for more edges than the graph's {e} prunable edges")
        if budget.edges == 0:
            warnings.warn("Budget(edges=0): nothing will be removed", UserWarning, stacklevel=4)
        return
    absolute = budget.absolute(costs)
    kind = "parameters" if absolute.max_params is not None else "MACs per example"
    limit = absolute.max_params if absolute.max_params is not None else absolute.max_macs
    full, floor = _cost_of(absolute, costs, np.vstack([np.ones(e), np.zeros(e)]))
    if limit < floor:
        raise ValueError(f"{budget} cannot be met: it allows {limit:.0f} {kind}, and with every prunable edge removed "
                         f"the network still has {int(floor)}")
    if limit >= full:
        warnings.warn(f"{budget} is met by the unpruned network ({int(full)} {kind}): nothing will be removed",
                      UserWarning, stacklevel=4)


@torch.no_grad()
def _warn_if_constant(model: nn.Module, pruned: nn.Module, scoring: Subset, samples: int = 8) -> None:
    """Warn if the pruned network gives one output for several different samples where the model does not:
    its output no longer depends on its input (every path carrying the input is cut or multiplied by zero)."""
    data = scoring[:samples]
    x = tuple(t.to(model_device(pruned)) for t in data.args(model))
    if len(data) < 2 or all(torch.equal(t[1:], t[:1].expand_as(t[1:])) for t in x):
        return  # fewer than two different samples: nothing to compare
    with measuring(model, pruned):
        before, after = (pytree.tree_leaves(net(*x)) for net in (model, pruned))
    if _input_independent(after) and not _input_independent(before):
        warnings.warn(f"the pruned network's output no longer depends on its input: it is the same for "
                      f"{len(data)} different samples of {scoring.name!r}. The pick cuts every path that carries "
                      "the input; choose a smaller budget", UserWarning, stacklevel=4)


def _input_independent(outputs: list[Any]) -> bool:
    """Whether every floating-point output tensor has the same value for every sample (rows of dim 0)."""
    rows = [t for t in outputs if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() > 0]
    if not rows:
        return False
    for t in rows:
        scale = float(t.abs().max()) if t.numel() else 0.0
        if not torch.allclose(t, t[:1].expand_as(t), rtol=1e-5, atol=1e-6 * max(scale, 1e-12)):
            return False
    return True
