"""The draft's second and third scenarios for any model: pruned networks fine-tuned with one fixed budget,
and pruned networks transferred to another task (a fresh output layer, then the same fine-tuning).

    recs = finetune_masks(graph, {"ours": mask_a, "taylor2": mask_b}, train, test, Task("classification"),
                          FinetuneConfig(steps=300), key={"seed": 0})

For a study: ``finetune_sample`` fine-tunes random masks on each network, so that ``zero_shot_agreement`` can
say whether the zero-shot ranking of masks survives fine-tuning; ``finetune_picks`` fine-tunes the methods' and
the oracle's picks that the protocol (``surrogate.studies``) made on each network; ``finetune_method_picks``
makes the methods' picks among any edges itself (``method_picks``) and fine-tunes them; ``transfer_picks`` makes
the picks on a source network from importance measured on the source task and on the target task (through a
linear probe) and transfers them.

Every mask is pruned physically (``surrogate.gating.prune``), so a fine-tuned network is exactly the small
one a user would deploy. Each record is cached (``surrogate.train.cached_result``) by the mask, the
fine-tuning config, a fingerprint of the weights and of the data, and the caller's ``key``.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from .evaluate import Subset, Task
from .gating import prune
from .graph import ComputationGraph, build_graph
from .masks import mask_from_text, mask_text, prior_design, sparsity_masks
from .metrics import kendall, spearman
from .methods import METHODS, fit_method, fitting_context
from .progress import Ticker, reporting, say
from .pruning import Budget, select_mask
from .studies import Records
from .tasks import check_data
from .train import _evaluate, cached_result, finetune, set_seed

__all__ = ["FinetuneConfig", "finetune_masks", "finetune_picks", "finetune_method_picks", "finetune_sample",
           "zero_shot_agreement", "linear_probe", "method_picks", "transfer_picks", "mask_text"]


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
        m = mask_from_text(mask) if isinstance(mask, str) else np.asarray(mask, dtype=np.float32).ravel()
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
                 batch_size: int = 256, log: Callable[[str], None] | None = None) -> dict[tuple[str, int], np.ndarray]:
    """Each method's pick for each budget (number of edges removed, among the edges whose name matches the
    regex ``allowed``; default all), from the prior design measured once on ``scoring`` -- the experiment
    protocol's fitting and search without its truth (e.g. importance estimated on a source task, to be
    transferred). Picks keep an input->output path. Returns {(method, budget): mask}. ``log``: a line per
    method (time so far and left), and the measurements' own progress lines."""
    return _picks_and_passes(model, scoring, task, methods, budgets, allowed=allowed, seed=seed,
                             batch_size=batch_size, log=log)[0]


def _picks_and_passes(model: nn.Module | ComputationGraph, scoring: Subset, task: Task, methods: Sequence[str],
                      budgets: Sequence[int], *, allowed: str | None = None, seed: int = 0, batch_size: int = 256,
                      log: Callable[[str], None] | None = None) -> tuple[dict[tuple[str, int], np.ndarray],
                                                                         dict[str, int]]:
    """``method_picks``' picks, and the passes over ``scoring`` each method costs (forward + backward; a fitted
    method's measured masks included)."""
    check_data(scoring, task, model.module if isinstance(model, ComputationGraph) else model)
    graph = model if isinstance(model, ComputationGraph) else build_graph(model, scoring[:2].args(model))
    removable = graph.edges_matching(allowed)
    if max(budgets, default=0) > removable.sum():
        raise ValueError(f"a budget of {max(budgets)} edges exceeds the {int(removable.sum())} removable ones")
    tick = Ticker(f"picks on {scoring.name}", len(methods), log)
    with reporting(log) if log is not None else contextlib.nullcontext():
        ctx = fitting_context(graph, scoring, task, methods, prior_design(graph.num_prunable), seed=seed,
                              batch_size=batch_size, removable=removable, max_removed=max(budgets, default=0))
        picks, passes = {}, {}
        for i, m in enumerate(methods, 1):
            pred = fit_method(m, ctx)
            passes[m] = sum(METHODS[m].passes_in(ctx).values())
            for b in budgets:
                picks[(m, b)] = select_mask(pred, graph, Budget(edges=b), allowed=None if removable.all() else removable)
            if log is not None:
                log(f"picks on {scoring.name}: {m} ({i}/{len(methods)} methods) {tick.timing(i)}")
    return picks, passes


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


def _picks_of(regret: pd.DataFrame, methods: Sequence[str], budgets: Sequence[int], oracle: str,
              num_prunable: int) -> dict[tuple[str, int], Any]:
    """{(method, budget): mask}: the dense network ("dense", 0), then per budget each method's pick and the
    oracle's mask (column ``oracle`` of the records)."""
    picks: dict[tuple[str, int], Any] = {("dense", 0): np.ones(num_prunable)}
    for b in budgets:
        rb = regret[regret.removed == b].set_index("method")
        missing = [m for m in methods if m not in rb.index]
        if not len(rb) or missing:
            raise ValueError(f"no pick of {missing or list(methods)} at {b} edges removed in the protocol's "
                             f"records; fine-tune methods the protocol ran ({sorted(set(regret.method))}) at "
                             f"its budgets ({sorted(set(regret.removed))})")
        picks |= {(m, b): rb["mask"][m] for m in methods} | {("oracle", b): rb[oracle].iloc[0]}
    return picks


def _in_unit(rec: dict[str, Any], unit: str) -> dict[str, Any]:
    """A fine-tuning record with its quality in ``unit``: "accuracy" in percent (replacing the fractions),
    or "perplexity" added (ppl_before, ppl) from the losses."""
    if unit == "accuracy":
        return {**rec, "accuracy": 100 * rec["accuracy"], "accuracy_before": 100 * rec["accuracy_before"]}
    if unit == "perplexity":
        return {**rec, "ppl_before": math.exp(rec["loss_before"]), "ppl": math.exp(rec["loss"])}
    raise ValueError(f"unknown unit {unit!r}; use 'accuracy' (classification) or 'perplexity' (language models)")


def finetune_picks(records: Records, nets: Mapping[int, nn.Module | ComputationGraph], example: torch.Tensor | None,
                   methods: Sequence[str], budgets: Sequence[int], train: Subset, test: Subset, task: Task,
                   config: FinetuneConfig = FinetuneConfig(), *, unit: str = "accuracy", oracle: str = "best_mask",
                   augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
                   device: str = "cpu", cache_dir: str | None = None,
                   log: Callable[[str], None] | None = say) -> pd.DataFrame:
    """Scenario 2 on a study's networks: on each network (seed -> model, its graph traced on ``example``
    inputs; or seed -> its graph), the dense network, each of ``methods``' picks at each budget (edges
    removed) and the oracle's mask (``oracle``: the records' "best_mask" or "best_accuracy_mask") are pruned,
    fine-tuned on ``train`` and measured on ``test`` (``finetune_masks``, cached). One row per network x
    pick: the fine-tuning record in ``unit`` (see ``_in_unit``) with "method" ("dense", a method, "oracle")
    and "budget" (0: dense)."""
    rows = []
    for s, net in nets.items():
        graph = net if isinstance(net, ComputationGraph) else build_graph(net, example)
        if graph.edge_names != records.examples[s]["edge_names"]:
            raise ValueError(f"network {s}'s graph traced on these example inputs differs from the protocol's; "
                             "trace it as the protocol did (its config.graph)")
        picks = _picks_of(records.regret[records.regret.seed == s], methods, budgets, oracle, graph.num_prunable)
        labels = {k: k[0] if k[0] == "dense" or len(budgets) == 1 else f"{k[0]}@{k[1]}" for k in picks}
        recs = finetune_masks(graph, {labels[k]: v for k, v in picks.items()}, train, test, task, config,
                              augment=augment, device=device, key={"seed": s}, cache_dir=cache_dir, log=log)
        rows += [{**_in_unit(rec, unit), "method": m, "budget": b} for (m, b), rec in zip(picks, recs)]
    return pd.DataFrame(rows)


def finetune_method_picks(nets: Mapping[int, nn.Module], scoring: Subset, methods: Sequence[str],
                          budgets: Sequence[int], train: Subset, test: Subset, task: Task,
                          config: FinetuneConfig = FinetuneConfig(), *, allowed: str | None = None,
                          unit: str = "accuracy", seed: int = 0,
                          augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
                          device: str = "cpu", cache_dir: str | None = None,
                          log: Callable[[str], None] | None = say) -> pd.DataFrame:
    """Scenario 2 over another set of removable edges than the protocol's: on each network (seed -> model,
    traced on two ``scoring`` inputs), each method's pick at each budget among the edges matching the regex
    ``allowed`` (default: all, e.g. ResNet shortcuts too), made by ``method_picks`` on ``scoring`` (cached),
    then pruned, fine-tuned and measured as ``finetune_masks`` does. One row per network x pick, as
    ``finetune_picks`` gives (no dense row), with the passes over ``scoring`` the method spent ("passes")."""
    rows = []
    for s, net in nets.items():
        graph = build_graph(net, scoring[:2].args(net))
        weights = _fingerprint(*[p.detach() for p in net.parameters()])
        data = _fingerprint(*(t.float() for t in (*scoring.args(net), scoring.targets)))
        key = ({"weights": weights, "scoring": data, "methods": list(methods), "budgets": list(budgets),
                "allowed": allowed, "seed": seed, "task": task}, {"seed": s})

        def run() -> dict[str, Any]:
            picks, passes = _picks_and_passes(graph, scoring, task, methods, budgets, allowed=allowed, seed=seed,
                                              log=log)
            return {"masks": {f"{m}@{b}": mask_text(v) for (m, b), v in picks.items()}, "passes": passes}

        made = cached_result(key, run, cache_dir, kind="picks")
        recs = finetune_masks(graph, made["masks"], train, test, task, config, augment=augment, device=device,
                              key={"seed": s}, cache_dir=cache_dir, log=log)
        for r in recs:
            m, _, b = r["label"].rpartition("@")
            rows.append({**_in_unit(r, unit), "method": m, "budget": int(b), "passes": made["passes"][m]})
    return pd.DataFrame(rows)


def finetune_sample(nets: Mapping[int, nn.Module | ComputationGraph], example: torch.Tensor | None, n: int,
                    counts: Sequence[int], train: Subset, test: Subset, task: Task,
                    config: FinetuneConfig = FinetuneConfig(), *, allowed: str | None = None, seed: int = 0,
                    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
                    device: str = "cpu", cache_dir: str | None = None,
                    log: Callable[[str], None] | None = say) -> pd.DataFrame:
    """``n`` random masks, each removing one of ``counts`` of the edges whose name matches the regex ``allowed``
    (default: all; drawn uniformly among the connected masks, seeded by ``seed``, the same masks on every
    network), pruned, fine-tuned with ``config`` and measured on ``test`` on each network (seed -> model, traced
    on ``example``; or seed -> graph), cached like ``finetune_masks``. One row per network x mask: seed, label
    ("sample<i>"), mask, removed, the quality before and after fine-tuning in percent (accuracy_before,
    accuracy) and the losses. ``zero_shot_agreement`` compares the two rankings."""
    if n < 2:
        raise ValueError(f"a sample of {n} masks cannot be ranked; ask for n >= 2 (the paper: 10 per network)")
    rows = []
    for s, net in nets.items():
        graph = net if isinstance(net, ComputationGraph) else build_graph(net, example)
        removable = graph.edges_matching(allowed)
        masks = sparsity_masks(graph, n, 0.0, 1.0, seed, allowed=removable, counts=counts)
        if len(masks) < n:
            raise ValueError(f"only {len(masks)} connected masks remove {list(counts)} of the {int(removable.sum())} "
                             f"edges matching {allowed!r}; ask for n <= {len(masks)}")
        recs = finetune_masks(graph, {f"sample{i}": m for i, m in enumerate(masks)}, train, test, task, config,
                              augment=augment, device=device, key={"seed": s}, cache_dir=cache_dir, log=log)
        rows += [_in_unit(r, "accuracy") for r in recs]
    return pd.DataFrame(rows)


def zero_shot_agreement(finetuned: pd.DataFrame, by: str = "seed") -> pd.DataFrame:
    """Per network (column ``by``), how well quality before fine-tuning ranks the same masks' quality after it:
    Spearman and Kendall correlations of "accuracy_before" and "accuracy" over the network's rows (each mask
    once), "spearman_loss" of the zero-shot loss (negated: what a loss surrogate ranks by) and the accuracy after,
    with the number of masks and the mean accuracy before and after fine-tuning."""
    rows = []
    for value, sub in finetuned.drop_duplicates([by, "mask"]).groupby(by, sort=True):
        if len(sub) < 3:
            raise ValueError(f"{by}={value!r} has {len(sub)} distinct masks; a rank correlation needs at least 3")
        rows.append({by: value, "masks": len(sub), "spearman": spearman(sub.accuracy_before, sub.accuracy),
                     "kendall": kendall(sub.accuracy_before, sub.accuracy),
                     "spearman_loss": spearman(-sub.loss_before, sub.accuracy),
                     "accuracy_before": float(sub.accuracy_before.mean()), "accuracy": float(sub.accuracy.mean())})
    return pd.DataFrame(rows)


def transfer_picks(source: nn.Module, source_scoring: Subset, target: Mapping[str, Subset], task: Task,
                   methods: Sequence[str], budget: int, config: FinetuneConfig = FinetuneConfig(), *,
                   probe_key: tuple, probe_kind: str = "probe", allowed: str | None = None, seed: int = 0,
                   head: str = "fc", augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
                   device: str = "cpu", cache_dir: str | None = None,
                   log: Callable[[str], None] | None = say) -> pd.DataFrame:
    """Scenario 3: each method's pick of ``budget`` edges (among those matching ``allowed``) on the
    ``source`` network, from importance estimated on the source task (``source_scoring``) and on the target
    task (``target["scoring"]``, read out by a ``linear_probe`` trained on ``target["train"]``, cached under
    ``probe_key`` in the folder ``probe_kind``); the dense source network and every pick get a fresh head
    (``head``, one output per target class) and are fine-tuned on ``target["train"]``, measured on
    ``target["test"]``. One row per pick: the fine-tuning record with "method" and "importance_on" ("source",
    "target"; "-" for the dense network), its accuracies in percent ("accuracy_before_pct", "accuracy_pct")."""
    classes = int(target["train"].targets.max()) + 1
    note = log if log is not None else (lambda line: None)
    note(f"transfer: linear probe of the source network on the target task ({config.steps} steps)")
    probe = cached_result(probe_key, lambda: linear_probe(source, target["train"], config, head=head), cache_dir,
                          kind=probe_kind)
    graph = build_graph(source, source_scoring.inputs[:2])
    picks: dict[str, Any] = {"dense": np.ones(graph.num_prunable)}
    for where, model, scoring in (("source", source, source_scoring), ("target", probe, target["scoring"])):
        note(f"transfer: {len(methods)} methods' picks of {budget} edges from importance on the {where} task")
        found = method_picks(model, scoring, task, methods, [budget], allowed=allowed, seed=seed, log=log)
        picks |= {f"{m}|{where}": mask for (m, _), mask in found.items()}
    note(f"transfer: fine-tuning {len(picks)} networks on the target task ({config.steps} steps each)")
    test = Subset("target test", target["test"].inputs, target["test"].targets)
    recs = finetune_masks(graph, picks, target["train"], test, task, config, augment=augment, head=head,
                          num_outputs=classes, device=device, key={"transfer": seed}, cache_dir=cache_dir, log=log)
    rows = pd.DataFrame([{**_in_unit(r, "accuracy"), "method": r["label"].split("|")[0],
                          "importance_on": r["label"].split("|")[1] if "|" in r["label"] else "-"} for r in recs])
    return rows.drop(columns=["label"]).rename(columns={"accuracy": "accuracy_pct",
                                                        "accuracy_before": "accuracy_before_pct"})
