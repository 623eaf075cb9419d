"""A readout state: a node of the traced graph that every input->output path passes through, after which
no edge is gated -- e.g. the residual stream of a ResNet before its last ReLU, or of a transformer before its
final norm and LM head -- and the *tail* of the network from that node to the output.

Surrogates that superpose measured changes can superpose them at the readout (where the network is additive
and the state is small: a transformer's hidden size instead of its vocabulary) and run the true tail on the
superposed state, so the loss of the prediction is computed exactly from it.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree

from .gating import GatedModel, gate_indices

__all__ = ["find_readout", "Tail"]


def _is_gate(n: fx.Node) -> bool:
    return gate_indices(n) is not None


def _tensors(gated: GatedModel, nodes: list[fx.Node]) -> set[fx.Node]:
    """Nodes that carry tensors (shape arithmetic excluded): recorded as tensors when traced, or gates."""
    info = gated.graph.node_info
    return {n for n in nodes if _is_gate(n) or isinstance(info.get(n.name), tuple)}


def _dependants(nodes: list[fx.Node], roots: set[fx.Node]) -> set[fx.Node]:
    """Nodes computed (transitively) from ``roots``, roots included."""
    out = set(roots)
    for n in nodes:
        if any(p in out for p in n.all_input_nodes):
            out.add(n)
    return out


def find_readout(gated: GatedModel) -> str | None:
    """The last node that takes a gated edge as input and through which every input->output path passes,
    with no gate after it. Where no gated edge enters such a node (e.g. only attention heads are gated, and
    the residual stream bypasses them): the first node after the last gate through which every path passes
    (the residual add after the last gated heads). None if there is none (the output is the last merge)."""
    g = gated.module.graph
    nodes = list(g.nodes)
    placeholders = {n for n in nodes if n.op == "placeholder"}
    tensors = _tensors(gated, nodes)
    data = _dependants(nodes, placeholders) & tensors
    output = next(n for n in nodes if n.op == "output")
    gates = [n for n in nodes if _is_gate(n)]
    if not gates:
        return None
    after_last_gate = _dependants(nodes, {gates[-1]})

    def candidate(n: fx.Node) -> bool:  # computed from the inputs after the last gate, and no gate after it
        return (n.op not in ("output", "placeholder") and n in data and n in after_last_gate and not _is_gate(n)
                and not any(_is_gate(d) for d in _dependants(nodes, {n}) - {n}))

    def cut(n: fx.Node) -> bool:  # without n, no tensor computed from the inputs reaches the output
        reach = set(placeholders)
        for m in nodes:
            if m is not n and (m in tensors or m is output) and any(p in reach for p in m.all_input_nodes):
                reach.add(m)
        return output not in reach

    for n in reversed(nodes):
        if candidate(n) and any(_is_gate(p) for p in n.all_input_nodes) and cut(n):
            return n.name
    for n in nodes:  # no gated edge enters a cut: the first cut after the last gate
        if candidate(n) and cut(n):
            return n.name
    return None


class Tail(nn.Module):
    """The network from the readout node ``name`` to the output: ``Tail(gated, name)(h, *inputs)`` gives the
    outputs the network computes when that node takes the value ``h`` (leading dimension: the batch); the
    inputs are only read for their shapes. Shares the model's modules; computes nothing upstream of the node."""

    def __init__(self, gated: GatedModel, name: str):
        super().__init__()
        src = gated.module.graph
        nodes = list(src.nodes)
        by_name = {n.name: n for n in nodes}
        if name not in by_name:
            raise KeyError(f"no node {name!r} in the traced graph")
        r = by_name[name]
        placeholders = [n for n in nodes if n.op == "placeholder"]
        data = _dependants(nodes, set(placeholders)) & _tensors(gated, nodes)
        down = _dependants(nodes, {r})
        output = next(n for n in nodes if n.op == "output")
        needed: set[fx.Node] = set()
        stack = [output]
        while stack:  # everything the output needs, stopping at the readout
            n = stack.pop()
            if n in needed:
                continue
            needed.add(n)
            if n is not r:
                stack.extend(n.all_input_nodes)
        bad = [n.name for n in needed if n in data and n not in down and n is not r and n.op != "placeholder"]
        if bad:
            raise ValueError(f"node {name!r} is not a readout: the output also depends on the inputs through "
                             f"{sorted(bad)[:3]}, which bypass it")
        if any(_is_gate(n) for n in needed if n in down and n is not r):
            raise ValueError(f"node {name!r} is not a readout: gated edges follow it")
        g = fx.Graph()
        env: dict[fx.Node, Any] = {r: g.placeholder("state")}
        for p in placeholders:  # the inputs only feed shape arithmetic here (e.g. a view to the batch size)
            env[p] = g.placeholder(p.name)
        for n in nodes:
            if n in needed and n is not r and n.op not in ("placeholder", "output"):
                env[n] = g.node_copy(n, lambda p: env[p])
        result = pytree.tree_map(lambda v: env[v] if isinstance(v, fx.Node) else v, output.args[0])
        g.output(result)
        self.spec = None
        if isinstance(src._codegen, fx.graph._PyTreeCodeGen):
            self.spec = src._codegen.pytree_info.out_spec
        self.module = fx.GraphModule(gated.module, g)
        self.name = name

    def forward(self, state: torch.Tensor, *inputs: torch.Tensor) -> Any:
        """The outputs for readout ``state``; ``inputs``: the model's inputs of the same samples (only their
        shapes may be read, by graphs that reshape to the batch size)."""
        out = self.module(state, *inputs)
        if self.spec is not None:
            out = pytree.tree_unflatten(list(out) if isinstance(out, (list, tuple)) else [out], self.spec)
        return out
