"""The CIFAR-10 ResNet setup of the paper: data splits and a trained, cached CIFAR ResNet.

Splits (all seeded): ``train`` -- the training set minus ``n_val`` held-out images (or the first ``n_train`` of
them); ``val`` -- those held-out images
(early stopping / model choice); ``scoring`` -- ``n_score`` images of ``train`` (all a pruning method may
see); ``test`` -- the test set (the truth). ``classes`` keeps a subset of the classes, relabelled 0..k-1 in
the given order (the transfer scenario trains on some classes and transfers to the others).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from .data import cifar_augment, load_cifar10, normalize_cifar, resolve_data_dir
from .evaluate import Subset, Task
from .models import ResNetCifar
from .train import TrainConfig, cached_model, train

__all__ = ["CifarConfig", "PAPER_TRAINING", "cifar_splits", "cifar_resnet"]

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
    from dataclasses import replace
    tc = replace(training, seed=seed)
    classes = len(config.classes) if config.classes is not None else 10

    def fit(model: ResNetCifar) -> dict:
        data = splits if splits is not None else cifar_splits(config, data_dir)
        res = train(model, data["train"], data["val"], Task("classification"), tc, augment=cifar_augment, log=log)
        return {"history": res.history, "best_epoch": res.best_epoch}

    return cached_model((config, tc, {"data": _source(data_dir)}), lambda: ResNetCifar(config.depth, classes, config.width),
                        fit, cache_dir=cache_dir, kind="cifar_resnet")
