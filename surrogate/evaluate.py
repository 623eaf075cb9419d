"""Ground truth: the loss S(m) (and accuracy / perplexity) of the gated model under each mask."""
from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.utils import _pytree as pytree

from .gating import _GATES_ATTR, GatedModel, check_mask, gate_indices
from .measuring import measuring
from .progress import Ticker

__all__ = ["Task", "Subset", "MaskEval", "evaluate_masks", "default_masks_per_pass", "measuring",
           "MAX_PASS_ELEMENTS"]


@dataclass(frozen=True)
class Task:
    """How outputs and targets become per-sample losses.

    classification: logits (B, C), labels (B,), cross-entropy and accuracy.
    lm: logits (B, T, V) for input_ids (B, T); next-token cross-entropy averaged over the T-1 predicted
        tokens of each sequence, next-token accuracy; perplexity = exp(mean loss).
    regression: outputs and targets of the same shape, squared error summed over non-batch dims.
    """
    kind: Literal["classification", "lm", "regression"] = "classification"

    def per_sample(self, out: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(loss (B,), correct-fraction (B,) or None) for outputs of one mask."""
        out = out.float() if out.dtype in (torch.float16, torch.bfloat16) else out  # keep float64 exact
        if self.kind == "classification":
            loss = F.cross_entropy(out, target, reduction="none")
            return loss, (out.argmax(-1) == target).float()
        if self.kind == "lm":
            logits, labels = out[:, :-1], target[:, 1:]
            tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
            correct = (logits.argmax(-1) == labels).float().mean(1)
            return tok.view(labels.shape).mean(1), correct
        if self.kind == "regression":
            return (out - target.to(out.dtype)).pow(2).flatten(1).sum(1), None
        raise ValueError(f"unknown task kind {self.kind!r}; use 'classification', 'lm' or 'regression'")

    def targets_of(self, inputs: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return inputs if self.kind == "lm" else labels


@dataclass(frozen=True)
class Subset:
    """A named data subset held in memory: what a method may see ("scoring") or the truth ("evaluation")."""
    name: str
    inputs: torch.Tensor
    targets: torch.Tensor

    def __post_init__(self) -> None:
        if len(self.inputs) != len(self.targets):
            raise ValueError(f"subset {self.name!r}: {len(self.inputs)} inputs but {len(self.targets)} targets")

    def __len__(self) -> int:
        return len(self.inputs)


@dataclass
class MaskEval:
    """Per-mask results on one subset."""
    subset: str
    n_samples: int
    loss: np.ndarray                      # (M,) mean loss
    accuracy: np.ndarray | None = None    # (M,) mean accuracy (classification / next-token)
    outputs: torch.Tensor | None = None   # (M, n, ...) model outputs, if asked for (keep_outputs=True)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def perplexity(self) -> np.ndarray:
        return np.exp(self.loss)


MAX_PASS_ELEMENTS = 2 ** 27  # default cap on the elements of one stacked pass's output (512 MiB of float32)


@torch.no_grad()
def evaluate_masks(gated: GatedModel, masks: Any, data: Subset, task: Task, *, batch_size: int = 512,
                   masks_per_pass: int | None = None, progress: bool = False, keep_outputs: bool = False,
                   strategy: Literal["stack", "prefix"] = "stack",
                   max_pass_elements: int = MAX_PASS_ELEMENTS, keep_state: str | None = None,
                   log: Callable[[str], None] | None = None) -> MaskEval:
    """Evaluate every mask on the whole subset: S(m) = mean per-sample loss. Deterministic: no sampling.

    strategy "stack": masks_per_pass masks are stacked into one forward pass (None: as many as keep a pass
    near 16k samples, and its stacked output under max_pass_elements elements, measured from one pass on
    the first batch; for convolutional nets on a CPU, 1 is usually fastest).
    strategy "prefix": masks that agree on the first gates (in execution order) share the computation up to
    there (a prefix tree, walked depth first for every data batch); each distinct mask runs alone, so the
    results equal those of masks_per_pass=1 bit for bit. Fastest for many masks over few gates (all 2^k
    masks of k residual branches).
    keep_outputs: also return the outputs of every mask on every sample ((M, n, ...), as the model returns
    them), what output-space surrogates are built from; mind the memory of large outputs (LM logits).
    keep_state: an fx node name (see ``GatedModel.forward(taps=...)``): also keep the value that node takes
    under every mask on every sample, ``extra["state"]`` ((M, n, ...)), measured in the same passes
    (strategy "stack" only); hidden-state surrogates are built from it.
    progress: a tqdm bar (tqdm.auto: also in notebooks) counting masks done.
    log: a callable that receives a progress line (masks done, time so far and left) every few minutes of a
    long evaluation (``surrogate.progress``; default: the log installed by ``progress.reporting``, if any).
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
    n = len(data)
    total_loss = torch.zeros(len(m), dtype=torch.float64)
    total_acc = torch.zeros(len(m), dtype=torch.float64)
    has_acc = True
    kept: list[list[torch.Tensor]] = [[] for _ in range(len(m))] if keep_outputs else []
    states: list[list[torch.Tensor]] = [[] for _ in range(len(m))] if keep_state is not None else []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(m), desc=f"S(m) on {data.name}", unit="mask")
    tick = Ticker(f"S(m) of {len(m)} masks on {data.name}", len(m), log)

    def add(j: int, out: torch.Tensor, y: torch.Tensor) -> None:  # one mask's outputs on one batch
        nonlocal has_acc
        if keep_outputs:
            kept[j].append(out.cpu())  # kept outputs and states live on the CPU (no-op there)
        loss, acc = task.per_sample(out, y)
        total_loss[j] += loss.double().sum().cpu()
        if acc is None:
            has_acc = False
        else:
            total_acc[j] += acc.double().sum().cpu()

    device = next(itertools.chain(gated.parameters(), gated.buffers()), torch.zeros(0)).device  # batches follow the model
    try:
        with measuring(gated):
            if strategy == "prefix":
                tree, rows, done = _PrefixTree(gated), [tuple(r) for r in m.tolist()], 0
                n_batches = (n + batch_size - 1) // batch_size
                for b0 in range(0, n, batch_size):
                    x, y = data.inputs[b0:b0 + batch_size].to(device), data.targets[b0:b0 + batch_size].to(device)
                    for group, out in tree.run((x,), rows):
                        for j in group:  # masks of one leaf are equal: the same outputs
                            add(j, out, y)
                        done += len(group)
                        if bar is not None:
                            bar.update(done // n_batches - bar.n)
                        tick(done // n_batches)
            else:
                if masks_per_pass is None:
                    masks_per_pass = default_masks_per_pass(gated, data, len(m), batch_size, max_pass_elements)
                for c0 in range(0, len(m), masks_per_pass):
                    mc = m[c0:c0 + masks_per_pass]
                    for b0 in range(0, n, batch_size):
                        x, y = data.inputs[b0:b0 + batch_size].to(device), data.targets[b0:b0 + batch_size].to(device)
                        mk = mc if len(mc) > 1 else mc[0]
                        if keep_state is None:
                            out = gated(x, mask=mk)
                        else:
                            out, tapped = gated(x, mask=mk, taps=(keep_state,))
                            h = tapped[keep_state] if len(mc) > 1 else tapped[keep_state].unsqueeze(0)
                            for j in range(len(mc)):
                                states[c0 + j].append(h[j].cpu())
                        out = out if len(mc) > 1 else out.unsqueeze(0)
                        for j in range(len(mc)):
                            add(c0 + j, out[j], y)
                        tick(c0 + len(mc) * min(n, b0 + batch_size) // n)  # a large stack: progress within it
                    if bar is not None:
                        bar.update(len(mc))
    finally:
        if bar is not None:
            bar.close()
    loss = (total_loss / n).numpy()
    if not np.isfinite(loss).all():
        raise FloatingPointError(f"non-finite loss for {int((~np.isfinite(loss)).sum())} masks on {data.name}")
    outputs = torch.stack([torch.cat(parts) for parts in kept]) if keep_outputs else None
    extra = {} if keep_state is None else {"state": torch.stack([torch.cat(p) for p in states]),
                                           "state_node": keep_state}
    return MaskEval(data.name, n, loss, (total_acc / n).numpy() if has_acc else None, outputs, extra)


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
            out = gated(data.inputs[:b])
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
        if node.op == "get_attr":
            if node.target == _GATES_ATTR:
                return None  # gate nodes get the mask of their group instead
            value: Any = self.module
            for name in str(node.target).split("."):
                value = getattr(value, name)
            return value
        if gate_indices(node) is not None:
            return node.target(env[node.args[0]], gates, *node.args[2:])
        args = fx.node.map_arg(node.args, env.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "call_module":
            return self.module.get_submodule(node.target)(*args, **kwargs)
        raise RuntimeError(f"cannot run fx node {node.format_node()} (op {node.op!r})")
