"""The equal-cost benchmark: every method's pick at every budget of forward passes, scored against the truth.

``run_bench(model, scoring, evaluation, task, BenchConfig(...))`` on one trained network:

1. the *searches* (``surrogate.search.SEARCHES``: random search, greedy, evolution, regressions, and this
   project's sequential surrogate) each spend at most P passes over the scoring subset for every P in
   ``config.budgets`` and every pruning budget k in ``config.ks`` (remove exactly k of the removable units);
2. the *zero-shot criteria* (``surrogate.methods.METHODS``) are points at their own fixed cost;
3. every pick is measured on the evaluation subset (the truth), against a *reference* that no method chose:
   every k-mask when there are at most ``exhaustive_limit``, otherwise the best of a long evolutionary search
   on the evaluation data (``reference`` times the largest P evaluations, over ``restarts`` restarts), and the
   best of every pick;
4. records: one row per (k, method, P) with the passes spent, the pick, its true loss and accuracy, the
   reference's, and the regret.

Truth tables (``load_truth`` / ``save_truth``): every mask measured on the evaluation subset of a network, kept
as a CSV in the repository, so that a rerun measures only what is new. Register a new method as a ``Search``
(``surrogate.search.register_search``) and it is benchmarked like the others (README: "Benchmark a method").
"""
from __future__ import annotations

import ast
import csv
import io
import math
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from .tasks import Subset, Task
from .gating import GatedModel
from .graph import ComputationGraph, build_graph
from .masks import _embed, exhaustive_masks, mask_from_text, mask_text
from .methods import METHODS, fit_method, measure_design
from .metrics import bootstrap_ci, paired_test, spearman
from .passes import BudgetExhausted, LossOracle
from .paths import atomic_write
from .pruning import Budget, select_mask
from .methods import Context
from .search import SEARCHES, Problem, evolution, run_search
from .train import cached_result
from . import sequential as _sequential  # noqa: F401  (registers this project's searches)

__all__ = ["BenchConfig", "BenchResult", "Study", "STUDIES", "study_from", "score", "evaluation_subset", "labels", "regret_table", "network_macros",
           "bench_macros", "resolve_budgets",
           "run_bench", "load_truth", "save_truth", "write_truth", "WALL_TIME_COLUMNS", "at_budgets", "regret_summary",
           "head_to_head"]


@dataclass(frozen=True)
class BenchConfig:
    """What to benchmark (module docstring). Budgets are expressions in E, the number of removable units."""
    units: str | None = None                      # regular expression: the removable prunable edges (None: all)
    ks: tuple[int, ...] = (2,)                    # pruning budgets: units removed
    budgets: tuple[str, ...] = ("E+2", "2*E", "4*E", "E*(E+1)/2")
    searches: tuple[str, ...] = ("random_search", "greedy", "evolution", "linear_regression",
                                 "pairwise_regression", "sequential_loss", "sequential")
    zero_shot: tuple[str, ...] = ("loo", "taylor1_abs", "block_influence")
    reference: int = 10
    restarts: int = 3
    ablations: tuple[float, ...] = (0.10, 0.15, 0.25)  # rank agreement as COAR measures it: random ablations of
    ablation_masks: int = 100                          # these fractions of the units, this many masks each
    reach: tuple[float, ...] = (0.01,)   # passes each anytime search needs to pick within these relative
                                         # distances of the reference's true loss (and the reference search)
    exhaustive_limit: int = 2 ** 16
    connected: bool = True
    batch_size: int = 256
    strategy: str = "stack"                       # evaluate_masks strategy ("prefix": CNNs with few gates)

    def __post_init__(self) -> None:
        unknown = [s for s in self.searches if s not in SEARCHES] + [m for m in self.zero_shot if m not in METHODS]
        if unknown:
            raise KeyError(f"unknown method(s) {unknown}; searches: {', '.join(SEARCHES)}; "
                           f"zero-shot: {', '.join(METHODS)}")
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"pruning budgets ks must be at least 1, got {self.ks}")


def resolve_budgets(exprs: Sequence[str | float], e: int) -> list[int]:
    """Pass budgets from expressions in E (e.g. "E+2", "4*E", "E*(E+1)/2"), rounded down, sorted, distinct."""
    out = set()
    for x in exprs:
        if isinstance(x, (int, float)):
            out.add(int(x))
            continue
        tree = ast.parse(str(x), mode="eval")
        allowed = (ast.Expression, ast.BinOp, ast.Constant, ast.Name, ast.Add, ast.Sub, ast.Mult, ast.Div,
                   ast.Pow, ast.Load)
        if not all(isinstance(n, allowed) for n in ast.walk(tree)) or \
                any(isinstance(n, ast.Name) and n.id != "E" for n in ast.walk(tree)):
            raise ValueError(f"a budget is a number or an arithmetic expression in E, got {x!r}")
        out.add(int(eval(compile(tree, "<budget>", "eval"), {"__builtins__": {}}, {"E": e})))  # noqa: S307
    return sorted(out)


@dataclass
class BenchResult:
    """picks: one row per (k, method, budget P); ranking: one row per (ablated fraction, method, P) with the
    rank (Spearman) and linear (Pearson) correlation of predicted and true loss on random ablations; reach: one
    row per (k, method, tolerance): the fewest passes after which the method's pick stayed within that relative
    distance of the reference's true loss (NaN: never within its largest budget); the reference search's own
    row counts evaluations on the evaluation data."""
    picks: list[dict[str, Any]]
    ranking: list[dict[str, Any]]
    reach: list[dict[str, Any]]


def run_bench(model: nn.Module | ComputationGraph, scoring: Subset, evaluation: Subset, task: Task,
              config: BenchConfig, *, seed: int = 0, truth: LossOracle | None = None,
              oracle: LossOracle | None = None, log: Callable[[str], None] | None = None) -> BenchResult:
    """The benchmark on one network (module docstring). ``truth``: an oracle on ``evaluation`` to reuse (e.g.
    preloaded from a truth table: ``load_truth``); its measurements grow as picks are scored. ``oracle``: the
    same on ``scoring`` (preloaded losses save wall time only: every method is still charged each pass)."""
    say = log or (lambda msg: None)
    graph = model if isinstance(model, ComputationGraph) else build_graph(model, scoring[:4].args(model))
    gated = GatedModel(graph)
    allowed = graph.edges_matching(config.units)
    e = int(allowed.sum())
    budgets = resolve_budgets(config.budgets, e)
    oracle = oracle or LossOracle(gated, scoring, task, batch_size=config.batch_size, strategy=config.strategy)
    truth = truth or LossOracle(gated, evaluation, task, batch_size=config.batch_size, strategy=config.strategy)
    ctx = Context(graph, gated, scoring, task, seed=seed, batch_size=config.batch_size,
                  removable=None if allowed.all() else allowed, max_removed=max(config.ks))
    rows: list[dict[str, Any]] = []
    reach: list[dict[str, Any]] = []
    zero = _zero_shot(config, ctx, allowed, say)
    for k in config.ks:
        problem = Problem(graph, k, allowed, config.connected, ctx)
        traces: dict[str, list[tuple[float, np.ndarray]]] = {}
        for name in config.searches:
            t0 = time.perf_counter()
            trace = traces.setdefault(name, []) if SEARCHES[name].anytime else None
            for r in run_search(name, problem, oracle, budgets, seed=seed, trace=trace):
                rows.append({"k": k, "method": name, "kind": "search", **r})
            say(f"k={k} {name}: {time.perf_counter() - t0:.0f} s")
        for name, (pred, passes, zgraph) in zero.items():
            mask = _zero_shot_pick(pred, zgraph, k, allowed, config.connected)
            rows.append({"k": k, "method": name, "kind": "zero-shot", "budget": passes, "spent": passes, "mask": mask})
        best, how = _reference(problem, truth, config, budgets, rows, seed, say, traces)
        for r in (r for r in rows if r["k"] == k):
            _score(r, truth, oracle, best, how, e)
        reach.extend(_reach(k, traces, truth, best, config.reach))
        for r in (r for r in rows if r["k"] == k):  # the measured wall time of a pass, for the queries' cost
            r["pass_seconds"] = oracle.seconds / max(oracle.passes_run, 1e-12)
    ranking = _ranking(config, graph, allowed, ctx, oracle, truth, budgets, zero, seed, say)
    return BenchResult(rows, ranking, reach)


def _reach(k: int, traces: dict[str, list[tuple[float, np.ndarray]]], truth: LossOracle, best: float,
           tolerances: Sequence[float]) -> list[dict[str, Any]]:
    """For each trace and tolerance: the passes after which every later pick was within tolerance of ``best``."""
    rows = []
    for name, trace in traces.items():
        losses = truth.losses(np.stack([m for _, m in trace])) if trace else np.zeros(0)
        for tol in tolerances:
            ok = losses <= best + tol * abs(best)
            after = [s for i, (s, _) in enumerate(trace) if ok[i:].all()]
            rows.append({"k": k, "method": name, "tolerance": tol, "passes": after[0] if after else float("nan"),
                         "largest": trace[-1][0] if trace else float("nan")})
    return rows


def _ranking(config: BenchConfig, graph: ComputationGraph, allowed: np.ndarray, ctx: Context,
             oracle: LossOracle, truth: LossOracle, budgets: Sequence[int], zero: dict[str, tuple[Any, int, Any]],
             seed: int, say) -> list[dict[str, Any]]:
    """Rank agreement on random ablations of each fraction of the units, as COAR reports it: every method with a
    loss model, fitted at every budget (the regressions on masks of that fraction), and the zero-shot criteria."""
    rows: list[dict[str, Any]] = []
    units = int(allowed.sum())
    fitted: dict[tuple[str, int, int | None], Any] = {}
    for a, frac in enumerate(config.ablations):
        k = max(1, round(frac * units))
        problem = Problem(graph, k, allowed, config.connected, ctx)
        masks = problem.sample(config.ablation_masks, np.random.default_rng(20_000 + seed + a))
        say(f"rank agreement on {len(masks)} random ablations of {k} units")
        true = truth.losses(masks)
        models: list[tuple[str, float, float, Any]] = [(n, p, p, pred) for n, (pred, p, _) in zero.items()]
        for name in (n for n in config.searches if SEARCHES[n].model is not None):
            for b in budgets:
                key = (name, b, k if SEARCHES[name].model_per_k else None)
                if key not in fitted:  # a model that ignores k is fitted once per budget
                    meter = oracle.meter(b, name=f"{name} model")
                    try:
                        fitted[key] = (SEARCHES[name].model(problem, meter, np.random.default_rng(seed)), meter.spent)
                    except BudgetExhausted:
                        fitted[key] = None
                if fitted[key] is not None:
                    models.append((name, b, fitted[key][1], fitted[key][0]))
        for name, b, spent, pred in models:
            yhat = np.asarray(pred.predict(masks), dtype=np.float64)
            rows.append({"fraction": frac, "removed": k, "method": name, "budget": b, "spent": spent,
                         "n_masks": len(masks), "spearman": spearman(yhat, true),
                         "pearson": float(np.corrcoef(yhat, true)[0, 1]) if np.std(yhat) > 0 else float("nan")})
    return rows


class _OnUnits:
    """A zero-shot predictor fitted on the removable units alone, asked about masks of every prunable edge."""

    def __init__(self, pred: Any, allowed: np.ndarray):
        self.pred, self.allowed = pred, allowed

    def predict(self, masks: np.ndarray) -> np.ndarray:
        return self.pred.predict(np.atleast_2d(masks)[:, self.allowed])


def _zero_shot(config: BenchConfig, ctx: Context, allowed: np.ndarray, say
               ) -> dict[str, tuple[Any, int, ComputationGraph]]:
    """Each zero-shot criterion's predictor (fitted on the prior design where it needs one), its passes, and the
    graph whose masks it picks. When only some edges are units, the criteria see a graph gating those alone
    (the others always kept), so that they measure and differentiate only what may be removed: single removals
    cost n+1 passes for n units, not one per prunable edge."""
    if not config.zero_shot:
        return {}
    graph = ctx.graph if allowed.all() else replace(
        ctx.graph, prunable=[e for e, ok in zip(ctx.graph.prunable, allowed) if ok])
    zctx = ctx if allowed.all() else Context(graph, GatedModel(graph), ctx.scoring, ctx.task, seed=ctx.seed,
                                             batch_size=ctx.batch_size, max_removed=ctx.max_removed)
    zctx.measured = measure_design(zctx.gated, zctx.scoring, zctx.task, config.zero_shot,
                                   batch_size=config.batch_size)
    out = {}
    for name in config.zero_shot:
        pred = fit_method(name, zctx)
        passes = METHODS[name].passes_in(zctx)
        out[name] = (pred if allowed.all() else _OnUnits(pred, allowed), int(passes["forward"] + passes["backward"]),
                     graph)
        say(f"zero-shot {name}: {out[name][1]} passes")
    return out


def _zero_shot_pick(pred: Any, graph: ComputationGraph, k: int, allowed: np.ndarray, connected: bool) -> np.ndarray:
    """A zero-shot criterion's pick of k units, as a mask of every prunable edge."""
    inner = pred.pred if isinstance(pred, _OnUnits) else pred
    mask = select_mask(inner, graph, Budget(edges=k), allow_disconnected=not connected)
    return _embed(np.asarray(mask, dtype=np.float32)[None], np.flatnonzero(allowed), len(allowed))[0]


def _reference(problem: Problem, truth: LossOracle, config: BenchConfig, budgets: Sequence[int],
               rows: list[dict[str, Any]], seed: int, say,
               traces: dict[str, list[tuple[float, np.ndarray]]]) -> tuple[float, str]:
    """The best true loss known at pruning budget k: exhaustive, or a long search on the evaluation data, and
    every pick of every method."""
    k, units = problem.k, problem.units
    if math.comb(len(units), k) <= config.exhaustive_limit:
        masks = exhaustive_masks(problem.num_edges, (k,), problem.allowed)
        masks = masks[problem.ok(masks)]
        say(f"k={k} reference: all {len(masks)} masks on {len(truth.data)} evaluation samples")
        truth.losses(masks)
        how = f"exhaustive ({len(masks)} masks)"
    else:
        total = config.reference * max(budgets)
        say(f"k={k} reference: evolution on the evaluation data, {config.restarts} x {total // config.restarts} "
            "evaluations")
        for r in range(config.restarts):
            meter = truth.meter(total // config.restarts, name=f"reference k={k} restart {r}")
            try:
                evolution(problem, meter, np.random.default_rng(10_000 + seed + r))
            except BudgetExhausted:  # the budget ends a restart
                pass
            traces[f"reference_search_{r}"] = meter.picks  # evolution on the evaluation data itself
        how = "search"
    picks = [r["mask"] for r in rows if r["k"] == k and r["mask"] is not None]
    if picks:
        truth.losses(np.stack(picks))
    known = [(m, l) for m, l, _ in truth.table() if problem.feasible(m)[0]]
    return min(l for _, l in known), how


def _score(row: dict[str, Any], truth: LossOracle, oracle: LossOracle, best: float, how: str, e: int) -> None:
    mask = row.pop("mask")
    row.update({"units": e, "reference": how, "best_loss": best, "eval_samples": len(truth.data)})
    if mask is None:
        row.update({"mask": "", "loss": np.nan, "accuracy": np.nan, "regret": np.nan, "scoring_loss": np.nan})
        return
    loss = float(truth.losses(mask)[0])
    row.update({"mask": mask_text(mask), "loss": loss, "accuracy": float(truth.accuracy(mask)[0]),
                "regret": loss - best, "scoring_loss": oracle.known(mask)})


# ----------------------------------------------------------------------------------------------------
# truth tables

TRUTH_COLUMNS = ("network", "subset", "samples", "mask", "removed", "loss", "accuracy")
# columns of the picks measured in wall time: they differ from run to run, so published tables leave them out
WALL_TIME_COLUMNS = ("pass_seconds", "query_seconds")


def load_truth(path: str | Path, network: str, oracle: LossOracle) -> int:
    """Preload ``oracle`` with the rows of ``network`` in the truth table at ``path`` (if it exists) measured
    on a subset of the same name and size; returns how many were loaded."""
    path = Path(path)
    if not path.exists():
        return 0
    masks, losses, accs = [], [], []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            if r["network"] == network and r["subset"] == oracle.data.name and int(r["samples"]) == len(oracle.data):
                masks.append(mask_from_text(r["mask"], oracle.num_edges))
                losses.append(float(r["loss"]))
                accs.append(float(r["accuracy"]) if r["accuracy"] else np.nan)
    if masks:
        oracle.preload(np.stack(masks), np.array(losses), np.array(accs))
    return len(masks)


def save_truth(path: str | Path, network: str, oracle: LossOracle) -> None:
    """Write every mask ``oracle`` knows on its whole subset into the truth table at ``path`` (the rows of other
    networks or subsets kept; this network's rows sorted by mask), atomically."""
    path = Path(path)
    keep: list[dict[str, str]] = []
    if path.exists():
        with open(path, newline="") as f:
            keep = [r for r in csv.DictReader(f) if not (r["network"] == network and r["subset"] == oracle.data.name
                                                          and int(r["samples"]) == len(oracle.data))]
    n = len(oracle.data)
    mine = [{"network": network, "subset": oracle.data.name, "samples": str(n), "mask": mask_text(m),
             "removed": str(int((m == 0).sum())), "loss": repr(float(l)),
             "accuracy": "" if math.isnan(a) else repr(float(a))} for m, l, a in oracle.table()]
    write_truth(path, keep + mine)


def write_truth(path: str | Path, rows: Sequence[dict[str, str]]) -> None:
    """Write truth-table rows (``TRUTH_COLUMNS``, as text) sorted by network, subset, samples and mask,
    atomically."""
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=TRUTH_COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(sorted(rows, key=lambda r: (r["network"], r["subset"], int(r["samples"]), r["mask"])))
    atomic_write(path, out.getvalue())


# ----------------------------------------------------------------------------------------------------
# summaries over networks

def at_budgets(picks: pd.DataFrame, budgets: Sequence[int]) -> pd.DataFrame:
    """Every method's pick at each pass budget P: a search's pick at P, a zero-shot criterion's pick at every
    P at least its cost (it can spend no more). Columns of ``picks`` plus ``P``."""
    out = []
    for p in budgets:
        s = picks[(picks.kind == "search") & (picks.budget == p)]
        z = picks[(picks.kind == "zero-shot") & (picks.budget <= p)]
        out.append(pd.concat([s, z]).assign(P=p))
    return pd.concat(out, ignore_index=True)


def regret_summary(table: pd.DataFrame, by: Sequence[str] = ("k", "P", "method"), value: str = "regret",
                   seed: int = 0) -> pd.DataFrame:
    """Mean of ``value`` over networks per group, with a bootstrap 95% interval over the networks and how many
    networks have a pick (a method whose budget is too small has none)."""
    rows = []
    for key, g in table.dropna(subset=[value]).groupby(list(by), sort=True):
        lo, hi = bootstrap_ci(g[value].to_numpy(), seed=seed)
        rows.append({**dict(zip(by, key)), "mean": float(g[value].mean()), "lo": lo, "hi": hi,
                     "networks": int(g["network"].nunique()), "spent": float(g["spent"].mean())})
    return pd.DataFrame(rows)


def head_to_head(table: pd.DataFrame, ours: str, value: str = "regret", tol: float = 1e-9) -> pd.DataFrame:
    """Ours against every other method at each budget P, paired over (network, k): wins (ours lower), ties
    (within ``tol``), losses, the mean difference (ours - other) and a two-sided Wilcoxon signed-rank p; with
    several budgets, also rows with P "all": paired over (network, k, P) where both have a pick (the budgets of
    one network are not independent samples: the pooled test is a summary, the per-network count the evidence)."""
    groups = list(table.groupby("P", sort=True))
    if len(groups) > 1:
        groups.append(("all", table))
    rows = []
    for p, g in groups:
        mine = g[g.method == ours].set_index(["network", "k", "P"])[value]
        for other in sorted(set(g.method) - {ours}):
            theirs = g[g.method == other].set_index(["network", "k", "P"])[value]
            both = mine.to_frame("a").join(theirs.to_frame("b"), how="inner").dropna()
            if both.empty:
                continue
            d = both.a - both.b
            test = paired_test(both.a.to_numpy(), both.b.to_numpy()) if len(d) > 1 else {"wilcoxon_p": float("nan")}
            rows.append({"P": p, "method": other, "pairs": len(d), "wins": int((d < -tol).sum()),
                         "ties": int((d.abs() <= tol).sum()), "losses": int((d > tol).sum()),
                         "mean_diff": float(d.mean()), "wilcoxon_p": test["wilcoxon_p"]})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------
# the paper's studies as a benchmark

@dataclass(frozen=True)
class Study:
    """A study of the paper as a benchmark: its networks (``surrogate.zoo`` names), the truth's evaluation subset
    (``n_eval`` test samples drawn with seed 0) and the protocol (``config``: units, pruning and pass budgets)."""
    networks: tuple[str, ...]
    config: BenchConfig
    n_eval: int
    load: Callable[..., tuple[nn.Module, dict[str, Subset], Task]] | None = field(default=None, compare=False)
    # load(name, data_dir, log) -> (network, splits with "scoring" and "test", task); None: surrogate.zoo.load


def _sublayers() -> str:
    from .lm import SUBLAYER_BRANCHES
    return SUBLAYER_BRANCHES


STUDIES: dict[str, Study] = {
    "cifar": Study(tuple(f"cifar_resnet20_seed{s}" for s in range(3)),
                   BenchConfig(units=None, ks=(3, 5), strategy="prefix", batch_size=500), 1000),
    "gpt2_12l": Study(tuple(f"gpt2_12l_seed{s}" for s in range(3)),
                      BenchConfig(units=_sublayers(), ks=(6,), batch_size=16), 16),
}


def study_from(name: str, *, networks: Sequence[str] | None = None, ks: Sequence[int] | None = None,
               budgets: Sequence[str] | None = None, searches: Sequence[str] | None = None,
               zero_shot: Sequence[str] = (), n_eval: int | None = None, reference: int | None = None,
               ablation_masks: int | None = None, ablations: Sequence[float] | None = None,
               quick: dict[str, Any] | None = None) -> Study:
    """Study ``name`` of ``STUDIES`` with a notebook's overrides (None keeps the study's own; ``searches`` None:
    every registered search; ``quick``: training/data overrides for stand-in networks, as ``zoo.load`` takes).
    Every override but ``quick`` may also be a mapping from study names to values (a study it does not name
    keeps its own), so that one set of notebook parameters can give each study its own budgets."""
    if name not in STUDIES:
        raise KeyError(f"unknown study {name!r}; studies: {', '.join(STUDIES)}")
    base = STUDIES[name]
    of = lambda v: v.get(name) if isinstance(v, Mapping) else v  # noqa: E731
    given = {"ks": of(ks), "budgets": of(budgets), "reference": of(reference),
             "ablation_masks": of(ablation_masks), "ablations": of(ablations)}
    config = replace(base.config, searches=tuple(of(searches) or SEARCHES), zero_shot=tuple(of(zero_shot) or ()),
                     **{k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in given.items() if v is not None})
    load = None
    if quick:
        from . import zoo
        load = lambda net, data_dir=None, log=None: zoo.load(net, data_dir, log, **quick)  # noqa: E731
    return Study(tuple(of(networks) or base.networks), config, of(n_eval) or base.n_eval, load)


def labels(names: Sequence[str]) -> dict[str, str]:
    """Display labels of searches and zero-shot criteria."""
    return {n: SEARCHES[n].label if n in SEARCHES else METHODS[n].label if n in METHODS else n for n in names}


def evaluation_subset(test: Subset, n: int) -> Subset:
    """The first ``n`` samples of a seed-0 permutation of ``test``, named by both (truth tables key on the name)."""
    import torch
    pick = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:n]
    part = test[pick]
    return Subset(f"{test.name}[{len(pick)} of {len(test)}, seed 0]", part.inputs, part.targets)


def score(searches: Sequence[str], study: str | Study = "cifar", *, zero_shot: Sequence[str] = (),
          networks: Sequence[str] | None = None, budgets: Sequence[str] | None = None,
          truth: str | Path | None = None, save_truth_to: str | Path | None = None,
          data_dir: str | Path | None = None, seed: int = 0, log: Callable[[str], None] | None = print,
          cache: bool = False, cache_dir: str | Path | None = None) -> BenchResult:
    """Benchmark ``searches`` (registered in ``surrogate.search.SEARCHES``: the field's, this project's, or your own)
    and ``zero_shot`` criteria on a study's networks at its pass budgets, against the truth (module docstring).
    ``truth``: a truth table (CSV) whose measurements are reused, e.g. the paper's ``truth/<study>.csv``;
    ``save_truth_to``: where to write the table extended by every mask measured here (default: nowhere). The
    table also keeps the masks measured on the scoring subset (its own ``subset`` rows), so that a rerun replays
    the searches without running those passes again (they are still charged). The records carry a ``network``
    column. ``cache``: keep each network's records in ``<cache_dir>/bench`` (default cache: ``$SURROGATE_CACHE_DIR``
    or ``<project>/cache``), keyed by the network's weights, its subsets' names and sizes, the config, the seed and the
    searches' names, so that a rerun (or another process scoring the same network) reads them; clear it after changing a
    search's code under the same name."""
    from . import zoo
    if not isinstance(study, Study) and study not in STUDIES:
        raise KeyError(f"unknown study {study!r}; studies: {', '.join(STUDIES)} (or pass a bench.Study)")
    spec = study if isinstance(study, Study) else STUDIES[study]
    load = spec.load or zoo.load
    config = replace(spec.config, searches=tuple(searches), zero_shot=tuple(zero_shot),
                            **({"budgets": tuple(budgets)} if budgets is not None else {}))
    out = BenchResult([], [], [])
    for name in networks or spec.networks:
        net, splits, task = load(name, data_dir, log)
        evaluation = evaluation_subset(splits["test"], spec.n_eval)
        run = partial(_bench_network, name, net, splits, evaluation, task, config, seed, truth, save_truth_to, log)
        if cache:
            key = (_weights_digest(net), splits["scoring"].name, len(splits["scoring"]), evaluation.name, config, seed)
            res = cached_result(key, run, cache_dir, kind="bench")
        else:
            res = run()
        for part in ("picks", "ranking", "reach"):
            getattr(out, part).extend({"network": name, **r} for r in getattr(res, part))
    return out


def _bench_network(name: str, net: nn.Module, splits: dict[str, Subset], evaluation: Subset, task: Task,
                   config: BenchConfig, seed: int, truth: str | Path | None, save_truth_to: str | Path | None,
                   log: Callable[[str], None] | None) -> BenchResult:
    """``run_bench`` on one network of a study, its oracles preloaded from the truth table ``truth`` and saved
    into ``save_truth_to`` afterwards (either may be None)."""
    graph = build_graph(net, splits["scoring"][:4].args(net))
    gated = GatedModel(graph)
    oracles = [LossOracle(gated, data, task, batch_size=config.batch_size, strategy=config.strategy)
               for data in (evaluation, splits["scoring"])]
    if truth is not None:
        for o in oracles:
            load_truth(truth, name, o)
    res = run_bench(graph, splits["scoring"], evaluation, task, config, seed=seed, truth=oracles[0],
                    oracle=oracles[1], log=log)
    if save_truth_to is not None:
        for o in oracles:
            save_truth(save_truth_to, name, o)
    return res


def _weights_digest(net: nn.Module) -> str:
    """sha256 of a network's parameters and buffers (names, dtypes, shapes, values): its identity in a cache key."""
    import hashlib
    h = hashlib.sha256()
    for name, t in net.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def regret_table(summary: pd.DataFrame, path: str | Path | None = None) -> pd.DataFrame:
    """Mean regret (bootstrap interval over networks) per method (rows) at each (k, P) (columns), with the mean
    passes it spent in parentheses (a search may stop early, a zero-shot criterion costs what it costs), the
    lowest of a column in bold; written as LaTeX to ``path`` if given; returns the readable table."""
    from .paper import Raw, fmt, write_table
    cols = sorted({(int(k), int(p)) for k, p in zip(summary.k, summary.P)})
    names = list(dict.fromkeys(summary.method))
    lab = labels(names)
    best = {c: summary[(summary.k == c[0]) & (summary.P == c[1])]["mean"].min() for c in cols}
    text, latex = [], []
    for m in names:
        row, raw = {"Method": lab[m]}, {"Method": lab[m]}
        for k, p in cols:
            r = summary[(summary.method == m) & (summary.k == k) & (summary.P == p)]
            head = f"k={k}, P={p}"
            if r.empty:
                row[head], raw[head] = "", Raw("--")
                continue
            r = r.iloc[0]
            spent = f" ({r.spent:.0f})" if "spent" in r and np.isfinite(r.spent) else ""  # passes it used
            row[head] = f"{r['mean']:.3f} [{r.lo:.3f}, {r.hi:.3f}]{spent}"
            cell = f"{fmt(r['mean'])}\\,{{\\scriptsize[{fmt(r.lo)}, {fmt(r.hi)}]{spent}}}"
            raw[head] = Raw(f"\\textbf{{{cell}}}" if np.isclose(r["mean"], best[(k, p)]) else cell)
        text.append(row)
        latex.append(raw)
    if path is not None:
        df = pd.DataFrame(latex)
        write_table(path, df, raw_columns=[c for c in df.columns if c != "Method"])
    return pd.DataFrame(text)


def bench_macros(study: str, summary: pd.DataFrame, h2h: pd.DataFrame, ranking: pd.DataFrame,
                 reach: pd.DataFrame, ours: str, picks: pd.DataFrame | None = None) -> dict[str, Any]:
    """The numbers the paper quotes from one study: per budget P, ours' mean regret, the best other method's
    and its name, ours' wins/ties/losses over (network, k) pairs summed over the other methods; the rank
    agreement of ours and of the best other model at each ablated fraction (largest budget); the passes to
    within 1% of the reference (ours, and the reference search's evaluations on the test data)."""
    from .paper import fmt, macro_name
    m: dict[str, Any] = {}
    if picks is not None and len(picks):  # the setting: networks, test samples, the exhaustive reference's size
        m[macro_name(study, "nets")] = int(picks.network.nunique())
        m[macro_name(study, "eval", "n")] = int(picks.eval_samples.max())
        sizes = picks.reference.str.extract(r"exhaustive \((\d+) masks\)")[0].dropna()
        if len(sizes):
            m[macro_name(study, "reference", "masks")] = int(sizes.astype(int).max())
    if len(ranking):
        m[macro_name(study, "rank", "masks")] = int(ranking.n_masks.max())
    m.update(_query_macros(study, picks, ours))
    for i, (p, rows) in enumerate(summary.groupby("P", sort=True)):
        g = rows.groupby("method")["mean"].mean()
        one_k = rows.k.nunique() == 1  # the bootstrap interval over networks is quoted for a single k only
        tag = macro_name(study, "budget", "ABCDEFGH"[i])
        m[tag + "Passes"] = int(p)
        if ours in g:
            m[tag + "Ours"] = float(g[ours])
        others = g.drop(ours, errors="ignore")
        if len(others):
            m[tag + "BestOther"] = float(others.min())
            m[tag + "BestOtherName"] = labels([others.idxmin()])[others.idxmin()]
        for who, name in (("Ours", ours), ("BestOther", others.idxmin() if len(others) else None)):
            row = rows[rows.method == name]
            if one_k and len(row) and {"lo", "hi"} <= set(row.columns):
                m[tag + who + "Lo"], m[tag + who + "Hi"] = float(row.lo.iloc[0]), float(row.hi.iloc[0])
        hp = h2h[h2h.P.astype(str) == str(p)]
        for col in ("wins", "ties", "losses"):
            m[tag + col.title()] = int(hp[col].sum())
    pooled = h2h[h2h.P.astype(str) == "all"]
    for row in pooled.itertuples():  # pooled over networks and budgets: pairs and p per method
        tag = macro_name(study, "pooled", row.method)
        m[tag + "Pairs"], m[tag + "P"] = int(row.pairs), float(row.wilcoxon_p)
        m[tag + "Wins"], m[tag + "Ties"], m[tag + "Losses"] = int(row.wins), int(row.ties), int(row.losses)
    if len(ranking):
        top = ranking[ranking.budget == ranking.budget.max()]
        for frac, g in top.groupby("fraction"):
            tag = macro_name(study, "rank", f"{round(100 * frac)}pct")
            s = g.groupby("method")["spearman"].mean()
            if ours in s:
                m[tag + "Ours"] = float(s[ours])
            if len(s.drop(ours, errors="ignore")):
                m[tag + "BestOther"] = float(s.drop(ours, errors="ignore").max())
    if len(reach):
        for k, g in reach[reach.tolerance == reach.tolerance.min()].groupby("k"):
            tag = macro_name(study, "reach", "k", int(k))
            mine = g[g.method == ours].passes
            ref = g[g.method.str.startswith("reference_search")].passes
            if len(mine):
                m[tag + "Ours"] = fmt(mine.mean(), 1)
            if len(ref):
                m[tag + "Reference"] = fmt(ref.mean(), 1)
    return m


def _query_macros(study: str, picks: pd.DataFrame | None, ours: str) -> dict[str, Any]:
    """What ours' queries of its model cost: per network and k, the queries of its run to the largest budget and
    their cost in passes (FLOPs counted); macros: the mean number of queries and the mean cost of one query in
    percent of a pass (and the largest over networks and k)."""
    from .paper import fmt, macro_name
    if picks is None or "queries" not in picks or not len(picks):
        return {}
    mine = picks[(picks.method == ours) & picks.queries.notna()]
    if not len(mine):
        return {}
    last = mine.sort_values("budget").groupby(["network", "k"]).tail(1)
    pct = 100 * last.query_passes / last.queries
    tag = macro_name(study, "query")
    return {tag + "Count": fmt(last.queries.mean(), 0), tag + "Pct": fmt(pct.mean(), 2),
            tag + "PctMax": fmt(pct.max(), 2)}


def network_macros(study: str, networks: Sequence[str]) -> dict[str, Any]:
    """The shipped networks of a study as the paper quotes them (from ``checkpoints/manifest.json``): how many,
    their test metric (mean, min, max: accuracy in percent or perplexity) and the longest training in minutes,
    and a language model's size. Networks that are not shipped (a fast profile's stand-ins) give nothing."""
    from .checkpoints import load_manifest
    from .paper import fmt, macro_name
    from . import zoo
    entries = [e for n, e in load_manifest().items() if n in set(networks)]
    if not entries or len(entries) < len(set(networks)):
        return {}
    m: dict[str, Any] = {macro_name(study, "shipped"): len(entries),
                         macro_name(study, "train", "minutes"): fmt(max(e["wall_minutes"] for e in entries), 0)}
    acc = [100 * e["metrics"]["test_acc"] for e in entries if "test_acc" in e["metrics"]]
    ppl = [e["metrics"]["test_ppl"] for e in entries if "test_ppl" in e["metrics"]]
    for word, vals, digits in (("acc", acc, 2), ("ppl", ppl, 1)):  # as the paper quotes them
        if vals:
            m.update({macro_name(study, "test", word, "mean"): fmt(np.mean(vals), digits),
                      macro_name(study, "test", word, "min"): fmt(min(vals), digits),
                      macro_name(study, "test", word, "max"): fmt(max(vals), digits)})
    spec = zoo.parse(next(iter(networks)))
    if spec["study"] == "lm":
        m.update({macro_name(study, k): v for k, v in zoo.GPT2_SIZES[spec["layers"]].items()})
    return m
