"""Edge gates on a traced model, and physical removal of cut edges.

``GatedModel(graph)`` multiplies every prunable edge's tensor by a scalar gate. A removed input of a merge
is replaced by the merge's neutral element: 0 for add/cat/stack (and for every edge in "all" mode), 1 for
a product of two branches (removing a squeeze-excitation scale leaves the features unscaled). The gate
expression is ``x * g`` (zero-neutral) or ``x * g + (1 - g)`` (one-neutral): with g = 1 both are exactly x,
so the all-ones mask reproduces the traced model bit for bit.

``prune(graph, mask)`` builds a smaller module in which cut edges are not computed: a cut term of an add is
dropped, any other cut tensor becomes a constant (zeros or ones, of the shape the tensor would have at the
current inputs, so the pruned model runs at any input shape the original accepts), and dead-code elimination
removes every operation and parameter that only fed removed edges.

Head edges (``build_graph(heads=...)``) gate the chunks of an output projection's input one by one; pruning
them drops the removed heads' input columns from the projection's weight.
"""
from __future__ import annotations

import contextlib
import copy
import operator
import weakref
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import _disable_current_modes

from .graph import MERGE_OPS, ComputationGraph, Edge, HeadSplit, _canonical_op, run_nodes
from .measuring import measuring, model_device

__all__ = ["GatedModel", "prune", "check_mask", "EmptyProjection"]

_GATES_ATTR = "_surrogate_gates"


def _gate(x: torch.Tensor, gates: torch.Tensor | tuple[float, ...], index: int, neutral_one: bool) -> torch.Tensor:
    """Gate ``x`` by gates[..., index]. gates is a tuple of floats (one mask, no gradient: a kept edge
    costs nothing), a tensor (E,) (one mask, differentiable), or (M, E) for M masks (batch-major x)."""
    if isinstance(gates, tuple):
        g = gates[index]
        if g == 1.0:
            return x  # == x * 1 exactly
        return x * g + (1.0 - g) if neutral_one else x * g
    g = gates[..., index]
    if g.dim() == 1:  # M masks: x holds M consecutive copies of the data batch along dim 0
        m = g.shape[0]
        if x.dim() == 0 or x.shape[0] % m:
            raise RuntimeError(f"cannot apply {m} masks to a tensor of shape {tuple(x.shape)}: a batch of "
                               "masks needs every gated tensor to carry the batch in dimension 0")
        g = g.to(x.dtype).view(m, *([1] * x.dim()))
        xs = x.unflatten(0, (m, -1))
        return (xs * g + (1 - g) if neutral_one else xs * g).flatten(0, 1)
    g = g.to(x.dtype)
    return x * g + (1 - g) if neutral_one else x * g


torch.fx.wrap("_gate")


def _gate_heads(x: torch.Tensor, gates: torch.Tensor | tuple[float, ...], indices: tuple[int, ...]
                ) -> torch.Tensor:
    """Gate chunk k of the last dimension of ``x`` (len(indices) equal chunks, one per head) by
    gates[..., indices[k]]; index -1 marks a head that is not prunable (gate 1). Gates as in ``_gate``."""
    n = len(indices)
    if isinstance(gates, tuple):
        values = [1.0 if i < 0 else gates[i] for i in indices]
        if all(v == 1.0 for v in values):
            return x  # the all-ones mask leaves the model bit for bit unchanged
        g = torch.tensor(values, dtype=x.dtype, device=x.device)
    else:
        ones = gates.new_ones(gates.shape[:-1] + (1,))  # index -1 picks this constant 1 (differentiable)
        g = torch.cat([gates, ones], -1)[..., list(indices)].to(x.dtype)
    if g.dim() == 1:
        return (x.unflatten(-1, (n, -1)) * g.unsqueeze(-1)).flatten(-2)
    m = g.shape[0]  # M masks: x holds M consecutive copies of the data batch along dim 0
    if x.dim() < 2 or x.shape[0] % m:
        raise RuntimeError(f"cannot apply {m} masks to a tensor of shape {tuple(x.shape)}: a batch of masks "
                           "needs every gated tensor to carry the batch in dimension 0")
    xs = x.unflatten(0, (m, -1)).unflatten(-1, (n, -1))             # (M, B, ..., heads, head dim)
    return (xs * g.view(m, *([1] * (x.dim() - 1)), n, 1)).flatten(-2).flatten(0, 1)


torch.fx.wrap("_gate_heads")


def gate_indices(node: fx.Node) -> tuple[int, ...] | None:
    """The mask entries a gate node reads, or None for any other node."""
    if node.op != "call_function":
        return None
    if node.target is _gate:
        return (node.args[2],)
    if node.target is _gate_heads:
        return tuple(i for i in node.args[2] if i >= 0)
    return None


def _neutral_one(edge: Edge) -> bool:
    return edge.merge is not None and MERGE_OPS.get(edge.merge) == "one"


def check_mask(mask: Any, num_edges: int, *, binary: bool = False, batch: bool = True,
               allow_extrapolation: bool = False) -> torch.Tensor:
    """Validate a mask (or a batch of masks) and return it as a float tensor.

    Entries lie in [0, 1] (0 removes an edge, 1 keeps it, values between interpolate), or are 0/1 only with
    ``binary``. ``allow_extrapolation`` admits any finite value (for derivatives with respect to the gates)."""
    if not isinstance(mask, torch.Tensor):
        try:
            mask = torch.as_tensor(mask)
        except Exception as exc:  # noqa: BLE001
            raise TypeError(f"mask must be a tensor or array of shape ({num_edges},) or (M, {num_edges}), "
                            f"got {type(mask).__name__}") from exc
    if mask.is_meta:
        raise ValueError("the mask is on the meta device, which holds no values: create it on the CPU or the "
                         "model's device (e.g. torch.ones(num_edges))")
    if mask.dtype == torch.bool:
        mask = mask.float()
    elif not (mask.dtype.is_floating_point or mask.dtype in (torch.int8, torch.int16, torch.int32,
                                                               torch.int64, torch.uint8)):
        raise TypeError(f"mask dtype {mask.dtype} is not supported; use bool, int or float")
    elif not mask.dtype.is_floating_point:
        mask = mask.float()
    if mask.dim() not in ((1, 2) if batch else (1,)) or mask.shape[-1] != num_edges:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but the graph has {num_edges} prunable edges: "
                         f"pass shape ({num_edges},){' or (M, %d) for M masks' % num_edges if batch else ''}"
                         " (graph.edge_names gives the order)")
    if not torch.isfinite(mask).all():
        raise ValueError("mask contains NaN or infinite values")
    if binary and not ((mask == 0) | (mask == 1)).all():
        raise ValueError("this operation needs a binary mask (entries 0 or 1); got other values")
    outside = (mask < 0) | (mask > 1)
    if not allow_extrapolation and bool(outside.any()):
        values = sorted({float(v) for v in mask.detach()[outside].flatten()[:5]})
        raise ValueError(f"mask entries must lie in [0, 1] (0 removes an edge, 1 keeps it); got {values}. Gates "
                         "outside [0, 1] extrapolate the model beyond any pruned network and only make sense for "
                         "derivatives: pass allow_extrapolation=True if you mean it")
    return mask


class GatedModel(nn.Module):
    """The traced model with one gate per prunable edge: ``gated(x, mask=m)`` (several inputs: ``gated(ids,
    attention_mask, mask=m)``, in the order the model was traced with).

    mask: None (all ones), shape (E,) for one mask, or (M, E) for M masks evaluated in one pass over an
    M-times replicated batch; outputs then have a leading dimension M (shape (M, B, ...); every output tensor
    with the batch in dimension 0). Where one pass would gate the wrong rows (``can_stack``: a mixture of
    experts), the M masks run one after the other, with the same result. Gates may be continuous in [0, 1]
    and require grad (for gradients/Hessians with respect to the gates); values outside [0, 1] are rejected
    unless ``allow_extrapolation=True``.

    A gated call runs the model in eval mode (BatchNorm reads its running statistics and does not update
    them, dropout is off) and gives every module its own mode back afterwards, whatever mode the model was
    left in: measuring a mask never changes the model. ``GatedModel(graph, train=True)`` runs the modules in
    their own modes instead (to train through the gates; BatchNorm then updates the model's statistics).
    """

    def __init__(self, graph: ComputationGraph, *, train: bool = False):
        super().__init__()
        self.graph = graph
        self.train_mode = bool(train)  # run in the modules' own modes (else in eval mode)
        self._can_stack: bool | None = None  # probed on the first call with several masks
        src = graph.module
        g = copy.deepcopy(src.graph)
        by_name = {n.name: n for n in g.nodes}
        # after the inputs (torch.export puts parameter reads before them): a gated input is read after it
        last_input = [n for n in g.nodes if n.op == "placeholder"][-1]
        with g.inserting_after(last_input):
            gates_node = g.get_attr(_GATES_ATTR)
        heads: dict[str, list[int]] = {}  # projection vertex -> prunable index of each head (-1: not gated)
        for i, edge in enumerate(graph.prunable):
            if edge.part is not None:
                heads.setdefault(edge.dst, [-1] * edge.part[1])[edge.part[0]] = i
                continue
            made: dict[str, fx.Node] = {}
            for p, c in edge.links:
                producer, consumer = by_name[p], by_name[c]
                if p not in made:
                    after = producer if producer.op != "placeholder" else gates_node
                    with g.inserting_after(after):
                        made[p] = g.call_function(_gate, (producer, gates_node, i, _neutral_one(edge)))
                consumer.replace_input_with(producer, made[p])
        for v, indices in heads.items():  # one gate node per projection input, gating each head's chunk
            split = graph.head_splits[v]
            producer = by_name[split.input]
            after = producer if producer.op != "placeholder" else gates_node
            with g.inserting_after(after):
                gated = g.call_function(_gate_heads, (producer, gates_node, tuple(indices)))
            for c in {c for e in graph.edges if e.dst == v for _, c in e.links}:
                by_name[c].replace_input_with(producer, gated)
        g.lint()
        setattr(src, _GATES_ATTR, None)  # the attribute the get_attr node reads; set per forward call
        try:
            self.module = fx.GraphModule(src, g)
        finally:
            delattr(src, _GATES_ATTR)

    @property
    def num_edges(self) -> int:
        return self.graph.num_prunable

    def tapped(self, taps: Sequence[str]) -> tuple[fx.GraphModule, Any]:
        """The gated graph returning ``(output, value of node t for t in taps)`` and, for exported graphs, the
        tree spec of the output (None for fx); cached per set of taps."""
        taps = tuple(taps)
        cache = self.__dict__.setdefault("_tap_modules", {})  # a plain dict: not registered as submodules
        if taps not in cache:
            g = copy.deepcopy(self.module.graph)
            nodes = {n.name: n for n in g.nodes}
            missing = [t for t in taps if t not in nodes]
            if missing:
                raise KeyError(f"no node named {missing} in the traced graph; node names are those of "
                               "graph.module.graph.nodes (e.g. a vertex's last node in graph.vertex(name).nodes)")
            out = next(n for n in g.nodes if n.op == "output")
            spec = None
            if isinstance(g._codegen, fx.graph._PyTreeCodeGen):  # exported graphs: flat outputs + a tree spec
                spec = g._codegen.pytree_info.out_spec
                g._codegen = fx.graph.CodeGen()
            out.args = ((out.args[0], *(nodes[t] for t in taps)),)
            gm = fx.GraphModule(self.module, g)
            cache[taps] = (gm, spec)
        return cache[taps]

    @property
    def input_names(self) -> list[str]:
        """The names of the model's inputs, in the order it was traced with (and takes them)."""
        return [n.name for n in self.graph.module.graph.nodes if n.op == "placeholder"]

    def forward(self, *inputs: torch.Tensor, mask: Any = None, allow_extrapolation: bool = False,
                taps: Sequence[str] = ()) -> Any:
        """The network's output under ``mask``; with ``taps`` (fx node names), ``(output, {name: value})``:
        the values those nodes take in the same pass (e.g. the residual stream before the network's head)."""
        traced = tuple((tuple(x.shape), x.dtype) for x in self.graph.example_inputs)
        _check_inputs(inputs, traced, "the gated model", self.input_names)
        device = model_device(self.module, default=inputs[0].device)
        gates = self._gates(mask, allow_extrapolation, device)
        with contextlib.nullcontext() if self.train_mode else measuring(self.module):
            if isinstance(gates, torch.Tensor) and gates.dim() == 2 and not self.can_stack(inputs):
                outs = [self._run(inputs, _one_mask(row), taps, traced) for row in gates]
                return pytree.tree_map(lambda *v: torch.stack(v) if isinstance(v[0], torch.Tensor) else v[0], *outs)
            return self._run(inputs, gates, taps, traced)

    def _gates(self, mask: Any, allow_extrapolation: bool, device: torch.device
               ) -> torch.Tensor | tuple[float, ...]:
        """The gates of ``mask``: a tuple of floats for one mask without gradient (a kept edge costs
        nothing), else a tensor (E,) or (M, E) on ``device``."""
        if mask is None:
            return (1.0,) * self.num_edges
        gates = check_mask(mask, self.num_edges, allow_extrapolation=allow_extrapolation).to(device)
        return _one_mask(gates) if gates.dim() == 1 else gates

    def _run(self, inputs: Sequence[torch.Tensor], gates: torch.Tensor | tuple[float, ...], taps: Sequence[str],
             traced: Sequence[tuple[tuple[int, ...], torch.dtype]]) -> Any:
        """One pass of the gated graph; M stacked masks (gates (M, E)) run on the M-times repeated batch."""
        m = gates.shape[0] if isinstance(gates, torch.Tensor) and gates.dim() == 2 else 0
        given = inputs
        if m:
            inputs = tuple(x.repeat(m, *([1] * (x.dim() - 1))) for x in inputs)
        module, spec = self.tapped(taps) if taps else (self.module, None)
        setattr(module, _GATES_ATTR, gates)
        try:
            out = module(*inputs)
        except Exception as exc:
            raise RuntimeError(_forward_failed(exc, given, traced)) from exc
        finally:
            setattr(module, _GATES_ATTR, None)
        if spec is not None:
            out = (pytree.tree_unflatten(list(out[0]), spec), *out[1:])
        if m:  # every tensor with M copies of the batch in dimension 0 gets a leading dimension M
            out = pytree.tree_map(lambda t: t.unflatten(0, (m, -1)) if isinstance(t, torch.Tensor) and t.dim() > 0
                                  and t.shape[0] % m == 0 else t, out)
        if taps:
            return out[0], dict(zip(taps, out[1:]))
        return out

    def can_stack(self, inputs: Sequence[torch.Tensor]) -> bool:
        """Whether M masks stacked in one pass give each mask's own outputs. Probed once (then cached) on
        the first two samples of ``inputs``: three different masks stacked against one pass each. False where
        a gated tensor is not ordered by sample and mask, e.g. inside a mixture of experts, whose routing
        gathers tokens by their values (copies under different masks route differently); gated calls with
        several masks then run them one after the other."""
        if self._can_stack is None:
            self._can_stack = self._probe_stacking(tuple(x[:2] for x in inputs))
        return self._can_stack

    @torch.no_grad()
    def _probe_stacking(self, inputs: tuple[torch.Tensor, ...]) -> bool:
        e = self.num_edges
        if e == 0:
            return True
        traced = tuple((tuple(x.shape), x.dtype) for x in self.graph.example_inputs)
        device = model_device(self.module, default=inputs[0].device)
        half = (torch.rand(e, generator=torch.Generator().manual_seed(0)) < 0.5).float()
        masks = torch.stack([torch.ones(e), half, torch.zeros(e)]).to(device)
        with measuring(self.module):
            singles = [self._run(inputs, _one_mask(row), (), traced) for row in masks]
            try:
                stacked = self._run(inputs, masks, (), traced)
            except RuntimeError:  # e.g. a gated tensor whose first dimension is not the batch
                return False
        flat, spec = pytree.tree_flatten(stacked)
        for j, single in enumerate(singles):
            ones, spec_j = pytree.tree_flatten(single)
            if spec_j != spec:
                return False
            for a, b in zip(flat, ones):
                if isinstance(b, torch.Tensor) and b.dim() > 0 and not _same(a, j, b):
                    return False
        return True


def _one_mask(gates: torch.Tensor) -> torch.Tensor | tuple[float, ...]:
    """One mask's gates: a tuple of floats unless they need a gradient (then the tensor itself)."""
    if gates.requires_grad and torch.is_grad_enabled():
        return gates
    return tuple(gates.tolist())


def _same(stacked: Any, j: int, single: torch.Tensor) -> bool:
    """Whether row j of a stacked output equals the output of mask j alone, to the rounding of the dtype
    (the batch size changes the order of floating-point sums)."""
    if not isinstance(stacked, torch.Tensor) or stacked.shape[1:] != single.shape or len(stacked) <= j:
        return False
    a = stacked[j]
    if not single.is_floating_point():
        return torch.equal(a, single)
    tol = max(1e-4, 16 * torch.finfo(single.dtype).eps)
    scale = float(single.detach().abs().nan_to_num(0.0, 0.0, 0.0).max()) if single.numel() else 0.0
    return torch.allclose(a.double(), single.double(), rtol=tol, atol=tol * max(scale, 1e-12), equal_nan=True)


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "boolean"
    if dtype.is_complex:
        return "complex"
    return "floating-point" if dtype.is_floating_point else "integer"


def _check_inputs(inputs: Sequence[Any], traced: Sequence[tuple[tuple[int, ...], torch.dtype]], what: str,
                  names: Sequence[str] | None = None) -> None:
    """Raise if ``inputs`` cannot be what the model was traced with: their number, each one's number of
    dimensions (any size may differ) and kind of dtype (integer token ids, floating-point features...)."""
    if len(inputs) != len(traced):
        named = f" ({', '.join(names)})" if names else ""
        raise TypeError(f"{what} takes {len(traced)} input tensor(s){named} as traced, got {len(inputs)}: pass "
                        "them all, in that order (a Subset carries several inputs as one tuple or dict: "
                        "Subset(name, (input_ids, attention_mask), targets))")
    for i, (x, (shape, dtype)) in enumerate(zip(inputs, traced)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input {i} of {what} must be a tensor, got {type(x).__name__}")
        if x.dim() != len(shape):
            raise ValueError(f"input {i} of {what} has shape {tuple(x.shape)}, but the model was traced with "
                             f"shape {shape}: pass the same number of dimensions (dim 0 is the batch)")
        kind = _dtype_kind(dtype)
        if _dtype_kind(x.dtype) != kind:
            raise TypeError(f"input {i} of {what} has dtype {x.dtype}, but the model was traced with {dtype}: "
                            f"pass {kind} values{' (token ids?)' if kind == 'integer' else ''}")


def _forward_failed(exc: Exception, inputs: Sequence[torch.Tensor],
                    traced: Sequence[tuple[tuple[int, ...], torch.dtype]]) -> str:
    """The message for a failed forward pass: the error itself; where the input shapes differ from the
    traced ones (beyond the batch dimension), that they may be the cause."""
    msg = f"gated forward failed: {type(exc).__name__}: {exc}"
    if any(tuple(x.shape[1:]) != shape[1:] for x, (shape, _) in zip(inputs, traced)):
        msg += (f"\nThe inputs have shapes {[tuple(x.shape) for x in inputs]}, the graph was traced with "
                f"{[shape for shape, _ in traced]}: if the traced model cannot run at these shapes, build the "
                "graph again with example inputs of the shapes you need.")
    elif isinstance(exc, IndexError):
        ranges = [f"input {i} holds values in [{int(x.min())}, {int(x.max())}]" for i, x in enumerate(inputs)
                  if _dtype_kind(x.dtype) == "integer" and x.numel()]
        if ranges:
            msg += f"\n{'; '.join(ranges)}: is an index beyond an embedding table (a token id >= the vocabulary size)?"
    return msg


def _zeros(ref: torch.Tensor, shape: tuple[int, ...], ref_shape: tuple[int, ...], dtype: torch.dtype,
           value: float) -> torch.Tensor:
    """Constant standing in for a removed tensor when its shape cannot be computed at run time (see
    ``_ShapeOracle``): a dimension that matched the first input's dimension at the same position when traced
    (the batch, a sequence length) follows that input, every other dimension keeps its traced size."""
    shape = tuple(ref.shape[d] if d < len(ref_shape) and n == ref_shape[d] else n
                  for d, n in enumerate(shape))
    return torch.full(shape, value, dtype=dtype, device=ref.device)


torch.fx.wrap("_zeros")


class _ShapeOracle:
    """Shapes that tensors of the traced model take at the current input shapes.

    A removed tensor is not computed in the pruned model, but the constant replacing it must have the shape
    the tensor would have had at these inputs (an image size or sequence length other than the traced one
    changes the spatial or sequence dimensions). The oracle runs the traced graph on meta tensors (shapes
    only: no data, no arithmetic, parameters cost no memory) once per distinct input signature and keeps the
    shapes of the tensors ``names``. It is kept outside the module tree (a plain attribute of
    ``RemovedTensors``): moving, training or saving the pruned model's state never touches it.
    """

    _MAX_CACHED = 64

    def __init__(self, module: fx.GraphModule, names: Sequence[str]):
        self.module = _meta_clone(module)
        self.names = tuple(dict.fromkeys(names))
        self._cache: dict[tuple, dict[str, torch.Size]] = {}

    def __deepcopy__(self, memo: dict[int, Any]) -> _ShapeOracle:
        copied = copy.copy(self)  # the meta module holds no data and is never written: shared
        copied._cache = dict(self._cache)
        return copied

    @staticmethod
    def _key(inputs: Sequence[torch.Tensor]) -> tuple:
        return tuple((tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else x for x in inputs)

    def shapes(self, inputs: Sequence[torch.Tensor]) -> dict[str, torch.Size]:
        key = self._key(inputs)
        found = self._cache.get(key)
        if found is None:
            if len(self._cache) >= self._MAX_CACHED:
                self._cache.clear()
            found = self._cache[key] = self._run(inputs)
        return found

    def _run(self, inputs: Sequence[torch.Tensor]) -> dict[str, torch.Size]:
        wanted, found = set(self.names), {}

        class _Done(Exception):
            pass

        def record(n: fx.Node, compute: Callable[[], Any]) -> Any:
            out = compute()
            if n.name in wanted:
                found[n.name] = out.shape
                if len(found) == len(wanted):
                    raise _Done  # the rest of the graph is not needed
            return out

        metas = [torch.empty(x.shape, dtype=x.dtype, device="meta") if isinstance(x, torch.Tensor) else x
                 for x in inputs]
        try:  # invisible to dispatch modes around the call (FLOP counters must not count the meta pass)
            with torch.no_grad(), _disable_current_modes():
                run_nodes(self.module, metas, record)
        except _Done:
            pass
        return found

    def agrees(self, inputs: Sequence[torch.Tensor], expected: dict[str, tuple[int, ...]]) -> bool:
        """Whether the meta pass works and reproduces the traced shapes at the traced inputs."""
        try:
            found = self._run(inputs)
        except Exception:  # noqa: BLE001 - an op without a meta kernel: keep the traced shapes
            return False
        self._cache[self._key(inputs)] = found
        return all(tuple(found.get(n, ())) == tuple(s) for n, s in expected.items())


_META_CLONES: weakref.WeakKeyDictionary[fx.GraphModule, fx.GraphModule] = weakref.WeakKeyDictionary()


def _meta_clone(module: fx.GraphModule) -> fx.GraphModule:
    """A copy of the traced module whose parameters and buffers are meta tensors (made once per module).
    Pruned models share it: nothing writes to it (it stays in eval mode, outside their module tree)."""
    clone = _META_CLONES.get(module)
    if clone is None:
        memo: dict[int, Any] = {}
        for t in module.parameters():
            memo[id(t)] = nn.Parameter(t.detach().to("meta"), requires_grad=t.requires_grad)
        for t in module.buffers():
            memo[id(t)] = t.detach().to("meta")
        for sub in module.modules():  # plain tensor attributes (constants of an exported graph)
            for t in vars(sub).values():
                if isinstance(t, torch.Tensor) and id(t) not in memo:
                    memo[id(t)] = t.detach().to("meta")
        clone = copy.deepcopy(module, memo).eval()  # shapes are alike in train mode
        _on_meta(clone.graph)
        clone.recompile()
        _META_CLONES[module] = clone
    return clone


def _on_meta(graph: fx.Graph) -> None:
    """Point every device an operation names (``x.to("cpu")``, ``arange(n, device=cpu)``, as exported graphs
    of Hugging Face models have) at the meta device, so that the meta pass never meets a real tensor."""
    meta = torch.device("meta")

    def to_meta(a: Any) -> Any:
        return meta if isinstance(a, torch.device) else a

    for node in graph.nodes:
        node.args = fx.node.map_aggregate(node.args, to_meta)
        kwargs = fx.node.map_aggregate(node.kwargs, to_meta)
        if isinstance(kwargs.get("device"), str):
            kwargs = {**kwargs, "device": meta}
        node.kwargs = kwargs


class RemovedTensors(nn.Module):
    """The constants that stand in for removed tensors in a pruned model: ``self(name, dtype, value,
    *inputs)`` is filled with ``value`` and has the shape that the traced tensor ``name`` has at these
    inputs. It has no parameters or buffers."""

    def __init__(self, oracle: _ShapeOracle):
        super().__init__()
        self.oracle = oracle

    def forward(self, name: str, dtype: torch.dtype, value: float, *inputs: torch.Tensor) -> torch.Tensor:
        try:
            shape = self.oracle.shapes(inputs)[name]
        except Exception as exc:
            shapes = [tuple(x.shape) for x in inputs if isinstance(x, torch.Tensor)]
            raise RuntimeError(f"the pruned model cannot run on inputs of shapes {shapes}: the traced model "
                               f"itself fails at these shapes ({type(exc).__name__}: {exc}). Use input shapes "
                               "the original model accepts.") from exc
        return torch.full(shape, value, dtype=dtype, device=inputs[0].device)


_CONSTANTS_PATH = "_surrogate_removed"


class InputCheck(nn.Module):
    """The first operation of a pruned model: a clear error if its inputs cannot be what the model was
    traced with (their number, number of dimensions, kind of dtype). No parameters or buffers."""

    def __init__(self, traced: Sequence[tuple[tuple[int, ...], torch.dtype]]):
        super().__init__()
        self.traced = tuple((tuple(shape), dtype) for shape, dtype in traced)

    def forward(self, *inputs: torch.Tensor) -> None:
        _check_inputs(inputs, self.traced, "the pruned model")


_CHECK_PATH = "_surrogate_input_check"


def prune(graph: ComputationGraph, mask: Any) -> fx.GraphModule:
    """A physically smaller copy of the model with the edges where ``mask`` is 0 removed.

    Its outputs equal ``GatedModel(graph)(x, mask=mask)`` (bit for bit, except that an output projection
    with removed heads sums over fewer input columns, which can change the last bits), also at input shapes
    other than the traced ones (another image size, sequence length or batch size) wherever the original
    model runs: the constant replacing a removed tensor takes the shape that tensor would have at the
    current inputs (computed on meta tensors, once per input signature). Parameters that only
    fed removed edges are gone. An output projection with removed heads is replaced, at the same module
    path, by a module of the same class with only the kept heads' input columns (fed with those chunks of
    its input); with every head removed, by an ``EmptyProjection`` (its bias). The query/key/value
    projections of a removed head stay: they are one fused matmul shared with the kept heads, and only a
    projection with no kept head lets dead-code elimination remove the attention that feeds it.
    The result is an independent module (a deep copy): fine-tuning it leaves the original alone.
    """
    m = check_mask(mask, graph.num_prunable, binary=True, batch=False)
    g = copy.deepcopy(graph.module.graph)
    by_name = {n.name: n for n in g.nodes}
    placeholders = [n for n in g.nodes if n.op == "placeholder"]

    def constant(name: str, value: float) -> fx.Node:
        """A node of the constant replacing the removed tensor ``name`` (see ``RemovedTensors``)."""
        return g.call_module(_CONSTANTS_PATH, (name, graph.node_info[name][1], value, *placeholders))

    with g.inserting_after(placeholders[-1]):  # before anything else (an exported graph's guards)
        g.call_module(_CHECK_PATH, tuple(placeholders))
    removed_heads: dict[str, set[int]] = {}  # projection vertex -> removed heads
    for i, edge in enumerate(graph.prunable):
        if m[i] == 1:
            continue
        if edge.part is not None:
            removed_heads.setdefault(edge.dst, set()).add(edge.part[0])
            continue
        one = _neutral_one(edge)
        for p, c in edge.links:
            producer, consumer = by_name[p], by_name[c]
            if _drop_term(consumer, producer, graph, one):
                continue
            with g.inserting_before(consumer):
                const = constant(p, 1.0 if one else 0.0)
            consumer.replace_input_with(producer, const)
    stand_in = nn.Module()  # the target of the constants' nodes until their shapes are known (below)
    check = InputCheck([(tuple(x.shape), x.dtype) for x in graph.example_inputs])
    graph.module.add_submodule(_CONSTANTS_PATH, stand_in)
    graph.module.add_submodule(_CHECK_PATH, check)
    try:
        pruned = fx.GraphModule(graph.module, g)
    finally:
        delattr(graph.module, _CONSTANTS_PATH)
        delattr(graph.module, _CHECK_PATH)
    pruned.add_submodule(_CONSTANTS_PATH, stand_in)  # also when only head projections use it
    smaller = [_prune_heads(pruned, graph, graph.head_splits[v], removed, by_name, constant)
               for v, removed in removed_heads.items()]
    pruned.graph.eliminate_dead_code(is_impure_node=_has_side_effect)
    _shapes_without_computation(pruned.graph, graph, constant)
    constants = [n for n in pruned.graph.nodes if n.op == "call_module" and n.target == _CONSTANTS_PATH]
    if constants:
        names = [n.args[0] for n in constants]
        oracle = _ShapeOracle(graph.module, names)
        if oracle.agrees(graph.example_inputs, {n: graph.node_info[n][0] for n in names}):
            pruned.add_submodule(_CONSTANTS_PATH, RemovedTensors(oracle))
        else:  # no meta kernel for some op: the traced shapes, following the first input where they matched
            ref = placeholders[0]
            for n in constants:
                name, dtype, value = n.args[:3]
                n.op, n.target = "call_function", _zeros
                n.args = (ref, graph.node_info[name][0], graph.node_info[ref.name][0], dtype, value)
    for path, module in smaller:  # only now: the dead nodes read the old projection's weight
        _unshare_parents(pruned, graph.module, path)
        pruned.add_submodule(path, module)
    pruned.graph.lint()
    pruned.recompile()
    pruned.delete_all_unused_submodules()
    return copy.deepcopy(pruned)


_SHAPE_METHODS = {"size", "dim", "numel"}
_SHAPE_ATTRIBUTES = {"shape", "ndim", "dtype"}
_SHAPE_OPS = {torch.ops.aten.sym_size.int, torch.ops.aten.sym_size.default, torch.ops.aten.sym_numel.default,
              torch.ops.aten.dim.default, torch.numel}


def _reads_shape(node: fx.Node, tensor: fx.Node) -> bool:
    """Whether ``node`` reads only the shape (or rank, dtype) of ``tensor``: ``t.shape``, ``t.size(d)``."""
    if node.op == "call_method":
        return node.target in _SHAPE_METHODS and node.args[0] is tensor
    if node.op == "call_function" and node.target is getattr:
        return node.args[0] is tensor and node.args[1] in _SHAPE_ATTRIBUTES
    return node.op == "call_function" and node.target in _SHAPE_OPS and node.args[0] is tensor


def _shapes_without_computation(g: fx.Graph, graph: ComputationGraph,
                                constant: Callable[[str, float], fx.Node]) -> None:
    """Read the shape of a tensor that is still computed only for its shape (``F.interpolate(x,
    size=skip.shape[-2:])`` with the edge from ``skip`` removed) from the removed-tensor constant, so that
    the computation and its parameters go, as ``CostModel`` counts them (shape reads are no edges)."""
    data = {n for v in graph.vertices if v.kind != "input" for n in v.nodes}
    while True:
        shape_only = [n for n in g.nodes if n.name in data and n.users and not _has_side_effect(n)
                      and all(_reads_shape(u, n) for u in n.users)
                      and isinstance(graph.node_info.get(n.name), tuple)
                      and isinstance(graph.node_info[n.name][1], torch.dtype)]
        if not shape_only:
            return
        for n in shape_only:
            with g.inserting_after(n):
                const = constant(n.name, 0.0)
            for user in list(n.users):
                if user is not const:
                    user.replace_input_with(n, const)
        g.eliminate_dead_code(is_impure_node=_has_side_effect)


def _has_side_effect(node: fx.Node) -> bool:
    """What dead-code elimination must keep. Unlike fx's default, random ops (dropout) are removable: an
    unused result has no effect, and traced graphs are used in eval mode where dropout is the identity."""
    if node.op in ("placeholder", "output"):
        return True
    if node.op == "call_module":
        return node.target in ("_guards_fn", _CHECK_PATH) or node.is_impure()
    if node.op == "call_method":
        return str(node.target).endswith("_") and not str(node.target).startswith("_")  # in-place
    if node.op == "call_function":
        schema = getattr(node.target, "_schema", None)
        if schema is not None:
            return schema.is_mutable and not _writes_only_dead_temporaries(node)
        return node.target in (operator.setitem, torch._assert) or node.is_impure(impure_random=False)
    return False


def _schema_args(node: fx.Node) -> list[tuple[Any, Any]]:
    """(schema argument, value) of an operator call, positional and keyword."""
    out = []
    for i, a in enumerate(node.target._schema.arguments):
        value = node.args[i] if i < len(node.args) else node.kwargs.get(a.name)
        out.append((a, value))
    return out


def _fresh_root(node: Any) -> fx.Node | None:
    """The node whose freshly allocated tensor ``node`` is (a view of), or None if it may be an input, a
    parameter, a buffer or anything else that outlives the call (or we cannot tell)."""
    while isinstance(node, fx.Node) and node.op == "call_function":
        producer, schema = node, getattr(node.target, "_schema", None)
        if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
            producer, schema = node.args[0], getattr(node.args[0].target, "_schema", None)
        if schema is None:
            return None
        viewed = [v for a, v in _schema_args(producer) if a.alias_info is not None and isinstance(v, fx.Node)]
        if not viewed:
            return node  # an operator that allocates its output
        node = viewed[0]
    return None


def _writes_only_dead_temporaries(node: fx.Node) -> bool:
    """Whether an in-place operator only writes temporaries: tensors the graph allocated itself that nothing
    reads after this node (the routing of a mixture of experts normalises its weights in place and scatters
    into a fresh index tensor; once the experts' output is cut, those writes are dead code too). Decided
    from operator schemas (exported graphs); anything without one counts as sharing memory."""
    written = [v for a, v in _schema_args(node) if a.alias_info is not None and a.alias_info.is_write]
    if not written:
        return False
    later = set()
    cursor = node.next
    while cursor.op != "root":
        later.add(cursor)
        cursor = cursor.next
    for target in written:
        root = _fresh_root(target)
        if root is None:
            return False
        aliases, todo = {root}, [root]
        while todo:  # every tensor that may share the root's memory: through views, in-place ops, getitem
            for user in todo.pop().users:
                if user is node:
                    continue
                if user in later:
                    return False  # read after the write
                schema = getattr(user.target, "_schema", None) if user.op == "call_function" else None
                shares = schema is None or any(a.alias_info is not None and isinstance(v, fx.Node)
                                               and v in aliases for a, v in _schema_args(user))
                if shares and user not in aliases:
                    aliases.add(user)
                    todo.append(user)
    return True


def _keep(x: torch.Tensor) -> torch.Tensor:
    """What ``a + b`` becomes when b is removed (or ``a * b`` for a one-neutral b): just a."""
    return x


torch.fx.wrap("_keep")


def _drop_term(consumer: fx.Node, producer: fx.Node, graph: ComputationGraph, one: bool) -> bool:
    """Rewrite ``a + b`` (or ``a * b`` when b's neutral element is 1) with b removed as ``a``, exactly,
    when the shapes allow it; returns True if done. The node keeps its name, so later links still find it."""
    if _canonical_op(consumer) != ("mul" if one else "add") or len(consumer.args) != 2 \
            or consumer.kwargs.get("alpha", 1) != 1:
        return False
    a, b = consumer.args
    if a is producer and b is producer:
        return False
    keep = b if a is producer else a
    if not isinstance(keep, fx.Node) or producer not in (a, b):
        return False
    info_keep, info_out = graph.node_info.get(keep.name), graph.node_info.get(consumer.name)
    if not (isinstance(info_keep, tuple) and info_keep == info_out):
        return False  # the op broadcasts or promotes the dtype: replace b by a constant instead
    consumer.op, consumer.target, consumer.args, consumer.kwargs = "call_function", _keep, (keep,), {}
    return True


# ----------------------------------------------------------------------------------------------------
# attention heads

class EmptyProjection(nn.Module):
    """An output projection whose every head was removed: its output is its bias (zeros without one)."""
    in_features = 0

    def __init__(self, bias: torch.Tensor | None):
        super().__init__()
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), bias.requires_grad)

    def forward(self, zeros: torch.Tensor) -> torch.Tensor:  # zeros of the output's shape
        return zeros if self.bias is None else zeros + self.bias


def _head_columns(heads: tuple[int, ...], head_dim: int, device: torch.device) -> torch.Tensor:
    """Indices of the columns of the chunks ``heads`` (each ``head_dim`` wide), in order."""
    return torch.cat([torch.arange(k * head_dim, (k + 1) * head_dim, device=device) for k in heads])


def _take_heads(x: torch.Tensor, heads: tuple[int, ...], num_heads: int) -> torch.Tensor:
    """The chunks ``heads`` (of ``num_heads`` equal chunks) of the last dimension of x, contiguous
    (transformers' Conv1D views its input)."""
    return x.index_select(-1, _head_columns(heads, x.shape[-1] // num_heads, x.device))


torch.fx.wrap("_take_heads")


def _smaller_projection(module: nn.Module, split: HeadSplit, kept: tuple[int, ...]) -> nn.Module:
    """A copy of the projection (weight, optional bias) restricted to the input columns of ``kept``."""
    weight, bias = module.weight.detach(), getattr(module, "bias", None)
    d = (weight.shape[1] if split.layout == "linear" else weight.shape[0]) // split.heads
    cols = _head_columns(kept, d, weight.device)
    if split.layout == "linear":  # weight (out, in)
        new: nn.Module = nn.Linear(len(cols), weight.shape[0], bias=bias is not None, device=weight.device,
                                   dtype=weight.dtype)
        new.weight.data.copy_(weight.index_select(1, cols))
    else:  # transformers' Conv1D: weight (in, out), always with a bias
        from transformers.pytorch_utils import Conv1D
        new = Conv1D(weight.shape[1], len(cols)).to(device=weight.device, dtype=weight.dtype)
        new.weight.data.copy_(weight.index_select(0, cols))
    if bias is not None:
        new.bias.data.copy_(bias.detach())
    return new.requires_grad_(module.weight.requires_grad)  # a frozen model stays frozen


def _prune_heads(pruned: fx.GraphModule, graph: ComputationGraph, split: HeadSplit, removed: set[int],
                 by_name: dict[str, fx.Node], constant: Callable[[str, float], fx.Node]
                 ) -> tuple[str, nn.Module]:
    """Rewrite the projection call of ``split`` in ``pruned`` as a call of a smaller module at the same
    path; returns (path, module) for the caller to install after dead-code elimination. The projection's
    output node keeps its name and users; its old computation becomes dead code."""
    path = split.vertex.split("@")[0]
    module = graph.module.get_submodule(path)
    out = by_name[split.output]
    kept = tuple(k for k in range(split.heads) if k not in removed)
    with pruned.graph.inserting_before(out):
        if kept:
            small = _smaller_projection(module, split, kept)
            arg = pruned.graph.call_function(_take_heads, (by_name[split.input], kept, split.heads))
        else:  # no head left: nothing reads the input, so the attention feeding it is dead code
            small = EmptyProjection(getattr(module, "bias", None))
            arg = constant(split.output, 0.0)  # zeros of the output's shape
    out.op, out.target, out.args, out.kwargs = "call_module", path, (arg,), {}
    return path, small


def _unshare_parents(pruned: nn.Module, source: nn.Module, path: str) -> None:
    """fx.GraphModule shares the source's submodules; copy any module on the way to ``path`` that is
    shared, so that replacing ``path`` in ``pruned`` never edits the original model."""
    parent, src = pruned, source
    for item in path.split(".")[:-1]:
        child, src_child = getattr(parent, item), getattr(src, item)
        if child is src_child:
            child = copy.deepcopy(child)
            setattr(parent, item, child)
        parent, src = child, src_child
