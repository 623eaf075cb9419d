"""Ground truth: the loss S(m) (and accuracy / perplexity) of the gated model under each mask."""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import numpy as np
import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from .gating import _GATES_ATTR, GatedModel, check_mask, gate_indices
from .graph import run_node
from .measuring import measuring, model_device
from .progress import Ticker
from .tasks import Subset, Task, check_data, check_output

__all__ = ["Task", "Subset", "MaskEval", "evaluate_masks", "default_masks_per_pass", "measuring",
           "MAX_PASS_ELEMENTS"]


@dataclass
class MaskEval:
    """Per-mask results on one subset."""
    subset: str
    n_samples: int
    loss: np.ndarray                      # (M,) mean loss
    accuracy: np.ndarray | None = None    # (M,) mean accuracy (classification / next-token)
    outputs: torch.Tensor | None = None   # (M, n, ...) scored outputs (``Task.scored``), if asked for (keep_outputs=True)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def perplexity(self) -> np.ndarray:
        return np.exp(self.loss)


MAX_PASS_ELEMENTS = 2 ** 27  # default cap on the elements of one stacked pass's output (512 MiB of float32)


@torch.no_grad()
def evaluate_masks(gated: GatedModel, masks: Any, data: Subset, task: Task, *, batch_size: int = 512,
                   masks_per_pass: int | None = None, keep_outputs: bool = False,
                   strategy: Literal["stack", "prefix"] = "stack",
                   max_pass_elements: int = MAX_PASS_ELEMENTS, keep_state: str | None = None,
                   log: Callable[[str], None] | None = None, progress: bool = False) -> MaskEval:
    """Evaluate every mask on the whole subset: S(m) = mean per-sample loss. Deterministic: no sampling.

    strategy "stack": masks_per_pass masks are stacked into one forward pass (None: as many as keep a pass
    near 16k samples, and its stacked output under max_pass_elements elements, measured from one pass on
    the first batch; for convolutional nets on a CPU, 1 is usually fastest). Where stacking would gate the
    wrong rows (a mixture of experts routes tokens by their values, so tensors inside it are not ordered by
    mask: ``GatedModel.can_stack``), every mask runs alone.
    strategy "prefix": masks that agree on the first gates (in execution order) share the computation up to
    there (a prefix tree, walked depth first for every data batch); each distinct mask runs alone, so the
    results equal those of masks_per_pass=1 bit for bit. Fastest for many masks over few gates (all 2^k
    masks of k residual branches).
    keep_outputs: also return the scored outputs (``task.scored``) of every mask on every sample ((M, n, ...)),
    what output-space surrogates are built from; mind the memory of large outputs (LM logits).
    keep_state: an fx node name (see ``GatedModel.forward(taps=...)``): also keep the value that node takes
    under every mask on every sample, ``extra["state"]`` ((M, n, ...)), measured in the same passes
    (strategy "stack" only); hidden-state surrogates are built from it.
    log: a callable that receives a progress line (masks done, time so far and left) every few minutes of a
    long evaluation (``surrogate.progress``; default: the log installed by ``progress.reporting``, if any).
    progress: deprecated (a tqdm bar); pass log=print.
    The data are checked first (``tasks.check_data``: an empty subset, targets the task cannot take, dtypes).
    """
    m = check_mask(masks, gated.num_edges)
    m = m.unsqueeze(0) if m.dim() == 1 else m
    if strategy not in ("stack", "prefix"):
        raise ValueError(f"unknown strategy {strategy!r}; use 'stack' (masks stacked per pass) or 'prefix' "
                         "(shared computation of common mask prefixes)")
    if strategy == "prefix" and keep_state is not None:
        raise ValueError("keep_state needs strategy='stack'")
    if strategy == "prefix" and masks_per_pass is not None:
        raise ValueError("masks_per_pass applies to strategy='stack'; the prefix strategy runs each distinct mask "
                         "alone (pass masks_per_pass=None)")
    if progress:
        warnings.warn("evaluate_masks(progress=True) is deprecated: pass log=print (a line every few minutes)",
                      DeprecationWarning, stacklevel=2)
    check_data(data, task, gated, run=False)
    totals = _Totals(data, task, len(m), keep_outputs, keep_state is not None)
    bar = _bar(progress, len(m), data.name)
    tick = Ticker(f"S(m) of {len(m)} masks on {data.name}", len(m), log)
    try:
        with measuring(gated):
            if strategy == "prefix":
                _run_prefix(gated, m, data, batch_size, totals, bar, tick)
            else:
                if masks_per_pass is None:
                    masks_per_pass = default_masks_per_pass(gated, data, len(m), batch_size, max_pass_elements)
                _run_stacked(gated, m, data, batch_size, masks_per_pass, keep_state, totals, bar, tick)
    finally:
        if bar is not None:
            bar.close()
    return totals.result(data, keep_state)


class _Totals:
    """Per-mask sums of losses and accuracies over the batches, and the kept outputs and states."""

    def __init__(self, data: Subset, task: Task, num_masks: int, keep_outputs: bool, keep_state: bool):
        self.data, self.task, self.checked = data, task, False
        self.loss = torch.zeros(num_masks, dtype=torch.float64)
        self.acc: torch.Tensor | None = torch.zeros(num_masks, dtype=torch.float64)
        self.outputs: list[list[torch.Tensor]] | None = [[] for _ in range(num_masks)] if keep_outputs else None
        self.states: list[list[torch.Tensor]] | None = [[] for _ in range(num_masks)] if keep_state else None

    def add(self, j: int, out: torch.Tensor, y: torch.Tensor) -> None:
        """Mask j's scored outputs on one batch."""
        if not self.checked:  # the targets against the first output, before any loss is computed
            check_output(self.data, self.task, out)
            self.checked = True
        if self.outputs is not None:
            self.outputs[j].append(out.cpu())  # kept outputs and states live on the CPU (no-op there)
        loss, acc = self.task.per_sample(out, y)
        self.loss[j] += loss.double().sum().cpu()
        if acc is None:
            self.acc = None
        elif self.acc is not None:
            self.acc[j] += acc.double().sum().cpu()

    def result(self, data: Subset, keep_state: str | None) -> MaskEval:
        n = len(data)
        loss = (self.loss / n).numpy()
        if not np.isfinite(loss).all():
            raise FloatingPointError(f"non-finite loss for {int((~np.isfinite(loss)).sum())} masks on {data.name} "
                                     "(the model's outputs overflow or hold NaN under these masks)")
        outputs = None if self.outputs is None else torch.stack([torch.cat(parts) for parts in self.outputs])
        extra = {} if self.states is None else {"state": torch.stack([torch.cat(p) for p in self.states]),
                                                "state_node": keep_state}
        return MaskEval(data.name, n, loss, None if self.acc is None else (self.acc / n).numpy(), outputs, extra)


def _bar(progress: bool, total: int, name: str) -> Any:
    if not progress:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=f"S(m) on {name}", unit="mask")


def _run_prefix(gated: GatedModel, m: torch.Tensor, data: Subset, batch_size: int, totals: _Totals, bar: Any,
                tick: Ticker) -> None:
    tree, rows, done = _PrefixTree(gated), [tuple(r) for r in m.tolist()], 0
    n_batches = (len(data) + batch_size - 1) // batch_size
    for x, y in data.batches(batch_size, gated, model_device(gated)):
        for group, out in tree.run(x, rows):
            out = totals.task.scored(out)
            for j in group:  # masks of one leaf are equal: the same outputs
                totals.add(j, out, y)
            done += len(group)
            if bar is not None:
                bar.update(done // n_batches - bar.n)
            tick(done // n_batches)


def _run_stacked(gated: GatedModel, m: torch.Tensor, data: Subset, batch_size: int, masks_per_pass: int,
                 keep_state: str | None, totals: _Totals, bar: Any, tick: Ticker) -> None:
    n, device = len(data), model_device(gated)
    if masks_per_pass > 1 and not gated.can_stack(tuple(x.to(device) for x in data[:2].args(gated))):
        masks_per_pass = 1  # stacked masks would gate the wrong rows: one mask per pass
    for c0 in range(0, len(m), masks_per_pass):
        mc = m[c0:c0 + masks_per_pass]
        mk = mc if len(mc) > 1 else mc[0]
        for b0, (x, y) in zip(range(0, n, batch_size), data.batches(batch_size, gated, device)):
            if keep_state is None:
                out = gated(*x, mask=mk)
            else:
                out, tapped = gated(*x, mask=mk, taps=(keep_state,))
                h = tapped[keep_state] if len(mc) > 1 else tapped[keep_state].unsqueeze(0)
                for j in range(len(mc)):
                    totals.states[c0 + j].append(h[j].cpu())
            out = totals.task.scored(out)
            out = out if len(mc) > 1 else out.unsqueeze(0)
            for j in range(len(mc)):
                totals.add(c0 + j, out[j], y)
            tick(c0 + len(mc) * min(n, b0 + batch_size) // n)  # a large stack: progress within it
        if bar is not None:
            bar.update(len(mc))


def default_masks_per_pass(gated: GatedModel, data: Subset, num_masks: int, batch_size: int,
                           max_pass_elements: int = MAX_PASS_ELEMENTS) -> int:
    """How many masks evaluate_masks stacks into one pass by default: as many as keep a pass near 16k
    samples, capped so that the stacked output has at most max_pass_elements elements (measured from one
    all-ones pass on the first batch, only when more than one mask would be stacked). With small outputs
    (class logits) the cap does not bind; with LM logits (batch x tokens x vocabulary) it does."""
    b = max(1, min(batch_size, len(data)))
    per_pass = max(1, min(num_masks, 16384 // b))
    if per_pass > 1 and len(data):
        with measuring(gated):
            out = gated(*(x.to(model_device(gated)) for x in data[:b].args(gated)))
        size = sum(t.numel() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
        per_pass = max(1, min(per_pass, max_pass_elements // max(1, size)))
    return per_pass


# ----------------------------------------------------------------------------------------------------
# prefix-tree evaluation



class _PrefixTree:
    """Runs a GatedModel's graph for many single masks at once, sharing what common prefixes compute.

    The graph's nodes run in order, with every gate node moved to just before its first user (the later a
    mask splits, the more is shared). Before a gate node that reads mask entries not read so far, the
    group of masks splits by their values there; each subgroup continues from the activations computed
    so far, depth first, so at most one path of activations per split is alive. Every node runs exactly
    as in ``gated(x, mask=row)`` (gates as a tuple of floats), so outputs equal one pass per mask bit for bit.
    """

    def __init__(self, gated: GatedModel):
        self.module = gated.module
        self.graph = gated.module.graph
        order: list[fx.Node] = []
        pending: dict[fx.Node, fx.Node] = {}

        def emit(node: fx.Node) -> None:
            for inp in node.all_input_nodes:
                if inp in pending:
                    emit(pending.pop(inp))
            order.append(node)

        for node in self.graph.nodes:
            if gate_indices(node) is not None:
                pending[node] = node  # emitted when its first user is; a gate nobody reads never runs
            else:
                emit(node)
        # the program: ("split", indices) before a gate node that reads new mask entries, ("node", node)
        self.program: list[tuple[str, Any]] = []
        seen: set[int] = set()
        for node in order:
            idx = gate_indices(node)
            new = tuple(i for i in idx if i not in seen) if idx is not None else ()
            if new:
                seen.update(new)
                self.program.append(("split", new))
            self.program.append(("node", node))
        # free each value after its last use (a subgroup drops its own reference; the parent keeps its own)
        last: dict[fx.Node, int] = {}
        for k, (kind, node) in enumerate(self.program):
            if kind == "node":
                last[node] = k  # a value nobody reads is dropped right away
                for inp in node.all_input_nodes:
                    last[inp] = k
        self.frees: list[list[fx.Node]] = [[] for _ in self.program]
        for node, k in last.items():
            if node.op != "output":
                self.frees[k].append(node)

    def run(self, inputs: tuple[torch.Tensor, ...], rows: list[tuple[float, ...]]
            ) -> Iterator[tuple[list[int], Any]]:
        """Yield (mask indices, output) once per distinct mask among ``rows`` (masks as float tuples)."""
        flat = iter(self.graph.process_inputs(*inputs))
        env: dict[fx.Node, Any] = {}
        stack: list[tuple[int, dict[fx.Node, Any], list[int]]] = [(0, env, list(range(len(rows))))]
        while stack:
            k, env, group = stack.pop()
            while k < len(self.program):
                kind, item = self.program[k]
                if kind == "split":
                    parts: dict[tuple[float, ...], list[int]] = {}
                    for r in group:
                        parts.setdefault(tuple(rows[r][i] for i in item), []).append(r)
                    if len(parts) > 1:  # depth first: the first subgroup is popped next
                        stack.extend((k + 1, dict(env), sub) for sub in reversed(list(parts.values())))
                        break
                    k += 1
                    continue
                if item.op == "output":
                    out = fx.node.map_arg(item.args[0], env.__getitem__)
                    yield group, self.graph.process_outputs(out)
                    break
                env[item] = self._run_node(item, env, rows[group[0]], flat)
                for dead in self.frees[k]:
                    env.pop(dead, None)
                k += 1

    def _run_node(self, node: fx.Node, env: dict[fx.Node, Any], gates: tuple[float, ...],
                  flat: Iterator[Any]) -> Any:
        if node.op == "placeholder":
            return next(flat)  # placeholders precede every split, so they run once per call
        if node.op == "get_attr" and node.target == _GATES_ATTR:
            return None  # gate nodes get the mask of their group instead
        if gate_indices(node) is not None:
            return node.target(env[node.args[0]], gates, *node.args[2:])
        return run_node(self.module, node, env.__getitem__)
