"""surrogate: computation-graph edge masking, importance scoring and surrogate-based structural pruning.

The names a user needs, in the order of use::

    graph = build_graph(model, example_inputs)            # vertices = layers, prunable edges = data flow
    gated = GatedModel(graph)                              # gated(x, mask=m): the network with edges removed
    result = evaluate_masks(gated, masks, Subset(...), Task("classification"))
    ctx = Context(graph, gated, scoring, task, Measured.of(masks, result))
    predictor = fit_method("superposition", ctx)           # any name in METHODS
    mask = select_mask(predictor, graph, Budget(edges=3))
    smaller = prune(graph, mask)                           # a physically smaller nn.Module
    auto_prune(model, scoring, task, Budget(params=0.8))   # all of the above in one call (<= 80% of the parameters)
    run_experiment(model, scoring, evaluation, task, ExperimentConfig(...))   # the studies' protocol
"""
# the method modules register their methods in METHODS on import; this order is the registry's order
from . import scorers  # noqa: F401,I001  (the classic zero-shot scorers)
from . import surrogates  # noqa: F401  (fitted surrogates of prior work, then this project's methods)
from . import baselines  # noqa: F401  (the field's criteria)
from .evaluate import MaskEval, Subset, Task, evaluate_masks
from .experiment import ExperimentConfig, GraphOptions, MaskFamily, run_experiment
from .gating import GatedModel, check_mask, prune
from .graph import ComputationGraph, TraceError, build_graph
from .masks import prior_design
from .methods import METHODS, Context, Measured, fit_method, register_method
from .pruning import Budget, auto_prune, select_mask

__all__ = ["build_graph", "ComputationGraph", "TraceError", "GatedModel", "check_mask", "prune",
           "Subset", "Task", "MaskEval", "evaluate_masks", "prior_design", "Measured", "Context",
           "METHODS", "fit_method", "register_method", "Budget", "select_mask", "auto_prune",
           "ExperimentConfig", "GraphOptions", "MaskFamily", "run_experiment"]
