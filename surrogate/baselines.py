"""The field's pruning criteria (docs/baselines.md), generalised from blocks and layers to the prunable edges of
any traced graph, each registered once as a method (``fit_method(name, ctx)``)::

    block_influence  ShortGPT's Block Influence               1 forward pass
    angular          Gromov et al.'s angular distance          1 forward pass
    taylor_plus      Shortened-LLaMA's Taylor+                 1 forward + 1 backward pass
    synflow          Tanaka et al.'s SynFlow (data-free)       1 forward + 1 backward, one all-ones input
    sleb             SLEB's greedy removal                     sum_{j<k} (A - j) forward passes at most
    bonsai           Bonsai-style ridge regression             E + 2 measured masks (bonsai_10x: 10 (E + 2))

Conventions shared by the criteria:

- *The destination's output without edge e*: what the destination vertex v of e computes when e's tensor is
  replaced by its neutral element (zeros; ones for a factor of a product; zeros in head k's chunk for a head
  edge), every other input as measured: removal as ``GatedModel`` defines it, evaluated locally by re-running
  v's own operations once per in-edge (a residual add is one addition), not by a second pass through the
  network. For a residual sum y = x + f(x) it is x for the branch edge and f(x) for the skip edge.
- Cosines are taken along the feature dimension at every position: dim 1 of (B, C, H, W, ...) feature maps
  (positions = pixels), the last dimension of (B, D) vectors and (B, T, D) token sequences. A (B, C, L)
  1-d feature map would be read as a sequence of L tokens.
- *An edge's exclusive parameters*: those that ``prune`` removes when the edge alone is removed (a branch's
  layers; for a head edge, its columns of the output projection). An edge without any (a skip connection)
  scores exactly 0 under the parameter criteria (Taylor+, SynFlow): restrict ``Context.removable`` to the
  branches when using them.

Every measurement runs under ``measuring`` (eval mode, each module's flag restored) and leaves parameters,
buffers and ``.grad`` untouched.
"""
from __future__ import annotations

import copy
import math
from dataclasses import replace
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils import _pytree as pytree

from .evaluate import evaluate_masks
from .gating import prune
from .graph import MERGE_OPS, Edge, run_node, run_nodes
from .measuring import measuring
from .methods import AdditivePredictor, Context, Method, register_method
from .metrics import kendall
from .progress import Ticker

__all__ = ["edge_similarities", "exclusive_sums", "taylor_plus_scores", "synflow_scores", "sleb_order",
           "bonsai_masks", "ridge_cv",
           "BONSAI_DROP", "BONSAI_PENALTIES", "BONSAI_FOLDS"]

BONSAI_DROP = 0.2                                      # probability that a sampled mask drops a removable edge
BONSAI_PENALTIES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)  # ridge penalties, relative to the mean column variance
BONSAI_FOLDS = 5                                       # cross-validation folds over the measured masks


def _modes(ctx: Context) -> tuple[nn.Module, ...]:
    return tuple(m for m in (ctx.gated, ctx.graph.module) if m is not None)


def _need_scoring(ctx: Context, name: str) -> None:
    if ctx.scoring is None or ctx.task is None or len(ctx.scoring) == 0:
        raise ValueError(f"{name} measures on the scoring subset: build the Context with scoring=Subset(...) "
                         "and task=Task(...)")


def _neutral(x: torch.Tensor, edge: Edge) -> torch.Tensor:
    """The value of ``x`` with ``edge`` removed, as GatedModel defines removal."""
    if edge.part is not None:  # head k of n: its chunk of the last dimension zeroed
        k, n = edge.part
        keep = torch.ones(n, 1, dtype=x.dtype, device=x.device)
        keep[k] = 0
        return (x.unflatten(-1, (n, -1)) * keep).flatten(-2)
    one = edge.merge is not None and MERGE_OPS.get(edge.merge) == "one"
    return torch.ones_like(x) if one else torch.zeros_like(x)


def _position_cos(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """cos(a, b) along the feature dimension at every position, (B, P) float64, and whether the tensors
    are token sequences (B, T, D). cos(0, 0) = 1 (nothing changed); cos(0, y) = 0."""
    a, b = a.detach().double(), b.detach().double()
    sequence = a.dim() == 3
    if a.dim() == 1:
        a, b = a[:, None], b[:, None]
    if a.dim() >= 4:  # channels first
        a, b = a.movedim(1, -1), b.movedim(1, -1)
    a, b = a.reshape(a.shape[0], -1, a.shape[-1]), b.reshape(b.shape[0], -1, b.shape[-1])
    na, nb = a.norm(dim=-1), b.norm(dim=-1)
    cos = (a * b).sum(-1) / (na * nb).clamp_min(torch.finfo(torch.float64).tiny)
    cos = torch.where((na == 0) & (nb == 0), torch.ones_like(cos), cos)
    return cos.clamp(-1.0, 1.0), sequence


def _similarity_sums(without: Any, with_: Any) -> np.ndarray:
    """[sum of cos, positions, sum of angle / pi, angle positions] over the floating-point tensors of two
    outputs: the cosine at every position; the angle at the last token of a sequence (Gromov et al.), at
    every position otherwise."""
    acc = np.zeros(4)
    for a, b in zip(pytree.tree_leaves(without), pytree.tree_leaves(with_)):
        if not (isinstance(a, torch.Tensor) and a.is_floating_point() and a.dim() >= 1):
            continue
        cos, sequence = _position_cos(a, b)
        last = cos[:, -1] if sequence else cos
        acc += [float(cos.sum()), cos.numel(), float(torch.arccos(last).sum() / math.pi), last.numel()]
    return acc


# ----------------------------------------------------------------------------------------------------
# Block Influence and angular distance: the destination's output with and without each edge

@torch.no_grad()
def edge_similarities(ctx: Context) -> tuple[np.ndarray, np.ndarray]:
    """For every prunable edge e into vertex v: the mean cosine between v's output without e and with it
    (over positions and samples), and the mean angle arccos(cos) / pi (last token of sequences; every
    position of feature maps), on the scoring subset. One forward pass (plus v's own operations once per
    in-edge); memoised in ``ctx.memo``."""
    if "edge_similarities" in ctx.memo:
        return ctx.memo["edge_similarities"]
    _need_scoring(ctx, "block_influence / angular")
    graph, module = ctx.graph, ctx.graph.module
    by_name = {n.name: n for n in module.graph.nodes}
    into: dict[str, list[int]] = {}
    for i, e in enumerate(graph.prunable):
        into.setdefault(e.dst, []).append(i)
    plans: dict[str, tuple[str, list[fx.Node], set[str]]] = {}  # last node of v -> (v, nodes, external inputs)
    need: dict[str, int] = {}
    for v in into:
        nodes = [by_name[n] for n in graph.vertex(v).nodes]
        inside = {n.name for n in nodes}
        ext = {a.name for n in nodes for a in n.all_input_nodes if a.name not in inside}
        plans[nodes[-1].name] = (v, nodes, ext)
        for a in ext:
            need[a] = need.get(a, 0) + 1
    acc = np.zeros((graph.num_prunable, 4))
    stash: dict[str, Any] = {}
    left: dict[str, int] = {}

    def hook(n: fx.Node, compute: Callable[[], Any]) -> Any:
        out = compute()
        if n.name in need:
            stash[n.name] = out
        if n.name in plans:
            compare(*plans[n.name], out)
        return out

    def compare(v: str, nodes: list[fx.Node], ext: set[str], out: Any) -> None:
        for i in into[v]:
            edge = graph.prunable[i]
            swap = {(p, c): _neutral(stash[p], edge) for p, c in edge.links}
            local: dict[str, Any] = {}
            for node in nodes:
                def value(a: fx.Node, c: str = node.name) -> Any:
                    return swap[(a.name, c)] if (a.name, c) in swap else local[a.name] if a.name in local \
                        else stash[a.name]
                local[node.name] = run_node(module, node, value)
            acc[i] += _similarity_sums(local[nodes[-1].name], out)
        for a in ext:  # free what no later vertex needs
            left[a] -= 1
            if left[a] == 0:
                stash.pop(a, None)

    with measuring(*_modes(ctx)):
        for b0 in range(0, len(ctx.scoring), ctx.batch_size):
            stash.clear()
            left.update(need)
            run_nodes(module, ctx.scoring[b0:b0 + ctx.batch_size].args(module), hook)
    bad = [graph.prunable[i].name for i in np.flatnonzero(acc[:, 1] == 0)]
    if bad:
        raise ValueError(f"no floating-point output to compare at the destination of {bad[:3]}: these criteria "
                         "need vertices that output tensors (build the graph with edges='merge')")
    result = (acc[:, 0] / acc[:, 1], acc[:, 2] / acc[:, 3])
    ctx.memo["edge_similarities"] = result
    return result


def block_influence_scorer(ctx: Context) -> AdditivePredictor:
    """Block Influence (ShortGPT, Men et al. 2024): BI = 1 - mean over tokens of cos(h_in, h_out), remove the
    lowest. Per edge e into vertex v: BI_e = 1 - mean over positions and samples of cos(y_v without e, y_v)
    (module doc). For a residual sum y = x + f(x) the branch edge gets exactly 1 - cos(h_in, h_out), h_out
    being the merge's output (in a post-activation ResNet block: before the block's last ReLU), and the
    skip edge 1 - cos(f(x), y); for a concatenation (along the features) 1 - sqrt(1 - energy share of x_e) at
    every position; for a product the factor replaced by ones; for an edge into a layer (edges="all") the
    layer's output at input 0. One forward pass."""
    cos, _ = edge_similarities(ctx)
    return AdditivePredictor("block_influence", 1.0 - cos)


def angular_scorer(ctx: Context) -> AdditivePredictor:
    """Angular distance (Gromov et al. 2024): d(l, n) = arccos(cos(h_l, h_{l+n})) / pi on the last token,
    averaged over sequences (images: over every pixel). Per edge e into vertex v: the mean angle between v's
    output with and without e (module doc); for the branch edge of a residual merge l this is d(l, 1), the
    angle between the stream before and after the merge; a skip edge gets the angle between f(x) and the
    output. (The paper's own rule removes the window of n consecutive blocks with the smallest d(l, n); per
    edge, the picks under a budget come from these scores.) One forward pass (shared with block_influence)."""
    _, angle = edge_similarities(ctx)
    return AdditivePredictor("angular", angle)


# ----------------------------------------------------------------------------------------------------
# parameter criteria: Taylor+ and SynFlow, summed over each edge's exclusive parameters

def exclusive_sums(ctx: Context, values: Mapping[str, torch.Tensor]) -> np.ndarray:
    """For every prunable edge, the sum of ``values`` (one tensor per parameter name of ``ctx.graph.module``,
    of the parameter's shape) over the parameter entries that ``prune`` removes with the edge alone. The
    values stand in for the parameters of a copy that is pruned once per edge (E + 1 prunes, no data)."""
    module = ctx.graph.module
    named = dict(module.named_parameters())
    missing = sorted(set(named) - set(values))
    if missing:
        raise ValueError(f"values are missing for parameters {missing[:3]}: give one tensor per name of "
                         "ctx.graph.module.named_parameters()")
    scale = max([float(values[n].detach().abs().max()) for n in named if values[n].numel()] + [0.0]) or 1.0
    memo: dict[int, Any] = {id(b): b for b in module.buffers()}  # shared, never written
    for name, p in named.items():  # scaled to at most 1: a float32 copy holds any magnitude
        v = (values[name].detach().double() / scale).to(p.dtype).reshape(p.shape)
        memo[id(p)] = nn.Parameter(v, requires_grad=False)
    scored = copy.deepcopy(module, memo)
    graph = replace(ctx.graph, module=scored)

    def total(m: nn.Module) -> float:
        return sum(float(p.detach().double().sum()) for p in m.parameters())

    full = total(prune(graph, np.ones(ctx.num_edges)))  # without parameters that no operation uses
    return np.array([full - total(prune(graph, graph.mask_from_removed([i])))
                     for i in range(ctx.num_edges)]) * scale


def taylor_plus_scores(ctx: Context) -> np.ndarray:
    """Taylor+ (Shortened-LLaMA, Kim et al. 2024): sum over a unit's weights of |w * dS/dw|, S = the mean loss
    on the scoring subset; per edge, summed over its exclusive parameters (module doc). The gradient is taken
    through ``torch.func.functional_call`` on detached copies of the parameters: nothing reaches ``.grad``,
    frozen models work. 1 forward + 1 backward pass."""
    _need_scoring(ctx, "taylor_plus")
    module, n = ctx.graph.module, len(ctx.scoring)
    leaves = {name: p.detach().requires_grad_(True) for name, p in module.named_parameters()}
    grads = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in leaves.items()}
    with measuring(*_modes(ctx)), torch.enable_grad():
        for x, y in ctx.scoring.batches(ctx.batch_size, module):
            out = torch.func.functional_call(module, leaves, x)
            loss = ctx.task.per_sample(out, y)[0].sum() / n
            gs = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
            for name, g in zip(leaves, gs):
                if g is not None:
                    grads[name] += g.double()
    return exclusive_sums(ctx, {name: (p.double() * grads[name]).abs() for name, p in leaves.items()})


def _double_copy(module: fx.GraphModule) -> fx.GraphModule:
    """A float64 copy of the traced module (torch.export's dtype assertions dropped from the copy)."""
    net = copy.deepcopy(module)
    for node in list(net.graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten._assert_tensor_metadata.default:
            net.graph.erase_node(node)
    net.recompile()
    return net.double()


def _synflow_gradients(net: fx.GraphModule, inputs: tuple[torch.Tensor, ...]
                       ) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor | None, ...]]:
    """|theta| in place of the parameters of ``net`` (a copy), and dR/d|theta| at ``inputs`` in eval mode."""
    net.eval()
    params = dict(net.named_parameters())
    with torch.no_grad():
        for p in params.values():
            p.abs_()
    with torch.enable_grad():
        leaves = [p.requires_grad_(True) for p in params.values()]
        out = net(*inputs)
        r = sum(t.sum() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point())
        return params, torch.autograd.grad(r, leaves, allow_unused=True)


def synflow_scores(ctx: Context) -> np.ndarray:
    """SynFlow (Tanaka et al. 2020), data-free: R = sum of the network's output on an all-ones input (batch of
    one; integer inputs such as token ids: all token 1) with every parameter replaced by its absolute value;
    score |theta * dR/dtheta| per parameter, summed over each edge's exclusive parameters. Computed on a copy
    in float64 (float32 if the traced graph does not run in float64) in eval mode: BatchNorm uses its running
    statistics (buffers, left as they are), i.e. the affine map x -> |gamma| (x - mu) / sqrt(var + eps) +
    |beta|, positive in slope but with a shift of either sign. 1 forward + 1 backward, no data."""
    example = ctx.graph.example_inputs

    def ones(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        return tuple(torch.ones(1, *x.shape[1:], dtype=dtype if x.is_floating_point() else x.dtype)
                     for x in example)

    try:
        params, grads = _synflow_gradients(_double_copy(ctx.graph.module), ones(torch.float64))
    except RuntimeError:  # a dtype baked into the trace: the model's own precision
        dtype = next((x.dtype for x in example if x.is_floating_point()), torch.float32)
        params, grads = _synflow_gradients(copy.deepcopy(ctx.graph.module), ones(dtype))
    scores = {name: (p.detach() * (torch.zeros_like(p) if g is None else g)).abs()
              for (name, p), g in zip(params.items(), grads)}
    return exclusive_sums(ctx, scores)


def taylor_plus_scorer(ctx: Context) -> AdditivePredictor:
    """Remove the edges with the lowest Taylor+ score (``taylor_plus_scores``)."""
    return AdditivePredictor("taylor_plus", taylor_plus_scores(ctx))


def synflow_scorer(ctx: Context) -> AdditivePredictor:
    """Remove the edges with the lowest SynFlow score (``synflow_scores``)."""
    return AdditivePredictor("synflow", synflow_scores(ctx))


# ----------------------------------------------------------------------------------------------------
# SLEB: greedy removal, measured

def _removable(ctx: Context) -> np.ndarray:
    return np.ones(ctx.num_edges, dtype=bool) if ctx.removable is None else ctx.removable


def _sleb_key(ctx: Context) -> str:
    return f"sleb:{ctx.max_removed}:{np.packbits(_removable(ctx)).tobytes().hex()}"


def sleb_order(ctx: Context) -> tuple[list[int], int]:
    """SLEB's greedy search (Song et al. 2024): k times, measure the loss of removing each remaining candidate
    on top of the edges removed so far (``evaluate_masks`` on the scoring subset) and remove the one with the
    lowest loss (ties: the lowest edge index). Candidates: ``ctx.removable`` (all edges if None); k =
    ``ctx.max_removed`` (all candidates if None). A candidate whose removal would cut every input->output
    path is skipped before it is measured, and the search stops early when every candidate would. Returns
    the removal order and the number of masks measured (forward passes over the scoring subset), at most
    sum_{j<k} (A - j) for A candidates; memoised. SLEB itself never removes the first and last block; this
    generalisation protects nothing: restrict the candidates with ``removable``."""
    key = _sleb_key(ctx)
    if key in ctx.memo:
        return ctx.memo[key]
    _need_scoring(ctx, "sleb")
    cand = [int(i) for i in np.flatnonzero(_removable(ctx))]
    k = len(cand) if ctx.max_removed is None else min(ctx.max_removed, len(cand))
    mask = np.ones(ctx.num_edges, dtype=np.float32)
    order: list[int] = []
    measured = 0
    tick = Ticker(f"sleb: greedy removal of {k} edges", k)  # each step measures every remaining candidate
    for step in range(k):
        tick(step)
        left = [i for i in cand if mask[i] == 1]
        trials = np.repeat(mask[None], len(left), 0)
        trials[np.arange(len(left)), left] = 0
        ok = ctx.graph.connected(trials)
        if not ok.any():
            break
        left, trials = [i for i, o in zip(left, ok) if o], trials[ok]
        losses = evaluate_masks(ctx.gated, trials, ctx.scoring, ctx.task, batch_size=ctx.batch_size).loss
        measured += len(trials)
        best = left[int(np.argmin(losses))]
        mask[best] = 0
        order.append(best)
    ctx.memo[key] = (order, measured)
    return order, measured


def sleb_search(ctx: Context) -> AdditivePredictor:
    """SLEB as a predictor for picks: importance = position in the greedy removal order (0 = removed first),
    then the candidates never removed, then the edges that are not candidates; ``select_mask`` with an edge
    budget b <= k then returns exactly the greedy pick of b edges. Not a loss model (``predicts=False``)."""
    order, _ = sleb_order(ctx)
    importance = np.where(_removable(ctx), len(order), len(order) + 1).astype(np.float64)
    importance[order] = np.arange(len(order))
    return AdditivePredictor("sleb", importance)


def _sleb_cost(ctx: Context) -> tuple[int, int]:
    """Masks measured by the search on ``ctx`` if it ran, else the bound sum_{j<k} (A - j)."""
    if _sleb_key(ctx) in ctx.memo:
        return ctx.memo[_sleb_key(ctx)][1], 0
    a = int(_removable(ctx).sum())
    k = a if ctx.max_removed is None else min(ctx.max_removed, a)
    return sum(a - j for j in range(k)), 0


# ----------------------------------------------------------------------------------------------------
# Bonsai-style regression on its own measured masks

def bonsai_masks(removable: np.ndarray, n: int, drop: float = BONSAI_DROP, seed: int = 0) -> np.ndarray:
    """n masks (n, E): pairs of a random mask that drops each removable edge with probability ``drop`` and its
    complement over the removable edges (antithetic pairs; an odd n ends with an unpaired mask). Edges that
    are not removable are always kept."""
    rng = np.random.default_rng(seed)
    idx = np.flatnonzero(removable)
    rows = []
    while len(rows) < n:
        m = np.ones(len(removable), dtype=np.float32)
        m[idx] = rng.random(len(idx)) >= drop
        c = m.copy()
        c[idx] = 1 - m[idx]
        rows += [m, c]
    return np.stack(rows[:n])


def _ridge(x: np.ndarray, y: np.ndarray, penalty: float) -> tuple[np.ndarray, float]:
    mx, my = x.mean(0), y.mean()
    xc = x - mx
    w = np.linalg.solve(xc.T @ xc + penalty * np.eye(x.shape[1]), xc.T @ (y - my))
    return w, float(my - mx @ w)


def ridge_cv(x: np.ndarray, y: np.ndarray, penalties: tuple[float, ...] = BONSAI_PENALTIES,
             folds: int = BONSAI_FOLDS, seed: int = 0) -> tuple[np.ndarray, float, float]:
    """Ridge regression y ~ x.w + b (intercept not penalised), the penalty chosen from ``penalties`` (times the
    mean column variance of x times the number of rows) by the Kendall tau between the out-of-fold
    predictions of ``folds``-fold cross-validation (pooled over folds) and y; ties: the smallest penalty.
    Returns (w, b, penalty)."""
    n = len(y)
    scale = max(float(((x - x.mean(0)) ** 2).sum()) / max(1, x.shape[1]), 1e-12)
    grid = [a * scale for a in penalties]
    k = min(folds, n)
    fold = np.random.default_rng(seed).permutation(n) % k
    taus = []
    for lam in grid:
        pred = np.zeros(n)
        for f in range(k):
            test = fold == f
            w, b = _ridge(x[~test], y[~test], lam)
            pred[test] = x[test] @ w + b
        taus.append(kendall(pred, y) if k > 1 else 0.0)
    lam = grid[int(np.argmax(taus))]
    w, b = _ridge(x, y, lam)
    return w, b, lam


def bonsai_fit(ctx: Context, num_masks: int, name: str = "bonsai") -> AdditivePredictor:
    """Bonsai-style regression (Dery et al. 2024): measure ``num_masks`` masks of ``bonsai_masks`` (each
    removable edge dropped with probability BONSAI_DROP, with complements; seeded by ``ctx.seed``) on the
    scoring subset, fit S(m) ~ w.m + b by ``ridge_cv``, and predict b + w.m: an additive model whose
    importance (the predicted loss increase of removing an edge) is -w. Edges that are not removable are never
    sampled, so their w is not estimated: they get the largest importance. ``num_masks`` forward passes."""
    _need_scoring(ctx, "bonsai")
    removable = _removable(ctx)
    if not removable.any():
        raise ValueError("bonsai needs removable edges: Context(removable=...) allows none")
    masks = bonsai_masks(removable, num_masks, BONSAI_DROP, seed=ctx.seed)
    losses = evaluate_masks(ctx.gated, masks, ctx.scoring, ctx.task, batch_size=ctx.batch_size).loss
    w_r, b, _ = ridge_cv(masks[:, removable].astype(np.float64), losses, seed=ctx.seed)
    w = np.zeros(ctx.num_edges)
    w[removable] = w_r
    importance = -w
    importance[~removable] = importance[removable].max()
    return AdditivePredictor(name, importance, base=b + float(w.sum()))


# ----------------------------------------------------------------------------------------------------
# the registry entries

for _m in (
    Method("block_influence", "Block Influence (ShortGPT)", block_influence_scorer, lambda e, k: (1, 0),
           description="1 - mean cos(destination's output without the edge, with it); residual branch: "
                       "1 - cos(h_in, h_out)"),
    Method("angular", "Angular distance (Gromov et al.)", angular_scorer, lambda e, k: (1, 0),
           description="arccos(cos) / pi of the destination's output without and with the edge, last token; "
                       "residual branch: d(l, 1)"),
    Method("taylor_plus", "Taylor+ (Shortened-LLaMA)", taylor_plus_scorer, lambda e, k: (1, 1),
           description="sum of |w dS/dw| over the parameters the edge alone removes"),
    Method("synflow", "SynFlow (data-free)", synflow_scorer, lambda e, k: (1, 1),
           description="sum of |theta dR/dtheta| over the edge's exclusive parameters; R on one all-ones "
                       "input with |theta|, no data"),
    Method("sleb", "SLEB (greedy)", sleb_search, lambda e, k: (e * (e + 1) // 2, 0), predicts=False,
           cost_in=_sleb_cost,
           description="greedy: remove the candidate whose removal measures the lowest loss, k times"),
    Method("bonsai", "Bonsai regression", lambda ctx: bonsai_fit(ctx, ctx.num_edges + 2),
           lambda e, k: (e + 2, 0),
           description="ridge fit of S(m) ~ w.m + b on E + 2 own random masks and complements"),
    Method("bonsai_10x", "Bonsai regression (10x)", lambda ctx: bonsai_fit(ctx, 10 * (ctx.num_edges + 2), "bonsai_10x"),
           lambda e, k: (10 * (e + 2), 0),
           description="ridge fit of S(m) ~ w.m + b on 10 (E + 2) own random masks and complements"),
):
    register_method(_m)
