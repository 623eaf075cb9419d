"""Every method, registered once: zero-shot scorers and fitted surrogates behind one verb, ``fit_method``.

A method turns a ``Context`` (the model, its graph, the scoring subset, the masks measured on it) into a
``Predictor``: ``predict(masks)`` gives a predicted loss (or a quantity monotone in it) for any (M, E) masks
and ``importance`` the predicted cost of removing each edge alone. The registry also knows what a reader of
a results table needs: the method's label, whether it is this project's, whether it is fitted on measured
masks (and needs their outputs), and what it costs in passes over the scoring subset::

    from surrogate.methods import METHODS, fit_method
    pred = fit_method("superposition", ctx)          # ctx.measured: the prior design with outputs kept
    METHODS["taylor2"].passes(num_edges=18)          # {"forward": 1, "backward": 19}

Register your own with ``register_method``; the experiment protocol, ``auto_prune`` and the notebooks
all go through this table, in its order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from . import scorers as S
from . import surrogates as G
from .evaluate import Subset, Task, evaluate_masks
from .gating import GatedModel
from .masks import prior_design
from .readout import find_readout
from .scorers import Context, Measured, Predictor

__all__ = ["Method", "METHODS", "register_method", "fit_method", "measure_design", "method_names", "label"]

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


def _surrogate(cls: type) -> Callable[[Context], Predictor]:
    return lambda ctx: cls(ctx).fit(ctx.measured)


def _fitted(extra: int = 0) -> PassCount:
    return lambda e, k: (k + extra, 0)


def measure_design(gated: GatedModel, scoring: Subset, task: Task, methods: Iterable[str],
                   masks: np.ndarray | None = None, *, batch_size: int = 256, progress: bool = False) -> Measured:
    """Measure the fitting masks (default: the prior design, ``masks.prior_design``) once on ``scoring``,
    keeping the outputs, or the readout states, when one of ``methods`` is built from them: the ``measured``
    of the Context that every method is then fitted from. The experiment protocol, ``auto_prune`` and
    ``scenarios.method_picks`` all start here."""
    names = list(methods)
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise KeyError(f"unknown method(s) {', '.join(map(repr, unknown))}; registered: {', '.join(METHODS)}")
    design = prior_design(gated.graph.num_prunable) if masks is None else np.asarray(masks, dtype=np.float32)
    state = find_readout(gated) if any(METHODS[m].needs_state for m in names) else None
    result = evaluate_masks(gated, design, scoring, task, batch_size=batch_size, progress=progress,
                            keep_outputs=any(METHODS[m].needs_outputs for m in names), keep_state=state)
    return Measured.of(design, result)


for _m in (
    Method("random", "Random", S.random_scorer, lambda e, k: (0, 0)),
    Method("magnitude", "Magnitude (activation L1)", S.magnitude_scorer, lambda e, k: (1, 0)),
    Method("param_l1", "Magnitude (parameter L1)", S.param_l1_scorer, lambda e, k: (0, 0)),
    Method("taylor1", "Taylor, 1st order", S.taylor1_scorer, lambda e, k: (1, 1)),
    Method("taylor1_abs", "Taylor, 1st order, abs.", S.taylor1_abs_scorer, lambda e, k: (1, 1)),
    Method("taylor2", "Taylor, 2nd order", S.taylor2_scorer, lambda e, k: (1, 1 + e),
           description="S(1) + g.(m-1) + (m-1)^T H (m-1) / 2; H from E Hessian-vector products"),
    Method("connectivity", "Connectivity", S.connectivity_scorer, lambda e, k: (0, 0)),
    Method("loo", "Leave-one-out", S.loo_scorer, lambda e, k: (e + 1, 0),
           description="measured single-removal losses, summed (reused from the measured masks if there)"),
    Method("linear", "Linear regression", _surrogate(G.LinearSurrogate), _fitted(), fitted=True),
    Method("fcn", "FCN", _surrogate(G.MLPSurrogate), _fitted(), fitted=True),
    Method("prior_graph", "Graph (prior)", _surrogate(G.PriorGraphSurrogate), _fitted(), fitted=True),
    Method("flow", "Flow (ours, zero-shot)", S.flow_scorer, lambda e, k: (1, 0), ours=True),
    Method("graph_flow", "Graph-flow (ours)", _surrogate(G.GraphFlowSurrogate), _fitted(1), ours=True,
           fitted=True),
    Method("superposition", "Superposition (ours)", _surrogate(G.SuperpositionSurrogate), _fitted(1), ours=True,
           fitted=True, needs_outputs=True),
    Method("superposition_state", "Superposition, readout state (ours)",
           lambda ctx: G.SuperpositionSurrogate(ctx, readout="auto").fit(ctx.measured), _fitted(1), ours=True,
           fitted=True, needs_state=True,
           description="measured changes superposed at the readout state (surrogate.readout), then the true "
                       "tail of the network; output space where the graph has no readout"),
    Method("superposition_pairs", "Superposition + pairs (ours)",
           lambda ctx: G.SuperpositionSurrogate(ctx, readout="auto", pairs=True).fit(ctx.measured), _fitted(1),
           ours=True, fitted=True, needs_state=True,
           cost_in=lambda ctx: (len(ctx.measured) + 1 + len(G.pair_candidates(ctx)), 0),
           description="readout-state superposition plus the measured interaction of every pair of removable "
                       "edges (one extra pass per pair), weighted 2/r in a mask with r edges removed"),
):
    register_method(_m)

# the field's criteria (baselines.md), registered after the methods above
from . import baselines  # noqa: E402,F401
