"""Forward passes as the common currency of mask searches and surrogates.

A *pass* is one forward pass of the gated network over the whole scoring subset with one mask (what measuring
one mask's loss costs). ``LossOracle`` measures masks on a subset and remembers every loss it measured, so
methods compared on one network share the compute; ``Meter`` is one method's account: it charges the method
for every mask *it* asks about (a mask measured on a fraction of the subset costs that fraction of a pass;
asking again for a mask it already paid for is free), charges any other work in pass units (e.g. a surrogate
running the network's tail to answer a query), refuses to overspend its budget, and records the method's
recommended mask after every step, so that one run at the largest budget gives the pick at every smaller one.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .evaluate import evaluate_masks
from .tasks import Subset, Task
from .gating import GatedModel
from .masks import mask_key
from .progress import Ticker

__all__ = ["LossOracle", "Meter", "BudgetExhausted"]


class BudgetExhausted(RuntimeError):
    """A method asked for more passes than its budget has left."""


class LossOracle:
    """S(m) on ``data`` (or on its first ``n`` samples: a cheaper, noisier fidelity), measured once per mask and
    fidelity and remembered. ``computed`` counts the masks actually run (the real compute, shared by every
    method that asks the same oracle)."""

    def __init__(self, gated: GatedModel, data: Subset, task: Task, *, batch_size: int = 256,
                 strategy: str = "stack"):
        if len(data) == 0:
            raise ValueError(f"the subset {data.name!r} is empty: a loss oracle needs samples to measure masks on")
        self.gated, self.data, self.task = gated, data, task
        self.batch_size, self.strategy = batch_size, strategy
        self._known: dict[tuple[bytes, int], float] = {}
        self._accuracy: dict[tuple[bytes, int], float] = {}
        self._states: dict[tuple[bytes, str], torch.Tensor] = {}
        self.computed = 0      # masks run (at any fidelity)
        self.seconds = 0.0     # wall time of running them ...
        self.passes_run = 0.0  # ... and how many whole passes they add up to (fidelities weighted)

    @property
    def num_edges(self) -> int:
        return self.gated.num_edges

    def samples(self, fraction: float) -> int:
        """How many leading samples a fidelity of ``fraction`` uses (at least one)."""
        if not 0 < fraction <= 1:
            raise ValueError(f"a fidelity is a fraction of the subset in (0, 1], got {fraction}")
        return max(1, min(len(self.data), round(fraction * len(self.data))))

    def losses(self, masks: np.ndarray, fraction: float = 1.0) -> np.ndarray:
        """(M,) mean loss of each mask on the first ``samples(fraction)`` samples; unknown masks are measured."""
        m = np.atleast_2d(np.asarray(masks, dtype=np.float32))
        n = self.samples(fraction)
        keys = [(mask_key(r), n) for r in m]
        first: dict[tuple[bytes, int], int] = {}
        for i, k in enumerate(keys):
            if k not in self._known:
                first.setdefault(k, i)
        todo = list(first.values())
        if todo:
            part = self.data[:n]
            data = self.data if n == len(self.data) else Subset(f"{self.data.name}[:{n}]", part.inputs, part.targets)
            # one mask per pass (or the prefix tree, equal bit for bit): a mask's loss never depends on which
            # other masks it was measured with, so every method sees the same number for it
            t0 = time.perf_counter()
            res = evaluate_masks(self.gated, m[todo], data, self.task, batch_size=self.batch_size,
                                 strategy=self.strategy, masks_per_pass=1 if self.strategy == "stack" else None)
            self.seconds += time.perf_counter() - t0
            self.passes_run += len(todo) * n / len(self.data)
            acc = res.accuracy if res.accuracy is not None else np.full(len(todo), np.nan)
            for i, loss, a in zip(todo, res.loss, acc):
                self._known[keys[i]] = float(loss)
                self._accuracy[keys[i]] = float(a)
            self.computed += len(todo)
        return np.array([self._known[k] for k in keys], dtype=np.float64)

    def accuracy(self, masks: np.ndarray) -> np.ndarray:
        """(M,) accuracy of each mask on the whole subset (NaN for tasks without one); measured if unknown."""
        m = np.atleast_2d(np.asarray(masks, dtype=np.float32))
        self.losses(m)
        return np.array([self._accuracy.get((mask_key(r), len(self.data)), np.nan) for r in m])

    def preload(self, masks: np.ndarray, losses: np.ndarray, accuracy: np.ndarray | None = None) -> None:
        """Remember losses (and accuracies) measured before on the whole subset, e.g. read from a truth table."""
        m = np.atleast_2d(np.asarray(masks, dtype=np.float32))
        acc = np.full(len(m), np.nan) if accuracy is None else np.asarray(accuracy, dtype=np.float64)
        for row, loss, a in zip(m, np.asarray(losses, dtype=np.float64), acc):
            key = (mask_key(row), len(self.data))
            self._known[key], self._accuracy[key] = float(loss), float(a)

    def table(self) -> list[tuple[np.ndarray, float, float]]:
        """Every (mask, loss, accuracy) known on the whole subset, in the order first measured or loaded."""
        n = len(self.data)
        return [(np.frombuffer(k, dtype=np.float32).copy(), v, self._accuracy.get((k, f), np.nan))
                for (k, f), v in self._known.items() if f == n]

    def states(self, masks: np.ndarray, node: str) -> tuple[np.ndarray, torch.Tensor]:
        """Losses (all samples) and the value of fx node ``node`` on every sample ((M, n, ...), on the CPU) under
        each mask, measured in the same passes and remembered (states take memory: n x the node's size each)."""
        m = np.atleast_2d(np.asarray(masks, dtype=np.float32))
        todo = [i for i, r in enumerate(m) if (mask_key(r), node) not in self._states]
        todo = list({mask_key(m[i]): i for i in reversed(todo)}.values())
        if todo:
            t0 = time.perf_counter()
            res = evaluate_masks(self.gated, m[todo], self.data, self.task, batch_size=self.batch_size,
                                 masks_per_pass=1, keep_state=node)
            self.seconds += time.perf_counter() - t0
            self.passes_run += len(todo)
            acc = res.accuracy if res.accuracy is not None else np.full(len(todo), np.nan)
            for i, loss, a, h in zip(todo, res.loss, acc, res.extra["state"]):
                self._known.setdefault((mask_key(m[i]), len(self.data)), float(loss))
                self._accuracy.setdefault((mask_key(m[i]), len(self.data)), float(a))
                self._states[(mask_key(m[i]), node)] = h
            self.computed += len(todo)
        return self.losses(m), torch.stack([self._states[(mask_key(r), node)] for r in m])

    def known(self, mask: np.ndarray, fraction: float = 1.0) -> float | None:
        """The remembered loss of ``mask`` at that fidelity, or None (nothing is measured)."""
        return self._known.get((mask_key(mask), self.samples(fraction)))

    def meter(self, budget: float, name: str = "search") -> "Meter":
        return Meter(self, float(budget), name=name)


@dataclass
class Meter:
    """One method's account with a ``LossOracle``: passes spent (``spent``) against ``budget``, the masks it has
    paid for, and its recommendations (``picks``: (passes spent, mask) after each step)."""
    oracle: LossOracle
    budget: float
    spent: float = 0.0
    picks: list[tuple[float, np.ndarray]] = field(default_factory=list)
    name: str = "search"
    _paid: dict[tuple[bytes, int], float] = field(default_factory=dict, repr=False)
    _paid_states: set[tuple[bytes, str]] = field(default_factory=set, repr=False)
    _ticker: Ticker | None = field(default=None, repr=False)
    measured: list[tuple[np.ndarray, float]] = field(default_factory=list, repr=False)  # full-fidelity, in order
    notes: dict[str, float] = field(default_factory=dict)  # what a method reports about its own cost

    @property
    def left(self) -> float:
        return self.budget - self.spent

    def cost(self, masks: np.ndarray, fraction: float = 1.0) -> float:
        """What measuring ``masks`` at that fidelity would cost this method (masks paid for before are free)."""
        n = self.oracle.samples(fraction)
        new = {mask_key(r) for r in np.atleast_2d(np.asarray(masks, dtype=np.float32))
               if (mask_key(r), n) not in self._paid}
        return len(new) * n / len(self.oracle.data)

    def can(self, masks: np.ndarray, fraction: float = 1.0) -> bool:
        return self.cost(masks, fraction) <= self.left + 1e-9

    def measure(self, masks: np.ndarray, fraction: float = 1.0) -> np.ndarray:
        """The losses of ``masks`` at that fidelity, charged to this method; BudgetExhausted (nothing charged or
        measured) if they cost more than is left."""
        m = np.atleast_2d(np.asarray(masks, dtype=np.float32))
        price = self.cost(m, fraction)
        if price > self.left + 1e-9:
            raise BudgetExhausted(f"measuring {len(m)} masks costs {price:.3g} passes, {self.left:.3g} left")
        losses = self.oracle.losses(m, fraction)
        n = self.oracle.samples(fraction)
        for row, loss in zip(m, losses):
            key = (mask_key(row), n)
            if key not in self._paid:
                self._paid[key] = float(loss)
                if n == len(self.oracle.data):
                    self.measured.append((row.copy(), float(loss)))
        self.spent += price
        self._report()
        return losses

    def _report(self) -> None:
        """A progress line every few minutes (surrogate.progress): passes spent, best loss so far, time left."""
        if self._ticker is None:
            self._ticker = Ticker(self.name, max(1, int(np.ceil(self.budget))))
        best = min((l for _, l in self.measured), default=float("nan"))
        self._ticker.what = f"{self.name} (best loss so far {best:.4f}): passes"
        self._ticker(int(self.spent))

    def states(self, masks: np.ndarray, node: str) -> tuple[np.ndarray, torch.Tensor]:
        """As ``measure`` on the whole subset, also returning the value of fx node ``node`` under each mask
        (``LossOracle.states``). A mask whose loss was paid for but not its state costs a pass again (the
        state needs the pass again); one whose state was paid for is free."""
        m = np.atleast_2d(np.asarray(masks, dtype=np.float32))
        new = {mask_key(r) for r in m if (mask_key(r), node) not in self._paid_states}
        if len(new) > self.left + 1e-9:
            raise BudgetExhausted(f"measuring {len(m)} masks costs {len(new)} passes, {self.left:.3g} left")
        losses, h = self.oracle.states(m, node)
        n = len(self.oracle.data)
        for row, loss in zip(m, losses):
            if (mask_key(row), n) not in self._paid:
                self._paid[(mask_key(row), n)] = float(loss)
                self.measured.append((row.copy(), float(loss)))
        self._paid_states |= {(k, node) for k in new}
        self.spent += len(new)
        self._report()
        return losses, h

    def record(self, mask: np.ndarray, loss: float, accuracy: float = float("nan")) -> None:
        """A whole-subset pass the method ran itself (e.g. with extra taps): charged as one pass, remembered by
        the oracle and the method like any measured mask (its loss must be what the oracle would measure)."""
        key = (mask_key(mask), len(self.oracle.data))
        if key in self._paid:
            return
        self.charge(1.0, "a pass run by the method")
        self.oracle.preload(np.asarray(mask, dtype=np.float32)[None], np.array([loss]), np.array([accuracy]))
        self._paid[key] = float(loss)
        self.measured.append((np.asarray(mask, dtype=np.float32).copy(), float(loss)))

    def charge(self, passes: float, what: str = "work") -> None:
        """Charge work other than measuring masks, in pass units (e.g. a surrogate's queries)."""
        if passes < 0:
            raise ValueError(f"cannot charge a negative number of passes ({what}: {passes})")
        if passes > self.left + 1e-9:
            raise BudgetExhausted(f"{what} costs {passes:.3g} passes, {self.left:.3g} left")
        self.spent += passes

    def recommend(self, mask: np.ndarray) -> None:
        """Record the method's current pick (after the passes spent so far)."""
        self.picks.append((self.spent, np.asarray(mask, dtype=np.float32).copy()))

    def pick_at(self, budget: float) -> np.ndarray | None:
        """The last recommendation made with at most ``budget`` passes spent (None if none was)."""
        found = None
        for spent, mask in self.picks:
            if spent <= budget + 1e-9:
                found = mask
        return found

    def best_measured(self, ok: np.ndarray | None = None) -> tuple[np.ndarray, float] | None:
        """The full-fidelity measured mask with the lowest loss (among rows where ``ok(mask)`` holds)."""
        rows = [(m, l) for m, l in self.measured if ok is None or ok(m)]
        return min(rows, key=lambda t: t[1]) if rows else None
