"""Figures: a layered drawing of a computation graph with its prunable edges (and their importances)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

if TYPE_CHECKING:
    from .graph import ComputationGraph

__all__ = ["layered_layout", "draw_graph"]


def layered_layout(graph: "ComputationGraph") -> dict[str, tuple[float, float]]:
    """x = longest-path depth from the inputs; y = order within a layer (barycentre of predecessors)."""
    depth: dict[str, int] = {}
    preds: dict[str, list[str]] = {v.name: [] for v in graph.vertices}
    for e in graph.edges:
        preds[e.dst].append(e.src)
    for v in graph.vertices:  # topological order
        depth[v.name] = 1 + max((depth[p] for p in preds[v.name]), default=-1)
    layers: dict[int, list[str]] = {}
    for v in graph.vertices:
        layers.setdefault(depth[v.name], []).append(v.name)
    y: dict[str, float] = {}
    for d in sorted(layers):
        names = layers[d]
        bary = [np.mean([y[p] for p in preds[n]]) if preds[n] else i for i, n in enumerate(names)]
        order = [n for _, n in sorted(zip(bary, names), key=lambda t: t[0])]
        for i, n in enumerate(order):
            y[n] = i - (len(order) - 1) / 2
    return {n: (float(depth[n]), y[n]) for n in depth}


def _short(name: str, parts: int = 2) -> str:
    return ".".join(name.split(".")[-parts:])


def _fan_out(graph: "ComputationGraph", spread: float = 0.5) -> dict[int, float]:
    """Arc curvature of every edge that shares both of its vertices with other edges (the heads of an
    attention output projection), so that each stays visible: the k parallel edges fan out evenly over
    [-spread/2, spread/2]. Keyed by the edge's index in ``graph.edges``; other edges are left out."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i, e in enumerate(graph.edges):
        groups.setdefault((e.src, e.dst), []).append(i)
    return {i: spread * (j / (len(idx) - 1) - 0.5)
            for idx in groups.values() if len(idx) > 1 for j, i in enumerate(idx)}


def draw_graph(graph: "ComputationGraph", ax=None, importances: Sequence[float] | None = None,
               label_vertices: bool = True, cmap: str = "viridis", label: Callable[[str], str] | None = None):
    """Draw the vertex graph left to right. Prunable edges are thick (coloured by ``importances`` if
    given, one value per prunable edge), the other edges thin and grey; ``label`` maps a vertex name to its
    text (default: the last two parts of its path). Returns the matplotlib axes."""
    import matplotlib.pyplot as plt
    from matplotlib import cm, colors

    pos = layered_layout(graph)
    if ax is None:
        width = min(18.0, 2.0 + 0.35 * max(x for x, _ in pos.values()))
        height = min(10.0, 1.5 + 0.5 * (max(abs(y) for _, y in pos.values()) * 2 + 1))
        _, ax = plt.subplots(figsize=(width, height))
    gate = {e.name: i for i, e in enumerate(graph.prunable)}
    if importances is not None:
        imp = np.asarray(importances, dtype=float)
        if imp.shape != (graph.num_prunable,):
            raise ValueError(f"importances must have one value per prunable edge ({graph.num_prunable}), "
                             f"got shape {imp.shape}")
        norm = colors.Normalize(vmin=float(imp.min()), vmax=float(imp.max()) + 1e-12)
        mapper = cm.ScalarMappable(norm=norm, cmap=cmap)
    fan = _fan_out(graph)
    for i, e in enumerate(graph.edges):
        (x0, y0), (x1, y1) = pos[e.src], pos[e.dst]
        if e.name in gate:
            color = mapper.to_rgba(imp[gate[e.name]]) if importances is not None else "tab:red"
            ax.annotate("", xy=(x1, y1), xytext=(x0, y0), zorder=2,
                        arrowprops=dict(arrowstyle="-|>", color=color, lw=2.2, shrinkA=6, shrinkB=6,
                                        connectionstyle=f"arc3,rad={fan.get(i, 0.08)}"))
        else:
            ax.annotate("", xy=(x1, y1), xytext=(x0, y0), zorder=1,
                        arrowprops=dict(arrowstyle="-", color="0.75", lw=0.8, shrinkA=4, shrinkB=4,
                                        connectionstyle=f"arc3,rad={fan.get(i, 0.0)}"))
    style = {"input": ("tab:green", "s"), "output": ("tab:blue", "s"), "module": ("0.3", "o"),
             "op": ("tab:orange", "D")}
    for v in graph.vertices:
        c, mk = style[v.kind]
        x, y = pos[v.name]
        ax.scatter([x], [y], s=40, c=c, marker=mk, zorder=3)
        if label_vertices and len(graph.vertices) <= 60:
            ax.text(x, y + 0.18, (label or _short)(v.name), fontsize=6, ha="center", va="bottom", zorder=4)
    if importances is not None:
        ax.figure.colorbar(mapper, ax=ax, fraction=0.03, pad=0.01, label="edge importance")
    ax.set_axis_off()
    ax.margins(0.05)
    return ax
