"""A study over several trained networks: the shared protocol (``run_experiment``) run once per network, each
run cached, and the records of all of them collected into tables.

    rec = run_networks(nets, scoring, evaluation, Task("classification"), config,
                       key=lambda s: (data_cfg, replace(training, seed=s), config, {"seed": s}), kind="my_study")
    rec.protocols          # one row per network x method x mask family (pandas)

The three studies differ in their networks and data only; what they do with the records is here and in
``surrogate.report`` (tables), ``surrogate.scenarios`` (fine-tuning the picks), ``surrogate.profile`` (the
cost of pruned networks) and ``surrogate.interactions``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from .evaluate import Subset, Task
from .experiment import ExperimentConfig, ExperimentResult, run_experiment
from .graph import ComputationGraph
from .masks import mask_from_text
from .progress import say
from .train import cached_result

__all__ = ["Records", "collect", "networks", "run_networks", "held_out", "oracle_masks"]

TABLES = ("info", "protocols", "by_k", "regret", "efficiency")


@dataclass
class Records:
    """The records of a study's networks as tables: ``info`` (one row per network), ``protocols`` (network x
    method x mask family), ``by_k`` (... x number removed), ``regret`` (network x method x budget),
    ``efficiency`` (network x method x family x extra masks), and ``examples`` (per network: what figures need,
    ``ExperimentResult.example``)."""
    info: pd.DataFrame
    protocols: pd.DataFrame
    by_k: pd.DataFrame
    regret: pd.DataFrame
    efficiency: pd.DataFrame
    examples: dict[Any, dict[str, Any]]


def collect(results: Mapping[Any, ExperimentResult | Mapping[str, Any]]) -> Records:
    """The records of several runs (network key -> an ``ExperimentResult``, or a dict with the same fields and
    "example") as one ``Records``; rows keep the order of ``results``."""
    def field(r: Any, name: str) -> Any:
        return r[name] if isinstance(r, Mapping) else getattr(r, name)

    frames = {k: pd.DataFrame([row for r in results.values()
                               for row in ([field(r, k)] if k == "info" else field(r, k))]) for k in TABLES}
    return Records(**frames, examples={k: field(r, "example") for k, r in results.items()})


def networks(train: Callable[[int], tuple[nn.Module, dict]],
             seeds: Sequence[int]) -> tuple[dict[int, nn.Module], dict[int, dict]]:
    """A study's evaluation networks: ``train(seed)`` (a trained model and its metadata, e.g. ``cifar_resnet``
    or ``gpt2_lm`` with every other argument bound) for each seed, as {seed: model} and {seed: metadata}."""
    trained = {s: train(s) for s in seeds}
    return {s: t[0] for s, t in trained.items()}, {s: t[1] for s, t in trained.items()}


def run_networks(nets: Mapping[int, nn.Module | ComputationGraph], scoring: Subset, evaluation: Subset, task: Task,
                 config: ExperimentConfig, *, key: Callable[[int], tuple], kind: str,
                 cache_dir: str | None = None, log: Callable[[str], None] | None = say) -> Records:
    """``run_experiment`` on every network (seed -> trained model, or its graph built already), each run's
    result from the cache when run before: ``key(seed)`` is its cache key (every config that determines it,
    the experiment config included), ``kind`` its cache folder. Each run is seeded by its network's seed and adds a "seed" column to its records.
    ``log`` receives progress lines (default: printed; None: silent)."""
    if not nets:
        raise ValueError("no networks to run the protocol on; pass {seed: trained model}")

    def run(s: int) -> ExperimentResult:
        return run_experiment(nets[s], scoring, evaluation, task, config, seed=s, key={"seed": s}, log=log)

    return collect({s: cached_result(key(s), lambda s=s: run(s), cache_dir, kind=kind) for s in nets})


def held_out(data: Subset, n: int | None, seed: int = 0) -> Subset:
    """The first ``n`` items of ``data`` in a seeded random order (all of ``data``, unshuffled, for None): the
    held-out evaluation subset; the same seed gives nested subsets for growing ``n``."""
    if n is None:
        return data
    if not 0 < n <= len(data):
        raise ValueError(f"cannot hold out {n} of the {len(data)} items of {data.name!r}; use 1..{len(data)}")
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n]
    return Subset(data.name, data.inputs[pick], data.targets[pick])


def mask_quality(graph: ComputationGraph, masks: Mapping[int, str], data: Subset, task: Task) -> pd.DataFrame:
    """Loss and accuracy (percent; NaN for tasks without one) on ``data`` of each mask of ``masks`` ({edges
    removed: mask text}, e.g. ``oracle_masks``): the quality to quote next to a pruned network's cost."""
    from .evaluate import evaluate_masks
    from .gating import GatedModel
    rows = sorted(masks.items())
    bits = torch.from_numpy(np.stack([mask_from_text(m, graph.num_prunable) for _, m in rows]))
    res = evaluate_masks(GatedModel(graph), bits, data, task, masks_per_pass=1)
    acc = res.accuracy if res.accuracy is not None else [float("nan")] * len(rows)
    return pd.DataFrame({"removed": [r for r, _ in rows], "loss": [float(x) for x in res.loss],
                         "accuracy": [100 * float(a) for a in acc]})


def oracle_masks(regret: pd.DataFrame, seed: int, column: str = "best_mask") -> dict[int, str]:
    """The dense network and the best mask found at each budget for network ``seed``, as {edges removed: mask
    text}: what the cost of pruning is measured on. ``column``: "best_mask" (lowest loss) or
    "best_accuracy_mask"."""
    rows = regret[regret.seed == seed].drop_duplicates("removed")
    if not len(rows):
        raise ValueError(f"no regret records for network {seed}; the networks are {sorted(set(regret.seed))}")
    dense = "1" * len(rows[column].iloc[0])
    return {0: dense, **dict(zip(rows.removed.tolist(), rows[column].tolist()))}
