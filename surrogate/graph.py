"""Computation graph of an arbitrary PyTorch model.

A model is traced (torch.fx first, torch.export as fallback) into an fx graph of tensor operations. Those
operations are grouped into *vertices* (by default: one vertex per call of a leaf module such as a Conv2d
or Linear, and one per free-standing tensor operation such as an ``add`` or ``cat``), and an *edge* is a
tensor that flows from one vertex into another. A subset of the edges is *prunable*: by default the
inputs of every structural merge (residual add, concatenation of branches, elementwise product of two
branches; not element-wise arithmetic on a single tensor, see ``build_graph``); optionally every edge.
Names are module paths, so ``"layer1.0.bn2 -> layer1.0.add"`` reads as "the residual branch of block
layer1.0". Optionally (``heads=``) the input of an attention output projection is split into one
prunable edge per attention head, named ``"... -> h.0.attn.c_proj[head 1]"``.
"""
from __future__ import annotations

import contextlib
import functools
import io
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, Sequence, Union

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch.utils import _pytree as pytree

from .measuring import measuring

__all__ = ["Vertex", "Edge", "HeadSplit", "ComputationGraph", "TraceError", "build_graph", "trace", "run_nodes",
           "run_node"]


class TraceError(RuntimeError):
    """The model could not be turned into a sound computation graph."""


# ----------------------------------------------------------------------------------------------------
# tracing

def _as_tuple(example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    inputs = tuple(example_inputs)
    if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
        raise TypeError("example_inputs must be a tensor or a tuple of tensors (the model's positional "
                        f"inputs); got {type(example_inputs).__name__}. Wrap a model with keyword "
                        "inputs in a small nn.Module whose forward takes tensors positionally.")
    return inputs


def _trace_fx(model: nn.Module) -> fx.GraphModule:
    return fx.symbolic_trace(model)


def _trace_export(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> fx.GraphModule:
    """torch.export with every dimension allowed to stay dynamic (export decides). The batch dimension must:
    a batch of masks is evaluated as one larger batch. Export fixes every dimension of size 0 or 1 to that
    size, so an example batch of 1 is traced repeated to a batch of 2 (the graph runs at batch 1 too)."""
    if inputs[0].dim() > 0 and inputs[0].shape[0] == 1:
        inputs = tuple(x.repeat(2, *([1] * (x.dim() - 1))) if x.dim() > 0 and x.shape[0] == 1 else x
                       for x in inputs)
    dyn = tuple({d: torch.export.Dim.AUTO for d in range(x.dim())} for x in inputs)
    was_training = model.training
    model.eval()  # the exported graph is specialised to eval mode (dropout off, running BN stats)
    try:
        ep = torch.export.export(model, inputs, dynamic_shapes=dyn, strict=False)
    finally:
        model.train(was_training)
    gm = ep.module()
    fixed = {n.name: int(v.shape[0]) for n in gm.graph.nodes if n.op == "placeholder"
             for v in [n.meta.get("val")] if isinstance(v, torch.Tensor) and v.dim() > 0
             and is_concrete_int(v.shape[0])}
    if fixed:
        raise TraceError(f"torch.export fixed dim 0 (the batch) of input(s) {fixed}: forward() ties it to that "
                         "size (e.g. a reshape to a literal batch size), so no other batch size or batch of masks "
                         "could run. Write the batch size as x.shape[0] or -1.")
    return gm


def trace(model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor],
          tracer: Literal["auto", "fx", "export"] = "auto") -> tuple[fx.GraphModule, str]:
    """Trace ``model`` into an fx.GraphModule; returns it with the name of the tracer that worked.

    "auto" tries torch.fx symbolic tracing (module-level graph, keeps train/eval behaviour) and falls back
    to torch.export (works for models with Python control flow such as Hugging Face transformers).
    The traced module is checked against the model on ``example_inputs``.
    """
    inputs = _as_tuple(example_inputs)
    if tracer not in ("auto", "fx", "export"):
        raise ValueError(f"tracer must be 'auto', 'fx' or 'export', got {tracer!r}")
    errors: list[str] = []
    with torch.no_grad():
        reference = model(*inputs)
    branching = []  # the tracers that failed on control flow over a tensor's value
    for name in (("fx", "export") if tracer == "auto" else (tracer,)):
        try:
            if name == "fx":
                gm = _trace_fx(model)
            else:  # export prints the partial graph of a failure to stderr: the reason is reported below
                with contextlib.redirect_stderr(io.StringIO()):
                    gm = _trace_export(model, inputs)
            _check_no_branches(model, gm)
            with torch.no_grad():
                out = gm(*inputs)
            _check_same(reference, out)
            return gm, name
        except Exception as exc:  # noqa: BLE001 - every failure is reported below
            if isinstance(exc, _Branches):
                raise TraceError(str(exc)) from None
            errors.append(f"  torch.{name}: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}")
            if "control flow" in str(exc) or "DataDependent" in type(exc).__name__:
                branching.append(name)
    if branching and len(branching) == len(errors):
        raise TraceError(
            f"{type(model).__name__}.forward branches on a tensor's value (an `if` or `while` on a tensor, or "
            "`.item()`), which a computation graph cannot hold:\n" + "\n".join(errors) + "\nWhat to change: "
            "compute both branches and select with torch.where(condition, a, b), or take the decision outside "
            "the traced forward (a flag or a module attribute set before build_graph).")
    raise TraceError(
        f"Could not trace {type(model).__name__} into a computation graph.\n" + "\n".join(errors) +
        "\nWhat to do: make forward() take tensors positionally and return tensors; avoid Python control "
        "flow on tensor values (torch.fx) or pass tracer='export'; "
        "for Hugging Face models call them with use_cache=False (see surrogate.models.CausalLMLogits).")


@contextlib.contextmanager
def _buffers_restored(model: nn.Module) -> Iterator[None]:
    """Give every buffer of ``model`` its value (and object) from before the block back, and warn if the
    block changed one: a forward that updates a buffer in place (a step counter, a running average outside
    BatchNorm) ran while tracing, and the traced graph does not reproduce such updates faithfully."""
    saved = [(f"{path}.{k}".lstrip("."), m, k, b, b.detach().clone())
             for path, m in model.named_modules() for k, b in m._buffers.items() if b is not None]
    try:
        yield
    finally:
        changed = [name for name, m, k, b, value in saved if m._buffers.get(k) is not b or not _same(b, value)]
        with torch.no_grad():
            for _, m, k, b, value in saved:
                m._buffers[k] = b
                b.copy_(value)
        if changed:
            more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
            warnings.warn(f"build_graph: the forward of {type(model).__name__} updates buffer(s) "
                          f"{', '.join(changed[:5])}{more} in place; tracing ran it, so their values from before "
                          "were restored. In-place buffer updates are not part of the computation graph: gated "
                          "and pruned models may skip or repeat them. Keep such state outside the traced "
                          "forward (or treat it as a constant).", stacklevel=4)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and (torch.equal(a, b) or (
        a.is_floating_point() and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)))


class _Branches(TraceError):
    """The traced graph holds a higher-order control-flow op (torch.cond, while_loop): not supported."""


def _check_no_branches(model: nn.Module, gm: fx.GraphModule) -> None:
    ops = {str(getattr(n.target, "__name__", n.target)) for n in gm.graph.nodes
           if n.op == "call_function" and isinstance(n.target, torch._ops.HigherOrderOperator)}
    if ops:
        raise _Branches(f"{type(model).__name__}.forward uses torch.{', torch.'.join(sorted(ops))}: not supported, "
                        "since the graph cannot see into its branches (their merges cannot be gated, their cost "
                        "is not counted). What to change: compute both branches and select with "
                        "torch.where(condition, a, b).")


def _check_same(a: Any, b: Any) -> None:
    la, lb = pytree.tree_leaves(a), pytree.tree_leaves(b)
    ta = [x for x in la if isinstance(x, torch.Tensor)]
    tb = [x for x in lb if isinstance(x, torch.Tensor)]
    if len(ta) != len(tb):
        raise TraceError(f"traced module returns {len(tb)} tensors, the model {len(ta)}")
    for x, y in zip(ta, tb):
        if x.shape != y.shape or not torch.allclose(x, y, rtol=1e-4, atol=1e-5, equal_nan=True):
            raise TraceError("traced module disagrees with the model on the example inputs "
                             "(data-dependent control flow baked into the trace?)")


# ----------------------------------------------------------------------------------------------------
# graph structure

@dataclass(frozen=True)
class Vertex:
    """A layer/module call or a free-standing operation."""
    name: str            # module path ("layer1.0.conv1", "@1" appended for a repeated call) or op name
    kind: str            # "input" | "module" | "op" | "output"
    op: str              # module class name, or canonical op name ("add", "cat", "linear", ...)
    nodes: tuple[str, ...] = field(repr=False)  # fx node names grouped into this vertex


@dataclass(frozen=True)
class Edge:
    """Data flow from vertex ``src`` into vertex ``dst`` (one or more fx tensors).

    ``part = (k, n)``: the edge is only the k-th of n equal chunks of the last dimension of that tensor
    (attention head k of an output projection's input, see ``build_graph(heads=...)``); the n chunk edges
    share ``links``."""
    src: str
    dst: str
    links: tuple[tuple[str, str], ...] = field(repr=False)  # (producer node, consumer node) pairs
    merge: str | None = None  # canonical merge op of the consumer ("add", "cat", "mul", ...) if any
    part: tuple[int, int] | None = None  # (head index, number of heads) of a head edge

    @property
    def name(self) -> str:
        return f"{self.src} -> {self.dst}" + (f"[head {self.part[0]}]" if self.part is not None else "")


@dataclass(frozen=True)
class HeadSplit:
    """An attention output projection whose input is split into one prunable edge per head."""
    vertex: str                         # the projection's vertex; its module path is the part before "@"
    layout: Literal["linear", "conv1d"]  # weight (out, in) as nn.Linear or (in, out) as transformers' Conv1D
    heads: int
    input: str                          # fx node of the projection's input (last dim = heads * head dim)
    output: str                         # fx node of the projection's output


# canonical op name -> value a removed input is replaced by (its neutral element)
MERGE_OPS: dict[str, str] = {"add": "zero", "sub": "zero", "cat": "zero", "concat": "zero",
                             "concatenate": "zero", "stack": "zero", "mul": "one"}


def _canonical_op(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_method":
        name = str(t)
    elif node.op == "call_function":
        if isinstance(t, torch._ops.OpOverload):
            name = t.overloadpacket.__name__
        elif isinstance(t, torch._ops.OpOverloadPacket):
            name = t.__name__
        else:
            name = getattr(t, "__name__", str(t))
    else:
        return node.op
    name = name.rstrip("_")
    return {"iadd": "add", "isub": "sub", "imul": "mul", "truediv": "div", "itruediv": "div"}.get(name, name)


VertexRule = Union[None, int, tuple, Callable[[str, nn.Module], bool]]
EdgeRule = Union[Literal["merge", "all"], Callable[["Edge"], bool]]


@dataclass
class ComputationGraph:
    """The vertex/edge view of a traced model, plus which edges are prunable (gated)."""
    module: fx.GraphModule
    vertices: list[Vertex]                      # topological order
    edges: list[Edge]                           # every data edge between vertices
    prunable: list[Edge]                        # the gated edges, in topological order of their dst
    tracer: str
    example_inputs: tuple[torch.Tensor, ...] = field(repr=False)
    node_info: dict[str, Any] = field(repr=False, default_factory=dict)  # node -> (shape, dtype) | None
    head_splits: dict[str, HeadSplit] = field(repr=False, default_factory=dict)  # projection vertex -> split

    # -- lookups ---------------------------------------------------------------------------------
    @property
    def edge_names(self) -> list[str]:
        return [e.name for e in self.prunable]

    @property
    def num_prunable(self) -> int:
        return len(self.prunable)

    def edge_index(self, name: str) -> int:
        for i, e in enumerate(self.prunable):
            if e.name == name:
                return i
        close = [e.name for e in self.prunable if name.split(" -> ")[0] in e.name][:5]
        raise KeyError(f"no prunable edge named {name!r}; the graph has {self.num_prunable} prunable edges"
                       f" (graph.edge_names lists them){'; similar: ' + ', '.join(close) if close else ''}")

    def edges_matching(self, pattern: str | None) -> np.ndarray:
        """(E,) booleans: the prunable edges whose name matches the regex ``pattern`` (``re.search``; None: all).
        ValueError when none does."""
        if pattern is None:
            return np.ones(self.num_prunable, dtype=bool)
        ok = np.array([re.search(pattern, n) is not None for n in self.edge_names], dtype=bool)
        if not ok.any():
            raise ValueError(f"no prunable edge matches {pattern!r}; edge names look like {self.edge_names[:3]}")
        return ok

    def vertex(self, name: str) -> Vertex:
        for v in self.vertices:
            if v.name == name:
                return v
        raise KeyError(f"no vertex named {name!r} (graph.vertices lists them)")

    @property
    def input_vertices(self) -> list[str]:
        return [v.name for v in self.vertices if v.kind == "input"]

    @property
    def output_vertex(self) -> str:
        return self.vertices[-1].name

    def mask_from_removed(self, removed: Iterable[str | int]) -> torch.Tensor:
        """All-ones mask with the named (or indexed) prunable edges set to 0."""
        m = torch.ones(self.num_prunable)
        for r in removed:
            m[r if isinstance(r, int) else self.edge_index(r)] = 0.0
        return m

    # -- connectivity ----------------------------------------------------------------------------
    def connected(self, masks: torch.Tensor | np.ndarray) -> np.ndarray:
        """For each binary mask (shape (E,) or (M, E)), whether some input->output path survives."""
        m = np.asarray(masks.detach().cpu() if isinstance(masks, torch.Tensor) else masks, dtype=bool)
        single = m.ndim == 1
        m = np.atleast_2d(m)
        if m.shape[1] != self.num_prunable:
            raise ValueError(f"masks have {m.shape[1]} entries, the graph has {self.num_prunable} "
                             "prunable edges")
        gate = {e.name: i for i, e in enumerate(self.prunable)}
        into: dict[str, list[Edge]] = {}
        for e in self.edges:
            into.setdefault(e.dst, []).append(e)
        reach = {v.name: np.full(len(m), v.kind == "input") for v in self.vertices}
        for v in self.vertices:  # topological order: reach(v) = OR over in-edges reach(u) AND kept(e)
            for e in into.get(v.name, ()):
                kept = m[:, gate[e.name]] if e.name in gate else True
                reach[v.name] = reach[v.name] | (reach[e.src] & kept)
        out = reach[self.output_vertex]
        return out[0] if single else out

    def summary(self) -> str:
        kinds = {k: sum(v.kind == k for v in self.vertices) for k in ("input", "module", "op", "output")}
        return (f"ComputationGraph(tracer={self.tracer}, vertices={len(self.vertices)} {kinds}, "
                f"edges={len(self.edges)}, prunable={self.num_prunable})")

    def __repr__(self) -> str:
        return self.summary()


# ----------------------------------------------------------------------------------------------------
# building

def _record_values(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    """Run the graph once and keep, for each node, (shape, dtype) of tensors (tuples for tuple outputs)."""
    info: dict[str, Any] = {}

    def summarise(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return (tuple(v.shape), v.dtype)
        if isinstance(v, (tuple, list)) and any(isinstance(x, torch.Tensor) for x in v):
            return [summarise(x) for x in v]
        return None

    def record(n: fx.Node, compute: Callable[[], Any]) -> Any:
        out = compute()
        info[n.name] = summarise(out)
        return out

    with torch.no_grad():
        run_nodes(gm, inputs, record)
    return info


def run_nodes(module: fx.GraphModule, inputs: Sequence[Any], hook: Callable[[fx.Node, Callable[[], Any]], Any]) -> Any:
    """Run a traced graph node by node: ``hook(node, compute)`` is called for every node, must call
    ``compute()`` (which runs the node) and return its value -- so it can record values, measure the cost
    of each node or stop early by raising. Returns the graph's output. The caller chooses grad and module
    modes (measurements wrap it in ``surrogate.measuring.measuring``)."""
    class _Hooked(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            return hook(n, lambda: super(_Hooked, self).run_node(n))

    return _Hooked(module).run(*inputs)


def run_node(module: fx.GraphModule, node: fx.Node, value: Callable[[fx.Node], Any]) -> Any:
    """Run one fx node of ``module`` (a call or an attribute read) with its input nodes' values given by
    ``value``: re-running a node on other inputs, outside a whole pass."""
    args, kwargs = fx.node.map_arg(node.args, value), fx.node.map_arg(node.kwargs, value)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    if node.op == "call_module":
        return module.get_submodule(node.target)(*args, **kwargs)
    if node.op == "get_attr":
        return functools.reduce(getattr, str(node.target).split("."), module)
    raise RuntimeError(f"cannot run fx node {node.format_node()} (op {node.op!r}) on its own")


def _is_float(info: Any) -> bool:
    return isinstance(info, tuple) and info[1].is_floating_point


def _has_tensor(info: Any) -> bool:
    return isinstance(info, tuple) or (isinstance(info, list) and any(_has_tensor(x) for x in info))


def _module_stack(node: fx.Node) -> list[tuple[str, str]]:
    """[(path, call suffix)] from outermost to innermost module, the root excluded."""
    stack = node.meta.get("nn_module_stack") or {}
    result = []
    for key, value in stack.items():
        path = value[0] if isinstance(value, tuple) else str(value)
        if not path:
            continue
        call = key.rsplit("@", 1)[1] if "@" in key else ""
        result.append((path, call))
    return result


def _vertex_rule(rule: VertexRule, model: nn.Module) -> Callable[[str], bool]:
    """Return is_unit(path): does a call of the module at ``path`` form one vertex?"""
    def module_at(path: str) -> nn.Module | None:
        try:
            return model.get_submodule(path)
        except AttributeError:
            return None

    def leaf(path: str) -> bool:
        m = module_at(path)
        return m is not None and next(m.children(), None) is None

    if rule is None:
        return leaf
    if isinstance(rule, int):
        return lambda p: p.count(".") + 1 == rule or (leaf(p) and p.count(".") + 1 < rule)
    if isinstance(rule, tuple):
        return lambda p: isinstance(module_at(p), rule) or leaf(p)
    if callable(rule):
        return lambda p: (module_at(p) is not None and rule(p, module_at(p))) or leaf(p)
    raise TypeError("vertices must be None (leaf modules), an int depth, a tuple of module classes, or a "
                    f"callable (path, module) -> bool; got {rule!r}")


def build_graph(model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor], *,
                vertices: VertexRule = None, edges: EdgeRule = "merge",
                exclude: str | None = None, tracer: Literal["auto", "fx", "export"] = "auto",
                heads: Mapping[str, int] | None = None) -> ComputationGraph:
    """Build the computation graph of ``model``.

    vertices: how fx operations group into vertices. None: one vertex per leaf-module call and per
        free-standing op; an int d: modules at depth d are vertices; a tuple of module classes (or a
        predicate (path, module) -> bool): calls of matching modules are vertices. Leaf modules are always
        units; the outermost matching module wins.
    edges: which edges are prunable. "merge": every floating-point input of a structural merge (below);
        "all": every floating-point edge except those into the output; or a predicate on Edge (every
        merge input, structural or not: ``lambda e: e.merge is not None``).
        A merge is an add, sub, cat, stack or mul with at least two floating-point inputs computed from the
        model's inputs. It is *structural* unless all its inputs derive from one common tensor through
        parameter-free vertices alone, i.e. unless no input passes through a layer (a vertex with
        parameters) since the inputs' last common ancestor. Cutting an input of a structural merge can
        remove computation; cutting one of a non-structural merge cannot (it only edits element-wise
        arithmetic on one tensor, such as the rotary-embedding ``q * cos + rotate_half(q) * sin`` inside
        attention). Residual adds ``x + f(x)``, concatenated branches (fire, inception), gated products
        (SwiGLU's ``act(gate(x)) * up(x)``, squeeze-excitation's ``x * scale``) are structural.
        A sum of several terms ``a + b + c`` (traced as nested adds) is one merge vertex, named after its
        last add, with one edge per term: a partial sum whose only user is another add of computed
        tensors is part of that add's vertex (outside module vertices; in every ``edges`` mode).
    exclude: optional regular expression; prunable edges whose name matches it are not gated (head edges
        included).
    heads: optional {pattern: number of heads}. Every module whose path (as in ``model.named_modules()``)
        matches a pattern (``re.search``, e.g. ``r"attn\.c_proj$"`` for GPT-2, ``r"self_attn\.o_proj$"`` for
        Llama) is an attention output projection (nn.Linear or transformers' Conv1D, called once): its
        input is split into that many equal chunks of the last dimension, one prunable edge per head,
        ``"<src> -> <projection>[head k]"``. These edges replace the projection's single input edge (in
        ``edges`` and, whatever ``edges=`` chose, among the prunable edges); removing every head of a
        projection cuts that path.
    """
    inputs = _as_tuple(example_inputs)
    # tracing runs the model: never in training mode (BatchNorm statistics, dropout), and buffers it updates
    # in place get their values back
    with measuring(model), _buffers_restored(model):
        gm, used = trace(model, inputs, tracer)
        info = _record_values(gm, inputs)
    nodes = _Nodes(model, gm, info, _vertex_rule(vertices, model))
    vertex_of, meta, order = _group(nodes)
    all_edges = _link(nodes, vertex_of)
    vnames = _toposort(list(meta), [(e.src, e.dst) for e in all_edges], order)
    vert = [Vertex(v, meta[v][0], meta[v][1],
                   tuple(n for n in vertex_of if vertex_of[n] == v)) for v in vnames]
    pos = {v: i for i, v in enumerate(vnames)}
    all_edges.sort(key=lambda e: (pos[e.dst], pos[e.src]))
    pick = _prunable(nodes, vert, all_edges, edges)
    splits: dict[str, HeadSplit] = {}
    if heads:
        all_edges, splits = _split_heads(model, heads, all_edges, vert, info, nodes.by_name)
        chosen = {e.name for e in pick}  # a split edge's name is gone: its head edges replace it
        pick = [e for e in all_edges if e.name in chosen or e.part is not None]
    if exclude is not None:
        pick = [e for e in pick if not re.search(exclude, e.name)]
    if not pick:
        warnings.warn(f"{type(model).__name__}: no prunable edges were found with edges={edges!r}: the model has "
                      "no structural merge (residual add, concatenated branches, gated product) left by the "
                      "other options; edges='all' gates every edge")
    return ComputationGraph(gm, vert, all_edges, pick, used, inputs, info, splits)


class _Nodes:
    """The nodes of a traced model and what grouping them into vertices needs: the data nodes (tensors
    computed from the inputs through tensor arguments; shape arithmetic excluded), which module calls are
    vertices (``is_unit``), and the free-standing sums."""

    def __init__(self, model: nn.Module, gm: fx.GraphModule, info: dict[str, Any], is_unit: Callable[[str], bool]):
        self.model, self.gm, self.info, self.is_unit = model, gm, info, is_unit
        self.nodes = list(gm.graph.nodes)
        self.by_name = {n.name: n for n in self.nodes}
        self.data: set[str] = set()
        for n in self.nodes:
            if n.op == "placeholder":
                if isinstance(info.get(n.name), tuple):
                    self.data.add(n.name)
            elif n.op in ("call_function", "call_method", "call_module") and _has_tensor(info.get(n.name)):
                if any(p.name in self.data for p in n.all_input_nodes):
                    self.data.add(n.name)
        # a partial sum (a sum whose only user is another sum) joins that sum's vertex: a + b + c is one merge
        # with one edge per term
        self.sum_into = {n.name: next(iter(n.users)) for n in self.nodes if len(n.users) == 1 and self.is_sum(n)
                         and self.is_sum(next(iter(n.users)))}

    def unit_of(self, n: fx.Node) -> tuple[str, str] | None:
        """(module path, call suffix) of the module call whose vertex holds ``n``; None for a free op."""
        unit = next(((p, c) for p, c in _module_stack(n) if self.is_unit(p)), None)
        return (str(n.target), "") if n.op == "call_module" and unit is None else unit

    def is_sum(self, n: fx.Node) -> bool:
        """A free-standing add of two computed floating-point tensors."""
        return (n.name in self.data and n.op in ("call_function", "call_method") and _canonical_op(n) == "add"
                and n.kwargs.get("alpha", 1) == 1 and self.unit_of(n) is None
                and sum(p.name in self.data and _is_float(self.info.get(p.name)) for p in _flat_inputs(n)) >= 2)


def _group(nodes: _Nodes) -> tuple[dict[str, str], dict[str, tuple[str, str]], dict[str, int]]:
    """The vertex of each data node, each vertex's (kind, op), and its position among the nodes."""
    vertex_of: dict[str, str] = {}
    meta: dict[str, tuple[str, str]] = {}  # vertex -> (kind, op)
    order: dict[str, int] = {}
    for i, n in enumerate(nodes.nodes):
        if n.name not in nodes.data and n.op != "output":
            continue
        if n.op == "placeholder":
            v, kind, op = n.name, "input", "input"
        elif n.op == "output":
            v, kind, op = "output", "output", "output"
        elif _is_pass_through(n, nodes.data, nodes.info):
            v = vertex_of[n.all_input_nodes[0].name]  # an alias of its input (e.g. a no-op dtype cast)
            kind, op = meta[v]
        elif (unit := nodes.unit_of(n)) is not None:
            v = unit[0] + (f"@{unit[1]}" if unit[1] else "")
            kind, op = "module", type(nodes.model.get_submodule(unit[0])).__name__ \
                if _safe_has(nodes.model, unit[0]) else "module"
        else:
            root = n
            while root.name in nodes.sum_into:  # the outermost sum of a chain names the vertex
                root = nodes.sum_into[root.name]
            stack = _module_stack(root)
            scope = stack[-1][0] if stack else ""
            v, kind, op = (f"{scope}.{root.name}" if scope else root.name), "op", _canonical_op(root)
        vertex_of[n.name] = v
        meta.setdefault(v, (kind, op))
        if n.name not in nodes.sum_into:  # a chain of sums sits where its outermost sum is
            order.setdefault(v, i)
    return vertex_of, meta, order


def _link(nodes: _Nodes, vertex_of: dict[str, str]) -> list[Edge]:
    """The edges between vertices (every data tensor from one vertex into another), each with the merge op of
    its consumer if that is a merge of two or more floating-point inputs."""
    links: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for n in nodes.nodes:
        if n.name not in vertex_of:
            continue
        for p in n.all_input_nodes:
            if p.name in nodes.data and vertex_of[p.name] != vertex_of[n.name]:
                links.setdefault((vertex_of[p.name], vertex_of[n.name]), []).append((p.name, n.name))
    edges: list[Edge] = []
    for (s, d), lk in links.items():
        merge = None
        consumers = {c for _, c in lk}
        # one op, or one chain of sums
        if len(consumers) == 1 or all(nodes.is_sum(nodes.by_name[c]) for c in consumers):
            c = nodes.by_name[next(iter(consumers))]
            op = _canonical_op(c)
            float_inputs = [p for p in _flat_inputs(c) if p.name in nodes.data and _is_float(nodes.info.get(p.name))]
            if op in MERGE_OPS and len(float_inputs) >= 2:
                merge = op
        edges.append(Edge(s, d, tuple(lk), merge))
    return edges


def _prunable(nodes: _Nodes, vertices: list[Vertex], edges: list[Edge], rule: EdgeRule) -> list[Edge]:
    """The edges that ``build_graph(edges=rule)`` gates (before heads and ``exclude``)."""
    def floating(e: Edge) -> bool:
        return all(_is_float(nodes.info.get(p)) for p, _ in e.links)

    if rule == "merge":
        structural = _structural_merges(vertices, edges,
                                        lambda v: _has_parameters(v, nodes.model, nodes.gm, nodes.by_name))
        return [e for e in edges if e.merge is not None and floating(e) and e.dst in structural]
    if rule == "all":
        return [e for e in edges if e.dst != "output" and floating(e)]
    if callable(rule):
        pick = [e for e in edges if rule(e)]
        bad = [e.name for e in pick if not floating(e)]
        if bad:
            raise ValueError(f"edges {bad[:3]} carry non-floating-point tensors and cannot be gated")
        return pick
    raise ValueError(f"edges must be 'merge', 'all' or a predicate on Edge, got {rule!r}")


def _has_parameters(vertex: Vertex, model: nn.Module, gm: fx.GraphModule, by_name: dict[str, fx.Node]) -> bool:
    """Whether a vertex is a layer: a call of a module with parameters, or operations reading a parameter."""
    path = vertex.name.split("@")[0]
    if vertex.kind == "module" and _safe_has(model, path) and \
            next(model.get_submodule(path).parameters(), None) is not None:
        return True
    for name in vertex.nodes:
        n = by_name[name]
        if n.op == "call_module" and next(gm.get_submodule(str(n.target)).parameters(), None) is not None:
            return True
        for p in n.all_input_nodes:
            if p.op == "get_attr" and isinstance(_attr(gm, str(p.target)), nn.Parameter):
                return True
    return False


def _attr(module: nn.Module, target: str) -> Any:
    for item in target.split("."):
        module = getattr(module, item, None)
    return module


def _structural_merges(vertices: list[Vertex], edges: list[Edge], is_layer: Callable[[Vertex], bool]) -> set[str]:
    """Merge vertices whose inputs do not all derive from one tensor through parameter-free vertices.

    source(v) is the vertex that v's value is computed from through parameter-free vertices alone: v itself
    for an input, a layer, or a vertex combining tensors of different sources; otherwise the one source of
    its inputs. A merge is structural if its merged inputs have more than one source."""
    preds: dict[str, list[str]] = {}
    merged: dict[str, list[str]] = {}
    for e in edges:
        preds.setdefault(e.dst, []).append(e.src)
        if e.merge is not None:
            merged.setdefault(e.dst, []).append(e.src)
    source: dict[str, str] = {}
    for v in vertices:  # topological order
        ups = {source[u] for u in preds.get(v.name, ())}
        source[v.name] = ups.pop() if len(ups) == 1 and v.kind != "input" and not is_layer(v) else v.name
    return {v for v, ins in merged.items() if len({source[u] for u in ins}) > 1}


def _projection_layout(module: nn.Module) -> Literal["linear", "conv1d"] | None:
    if isinstance(module, nn.Linear):
        return "linear"
    # transformers' Conv1D (GPT-2): forward = x @ weight + bias with weight (in, out); matched by name so
    # that transformers stays an optional dependency
    if type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers"):
        return "conv1d"
    return None


def _split_heads(model: nn.Module, heads: Mapping[str, int], edges: list[Edge], vertices: list[Vertex],
                 info: dict[str, Any], by_name: dict[str, fx.Node]
                 ) -> tuple[list[Edge], dict[str, HeadSplit]]:
    """Replace the input edge of every matching output projection by one edge per head."""
    modules = dict(model.named_modules())
    target: dict[str, int] = {}  # module path -> heads
    for pattern, n in heads.items():
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
            raise ValueError(f"heads[{pattern!r}] must be a positive int (the number of heads), got {n!r}")
        hits = [p for p in modules if p and re.search(pattern, p)]
        if not hits:
            linear = [p for p, m in modules.items() if p and _projection_layout(m) is not None][:6]
            raise ValueError(f"heads pattern {pattern!r} matches no module path of {type(model).__name__} "
                             f"(re.search on model.named_modules() paths; Linear/Conv1D modules are e.g. "
                             f"{', '.join(linear) or 'none'})")
        for p in hits:
            if p in target:
                raise ValueError(f"module {p!r} matches more than one heads pattern")
            target[p] = n
    vnames = {v.name: v for v in vertices}
    data = {x for v in vertices for x in v.nodes}  # shape arithmetic (sym_size, ...) is not data
    splits: dict[str, HeadSplit] = {}
    for path, n in target.items():
        layout = _projection_layout(modules[path])
        if layout is None:
            raise TypeError(f"heads: {path!r} is a {type(modules[path]).__name__}; supported output projections "
                            "are torch.nn.Linear and transformers.pytorch_utils.Conv1D")
        calls = [v for v in vnames if v == path or v.startswith(path + "@")]
        if not calls:
            raise ValueError(f"heads: module {path!r} is not a vertex of the traced graph (never called, or "
                             "grouped into a larger vertex: build with vertices=None)")
        if len(calls) > 1:
            raise ValueError(f"heads: module {path!r} is called {len(calls)} times (shared weights); head "
                             "pruning needs one call per projection")
        v = calls[0]
        ins = [e for e in edges if e.dst == v]
        producers = {p for e in ins for p, _ in e.links}
        inside = set(vnames[v].nodes)
        outs = [x for x in inside if any(u.name in data and u.name not in inside for u in by_name[x].users)]
        if len(ins) != 1 or len(producers) != 1 or len(outs) != 1:
            raise ValueError(f"heads: the call of {path!r} does not look like a projection of one tensor "
                             f"({len(producers)} input tensors, {len(outs)} outputs)")
        (p,) = producers
        width = info[p][0][-1] if isinstance(info.get(p), tuple) and info[p][0] else None
        weight = modules[path].weight
        in_features = weight.shape[1] if layout == "linear" else weight.shape[0]
        if width != in_features:
            raise ValueError(f"heads: the input of {path!r} has last dimension {width}, the module expects "
                             f"{in_features}")
        if width % n:
            raise ValueError(f"heads: the input of {path!r} has {width} features, which is not divisible into "
                             f"{n} heads")
        splits[v] = HeadSplit(v, layout, n, p, outs[0])
    result: list[Edge] = []
    for e in edges:
        if e.dst in splits:
            result += [Edge(e.src, e.dst, e.links, e.merge, (k, splits[e.dst].heads))
                       for k in range(splits[e.dst].heads)]
        else:
            result.append(e)
    return result, splits


_PASS_THROUGH = {"to", "alias", "contiguous", "detach", "type_as", "_to_copy", "clone", "lift_fresh_copy"}


def _is_pass_through(n: fx.Node, data: set[str], info: dict[str, Any]) -> bool:
    """A value-preserving op (same shape and dtype as its only data input): it joins its input's vertex,
    so that e.g. a residual read through a no-op cast is attributed to the layer that produced it."""
    if n.op not in ("call_function", "call_method") or _canonical_op(n) not in _PASS_THROUGH:
        return False
    ins = [p for p in n.all_input_nodes if p.name in data]
    return len(ins) == 1 and info.get(ins[0].name) == info.get(n.name) and ins[0].op != "placeholder"


def _safe_has(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


def _flat_inputs(node: fx.Node) -> list[fx.Node]:
    """Input nodes in argument order, with repeats (``x + x`` has two inputs)."""
    result: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda a: result.append(a) or a)
    return result


def _toposort(names: list[str], pairs: list[tuple[str, str]], order: dict[str, int]) -> list[str]:
    indeg = {v: 0 for v in names}
    out: dict[str, list[str]] = {v: [] for v in names}
    for s, d in pairs:
        indeg[d] += 1
        out[s].append(d)
    ready = sorted((v for v in names if indeg[v] == 0), key=order.get)
    result = []
    while ready:
        v = ready.pop(0)
        result.append(v)
        for d in out[v]:
            indeg[d] -= 1
            if indeg[d] == 0:
                ready.append(d)
        ready.sort(key=order.get)
    if len(result) != len(names):
        raise TraceError("grouping operations into vertices produced a cycle; choose finer vertices "
                         "(vertices=None groups by leaf module)")
    if result[-1] != "output":
        result.remove("output")
        result.append("output")
    return result
