"""The evaluation protocol shared by every study: one trained model in, tidy records out.

``run_experiment(model, scoring, evaluation, task, config)``:

1. builds the graph (``config.graph``: vertices, edges, heads, exclude) and gates it;
2. measures the fitting design (the prior design: |E| + 2 masks) on the small *scoring* subset, keeping the
   outputs when a method needs them;
3. fits or scores every requested method (``surrogate.methods``) on that one context;
4. draws held-out test masks of every ``MaskFamily`` in ``config.families`` and measures their true loss
   on the *evaluation* subset, in two halves whose agreement is the noise ceiling of the truth;
5. ranks: Spearman, Kendall, top-k overall, among connected masks, within each number of removed edges;
6. budgeted pruning: each method's pick under each budget against the best mask found (exhaustively when
   the space is small, else by random search and swap moves), the regret;
7. optionally, sample efficiency: fitted methods refitted with extra measured masks of each family.

Nothing here knows which network it runs on; the random-graph study (``surrogate.study``), the ResNet and
the GPT-2 notebooks call it with their own model, data and config. Seeds: every random draw is seeded
from ``seed`` (families i = 0, 1, ...: test masks ``seed + 1 + i``, extra masks ``seed + 1 + F + i`` for
F families; budget b's search ``seed + 100 + b``).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Mapping

import numpy as np
import torch.nn as nn

from .evaluate import MaskEval, Subset, Task, evaluate_masks
from .graph import ComputationGraph, Edge, Vertex, build_graph
from .masks import (bernoulli_masks, exhaustive_masks, mask_key, mask_text, prior_design, sparsity_masks,
                    unique_rows)
from .methods import METHODS, Context, Measured, Predictor, fit_method, fitting_context, method_names
from .metrics import evaluate_predictions, spearman
from .progress import reporting
from .pruning import Budget, select_mask
from .tasks import check_data

__all__ = ["MaskFamily", "GraphOptions", "ExperimentConfig", "GraphView", "ExperimentResult", "run_experiment",
           "within_k_spearman"]


@dataclass(frozen=True)
class MaskFamily:
    """A family of held-out test masks.

    kind: "bernoulli" -- every removable edge kept with probability ``keep_prob`` (the prior protocol; many
          such networks are disconnected); "removed" -- ``n`` distinct masks removing a fraction in
          ``removed`` (or exactly ``counts``) of the removable edges; "exhaustive" -- every mask removing
          ``counts`` (default: any number) of the removable edges.
    edges: regular expression on edge names: which edges may be removed (None: every prunable edge), e.g.
          the residual branches of a ResNet but not its shortcuts.
    connected: only networks that keep an input->output path ("removed").
    holdout: leave out masks the methods were fitted on ("removed", "exhaustive").
    """
    name: str
    kind: Literal["bernoulli", "removed", "exhaustive"] = "removed"
    n: int = 200
    keep_prob: float = 0.5
    removed: tuple[float, float] = (0.05, 0.25)
    counts: tuple[int, ...] | None = None
    edges: str | None = None
    connected: bool = True
    holdout: bool = True

    def allowed(self, graph: ComputationGraph) -> np.ndarray:
        return graph.edges_matching(self.edges)

    def draw(self, graph: ComputationGraph, seed: int, exclude: np.ndarray | None = None) -> np.ndarray:
        """The family's masks for ``graph`` (``exclude``: masks never to draw, e.g. the fitting masks)."""
        e, allowed = graph.num_prunable, self.allowed(graph)
        exclude = exclude if self.holdout else None
        if self.kind == "bernoulli":
            m = bernoulli_masks(e, self.n, self.keep_prob, seed=seed)
            m[:, ~allowed] = 1
            return m
        if self.kind == "removed":
            return sparsity_masks(graph, self.n, *self.removed, seed=seed, connected=self.connected,
                                  exclude=exclude, allowed=None if allowed.all() else allowed,
                                  counts=self.counts)
        if self.kind == "exhaustive":
            m = exhaustive_masks(e, self.counts, allowed)
            if self.connected:
                m = m[graph.connected(m)]
            if exclude is not None and len(exclude):
                seen = {mask_key(r) for r in exclude}
                m = m[np.array([mask_key(r) not in seen for r in m], dtype=bool)]
            return m
        raise ValueError(f"unknown mask family kind {self.kind!r}; use 'bernoulli', 'removed' or 'exhaustive'")


@dataclass(frozen=True)
class GraphOptions:
    """How the model becomes a graph (the arguments of ``build_graph``)."""
    vertices: Any = None
    edges: Any = "merge"
    heads: Mapping[str, int] | None = None
    exclude: str | None = None
    example_batch: int = 4   # rows of the scoring subset used as the tracing example


@dataclass(frozen=True)
class ExperimentConfig:
    """What to measure. Budgets are fractions of the removable edges (``budget_unit="fraction"``) or edge
    counts (``"edges"``); ``budget_edges`` restricts which edges a pick may remove (regular expression)."""
    methods: tuple[str, ...] = ("random", "magnitude", "taylor2", "loo", "flow", "prior_graph", "superposition")
    graph: GraphOptions = GraphOptions()
    families: tuple[MaskFamily, ...] = (MaskFamily("realistic"),)
    budgets: tuple[float, ...] = (0.1, 0.25)
    budget_unit: Literal["fraction", "edges"] = "fraction"
    budget_edges: str | None = None
    connected_picks: bool = True         # picks (and the optimum they are compared with) keep a path
    exhaustive_limit: int = 2000         # optimum found exhaustively when C(removable, b) is at most this
    search_random: int = 100             # otherwise: random masks at the budget ...
    search_swaps: int = 100              # ... and swap moves around the best mask found
    beam_width: int = 4                  # mask search for non-additive predictors
    extra_k: tuple[int, ...] = ()        # sample efficiency: measured masks beyond the prior design
    k_methods: tuple[str, ...] = ()      # ... for these (fitted) methods
    eval_batch: int = 2048
    eval_strategy: Literal["stack", "prefix"] = "stack"  # evaluate_masks: "prefix" shares common prefixes
                                                         # of masks (fast for exhaustive families on CNNs)
    context_batch: int = 512             # batch of the methods' own passes (derivatives, shares)
    max_k_breakdown: int = 4             # rank agreement per number removed: 1, 2, ..., "4+"

    def __post_init__(self) -> None:
        method_names(self.methods)  # unknown names fail here, before any measurement
        bad = [m for m in self.k_methods if not METHODS[m].fitted] if self.k_methods else []
        if bad:
            raise ValueError(f"sample efficiency refits methods on more masks; {bad} are not fitted")
        if len({f.name for f in self.families}) != len(self.families):
            raise ValueError("mask families need distinct names")


@dataclass(frozen=True)
class GraphView:
    """A picklable view of a computation graph (vertices and edges, no traced module): enough to draw it
    (``surrogate.plotting.draw_graph(view)``) and to name its edges."""
    vertices: list[Vertex]
    edges: list[Edge]
    prunable: list[Edge]

    @classmethod
    def of(cls, graph: ComputationGraph) -> "GraphView":
        return cls(list(graph.vertices), list(graph.edges), list(graph.prunable))

    @property
    def num_prunable(self) -> int:
        return len(self.prunable)

    @property
    def edge_names(self) -> list[str]:
        return [e.name for e in self.prunable]


@dataclass
class ExperimentResult:
    """Tidy records (lists of dicts, one row per model x method x protocol / budget / extra masks) and what
    figures need. Every record starts with the caller's ``key`` (e.g. seed, size)."""
    info: dict[str, Any]
    protocols: list[dict[str, Any]]
    by_k: list[dict[str, Any]]
    regret: list[dict[str, Any]]
    efficiency: list[dict[str, Any]]
    example: dict[str, Any] = field(repr=False)


def within_k_spearman(pred: np.ndarray, true: np.ndarray, removed: np.ndarray, min_masks: int = 3) -> float:
    """Mean Spearman correlation within groups of masks that remove the same number of edges (groups of at
    least ``min_masks``), weighted by group size: how well a method ranks masks of equal budget."""
    total, weight = 0.0, 0
    for k in np.unique(removed):
        sel = removed == k
        if sel.sum() >= min_masks:
            total += sel.sum() * spearman(pred[sel], true[sel])
            weight += int(sel.sum())
    return total / weight if weight else float("nan")


def _timed(fn: Any) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def run_experiment(model: nn.Module | ComputationGraph, scoring: Subset, evaluation: Subset, task: Task,
                   config: ExperimentConfig, *, seed: int = 0, mask_seed: int | None = None,
                   key: Mapping[str, Any] | None = None, log: Any = None) -> ExperimentResult:
    """Measure every method of ``config`` on one model (see the module docstring for the steps).

    model: a trained module (its graph is built with ``config.graph``) or a graph built already.
    scoring: all a method may see; evaluation: the truth (held-out data). key: columns that identify this
    model in every record (e.g. ``{"seed": 3}``). seed: the methods' own randomness (random scores,
    surrogate initialisation); mask_seed (default ``seed``): the draws of test and extra masks and of the
    budget searches. log: optional callable receiving progress lines (each phase, and every few minutes
    within a long one: masks measured or predicted so far, and an estimate of the time left). Both subsets
    are checked against the task first (``tasks.check_data``)."""
    net = model.module if isinstance(model, ComputationGraph) else model
    for data in (scoring, evaluation):
        check_data(data, task, net)
    with reporting(log) if log is not None else contextlib.nullcontext():  # None keeps a log installed outside
        return _experiment(model, scoring, evaluation, task, config, seed, mask_seed, key, log)


def _experiment(model: nn.Module | ComputationGraph, scoring: Subset, evaluation: Subset, task: Task,
                config: ExperimentConfig, seed: int, mask_seed: int | None, key: Mapping[str, Any] | None,
                log: Any) -> ExperimentResult:
    say = log or (lambda msg: None)
    mseed = seed if mask_seed is None else mask_seed
    graph = model if isinstance(model, ComputationGraph) else _build(model, scoring, config.graph)
    e = graph.num_prunable
    key = {**dict(key or {}), "edges": e}
    removable = graph.edges_matching(config.budget_edges)
    max_removed = max((_budget_edges(config, b, int(removable.sum())) for b in config.budgets), default=None)

    # 1. the fitting design, measured once; outputs kept if a method is built from them
    fit = prior_design(e)
    say(f"measuring {len(fit)} fitting masks on {len(scoring)} scoring samples")
    ctx = fitting_context(graph, scoring, task, config.methods, fit, seed=seed, batch_size=config.eval_batch,
                          context_batch=config.context_batch, removable=removable, max_removed=max_removed)
    ev = lambda m, sub: evaluate_masks(ctx.gated, m, sub, task, batch_size=config.eval_batch,  # noqa: E731
                                       strategy=config.eval_strategy)
    tests = _test_masks(graph, config.families, mseed, fit)

    # 2. the truth, and what it says about the model
    truth, ceiling = _truth(ev, tests, evaluation, say)
    info = _info(graph, key, ev, evaluation, tests, ceiling)

    # 3. every method on one context; ranking on every family
    fitted = _rank(ctx, config, tests, truth, key, say)

    # 4. budgeted pruning: true loss of each method's pick against the best achievable (masks whose truth
    # was measured above are not evaluated again)
    if config.budgets:
        say(f"budgeted picks of {len(fitted.predictors)} methods at {len(config.budgets)} budgets")
    regret = _regret(config, graph, removable, fitted.predictors, _reusing(ev, _known(tests, truth)), evaluation,
                     mseed, key, say)
    for r in regret:
        r.update(fitted.passes[r["method"]])

    # 5. sample efficiency: measured masks of each family added to the prior design
    efficiency = _efficiency(ctx, config, tests, truth, ev, mseed, key, say)

    example = {"graph": GraphView.of(graph), "edge_names": graph.edge_names,
               "importance": {n: np.asarray(p.importance, dtype=np.float64) for n, p in fitted.predictors.items()},
               "masks": tests, "truth": {p: t.loss for p, t in truth.items()},
               "truth_accuracy": {p: t.accuracy for p, t in truth.items()}, "predictions": fitted.predictions}
    return ExperimentResult(info, fitted.protocols, fitted.by_k, regret, efficiency, example)


def _build(model: nn.Module, scoring: Subset, go: GraphOptions) -> ComputationGraph:
    return build_graph(model, scoring[:go.example_batch].args(model), vertices=go.vertices, edges=go.edges,
                       heads=go.heads, exclude=go.exclude)


def _test_masks(graph: ComputationGraph, families: tuple[MaskFamily, ...], seed: int,
                fit: np.ndarray) -> dict[str, np.ndarray]:
    """Each family's held-out test masks (family i drawn with seed ``seed + 1 + i``)."""
    tests = {f.name: f.draw(graph, seed + 1 + i, exclude=fit) for i, f in enumerate(families)}
    for name, m in tests.items():
        if len(m) < 3:
            raise ValueError(f"mask family {name!r} has {len(m)} masks on this graph; at least 3 are needed to rank")
    return tests


def _truth(ev: Any, tests: Mapping[str, np.ndarray], evaluation: Subset,
           say: Any) -> tuple[dict[str, MaskEval], dict[str, float]]:
    """The true loss (and accuracy) of every family's test masks on the evaluation subset, measured on its two
    halves: their agreement bounds how well any predictor can rank the test masks (the noise ceiling), at no
    extra cost. A mask in two families is measured once."""
    half = len(evaluation) // 2
    halves = (replace(evaluation[:half], name=f"{evaluation.name}[:half]"),
              replace(evaluation[half:], name=f"{evaluation.name}[half:]"))
    union = unique_rows(np.vstack(list(tests.values())).astype(np.float32))
    say(f"truth of {len(union)} test masks ({', '.join(f'{len(m)} {p}' for p, m in tests.items())}) on "
        f"{len(evaluation)} evaluation samples")
    row_of = {mask_key(row): i for i, row in enumerate(union)}
    both = ev(union, halves[0]), ev(union, halves[1])
    truth: dict[str, MaskEval] = {}
    ceiling: dict[str, float] = {}
    for p, m in tests.items():
        rows = np.array([row_of[mask_key(r)] for r in m])
        a, b = (MaskEval(h.subset, h.n_samples, h.loss[rows], None if h.accuracy is None else h.accuracy[rows])
                for h in both)
        loss = (a.loss * len(halves[0]) + b.loss * len(halves[1])) / len(evaluation)
        acc = None if a.accuracy is None else (a.accuracy * len(halves[0]) + b.accuracy * len(halves[1])) / len(evaluation)
        truth[p] = MaskEval(evaluation.name, len(evaluation), loss, acc)
        r = spearman(a.loss, b.loss)
        ceiling[p] = float(np.sqrt(max(0.0, 2 * r / (1 + r)))) if r > -1 else 0.0  # Spearman-Brown, sqrt
    return truth, ceiling


def _info(graph: ComputationGraph, key: Mapping[str, Any], ev: Any, evaluation: Subset,
          tests: Mapping[str, np.ndarray], ceiling: Mapping[str, float]) -> dict[str, Any]:
    """The model's record: its size, its loss with every edge kept and with every edge removed, the share of
    connected test masks and the noise ceiling of each family."""
    e = graph.num_prunable
    full = ev(np.ones((1, e)), evaluation)
    return {**key, "vertices": len(graph.vertices), "params": sum(p.numel() for p in graph.module.parameters()),
            "test_loss": float(full.loss[0]),
            "test_acc": float(full.accuracy[0]) if full.accuracy is not None else float("nan"),
            "loss_all_removed": float(ev(np.zeros((1, e)), evaluation).loss[0]),
            **{f"{p}_frac_connected": float(graph.connected(m).mean()) for p, m in tests.items()},
            **{f"{p}_n_masks": len(m) for p, m in tests.items()},
            **{f"ceiling_{p}": c for p, c in ceiling.items()}}


@dataclass
class _Fitted:
    """Every method fitted on one context, and how it ranks the test masks."""
    predictors: dict[str, Predictor] = field(default_factory=dict)
    passes: dict[str, dict[str, int]] = field(default_factory=dict)
    predictions: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # family -> method -> (M,)
    protocols: list[dict[str, Any]] = field(default_factory=list)
    by_k: list[dict[str, Any]] = field(default_factory=list)


def _rank(ctx: Context, config: ExperimentConfig, tests: Mapping[str, np.ndarray],
          truth: Mapping[str, MaskEval], key: Mapping[str, Any], say: Any) -> _Fitted:
    """Fit every method of ``config`` on ``ctx`` and compare its predictions with the truth of each family:
    overall, among connected masks, and within each number of removed edges."""
    out = _Fitted(predictions={p: {} for p in tests})
    conn = {p: ctx.graph.connected(m) for p, m in tests.items()}
    removed = {p: (m == 0).sum(1) for p, m in tests.items()}
    for i, name in enumerate(config.methods):
        say(f"method {name} ({i + 1}/{len(config.methods)})")
        pred, seconds = _timed(lambda: fit_method(name, ctx))
        if seconds > 60:
            say(f"method {name}: fitted in {seconds / 60:.1f} min")
        out.predictors[name] = pred
        passes = out.passes[name] = METHODS[name].passes_in(ctx)
        if not METHODS[name].predicts:  # a search method: its picks count, its "predictions" do not
            continue
        for p, m in tests.items():
            yhat = np.asarray(pred.predict(m), dtype=np.float64)
            out.predictions[p][name] = yhat
            y = truth[p].loss
            metrics = evaluate_predictions(yhat, y)
            c = conn[p]
            metrics["spearman_connected"] = spearman(yhat[c], y[c]) if c.sum() >= 3 else float("nan")
            metrics["spearman_within_k"] = within_k_spearman(yhat, y, removed[p])
            out.protocols.append({**key, "protocol": p, "method": name, "seconds": seconds, **metrics, **passes})
            out.by_k += _by_k(config.max_k_breakdown, yhat, y, removed[p], {**key, "protocol": p, "method": name})
    return out


def _by_k(max_k: int, yhat: np.ndarray, y: np.ndarray, removed: np.ndarray,
          key: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rank agreement among the masks that remove k = 1, 2, ..., ``max_k`` or more edges (groups of 3 or more)."""
    rows = []
    for k in range(1, max_k + 1):
        sel = removed >= k if k == max_k else removed == k
        if sel.sum() >= 3:
            rows.append({**key, "removed": f"{k}+" if k == max_k else str(k), "n_masks": int(sel.sum()),
                         "spearman": spearman(yhat[sel], y[sel]),
                         "spearman_within_k": within_k_spearman(yhat[sel], y[sel], removed[sel])})
    return rows


def _known(tests: Mapping[str, np.ndarray], truth: Mapping[str, MaskEval]) -> dict[bytes, tuple[float, float]]:
    """(loss, accuracy) of every test mask, by mask: the budget searches do not measure them again."""
    return {mask_key(row): (float(l), float(a) if t.accuracy is not None else float("nan"))
            for p, t in truth.items() for row, l, a in
            zip(tests[p], t.loss, t.accuracy if t.accuracy is not None else t.loss)}


def _efficiency(ctx: Context, config: ExperimentConfig, tests: Mapping[str, np.ndarray],
                truth: Mapping[str, MaskEval], ev: Any, seed: int, key: Mapping[str, Any],
                say: Any) -> list[dict[str, Any]]:
    """The ``k_methods`` refitted with ``extra_k`` measured masks of each family added to the fitting design
    (family i's extra masks drawn with seed ``seed + 1 + F + i``), against that family's truth."""
    rows: list[dict[str, Any]] = []
    if not (config.extra_k and config.k_methods):
        return rows
    fit, e, nf = ctx.measured.masks, ctx.num_edges, len(config.families)
    for i, f in enumerate(config.families):
        extra = replace(f, n=max(config.extra_k))
        pool = extra.draw(ctx.graph, seed + 1 + nf + i, exclude=np.vstack([fit, tests[f.name]])) \
            if f.kind != "exhaustive" else np.zeros((0, e), dtype=np.float32)
        say(f"sample efficiency: {len(pool)} extra {f.name} masks")
        extra_loss = ev(pool, ctx.scoring).loss if len(pool) else np.zeros(0)
        for k in config.extra_k:
            k_eff = min(k, len(pool))
            kctx = ctx.with_measured(Measured(np.vstack([fit, pool[:k_eff]]),
                                              np.concatenate([ctx.measured.losses, extra_loss[:k_eff]])))
            for name in config.k_methods:
                pred, seconds = _timed(lambda: fit_method(name, kctx))
                metrics = evaluate_predictions(pred.predict(tests[f.name]), truth[f.name].loss)
                rows.append({**key, "protocol": f.name, "method": name, "extra": k,
                             "K": len(kctx.measured), "seconds": seconds, **metrics})
    return rows


def _reusing(ev: Any, known: Mapping[bytes, tuple[float, float]]) -> Any:
    """``ev`` on the evaluation subset, answering masks whose (loss, accuracy) is already ``known``."""
    def run(masks: np.ndarray, sub: Subset) -> MaskEval:
        masks = np.asarray(masks, dtype=np.float32)
        keys = [mask_key(row) for row in masks]
        todo = [i for i, k in enumerate(keys) if k not in known]
        new = ev(masks[todo], sub) if todo else None
        loss, acc = np.empty(len(masks)), np.empty(len(masks))
        for i, k in enumerate(keys):
            if k in known:
                loss[i], acc[i] = known[k]
        if new is not None:
            loss[todo] = new.loss
            acc[todo] = new.accuracy if new.accuracy is not None else np.nan
        has_acc = not np.isnan(acc).all()
        return MaskEval(sub.name, len(sub), loss, acc if has_acc else None)
    return run


def _budget_edges(config: ExperimentConfig, budget: float, removable: int) -> int:
    return max(1, round(budget * removable)) if config.budget_unit == "fraction" else int(budget)


def _regret(config: ExperimentConfig, graph: ComputationGraph, allowed: np.ndarray,
            predictors: Mapping[str, Predictor], ev: Any,
            evaluation: Subset, seed: int, key: Mapping[str, Any],
            say: Any = lambda msg: None) -> list[dict[str, Any]]:
    """Each method's pick at each budget, its true loss against the best mask found (budget b's search
    seeded with ``seed + 100 + b``): one record per budget and method."""
    idx = np.flatnonzero(allowed)
    rows: list[dict[str, Any]] = []
    for budget in config.budgets:
        b = _budget_edges(config, budget, len(idx))
        if b > len(idx):
            raise ValueError(f"budget {budget} removes {b} edges but only {len(idx)} may be removed")
        picks = {name: select_mask(pred, graph, Budget(edges=b), beam_width=config.beam_width,
                                   allowed=None if allowed.all() else allowed,
                                   allow_disconnected=not config.connected_picks)
                 for name, pred in predictors.items()}
        exhaustive = math.comb(len(idx), b) <= config.exhaustive_limit
        say(f"budget {budget}: {b} of {len(idx)} edges removed; methods' picks made, searching the "
            f"{'exhaustive' if exhaustive else 'sampled'} pool for the best mask")
        rng = np.random.default_rng(seed + 100 + b)
        pool, pool_loss, pool_acc = _search(config, graph, allowed, b, picks, exhaustive, ev, evaluation, rng)
        frac = budget if config.budget_unit == "fraction" else b / len(idx)
        rows += _against_best(picks, pool, pool_loss, pool_acc, ev, evaluation,
                              {**key, "budget_frac": frac, "removed": b}, exhaustive)
    return rows


def _search(config: ExperimentConfig, graph: ComputationGraph, allowed: np.ndarray, b: int,
            picks: Mapping[str, np.ndarray], exhaustive: bool, ev: Any, evaluation: Subset,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The pool of masks removing ``b`` allowed edges in which the best is searched, with its true losses and
    accuracies: every such mask, or the picks, random masks and swap moves around the best of them."""
    e, idx = graph.num_prunable, np.flatnonzero(allowed)
    if exhaustive:
        pool = exhaustive_masks(e, (b,), allowed)
        if config.connected_picks:
            pool = pool[graph.connected(pool)]
    else:
        rand = np.ones((config.search_random, e), dtype=np.float32)
        for row in rand:
            row[idx[rng.choice(len(idx), size=b, replace=False)]] = 0
        if config.connected_picks:
            rand = rand[graph.connected(rand)]
        pool = unique_rows(np.vstack([np.stack(list(picks.values())), rand]))
    pool_eval = ev(pool, evaluation)
    pool_loss, pool_acc = pool_eval.loss, pool_eval.accuracy
    if not exhaustive and config.search_swaps:  # swap moves around the best mask found so far
        best = pool[int(np.argmin(pool_loss))]
        swaps = np.repeat(best[None], config.search_swaps, 0)
        for row in swaps:
            row[rng.choice(np.flatnonzero((row == 0) & allowed))] = 1
            row[rng.choice(np.flatnonzero((row == 1) & allowed))] = 0
        if config.connected_picks:
            swaps = swaps[graph.connected(swaps)]
        swaps = unique_rows(swaps)
        if len(swaps):
            pool = np.vstack([pool, swaps])
            swap_eval = ev(swaps, evaluation)
            pool_loss = np.concatenate([pool_loss, swap_eval.loss])
            pool_acc = None if pool_acc is None else np.concatenate([pool_acc, swap_eval.accuracy])
    return pool, pool_loss, pool_acc


def _against_best(picks: Mapping[str, np.ndarray], pool: np.ndarray, pool_loss: np.ndarray,
                  pool_acc: np.ndarray | None, ev: Any, evaluation: Subset, key: Mapping[str, Any],
                  exhaustive: bool) -> list[dict[str, Any]]:
    """One record per pick: its true loss and accuracy, the best of the pool and the picks (lowest loss;
    highest accuracy: the accuracy oracle) and the regret."""
    best_loss = float(pool_loss.min())
    accs = pool_acc if pool_acc is not None else np.full(len(pool), np.nan)
    lookup = {mask_key(row): (float(l), float(a)) for row, l, a in zip(pool, pool_loss, accs)}
    best_acc = float(np.nanmax(accs)) if pool_acc is not None else float("nan")
    best_mask = mask_text(pool[int(np.argmin(pool_loss))])
    best_acc_mask = mask_text(pool[int(np.nanargmax(accs))]) if pool_acc is not None else ""
    rows = []
    for name, mask in picks.items():
        found = lookup.get(mask_key(mask))
        if found is None:  # a pick outside the pool (exhaustive pools hold every candidate)
            one = ev(mask[None], evaluation)
            found = (float(one.loss[0]), float(one.accuracy[0]) if one.accuracy is not None else float("nan"))
        chosen, chosen_acc = found
        if chosen < best_loss:
            best_loss, best_mask = chosen, mask_text(mask)
        if not math.isnan(chosen_acc) and chosen_acc > best_acc:
            best_acc, best_acc_mask = chosen_acc, mask_text(mask)
        rows.append({**key, "method": name, "chosen_loss": chosen, "chosen_accuracy": chosen_acc,
                     "exhaustive": exhaustive, "pool": len(pool), "mask": "".join(str(int(v)) for v in mask)})
    for r in rows:
        r["best_loss"] = best_loss
        r["regret"] = r["chosen_loss"] - best_loss
        r["best_accuracy"] = best_acc
        r["best_mask"], r["best_accuracy_mask"] = best_mask, best_acc_mask
    return rows
