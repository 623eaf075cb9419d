"""The field's mask searches and regressions, each run at a budget of forward passes (``surrogate.passes``).

A ``Problem`` is one pruning budget on one network: remove exactly ``k`` of the ``allowed`` units, keeping an
input->output path. Every method below spends its passes through a ``Meter`` (every candidate it measures is
charged, at the fraction of the scoring subset it was measured on) and records its pick as it goes:

* ``random_search``   -- measure random masks at the budget, keep the best;
* ``greedy``          -- SLEB / BlockPruner: remove, one unit at a time, the unit whose removal costs the least
                         measured loss; stopped by the budget, the rest is completed from its last ranking;
* ``evolution``       -- EvoPress-style (1 + lambda) evolution with level-switch mutation (swap removed and kept
                         units) and two-stage selection: offspring screened on a fraction of the scoring subset,
                         the best few measured on all of it; the parent is replaced only by a better one;
* ``linear_regression``   -- Bonsai / COAR: loss ~ b + w.x on random masks (x = removal indicators), ridge with
                             the penalty chosen by cross-validated Kendall tau; remove the k lowest-cost units;
* ``pairwise_regression`` -- the same with every pairwise product x_i x_j (a quadratic pseudo-Boolean model),
                             searched for its best mask.

``SEARCHES`` registers them (and this project's sequential surrogate, ``surrogate.sequential``, adds itself).
``run_search`` runs one at a list of pass budgets: an anytime method runs once at the largest budget and its
pick at a smaller one is the pick it had made by then; a regression is refitted at every budget on the first
P masks of one seeded sequence.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from .graph import ComputationGraph
from .metrics import kendall
from .masks import mask_key
from .passes import BudgetExhausted, LossOracle, Meter
from .pruning import Budget, select_mask
from .methods import AdditivePredictor, Predictor

__all__ = ["Problem", "Search", "SEARCHES", "register_search", "run_search", "random_search", "greedy", "evolution",
           "linear_regression", "pairwise_regression", "fit_linear", "fit_pairwise", "local_search"]


@dataclass
class Problem:
    """Remove exactly ``k`` of the ``allowed`` units of ``graph`` (keeping an input->output path when
    ``connected``). ``context``: what a method that runs the model itself needs (a ``scorers.Context``)."""
    graph: ComputationGraph
    k: int
    allowed: np.ndarray
    connected: bool = True
    context: Any = None

    def __post_init__(self) -> None:
        self.allowed = np.asarray(self.allowed, dtype=bool)
        if self.allowed.shape != (self.graph.num_prunable,):
            raise ValueError(f"allowed needs one entry per prunable edge ({self.graph.num_prunable})")
        if not 1 <= self.k <= int(self.allowed.sum()):
            raise ValueError(f"cannot remove {self.k} of the {int(self.allowed.sum())} allowed units")

    @property
    def num_edges(self) -> int:
        return self.graph.num_prunable

    @property
    def units(self) -> np.ndarray:
        return np.flatnonzero(self.allowed)

    def ok(self, masks: np.ndarray) -> np.ndarray:
        """Which masks keep a path (always True when ``connected`` is False)."""
        m = np.atleast_2d(masks)
        return self.graph.connected(m) if self.connected else np.ones(len(m), dtype=bool)

    def feasible(self, masks: np.ndarray) -> np.ndarray:
        """Which masks remove exactly k allowed units, nothing else, and keep a path."""
        m = np.atleast_2d(masks)
        right = ((m[:, ~self.allowed] == 1).all(1)) & ((m[:, self.allowed] == 0).sum(1) == self.k)
        return right & self.ok(m)

    def sample(self, n: int, rng: np.random.Generator, drop: float | None = None, tries: int = 50) -> np.ndarray:
        """n masks that keep a path: exactly k allowed units removed (``drop`` None), or each allowed unit
        removed with probability ``drop`` (at least one). Disconnected draws are redrawn."""
        units, out = self.units, []
        for _ in range(tries):
            m = np.ones((n, self.num_edges), dtype=np.float32)
            for row in m:
                if drop is None:
                    row[rng.choice(units, size=self.k, replace=False)] = 0
                else:
                    gone = units[rng.random(len(units)) < drop]
                    row[gone if len(gone) else rng.choice(units, size=1)] = 0
            out.extend(m[self.ok(m)])
            if len(out) >= n:
                return np.stack(out[:n])
        raise ValueError(f"fewer than {n} of {tries * n} random masks keep an input->output path; "
                         "the budget may leave no connected network")

    def complete(self, mask: np.ndarray, order: Sequence[int]) -> np.ndarray:
        """``mask`` with further allowed units removed in ``order`` (skipping any that would cut the network)
        until k are removed."""
        m = np.asarray(mask, dtype=np.float32).copy()
        for i in order:
            if (m[self.allowed] == 0).sum() >= self.k:
                break
            if m[i] == 1 and self.allowed[i]:
                m[i] = 0
                if not self.ok(m)[0]:
                    m[i] = 1
        if not self.feasible(m)[0]:
            raise ValueError(f"no way to remove {self.k} units along the given order while keeping a path")
        return m

    def swaps(self, mask: np.ndarray) -> np.ndarray:
        """Every feasible mask one swap away (one removed unit restored, one kept unit removed)."""
        m = np.asarray(mask, dtype=np.float32)
        gone, kept = np.flatnonzero((m == 0) & self.allowed), np.flatnonzero((m == 1) & self.allowed)
        out = np.repeat(m[None], len(gone) * len(kept), 0)
        for r, (i, j) in enumerate((i, j) for i in gone for j in kept):
            out[r, i], out[r, j] = 1, 0
        return out[self.ok(out)] if len(out) else out


# ----------------------------------------------------------------------------------------------------
# searches on the measured loss (anytime: they recommend as they go)

def random_search(problem: Problem, meter: Meter, rng: np.random.Generator, max_repeats: int = 1000) -> None:
    """Measure random feasible masks one at a time; the pick is the best measured so far. Stops when the budget
    is spent or ``max_repeats`` draws in a row were masks measured before (a small space is exhausted)."""
    repeats = 0
    while meter.left >= 1 - 1e-9 and repeats < max_repeats:
        mask = problem.sample(1, rng)[0]
        if meter.cost(mask) == 0:
            repeats += 1
            continue
        repeats = 0
        meter.measure(mask)
        meter.recommend(meter.best_measured(lambda m: problem.feasible(m)[0])[0])


def greedy(problem: Problem, meter: Meter, rng: np.random.Generator) -> None:
    """SLEB's / BlockPruner's greedy removal (no unit is protected). After every completed step the pick is
    the current mask completed by that step's ranking of the remaining candidates."""
    mask = np.ones(problem.num_edges, dtype=np.float32)
    for step in range(problem.k):
        cand_units = [i for i in np.flatnonzero((mask == 1) & problem.allowed)]
        cands = np.repeat(mask[None], len(cand_units), 0)
        cands[np.arange(len(cand_units)), cand_units] = 0
        keep = problem.ok(cands)
        cand_units, cands = [u for u, ok in zip(cand_units, keep) if ok], cands[keep]
        if not len(cands) or not meter.can(cands):
            return
        losses = np.array([meter.measure(c)[0] for c in cands])
        order = np.argsort(losses, kind="stable")
        mask = cands[order[0]]
        meter.recommend(problem.complete(mask, [cand_units[j] for j in order[1:]]))


def _mutate(problem: Problem, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Level-switch mutation: s swaps of a removed and a kept unit, s = 1 + Geometric(1/2) - 1, at most k."""
    m = mask.copy()
    for _ in range(min(problem.k, rng.geometric(0.5))):
        gone, kept = np.flatnonzero((m == 0) & problem.allowed), np.flatnonzero((m == 1) & problem.allowed)
        if not len(kept):
            break
        m[rng.choice(gone)], m[rng.choice(kept)] = 1, 0
    return m


def evolution(problem: Problem, meter: Meter, rng: np.random.Generator, offspring: int = 16,
              screen: float = 0.125, survivors: int = 2) -> None:
    """EvoPress-style (1 + lambda) search: per generation ``offspring`` mutants screened on a ``screen`` fraction
    of the scoring subset, the best ``survivors`` measured on all of it, the parent replaced by a better one."""
    parent = problem.sample(1, rng)[0]
    if not meter.can(parent):
        return
    parent_loss = meter.measure(parent)[0]
    meter.recommend(parent)
    stall = 0
    while meter.left > 1e-9 and stall < 100:
        kids = [_mutate(problem, parent, rng) for _ in range(offspring)]
        kids = [k for k in {mask_key(k): k for k in kids}.values() if problem.feasible(k)[0]
                and mask_key(k) != mask_key(parent)]
        if not kids:
            stall += 1
            continue
        kids_arr = np.stack(kids)
        stall = stall + 1 if meter.cost(kids_arr, screen) == 0 else 0  # a small space: nothing new to see
        try:
            screened = meter.measure(kids_arr, screen)
            top = kids_arr[np.argsort(screened, kind="stable")[:survivors]]
            full = np.array([meter.measure(t)[0] for t in top])
        except BudgetExhausted:
            return
        if full.min() < parent_loss:
            parent, parent_loss = top[int(np.argmin(full))], float(full.min())
            meter.recommend(parent)


# ----------------------------------------------------------------------------------------------------
# regressions on random masks (refitted at every budget)

def _ridge(x: np.ndarray, y: np.ndarray, lam: float) -> tuple[np.ndarray, float]:
    xm, ym = x.mean(0), y.mean()
    xc = x - xm
    w = np.linalg.solve(xc.T @ xc + lam * np.eye(x.shape[1]), xc.T @ (y - ym))
    return w, float(ym - xm @ w)


def _cv_ridge(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, folds: int = 5,
              grid: Sequence[float] = (1e-3, 1e-2, 1e-1, 1, 10, 100)) -> tuple[np.ndarray, float]:
    """Ridge with the penalty (scaled by the mean feature variance) chosen by cross-validated Kendall tau."""
    scale = max(float(x.var(0).mean()) * len(x), 1e-12)
    if len(x) < 2 * folds:
        return _ridge(x, y, scale * 1e-2)
    fold = rng.permutation(len(x)) % folds
    scores = []
    for lam in grid:
        taus = []
        for f in range(folds):
            w, b = _ridge(x[fold != f], y[fold != f], scale * lam)
            taus.append(kendall(x[fold == f] @ w + b, y[fold == f]))
        scores.append(np.nanmean(taus) if not np.isnan(taus).all() else -np.inf)
    return _ridge(x, y, scale * grid[int(np.argmax(scores))])


def _pairs(n: int) -> np.ndarray:
    i, j = np.triu_indices(n, 1)
    return np.stack([i, j], 1)


@dataclass
class QuadraticModel(Predictor):
    """loss ~ b + w.x + sum over pairs of v_ij x_i x_j, x = removal indicators of the units."""
    units: np.ndarray
    w: np.ndarray
    v: np.ndarray
    b: float
    num_edges: int

    @property
    def importance(self) -> np.ndarray:
        imp = np.zeros(self.num_edges)
        imp[self.units] = self.w
        return imp

    def predict(self, masks: np.ndarray) -> np.ndarray:
        x = 1 - np.atleast_2d(masks)[:, self.units]
        p = _pairs(len(self.units))
        return self.b + x @ self.w + (x[:, p[:, 0]] * x[:, p[:, 1]]) @ self.v


def _measured_random(problem: Problem, meter: Meter, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """As many random masks as the budget pays for (each allowed unit removed with probability k / units)."""
    n = int(np.floor(meter.left + 1e-9))
    if n < 2:
        raise BudgetExhausted(f"a regression needs at least 2 measured masks, the budget pays for {n}")
    masks = problem.sample(n, rng, drop=problem.k / len(problem.units))
    return masks, meter.measure(masks)


def fit_linear(problem: Problem, meter: Meter, rng: np.random.Generator) -> AdditivePredictor:
    """Bonsai / COAR: ridge regression of the loss on the removal indicators of as many random masks as the
    budget pays for; the model's importance of a unit is its coefficient."""
    masks, y = _measured_random(problem, meter, rng)
    w, b = _cv_ridge(1 - masks[:, problem.units], y, rng)
    imp = np.zeros(problem.num_edges)
    imp[problem.units] = w
    return AdditivePredictor("linear_regression", imp, b)


def fit_pairwise(problem: Problem, meter: Meter, rng: np.random.Generator) -> QuadraticModel:
    """The same with every pairwise product of removal indicators: a quadratic pseudo-Boolean model."""
    masks, y = _measured_random(problem, meter, rng)
    x = 1 - masks[:, problem.units]
    p = _pairs(len(problem.units))
    coef, b = _cv_ridge(np.hstack([x, x[:, p[:, 0]] * x[:, p[:, 1]]]), y, rng)
    n = len(problem.units)
    return QuadraticModel(problem.units, coef[:n], coef[n:], b, problem.num_edges)


def linear_regression(problem: Problem, meter: Meter, rng: np.random.Generator) -> None:
    meter.recommend(_pick(fit_linear(problem, meter, rng), problem))


def pairwise_regression(problem: Problem, meter: Meter, rng: np.random.Generator) -> None:
    model = fit_pairwise(problem, meter, rng)
    meter.recommend(local_search(model, problem, _pick(model, problem)))


def _pick(pred: Predictor, problem: Problem) -> np.ndarray:
    return select_mask(pred, problem.graph, Budget(edges=problem.k), allowed=problem.allowed,
                       allow_disconnected=not problem.connected)


def local_search(pred: Predictor, problem: Problem, start: np.ndarray, max_steps: int = 100) -> np.ndarray:
    """Best-improvement swap moves on a predictor (no passes: the predictor answers), from ``start``."""
    mask, value = start, float(pred.predict(start[None])[0])
    for _ in range(max_steps):
        nb = problem.swaps(mask)
        if not len(nb):
            break
        vals = pred.predict(nb)
        j = int(np.argmin(vals))
        if vals[j] >= value - 1e-12:
            break
        mask, value = nb[j], float(vals[j])
    return mask


# ----------------------------------------------------------------------------------------------------
# the registry and one entry point

@dataclass(frozen=True)
class Search:
    """A method that spends a budget of passes to pick a mask. run(problem, meter, rng) spends through the
    meter and recommends picks; anytime: one run at the largest budget serves every smaller one."""
    name: str
    label: str
    run: Callable[[Problem, Meter, np.random.Generator], None]
    anytime: bool = True
    model: Callable[[Problem, Meter, np.random.Generator], Predictor] | None = None  # a loss model fitted at
    # the budget (for rank agreement with the truth); None: a pure search
    model_per_k: bool = True   # the model depends on the problem's k (e.g. masks sampled at that fraction)
    ours: bool = False
    description: str = ""


SEARCHES: dict[str, Search] = {}


def register_search(search: Search, *, replace: bool = False) -> Search:
    if search.name in SEARCHES and not replace:
        raise KeyError(f"a search named {search.name!r} is registered already; pass replace=True to override")
    SEARCHES[search.name] = search
    return search


for _s in (Search("random_search", "Random search", random_search),
           Search("greedy", "Greedy (SLEB / BlockPruner)", greedy),
           Search("evolution", "Evolution (EvoPress-style)", evolution),
           Search("linear_regression", "Linear regression (Bonsai / COAR)", linear_regression, anytime=False,
                  model=fit_linear),
           Search("pairwise_regression", "Pairwise regression", pairwise_regression, anytime=False,
                  model=fit_pairwise)):
    register_search(_s)


def run_search(name: str, problem: Problem, oracle: LossOracle, budgets: Sequence[float], seed: int = 0,
               trace: list[tuple[float, np.ndarray]] | None = None) -> list[dict[str, Any]]:
    """Method ``name``'s pick at every pass budget: rows of budget, spent (passes actually used, <= budget),
    mask (None when the budget was too small for any pick). ``trace``: a list that receives every pick an
    anytime method made, with the passes spent when it made it (its whole path to the largest budget)."""
    if name not in SEARCHES:
        raise KeyError(f"unknown search {name!r}; registered: {', '.join(SEARCHES)}")
    search, budgets = SEARCHES[name], sorted(float(b) for b in budgets)
    if not budgets:
        return []
    runs = [(max(budgets), budgets)] if search.anytime else [(b, [b]) for b in budgets]
    rows = []
    for cap, serves in runs:
        meter = oracle.meter(cap, name=f"{name} (k={problem.k})")
        try:
            search.run(problem, meter, np.random.default_rng(seed))
        except BudgetExhausted:
            pass  # whatever was recommended within the budget stands
        if trace is not None and search.anytime:
            trace.extend(meter.picks)
        for b in serves:
            spent = max((s for s, _ in meter.picks if s <= b + 1e-9), default=None)
            rows.append({"budget": b, "spent": spent, "mask": meter.pick_at(b), **meter.notes})
    return rows
