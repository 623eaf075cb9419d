"""What a method is: what it sees (``Context``, with the ``Measured`` masks), what it gives (a ``Predictor``),
and the registry of every method by name, behind one verb, ``fit_method``.

A method turns a ``Context`` (the model, its graph, the scoring subset, the masks measured on it) into a
``Predictor``: ``predict(masks)`` gives a predicted loss (or a quantity monotone in it) for any (M, E) masks
and ``importance`` the predicted cost of removing each edge alone. The registry also knows what a reader of
a results table needs: the method's label, whether it is this project's, whether it is fitted on measured
masks (and needs their outputs), and what it costs in passes over the scoring subset::

    from surrogate.methods import METHODS, fit_method
    pred = fit_method("superposition", ctx)          # ctx.measured: the prior design with outputs kept
    METHODS["taylor2"].passes(num_edges=18)          # {"forward": 1, "backward": 19}

Each module of methods registers its own (``surrogate.scorers``, ``surrogate.surrogates``,
``surrogate.baselines``; importing ``surrogate`` imports them, in that order: the registry's order). Register
your own with ``register_method``; the experiment protocol, ``auto_prune`` and the notebooks all go through
this table, in its order.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable

import numpy as np
import torch

from .evaluate import Subset, Task, evaluate_masks
from .flow import measure_shares
from .gating import GatedModel
from .graph import ComputationGraph
from .masks import mask_key, prior_design
from .readout import find_readout

__all__ = ["Measured", "Context", "Predictor", "AdditivePredictor", "Method", "METHODS", "register_method",
           "fit_method", "measure_design", "fitting_context", "method_names", "label"]


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
        index = {mask_key(row): i for i, row in enumerate(self.masks)}
        rows = [index.get(mask_key(w)) for w in wanted]
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
            one = self.task.scored(self.gated(*self.scoring[:1].args(self.gated)))
        need = 8 * num_masks * len(self.scoring) * one.numel()  # float64 copies
        if need > limit:
            raise MemoryError(
                f"keeping the outputs of {num_masks} masks on {len(self.scoring)} scoring samples needs "
                f"{need / 2 ** 30:.1f} GiB (each sample's output has {one.numel()} values); use a smaller scoring "
                "subset (e.g. fewer sequences or shorter ones for a language model) or another surrogate")

    def shares(self) -> np.ndarray:
        """Measured merge shares of every vertex-graph edge (one pass over the scoring subset)."""
        if "shares" not in self.memo:
            self.memo["shares"] = measure_shares(self.graph, self.scoring, self.batch_size)
        return self.memo["shares"]


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


# ----------------------------------------------------------------------------------------------------
# the registry

PassCount = Callable[[int, int], tuple[int, int]]


@dataclass(frozen=True)
class Method:
    """One entry of the registry.

    build: Context -> Predictor (a surrogate is constructed and fitted on ``ctx.measured``).
    fitted: fitted on measured masks (needs ``ctx.measured``); needs_outputs: also their outputs
    (``evaluate_masks(..., keep_outputs=True)``), needs_state: their readout states
    (``keep_state=surrogate.readout.find_readout(gated)``); else it measures them itself.
    predicts: its ``predict`` is a loss model whose ranking of masks is meaningful; False for search methods
    (e.g. greedy removal) whose predictor only orders removals for picks under a budget.
    cost: (E, K) -> (forward, backward) passes over the scoring subset, K = number of measured masks it
    is fitted on (a mask's loss costs one forward pass). cost_in: for methods whose cost depends on the
    context (e.g. a greedy search reads ``ctx.removable`` and ``ctx.max_removed``), Context -> (forward,
    backward); ``passes_in(ctx)`` uses it when given."""
    name: str
    label: str
    build: Callable[[Context], Predictor]
    cost: PassCount
    ours: bool = False
    fitted: bool = False
    needs_outputs: bool = False
    needs_state: bool = False
    predicts: bool = True
    description: str = ""
    cost_in: Callable[[Context], tuple[int, int]] | None = None

    def passes(self, num_edges: int, num_masks: int = 0) -> dict[str, int]:
        """Forward and backward passes over the scoring subset this method costs."""
        f, b = self.cost(num_edges, num_masks)
        return {"forward": int(f), "backward": int(b)}

    def passes_in(self, ctx: Context) -> dict[str, int]:
        """The passes this method costs on ``ctx`` (its measured masks, removable edges and budget)."""
        if self.cost_in is not None:
            f, b = self.cost_in(ctx)
            return {"forward": int(f), "backward": int(b)}
        k = len(ctx.measured) if self.fitted and ctx.measured is not None else 0
        return self.passes(ctx.num_edges, k)


METHODS: dict[str, Method] = {}


def register_method(method: Method, *, replace: bool = False) -> Method:
    """Add ``method`` to the registry (at the end of its order)."""
    if method.name in METHODS and not replace:
        raise KeyError(f"a method named {method.name!r} is registered already; pass replace=True to override")
    METHODS[method.name] = method
    return method


def _get(name: str) -> Method:
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; registered: {', '.join(METHODS)}")
    return METHODS[name]


def fit_method(name: str, ctx: Context) -> Predictor:
    """The predictor of method ``name`` on ``ctx``: scored zero-shot, or fitted on ``ctx.measured``."""
    method = _get(name)
    if method.fitted and (ctx.measured is None or len(ctx.measured) == 0):
        raise ValueError(f"{name!r} is fitted on measured masks but the context has none: measure masks (e.g. "
                         "surrogate.masks.prior_design) with evaluate_masks and pass Context(..., measured="
                         "Measured.of(masks, result))")
    return method.build(ctx)


def method_names(names: Iterable[str] | None = None, *, ours: bool | None = None,
                 fitted: bool | None = None) -> list[str]:
    """Registered names in registry order (optionally only those in ``names``, ours / fitted or not)."""
    wanted = None if names is None else set(names)
    if wanted is not None:
        for n in wanted:
            _get(n)
    return [n for n, m in METHODS.items() if (wanted is None or n in wanted)
            and (ours is None or m.ours == ours) and (fitted is None or m.fitted == fitted)]


def label(name: str) -> str:
    """The display label of a registered method (the name itself for anything else, e.g. "oracle")."""
    return METHODS[name].label if name in METHODS else name


def measure_design(gated: GatedModel, scoring: Subset, task: Task, methods: Iterable[str],
                   masks: np.ndarray | None = None, *, batch_size: int = 256,
                   log: Callable[[str], None] | None = None) -> Measured:
    """Measure the fitting masks (default: the prior design, ``masks.prior_design``) once on ``scoring``,
    keeping the outputs, or the readout states, when one of ``methods`` is built from them: the ``measured``
    of the Context that every method is then fitted from (``fitting_context`` builds that Context)."""
    names = _registered(methods)
    design = prior_design(gated.graph.num_prunable) if masks is None else np.asarray(masks, dtype=np.float32)
    state = find_readout(gated) if any(METHODS[m].needs_state for m in names) else None
    result = evaluate_masks(gated, design, scoring, task, batch_size=batch_size, log=log,
                            keep_outputs=any(METHODS[m].needs_outputs for m in names), keep_state=state)
    return Measured.of(design, result)


def fitting_context(graph: ComputationGraph, scoring: Subset, task: Task, methods: Iterable[str],
                    masks: np.ndarray | None, *, seed: int = 0, batch_size: int = 256,
                    context_batch: int | None = None, removable: np.ndarray | None = None,
                    max_removed: int | None = None, log: Callable[[str], None] | None = None) -> Context:
    """The context that ``methods`` are fitted from: ``graph`` gated, and the fitting ``masks`` (e.g. the prior
    design, ``masks.prior_design``) measured once on ``scoring`` by ``measure_design`` (None: nothing
    measured, for zero-shot methods). ``removable``: which edges a pick may remove (None or all True: every
    edge); ``max_removed``: the most a pick removes. ``batch_size`` is the measurement's batch,
    ``context_batch`` (default: the same) that of the methods' own passes; ``log`` receives the measurement's
    progress lines. The experiment protocol, ``auto_prune`` and ``scenarios.method_picks`` all start here."""
    names = _registered(methods)
    gated = GatedModel(graph)
    measured = None if masks is None else measure_design(gated, scoring, task, names, masks, batch_size=batch_size,
                                                         log=log)
    if removable is not None and np.all(removable):
        removable = None
    return Context(graph, gated, scoring, task, measured, seed=seed,
                   batch_size=batch_size if context_batch is None else context_batch, removable=removable,
                   max_removed=max_removed)


def _registered(methods: Iterable[str]) -> list[str]:
    names = list(methods)
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise KeyError(f"unknown method(s) {', '.join(map(repr, unknown))}; registered: {', '.join(METHODS)}")
    return names
