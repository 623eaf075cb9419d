"""The draft's second and third scenarios for any model: pruned networks fine-tuned with one fixed budget,
and pruned networks transferred to another task (a fresh output layer, then the same fine-tuning).

    recs = finetune_masks(graph, {"ours": mask_a, "taylor2": mask_b}, train, test, Task("classification"),
                          FinetuneConfig(steps=300), key={"seed": 0})

Every mask is pruned physically (``surrogate.gating.prune``), so a fine-tuned network is exactly the small
one a user would deploy. Each record is cached (``surrogate.train.cached_result``) by the mask, the
fine-tuning config, a fingerprint of the weights and of the data, and the caller's ``key``.
"""
from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from .evaluate import Subset, Task
from .gating import GatedModel, prune
from .graph import ComputationGraph, build_graph
from .masks import mask_text
from .methods import Context, fit_method, measure_design
from .pruning import Budget, select_mask
from .tasks import check_data
from .train import _evaluate, cached_result, finetune, set_seed

__all__ = ["FinetuneConfig", "finetune_masks", "linear_probe", "method_picks", "mask_text"]


@dataclass(frozen=True)
class FinetuneConfig:
    steps: int = 300              # optimizer steps, the same for every mask
    lr: float = 1e-3
    batch_size: int = 128
    schedule: str = "cosine"      # "cosine" (to 0 over the steps) or "constant"
    seed: int = 0                 # batch order and augmentation; a new head's initialisation
    autocast: str | None = None   # "bf16": forward passes under bfloat16 autocast (language models on CPUs)
    optimizer: str = "adamw"      # or "sgd" (Nesterov momentum 0.9: the CIFAR networks' own recipe)
    weight_decay: float = 0.0


def _config_key(config: FinetuneConfig) -> dict[str, Any]:
    """The cache key of a fine-tuning config; a field added later is left out while it has its default, so
    results cached before it existed stay valid."""
    defaults = {"autocast": None, "optimizer": "adamw", "weight_decay": 0.0}
    fields = {k: v for k, v in dataclasses.asdict(config).items() if not (k in defaults and v == defaults[k])}
    return {"__class__": type(config).__name__, **fields}




def _fingerprint(*tensors: torch.Tensor) -> list[float]:
    """A cheap identity of weights or data for cache keys (sums in float64)."""
    return [round(float(t.double().sum()), 6) for t in tensors] + [round(float(t.double().abs().sum()), 6) for t in tensors]


def _replace_head(model: nn.Module, path: str, num_outputs: int, seed: int) -> None:
    """Put a freshly initialised linear layer with ``num_outputs`` outputs at module path ``path``."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old = getattr(parent, name, None)
    if not isinstance(old, nn.Linear):
        raise ValueError(f"head {path!r} of the pruned model is {type(old).__name__}, not nn.Linear; pass the path "
                         "of the final linear layer (as in model.named_modules()), or head=None")
    set_seed(seed)
    new = nn.Linear(old.in_features, num_outputs, bias=old.bias is not None).to(old.weight.device, old.weight.dtype)
    setattr(parent, name, new)


def finetune_masks(graph: ComputationGraph, masks: Mapping[str, Any], train: Subset, test: Subset, task: Task,
                   config: FinetuneConfig = FinetuneConfig(), *,
                   augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
                   head: str | None = None, num_outputs: int | None = None, device: str = "cpu",
                   key: Mapping[str, Any] | None = None, cache_dir: str | None = None,
                   log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Prune ``graph``'s model with each mask of ``masks`` (label -> mask; several labels may share a
    mask), fine-tune it on ``train`` for ``config.steps`` steps and measure it on ``test``.

    head/num_outputs (transfer): replace the linear layer at module path ``head`` by a fresh one with
    ``num_outputs`` outputs before fine-tuning; the "before" numbers are then those of the new task's
    untrained head. Returns one record per label: label, mask, removed, loss/accuracy before and after."""
    if (head is None) != (num_outputs is None):
        raise ValueError("pass head and num_outputs together (transfer to a new task), or neither")
    e = graph.num_prunable
    weights = _fingerprint(*[p.detach() for p in graph.module.parameters()])
    data = _fingerprint(*(t.float() for s in (train, test) for t in (*s.args(graph.module), s.targets)))
    rows: list[dict[str, Any]] = []
    for label, mask in masks.items():
        m = np.asarray([float(c) for c in mask] if isinstance(mask, str) else mask, dtype=np.float32).ravel()
        if m.shape != (e,):
            raise ValueError(f"mask {label!r} has {m.size} entries; the graph has {e} prunable edges")
        text = mask_text(m)

        def run() -> dict[str, Any]:
            model = prune(graph, m).to(device)
            if head is not None:
                _replace_head(model, head, num_outputs, config.seed)
            with torch.no_grad():
                before = _evaluate(model, test, task)
            finetune(model, train, task, config.steps, lr=config.lr, batch_size=config.batch_size, seed=config.seed,
                     augment=augment, schedule=config.schedule, device=device, autocast=config.autocast,
                     optimizer=config.optimizer, weight_decay=config.weight_decay)
            with torch.no_grad():
                after = _evaluate(model, test, task)
            return {"loss_before": before[0], "accuracy_before": before[1], "loss": after[0], "accuracy": after[1]}

        res = cached_result(({"mask": text, "head": head, "num_outputs": num_outputs, "weights": weights,
                              "data": data}, _config_key(config), dict(key or {})), run, cache_dir, kind="finetune")
        rows.append({**dict(key or {}), "label": label, "mask": text, "removed": int((m == 0).sum()),
                     "steps": config.steps, **res})
        if log is not None:
            log(f"fine-tuned {label} ({rows[-1]['removed']} removed): accuracy {res['accuracy_before']:.4f} -> "
                f"{res['accuracy']:.4f}")
    return rows


def method_picks(model: nn.Module | ComputationGraph, scoring: Subset, task: Task, methods: Sequence[str],
                 budgets: Sequence[int], *, allowed: str | None = None, seed: int = 0,
                 batch_size: int = 256) -> dict[tuple[str, int], np.ndarray]:
    """Each method's pick for each budget (number of edges removed, among the edges whose name matches the
    regex ``allowed``; default all), from the prior design measured once on ``scoring`` -- the experiment
    protocol's fitting and search without its truth (e.g. importance estimated on a source task, to be
    transferred). Picks keep an input->output path. Returns {(method, budget): mask}."""
    check_data(scoring, task, model.module if isinstance(model, ComputationGraph) else model)
    graph = model if isinstance(model, ComputationGraph) else build_graph(model, scoring[:2].args(model))
    gated = GatedModel(graph)
    removable = np.array([allowed is None or re.search(allowed, n) is not None for n in graph.edge_names])
    if not removable.any():
        raise ValueError(f"no prunable edge matches allowed={allowed!r}; edges are e.g. {graph.edge_names[:3]}")
    if max(budgets, default=0) > removable.sum():
        raise ValueError(f"a budget of {max(budgets)} edges exceeds the {int(removable.sum())} removable ones")
    measured = measure_design(gated, scoring, task, methods, batch_size=batch_size)
    ctx = Context(graph, gated, scoring, task, measured, seed=seed, batch_size=batch_size,
                  removable=None if removable.all() else removable, max_removed=max(budgets, default=0))
    picks = {}
    for m in methods:
        pred = fit_method(m, ctx)
        for b in budgets:
            picks[(m, b)] = select_mask(pred, graph, Budget(edges=b), allowed=None if removable.all() else removable)
    return picks


def linear_probe(model: nn.Module, train: Subset, config: FinetuneConfig = FinetuneConfig(), *, head: str = "fc",
                 num_outputs: int | None = None, task: Task = Task("classification"), device: str = "cpu") -> nn.Module:
    """A copy of ``model`` with a fresh linear layer at ``head`` (``num_outputs`` outputs; default: as many
    classes as ``train`` has) trained for ``config.steps`` steps on ``train`` while every other weight stays
    frozen: the source network read out for a target task, so importance can be estimated on target data."""
    probe = copy.deepcopy(model).to(device)
    n = int(train.targets.max()) + 1 if num_outputs is None else num_outputs
    for p in probe.parameters():
        p.requires_grad_(False)
    _replace_head(probe, head, n, config.seed)
    probe.eval()  # BatchNorm statistics of the source network stay as they are
    opt = torch.optim.AdamW(probe.get_submodule(head).parameters(), lr=config.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(config.seed)
    for _ in range(config.steps):
        b = torch.randint(0, len(train), (config.batch_size,), generator=gen)
        loss = task.per_sample(probe(*(x.to(device) for x in train[b].args(probe))), train.targets[b].to(device))[0].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for p in probe.parameters():
        p.requires_grad_(True)
    return probe.eval()
