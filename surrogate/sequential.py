"""This project's surrogate as a sequential design: a mask search that spends a budget of passes where they
change its pick.

The model of the loss of a pruned network (``SequentialModel``) has three parts:

1. *superposition* (``surrogates.SuperpositionSurrogate``): the readout state of a pruned network is the dense
   state plus the measured change of each removed unit, weighted along the graph; the network's true tail maps
   it to outputs and the loss is computed exactly (``base="loss"`` instead adds the measured single-removal
   losses: the same design without the superposition, an ablation);
2. *measured pairs*: for every pair of units measured together, the part of its state (or loss) that the
   superposition misses, weighted 2 / r in a mask with r units removed;
3. *a correction in loss space* from every other measured mask: kernel ridge regression of the residuals
   (measured minus predicted loss) on the removal sets, kernel exp(-Hamming distance / ``length``): exact on the
   measured masks, fading to the model above away from them.

The design (``sequential``), at one pruning budget (remove k units) and a budget of passes:
measure the dense network and every single removal (and the merge shares: one pass); then, while passes
remain, search the model for its best k-mask (beam search and swap moves on the model, no passes), measure the
pairs among that mask's removed units not yet measured, refit, and measure the (new) best predicted mask;
refit again. The pick is the best measured k-mask once one is measured (the model's best before). Every query
of the model that runs the network's tail is charged as the fraction of a pass the tail costs (measured with
torch's FLOP counter), so the pass count includes the surrogate's own compute.
"""
from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from .masks import mask_key
from .measuring import model_device
from .passes import BudgetExhausted, Meter
from .readout import Tail, find_readout
from .methods import Measured, Predictor
from .search import Problem, Search, local_search, register_search
from .surrogates import SuperpositionSurrogate
from .widehead import WideHeadLoss, split_head

__all__ = ["SequentialModel", "sequential", "fit_generic", "pass_flops"]


def _flops(fn) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def pass_flops(gated, node: str, probe: tuple[torch.Tensor, ...]) -> tuple[float, float]:
    """FLOPs per sample of the whole gated network and of its tail from readout ``node``, on the model's
    positional inputs ``probe``."""
    with torch.no_grad():
        _, taps = gated(*probe, taps=(node,))
    n = len(probe[0])
    whole = _flops(lambda: gated(*probe))
    return whole / n, _flops(lambda: Tail(gated, node)(taps[node], *probe)) / n


class _Superposition(SuperpositionSurrogate):
    """The superposition surrogate that counts its tail runs and forgets predictions a new pair changes."""
    tail_runs = 0            # masks answered by running the tail (not from memory)
    combine_flops = 0.0      # FLOPs of superposing the measured changes (and pairs) for those masks
    seconds = 0.0            # wall time of those answers
    wide: WideHeadLoss | None = None

    def _predict(self, m: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        self.tail_runs += len(m)
        self.combine_flops += 2.0 * len(m) * (self.num_edges + len(self.pair_index)) * self.y1.numel()
        out = super()._predict(m)
        self.seconds += time.perf_counter() - t0
        return out

    def _loss(self, y: torch.Tensor, targets: torch.Tensor) -> float:
        return self.wide.loss(y) if self.wide is not None else super()._loss(y, targets)

    def set_pairs(self, index: np.ndarray, interactions: torch.Tensor) -> None:
        new = {tuple(p) for p in index} - {tuple(p) for p in self.pair_index}
        self.pair_index, self.interactions = index, interactions
        if new:
            stale = [k for k in self._memo
                     if any(np.frombuffer(k, dtype=np.float32)[list(p)].max() < 0.5 for p in new)]
            for k in stale:
                del self._memo[k]


class SequentialModel(Predictor):
    """Loss model of the sequential design (module docstring), fitted on what a ``Meter`` measured."""

    def __init__(self, problem: Problem, base: str = "superposition", length: float = 2.0, ridge: float = 1e-6):
        if base not in ("superposition", "loss"):
            raise ValueError(f"unknown base {base!r}; use 'superposition' or 'loss'")
        self.problem, self.base, self.length, self.ridge = problem, base, length, ridge
        self.num_edges = problem.num_edges
        self.pairs: dict[tuple[int, int], float | torch.Tensor] = {}   # measured pair -> its interaction
        self.known: dict[bytes, float] = {}                            # every measured mask's loss
        self.sup: _Superposition | None = None

    # -- fitting ------------------------------------------------------------------------------------------
    def start(self, ones_loss: float, single_losses: np.ndarray, states: torch.Tensor | None = None,
              node: str | None = None) -> None:
        """The dense loss and single removals of the allowed units (and their readout states, for the
        superposition base); non-allowed units are never removed."""
        units, e = self.problem.units, self.num_edges
        self.s1 = ones_loss
        self.delta = np.zeros(e)
        self.delta[units] = np.asarray(single_losses) - ones_loss
        ones = np.ones(e, dtype=np.float32)
        self.known[mask_key(ones)] = ones_loss
        for u, loss in zip(units, single_losses):
            row = ones.copy()
            row[u] = 0
            self.known[mask_key(row)] = float(loss)
        if self.base == "superposition":
            ctx = self.problem.context
            h = states.double()
            dy = torch.zeros((e, *h.shape[1:]), dtype=torch.float64)
            dy[torch.as_tensor(units)] = h[1:] - h[0]
            ctx.memo[("states", node)] = (h[0], dy, states.dtype)
            self.sup = _Superposition(ctx, readout=node)
            self.sup.fit(Measured(ones[None], np.array([ones_loss])))
        self._residuals()

    def add_pair(self, i: int, j: int, loss: float, state: torch.Tensor | None = None) -> None:
        mask = np.ones(self.num_edges, dtype=np.float32)
        mask[[i, j]] = 0
        self.known[mask_key(mask)] = loss
        if self.sup is None:
            self.pairs[(i, j)] = loss - self.s1 - self.delta[i] - self.delta[j]
        else:
            base = self.sup.y1 + torch.tensordot(self.sup.coefficients(mask[None]), self.sup.dy, dims=1)[0]
            self.pairs[(i, j)] = (state.double() - base).float()
            index = np.array(list(self.pairs), dtype=np.int64).reshape(-1, 2)
            self.sup.set_pairs(index, torch.stack([self.pairs[tuple(p)] for p in index]))
        self._residuals()

    def add_mask(self, mask: np.ndarray, loss: float) -> None:
        self.known[mask_key(mask)] = float(loss)
        self._residuals()

    def _residuals(self) -> None:
        """Kernel ridge regression of measured-minus-modelled losses over every measured mask."""
        rows = np.stack([np.frombuffer(k, dtype=np.float32) for k in self.known])
        y = np.array(list(self.known.values()))
        self.rows = 1 - rows[:, self.problem.units]
        resid = y - self._model(rows)
        k = self._kernel(self.rows, self.rows)
        self.alpha = np.linalg.solve(k + self.ridge * np.eye(len(k)), resid)

    def _kernel(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        hamming = np.abs(a[:, None, :] - b[None, :, :]).sum(-1)
        return np.exp(-hamming / self.length)

    # -- predicting ---------------------------------------------------------------------------------------
    def _model(self, masks: np.ndarray) -> np.ndarray:
        if self.sup is not None:
            return self.sup.predict(masks)
        x = 1 - masks
        out = self.s1 + x @ self.delta
        if self.pairs:
            r = np.maximum(x.sum(1), 2)
            for (i, j), v in self.pairs.items():
                out = out + x[:, i] * x[:, j] * 2 / r * v
        return out

    def predict(self, masks: np.ndarray) -> np.ndarray:
        m = np.atleast_2d(np.asarray(masks, dtype=np.float32))
        out = self._model(m) + self._kernel(1 - m[:, self.problem.units], self.rows) @ self.alpha
        for i, row in enumerate(m):
            known = self.known.get(mask_key(row))
            if known is not None:
                out[i] = known
        return out

    @property
    def importance(self) -> np.ndarray:
        return self.delta

    @property
    def tail_runs(self) -> int:
        return 0 if self.sup is None else self.sup.tail_runs


def beam(model: Predictor, problem: Problem, width: int = 4) -> list[np.ndarray]:
    """Beam search on the model for masks removing k allowed units (kept connected): the final beam, best
    first."""
    frontier = np.ones((1, problem.num_edges), dtype=np.float32)
    for _ in range(problem.k):
        kids = []
        for m in frontier:
            for i in np.flatnonzero((m == 1) & problem.allowed):
                c = m.copy()
                c[i] = 0
                kids.append(c)
        kids = np.unique(np.stack(kids), axis=0)
        kids = kids[problem.ok(kids)]
        if not len(kids):
            raise ValueError(f"no connected mask removes {problem.k} allowed units")
        frontier = kids[np.argsort(model.predict(kids), kind="stable")[:width]]
    return list(frontier)


def _best_candidate(model: SequentialModel, problem: Problem, width: int) -> np.ndarray:
    """The model's best k-mask: the best of a beam search, improved by swap moves."""
    start = beam(model, problem, width)[0]
    return local_search(model, problem, start)


def _pairs_in(mask: np.ndarray, problem: Problem, model: SequentialModel) -> list[tuple[int, int]]:
    """Pairs of the mask's removed units not yet measured, the largest single effects first."""
    gone = [int(u) for u in problem.units if mask[u] == 0]
    pairs = [(i, j) for a, i in enumerate(gone) for j in gone[a + 1:] if (i, j) not in model.pairs]
    return sorted(pairs, key=lambda p: -abs(model.delta[p[0]]) * abs(model.delta[p[1]]))


class _Design:
    """What the design has measured, its model, and its account: measuring charges the meter, and so does every
    query of the model that runs the network's tail (``settle``)."""

    def __init__(self, problem: Problem, meter: Meter, base: str, length: float, wide_head: int | None):
        if problem.context is None or problem.context.gated is None:
            raise ValueError("the sequential design runs the model: give the Problem a scorers.Context")
        ctx = replace(problem.context, memo=dict(problem.context.memo))  # its own single-removal states
        self.problem, self.meter = replace(problem, context=ctx), meter
        self.model = SequentialModel(self.problem, base, length)
        e, units = problem.num_edges, problem.units
        design = np.ones((1 + len(units), e), dtype=np.float32)
        design[1 + np.arange(len(units)), units] = 0
        self.node, self.frac, self.settled, self.settled_flops, self.pass_flops = None, 0.0, 0, 0.0, 1.0
        if base == "loss":
            losses = meter.measure(design)
            self.model.start(losses[0], losses[1:])
            return
        self.node = find_readout(ctx.gated)
        if self.node is None:
            raise ValueError("the superposition base needs a readout state (surrogate.readout.find_readout "
                             "found none in this graph); use base='loss'")
        probe = ctx.scoring[:2].args(ctx.gated)
        meter.charge(2 * len(probe[0]) / len(ctx.scoring), "measuring the tail's share of a pass")
        whole, tail = pass_flops(ctx.gated, self.node, probe)
        self.frac, self.pass_flops = tail / whole, whole * len(ctx.scoring)
        dense = _dense_pass(ctx, self.node, meter)  # the dense network's loss, readout state and merge shares
        losses, states = meter.states(design[1:], self.node)
        self.model.start(dense[0], losses, torch.cat([dense[1][None], states]), self.node)
        if wide_head is not None:
            self.frac = _cheap_queries(self.model.sup, ctx, dense[1], self.frac, whole, wide_head, meter)
        self.settle()

    def settle(self) -> None:
        """Charge the model's queries since the last settlement: the tail runs (``frac`` of a pass each) and the
        arithmetic of superposing the measured changes, in passes by FLOPs; note the queries' cost so far."""
        sup = self.model.sup
        if sup is None:
            return
        flops = sup.combine_flops - self.settled_flops
        self.meter.charge((sup.tail_runs - self.settled) * self.frac + flops / self.pass_flops, "surrogate queries")
        self.settled, self.settled_flops = sup.tail_runs, sup.combine_flops
        self.meter.notes.update(queries=sup.tail_runs, query_seconds=sup.seconds,
                                query_passes=self.settled * self.frac + self.settled_flops / self.pass_flops)

    def measure(self, mask: np.ndarray) -> float:
        """Measure a mask (with its state, if any: a later pair may be this very mask) and add it to the model."""
        m = self.meter
        loss = float(m.states(mask, self.node)[0][0] if self.node is not None else m.measure(mask)[0])
        self.model.add_mask(mask, loss)
        self.settle()
        return loss

    def pair(self, i: int, j: int) -> bool:
        """Measure units i and j removed together and add their interaction (False: the pair cuts the network)."""
        mask = np.ones(self.problem.num_edges, dtype=np.float32)
        mask[[i, j]] = 0
        if not self.problem.ok(mask)[0]:
            return False
        if self.node is not None:
            loss, state = self.meter.states(mask, self.node)
            self.model.add_pair(i, j, float(loss[0]), state[0])
        else:
            self.model.add_pair(i, j, float(self.meter.measure(mask)[0]))
        self.settle()
        return True

    def candidate(self, width: int) -> np.ndarray:
        cand = _best_candidate(self.model, self.problem, width)
        self.settle()
        return cand

    def best(self) -> np.ndarray | None:
        found = self.meter.best_measured(lambda m: self.problem.feasible(m)[0])
        return None if found is None else found[0]


def sequential(problem: Problem, meter: Meter, rng: np.random.Generator, base: str = "superposition",
               width: int = 4, length: float = 2.0, wide_head: int | None = 1024) -> SequentialModel:
    """Run the sequential design (module docstring) until the meter's budget is spent (BudgetExhausted) or every
    k-mask is measured; returns its model. ``wide_head``: a tail ending in a linear head with at least this many
    outputs answers queries through ``surrogate.widehead.WideHeadLoss`` (None: always the exact tail)."""
    d = _Design(problem, meter, base, length, wide_head)
    cand = d.candidate(width)
    meter.recommend(cand)
    while meter.left > 1e-9:
        progressed = any([d.pair(i, j) for i, j in _pairs_in(cand, d.problem, d.model)])
        cand = d.candidate(width)
        if mask_key(cand) not in d.model.known:
            d.measure(cand)
            progressed = True
        meter.recommend(d.best() if d.best() is not None else cand)
        if not progressed:  # the model's best and its pairs are measured: measure its best neighbour
            if _explore(d) is None:
                break
            meter.recommend(d.best())
    return d.model


def fit_generic(problem: Problem, meter: Meter, rng: np.random.Generator, base: str = "superposition",
                length: float = 2.0, wide_head: int | None = 1024) -> SequentialModel:
    """The model without a target: the prior design, then pairs of allowed units in a seeded random order until
    the budget is spent (at E(E-1)/2 pairs: superposition_pairs' design). For rank agreement with the truth."""
    d = _Design(problem, meter, base, length, wide_head)
    units = problem.units
    pairs = [(int(i), int(j)) for a, i in enumerate(units) for j in units[a + 1:]]
    for p in rng.permutation(len(pairs)):
        if meter.left < 1 - 1e-9:
            break
        try:
            d.pair(*pairs[p])
        except BudgetExhausted:
            break
    return d.model


@torch.no_grad()
def _dense_pass(ctx, node: str, meter: Meter) -> tuple[float, torch.Tensor]:
    """One pass of the dense network over the scoring subset that yields its loss (recorded in the meter), its
    readout state and the merge shares (kept in ``ctx.memo`` for the superposition's flow weights)."""
    from .flow import ShareMeter
    from .measuring import measuring
    shares = ShareMeter(ctx.graph)
    data, task, bs = ctx.scoring, ctx.task, meter.oracle.batch_size
    taps = (node, *[t for t in shares.nodes if t != node])
    dev = model_device(ctx.gated)
    ones = torch.ones(ctx.num_edges, device=dev)
    total, correct, states = torch.zeros((), dtype=torch.float64), 0.0, []
    with measuring(ctx.gated):
        for x, y in data.batches(bs, ctx.gated, dev):
            out, tapped = ctx.gated(*x, mask=ones, taps=taps)
            loss, acc = task.per_sample(out, y)
            total += loss.double().sum().cpu()
            correct += float(acc.double().sum()) if acc is not None else float("nan")
            states.append(tapped[node].cpu())
            shares.add({t: tapped[t] for t in shares.nodes})
    ctx.memo["shares"] = shares.shares()
    loss = float((total / len(data)).numpy())
    meter.record(np.ones(ctx.num_edges, dtype=np.float32), loss, correct / len(data))
    return loss, torch.cat(states)


def _cheap_queries(sup: _Superposition, ctx, dense: torch.Tensor, frac: float, whole: float, wide: int,
                   meter: Meter) -> float:
    """Answer the superposition's queries through a WideHeadLoss when the tail ends in a linear head with at
    least ``wide`` outputs (its set-up runs the head once on the dense state: charged as one tail run); returns
    the fraction of a pass one query costs (``whole``: FLOPs of the network per sample)."""
    parts = split_head(sup.tail)
    if parts is None or parts[1].shape[0] < wide:
        return frac
    meter.charge(frac, "the wide head's candidates on the dense state")
    sup.wide = WideHeadLoss(sup.tail, dense, ctx.scoring.args(ctx.gated), ctx.scoring.targets, ctx.task)
    return sup.wide.flops(dense) / (whole * len(ctx.scoring))


def _explore(d: _Design) -> np.ndarray | None:
    """Measure the model's best unmeasured swap neighbour of the best measured k-mask that has one (None: the
    neighbourhoods of every measured k-mask are measured; swaps connect all k-masks, so the space is)."""
    measured = sorted((l, i, m) for i, (m, l) in enumerate(d.meter.measured) if d.problem.feasible(m)[0])
    for _, _, mask in measured:
        nb = d.problem.swaps(mask)
        nb = nb[[mask_key(m) not in d.model.known for m in nb]] if len(nb) else nb
        if len(nb):
            pick = nb[int(np.argmin(d.model.predict(nb)))]
            d.measure(pick)
            return pick
    return None


register_search(Search("sequential", "Superposition, sequential (ours)", sequential, ours=True, model=fit_generic,
                       model_per_k=False,
                       description="prior design, then pairs of the model's best mask and the mask itself, refitted"))
register_search(Search("sequential_loss", "Single + pairs in loss space, sequential",
                       lambda p, m, r: sequential(p, m, r, base="loss"),
                       model=lambda p, m, r: fit_generic(p, m, r, base="loss"), model_per_k=False,
                       description="the same design composed in loss space (no superposition): an ablation"))
