"""The CIFAR-10 ResNet setup of the paper: data splits and a trained, cached CIFAR ResNet.

Splits (all seeded): ``train`` -- the training set minus ``n_val`` held-out images (or the first ``n_train`` of
them); ``val`` -- those held-out images
(early stopping / model choice); ``scoring`` -- ``n_score`` images of ``train`` (all a pruning method may
see); ``test`` -- the test set (the truth). ``classes`` keeps a subset of the classes, relabelled 0..k-1 in
the given order (the transfer scenario trains on some classes and transfers to the others).

The study's protocol (``branch_protocol``): the exhaustive family of the residual branches and realistic masks
over every edge; the cost of its pruned networks (``cost_of``); the transfer scenario (``cifar_transfer``); and
its numbers for the paper (``cifar_macros``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import pandas as pd
import torch
import torch.nn as nn

from .data import cifar_augment, load_cifar10, normalize_cifar, resolve_data_dir
from .evaluate import Subset, Task
from .experiment import ExperimentConfig, MaskFamily
from .metrics import bootstrap_ci
from .models import ResNetCifar
from .paper import Macros, fmt
from .profile import count_macs, count_params, measure_latency
from .progress import say
from .report import cost_macros, family_macros, macros_from, macros_of, ranking_macros, summarize
from .scenarios import FinetuneConfig, transfer_picks
from .studies import Records
from .train import TrainConfig, cached_model, train

__all__ = ["CifarConfig", "PAPER_TRAINING", "BRANCHES", "cifar_splits", "cifar_resnet", "branch_protocol", "cost_of",
           "cifar_transfer",
           "cifar_macros"]

BRANCHES = r"bn2 ->"  # the residual branches (edges from each block's last BatchNorm into its add)

# the training recipe of the paper profile: SGD with Nesterov momentum, one cycle (2 warmup epochs, linear
# decay), weight decay 5e-4, bf16 autocast and channels-last on the CPU, the last epoch's weights
PAPER_TRAINING = TrainConfig(epochs=30, batch_size=128, lr=0.2, weight_decay=5e-4, optimizer="sgd", momentum=0.9,
                             nesterov=True, schedule="onecycle", warmup_epochs=2.0, decay="linear", patience=None,
                             keep="last", autocast="bf16", channels_last=True)


@dataclass(frozen=True)
class CifarConfig:
    depth: int = 20
    width: int = 16
    n_val: int = 5000
    n_score: int = 500
    split_seed: int = 0
    classes: tuple[int, ...] | None = None
    n_train: int | None = None      # use only this many training images (quick profiles); None: all the rest


def cifar_splits(config: CifarConfig, data_dir: str | os.PathLike[str] | None = None) -> dict[str, Subset]:
    """The seeded splits of ``config`` as normalised float tensors (see the module docstring)."""
    raw = load_cifar10(data_dir)
    (xtr, ytr), (xte, yte) = raw["train"], raw["test"]
    if config.classes is not None:
        lookup = torch.full((10,), -1, dtype=torch.long)
        lookup[list(config.classes)] = torch.arange(len(config.classes))
        keep_tr, keep_te = lookup[ytr] >= 0, lookup[yte] >= 0
        xtr, ytr, xte, yte = xtr[keep_tr], lookup[ytr[keep_tr]], xte[keep_te], lookup[yte[keep_te]]
    if not 0 < config.n_val < len(ytr) or not 0 < config.n_score <= len(ytr) - config.n_val:
        raise ValueError(f"n_val={config.n_val} and n_score={config.n_score} do not fit {len(ytr)} training images")
    perm = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(config.split_seed))
    val_idx, train_idx = perm[:config.n_val], perm[config.n_val:]
    if config.n_train is not None:
        if not config.n_score <= config.n_train <= len(train_idx):
            raise ValueError(f"n_train={config.n_train} must lie in [n_score, {len(train_idx)}]")
        train_idx = train_idx[:config.n_train]
    score_idx = train_idx[:config.n_score]
    x = normalize_cifar(xtr)
    return {"train": Subset("train", x[train_idx], ytr[train_idx]), "val": Subset("val", x[val_idx], ytr[val_idx]),
            "scoring": Subset("scoring", x[score_idx], ytr[score_idx]),
            "test": Subset("test", normalize_cifar(xte), yte)}


def _source(data_dir: str | os.PathLike[str] | None) -> str:
    """Which copy of CIFAR-10 the numbers come from: part of every cache key."""
    return "torchvision" if resolve_data_dir(data_dir) is None else "offline-jpeg-q75"


def cifar_resnet(config: CifarConfig, training: TrainConfig = PAPER_TRAINING, seed: int = 0, *,
                 data_dir: str | os.PathLike[str] | None = None, cache_dir: str | os.PathLike[str] | None = None,
                 splits: dict[str, Subset] | None = None,
                 log: Callable[[str], None] | None = print) -> tuple[ResNetCifar, dict]:
    """A CIFAR ResNet of ``config.depth`` trained with ``training`` (seeded by ``seed``) on the ``train``
    split, from the cache when it was trained before (keyed by every config and the data source). Returns
    the model (eval mode) and its metadata: validation loss and accuracy per epoch."""
    tc = replace(training, seed=seed)
    classes = len(config.classes) if config.classes is not None else 10

    def fit(model: ResNetCifar) -> dict:
        data = splits if splits is not None else cifar_splits(config, data_dir)
        res = train(model, data["train"], data["val"], Task("classification"), tc, augment=cifar_augment, log=log)
        return {"history": res.history, "best_epoch": res.best_epoch}

    return cached_model((config, tc, {"data": _source(data_dir)}), lambda: ResNetCifar(config.depth, classes, config.width),
                        fit, cache_dir=cache_dir, kind="cifar_resnet")


def branch_protocol(methods: Sequence[str], n_realistic: int, budgets: Sequence[int]) -> ExperimentConfig:
    """The study's protocol: all 2^9 masks of the residual branches (shortcuts kept, the exhaustive truth) and
    ``n_realistic`` masks removing 1-4 of all edges (connected); picks remove ``budgets`` branches."""
    return ExperimentConfig(
        methods=tuple(methods), eval_strategy="prefix", eval_batch=500, context_batch=100,
        families=(MaskFamily("branches", "exhaustive", edges=BRANCHES, holdout=False),
                  MaskFamily("realistic", "removed", n=n_realistic, counts=(1, 2, 3, 4))),
        budgets=tuple(budgets), budget_unit="edges", budget_edges=BRANCHES)


def cost_of(model: nn.Module, one: torch.Tensor, batch: torch.Tensor) -> dict[str, float]:
    """Parameters, MACs of one image, and the CPU latency at batch 1 and of ``batch`` (milliseconds)."""
    return {"params": count_params(model), "macs": count_macs(model, one),
            "latency_b1_ms": measure_latency(model, one, repeats=20),
            "latency_b256_ms": measure_latency(model, batch, repeats=5)}


def cifar_transfer(config: CifarConfig, training: TrainConfig, methods: Sequence[str], budget: int,
                   finetune: FinetuneConfig, *, epochs: int, seed: int = 0,
                   data_dir: str | os.PathLike[str] | None = None, cache_dir: str | os.PathLike[str] | None = None,
                   device: str = "cpu", log: Callable[[str], None] | None = say) -> pd.DataFrame:
    """Scenario 3 on CIFAR-10: a source ResNet trained ``epochs`` epochs on classes 0-4 (cached), each
    method's pick of ``budget`` residual branches from importance on the source task and on the target task
    (classes 5-9, through a linear probe), transferred to the target task (``scenarios.transfer_picks``)."""
    src_cfg, tgt_cfg = replace(config, classes=(0, 1, 2, 3, 4)), replace(config, classes=(5, 6, 7, 8, 9))
    src_splits, tgt_splits = cifar_splits(src_cfg, data_dir), cifar_splits(tgt_cfg, data_dir)
    source_training = replace(training, epochs=epochs)
    src, _ = cifar_resnet(src_cfg, source_training, seed=seed, data_dir=data_dir, cache_dir=cache_dir,
                          splits=src_splits, log=log)
    return transfer_picks(src, src_splits["scoring"], tgt_splits, Task("classification"), methods, budget, finetune,
                          probe_key=(src_cfg, tgt_cfg, replace(source_training, seed=seed), {"probe": finetune}),
                          probe_kind="cifar_probe", allowed=BRANCHES, seed=seed, augment=cifar_augment,
                          device=device, cache_dir=cache_dir, log=log)


def _ranking_intervals(protocols: pd.DataFrame, prefix: str) -> dict[str, object]:
    """The bootstrap 95% interval over networks of each method's Spearman correlation per mask family:
    ``<prefix><Family><Method>Lo`` and ``...Hi`` next to ``ranking_macros``' means."""
    rows = []
    for (family, method), d in protocols.groupby(["protocol", "method"]):
        lo, hi = bootstrap_ci(d.spearman.to_numpy(dtype=float))
        rows += [{"protocol": family, "method": method, "bound": "Lo", "value": lo},
                 {"protocol": family, "method": method, "bound": "Hi", "value": hi}]
    return macros_from(pd.DataFrame(rows), prefix, ["protocol", "method", "bound"], "value") if rows else {}


def cifar_macros(records: Records, rank: pd.DataFrame, picks: pd.DataFrame, finetuned: pd.DataFrame,
                 cost: pd.DataFrame, transfer: pd.DataFrame | None = None,
                 ours: Sequence[str] = ("superposition_pairs", "superposition_state"), *,
                 agreement: pd.DataFrame | None = None, finetune_tests: pd.DataFrame | None = None,
                 finetune_edges: pd.DataFrame | None = None) -> Macros:
    """The study's measured numbers for the paper (``Cif...``): the networks' test accuracy and mask families,
    rank agreement and passes (``rank``), the accuracy gap of the picks to the oracle (``picks``, accuracy
    unit; ``CifOursMeanGap`` for the first of ``ours`` that was run) and their test-loss regret, the passes each
    method spent for its picks (``CifPickFwd``: a search's as it ran), accuracy after fine-tuning and before
    (``finetuned``: the summary per method and budget), the cost of the largest pruning and the transfer
    accuracies; ``agreement`` (``scenarios.zero_shot_agreement`` of the fine-tuned random sample: ``CifFtRho``, its
    bootstrap interval over networks and range) and ``finetune_tests`` (``report.against_each`` after fine-tuning:
    ``CifFtVs<Method>Wins``, ...N, ...Diff, ...P); ``finetune_edges`` (the rows of
    ``scenarios.finetune_method_picks``, the picks over all edges fine-tuned: means per method and budget,
    ``CifFtEdge...`` after, ``CifZsEdge...`` before, ``CifFtEdgePasses...``)."""
    info = records.info
    gap = summarize(picks, ["method", "removed"], ["gap"])
    mean_gap = gap.groupby("method", as_index=False).gap_mean.mean()
    mine = next((m for m in ours if m in set(gap.method)), ours[-1])
    macros = Macros(CifTestAcc=fmt(100 * info.test_acc.mean(), 2), CifTestAccMin=fmt(100 * info.test_acc.min(), 2),
                    CifTestAccMax=fmt(100 * info.test_acc.max(), 2),
                    CifOursMeanGap=float(gap[gap.method == mine].gap_mean.mean()))
    macros.update(family_macros(info, "Cif", {"branches": "Branch", "realistic": "Realistic"}))
    macros.update(cost_macros(cost, "Cif", {"macs_rel": "MacsRatio", "latency_b1_ms_rel": "LatencyOneRatio",
                                            "latency_b256_ms_rel": "LatencyBatchRatio"}))
    if "accuracy" in cost:  # the test accuracy of the largest pruning whose cost is quoted, and of the dense network
        macros.update(CifCostAccuracy=fmt(cost.accuracy.iloc[-1], 1), CifCostDenseAccuracy=fmt(cost.accuracy.iloc[0], 1))
    macros.update(ranking_macros(rank, "Cif"))
    macros.update(_ranking_intervals(records.protocols, "Cif"))
    macros.update(macros_from(rank, "CifFwd", ["protocol", "method"], "forward_mean", digits=0))
    macros.update(macros_from(mean_gap, "CifMeanGap", ["method"], "gap_mean", digits=2))
    macros.update(macros_from(gap, "CifGap", ["method", "removed"], "gap_mean", digits=2))
    regret = summarize(picks, ["method", "removed"], ["regret"])  # the test-loss regret of the same picks
    macros.update(macros_from(regret, "CifRegret", ["method", "removed"], "regret_mean"))
    macros.update(macros_from(regret.groupby("method", as_index=False).regret_mean.mean(), "CifMeanRegret",
                              ["method"], "regret_mean"))
    if "forward" in records.regret:  # the passes each method spent for its picks (a search's as it ran)
        spent = records.regret.groupby("method", as_index=False).forward.mean()
        macros.update(macros_from(spent, "CifPickFwd", ["method"], "forward", digits=0))
    macros.update(macros_of(finetuned, ["method", "budget"], {"accuracy_mean": ("CifFt", 1),
                                                              "accuracy_before_mean": ("CifZs", 1)}))
    if finetune_edges is not None and len(finetune_edges):
        edges = summarize(finetune_edges, ["method", "budget"], ["accuracy_before", "accuracy", "passes"])
        macros.update(macros_of(edges, ["method", "budget"], {"accuracy_mean": ("CifFtEdge", 1),
                                                              "accuracy_before_mean": ("CifZsEdge", 1),
                                                              "passes_mean": ("CifFtEdgePasses", 0)}))
    if agreement is not None and len(agreement):
        lo, hi = bootstrap_ci(agreement.spearman)
        macros.update(CifFtRho=fmt(agreement.spearman.mean(), 2), CifFtRhoLo=fmt(lo, 2), CifFtRhoHi=fmt(hi, 2),
                      CifFtRhoMin=fmt(agreement.spearman.min(), 2), CifFtRhoMax=fmt(agreement.spearman.max(), 2),
                      CifFtSampleN=int(agreement.masks.min()), CifFtSampleTotal=int(agreement.masks.sum()),
                      CifFtRhoLoss=fmt(agreement.spearman_loss.mean(), 2))
    if finetune_tests is not None and len(finetune_tests):
        macros.update(macros_from(finetune_tests, "CifFtVs", ["other"], "wins", digits=0))
        macros.update(macros_from(finetune_tests, "CifFtVsN", ["other"], "n", digits=0))
        macros.update(macros_from(finetune_tests, "CifFtVsDiff", ["other"], "mean_diff", digits=1))
        macros.update(macros_from(finetune_tests, "CifFtVsP", ["other"], "wilcoxon_p", digits=3))
    if transfer is not None and len(transfer):
        macros.update(macros_from(transfer, "CifTr", ["method", "importance_on"], "accuracy_pct", digits=1))
    return macros
