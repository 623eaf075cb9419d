"""surrogate: computation-graph edge masking, importance scoring and surrogate-based structural pruning."""
from .graph import ComputationGraph, Edge, TraceError, Vertex, build_graph, trace
from .gating import GatedModel, check_mask, prune

__all__ = ["ComputationGraph", "Edge", "TraceError", "Vertex", "build_graph", "trace",
           "GatedModel", "check_mask", "prune"]
