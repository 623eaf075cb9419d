"""Training with early stopping on validation loss, seeding, and a checkpoint cache keyed by config."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
import torch.nn as nn

from .evaluate import Subset, Task
from .checkpoints import retraining, shipped_path
from .measuring import model_device
from .paths import atomic_path, cache_root
from . import progress as _progress  # train(log=...) reports every progress.PROGRESS_SECONDS within an epoch

__all__ = ["set_seed", "TrainConfig", "TrainResult", "lr_schedule", "train", "config_hash", "cached_model", "cached_result",
           "default_cache_dir", "finetune"]


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (CPU) at once."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 100                   # upper bound; early stopping usually ends sooner
    batch_size: int = 128
    lr: float = 3e-3                    # peak learning rate
    weight_decay: float = 1e-4
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = 0.9               # sgd only
    nesterov: bool = True               # sgd only
    schedule: Literal["cosine", "constant", "onecycle"] = "cosine"  # lr factor per batch step: lr_schedule
    warmup_epochs: float = 0.0          # onecycle: linear warmup over this many epochs (fractions allowed)
    decay: Literal["linear", "cosine"] = "linear"  # onecycle: shape of the decay to 0 after the warmup
    patience: int | None = 10           # epochs without val-loss improvement before stopping; None: never
    keep: Literal["best", "last"] = "best"  # weights returned: the lowest val loss, or the last epoch's
    label_smoothing: float = 0.0
    autocast: Literal["bf16"] | None = None  # forward pass under torch.autocast(bfloat16); loss in float32
    device: str = "cpu"                 # the model is moved here, and each batch with it
    channels_last: bool = False         # convolutional nets: train in channels-last memory format (faster
                                        # on CPUs); the returned model is contiguous again
    seed: int = 0


@dataclass
class TrainResult:
    model: nn.Module                    # the trained model, with the weights config.keep chose
    history: list[dict[str, float]]     # per epoch: train_loss, val_loss, val_acc
    best_epoch: int                     # the epoch with the lowest validation loss


def lr_schedule(config: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """The factor on config.lr at batch step s (0-based) of training, as LambdaLR takes it.

    cosine: from 1 to 0 over all steps. constant: 1. onecycle: (s + 1) / W over the W = warmup_epochs *
    steps_per_epoch warmup steps, then linear or cosine (config.decay) decay to 0 at the last step.
    """
    steps = config.epochs * steps_per_epoch
    if config.schedule == "cosine":
        return lambda s: 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps))
    if config.schedule == "constant":
        return lambda s: 1.0
    if config.schedule != "onecycle":
        raise ValueError(f"unknown schedule {config.schedule!r}; use 'cosine', 'constant' or 'onecycle'")
    if config.decay not in ("linear", "cosine"):
        raise ValueError(f"unknown decay {config.decay!r}; use 'linear' or 'cosine'")
    warm = min(steps, round(config.warmup_epochs * steps_per_epoch))

    def onecycle(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        p = min(1.0, (s - warm) / max(1, steps - warm))  # 0 after the warmup, 1 at the end
        return 1 - p if config.decay == "linear" else 0.5 * (1 + math.cos(math.pi * p))

    return onecycle


def _autocast(kind: str | None, device: torch.device) -> contextlib.AbstractContextManager:
    if kind is None:
        return contextlib.nullcontext()
    if kind != "bf16":
        raise ValueError(f"unknown autocast {kind!r}; use None or 'bf16'")
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _batches(n: int, batch_size: int, gen: torch.Generator | None) -> list[torch.Tensor]:
    idx = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
    return list(idx.split(batch_size))


def _inputs(batch: Subset, model: nn.Module, device: torch.device,
            augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
            gen: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
    """The model's positional inputs of a batch on ``device``; ``augment`` transforms the first one."""
    x = tuple(t.to(device) for t in batch.args(model))
    return x if augment is None else (augment(x[0], gen), *x[1:])


# _evaluate's batches hold at most this many output elements (2 GiB of float32: 83 blocks of 128 tokens of
# GPT-2 logits, 1024 images of 10 classes), so that validating a language model cannot exhaust the memory
MAX_EVAL_OUTPUT_ELEMENTS = 2**29


@torch.no_grad()
def _evaluate(model: nn.Module, data: Subset, task: Task, batch_size: int = 1024) -> tuple[float, float]:
    """Mean loss and accuracy on ``data``, in batches of at most ``batch_size`` samples and
    MAX_EVAL_OUTPUT_ELEMENTS output elements."""
    model.eval()
    device = model_device(model)
    loss_sum, acc_sum = 0.0, 0.0
    if len(data) > 1 and batch_size > 1:
        per_sample = task.scored(model(*_inputs(data[:1], model, device))).numel()
        batch_size = max(1, min(batch_size, MAX_EVAL_OUTPUT_ELEMENTS // max(1, per_sample)))
    for b in _batches(len(data), batch_size, None):
        out = model(*_inputs(data[b], model, device))
        loss, acc = task.per_sample(out, data.targets[b].to(device))
        loss_sum += float(loss.double().sum())
        acc_sum += float(acc.double().sum()) if acc is not None else float("nan")
    return loss_sum / len(data), acc_sum / len(data)


def train(model: nn.Module, train_data: Subset, val_data: Subset, task: Task, config: TrainConfig,
          augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
          log: Callable[[str], None] | None = None) -> TrainResult:
    """Minimise the task loss; return the weights with the lowest validation loss (early stopping) or those
    of the last epoch (config.keep). Trains ``model`` itself, moved to config.device (batches follow it);
    augment(x, generator) transforms each training batch on that device (see data.cifar_augment)."""
    set_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    if config.keep not in ("best", "last"):
        raise ValueError(f"keep must be 'best' or 'last', got {config.keep!r}")
    device = torch.device(config.device)
    model.to(device)
    fmt = torch.channels_last if config.channels_last else None
    if fmt is not None:
        model.to(memory_format=fmt)
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                              nesterov=config.nesterov)
    steps_per_epoch = (len(train_data) + config.batch_size - 1) // config.batch_size
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(config, steps_per_epoch))
    keep_best = config.keep == "best"
    best = (float("inf"), -1, copy.deepcopy(model.state_dict()) if keep_best else None)
    history: list[dict[str, float]] = []
    last_report = time.monotonic()
    clock = _progress.Ticker("training steps", config.epochs * steps_per_epoch)  # its estimates of the time left
    bound = " at most" if config.patience is not None else ""  # early stopping may end it sooner

    for epoch in range(config.epochs):
        model.train()
        total, count = 0.0, 0
        for step, b in enumerate(_batches(len(train_data), config.batch_size, gen)):
            if log is not None and time.monotonic() - last_report > _progress.PROGRESS_SECONDS and count:
                last_report = time.monotonic()  # long epochs (language models): a line every few minutes
                log(f"epoch {epoch:3d} step {step}/{steps_per_epoch} train {total / count:.4f} "
                    f"{clock.timing(epoch * steps_per_epoch + step, bound)}")
            x, y = _inputs(train_data[b], model, device, augment, gen), train_data.targets[b].to(device)
            if fmt is not None:
                x = (x[0].contiguous(memory_format=fmt), *x[1:])
            with _autocast(config.autocast, device):
                out = task.scored(model(*x))
            out = out.float() if config.autocast is not None else out
            if task.kind == "classification" and config.label_smoothing:
                loss = nn.functional.cross_entropy(out, y, label_smoothing=config.label_smoothing)
            else:
                loss = task.per_sample(out, y)[0].mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(b)
            count += len(b)
        val_loss, val_acc = _evaluate(model, val_data, task)
        history.append({"epoch": epoch, "train_loss": total / count, "val_loss": val_loss, "val_acc": val_acc})
        if log is not None:
            log(f"epoch {epoch:3d} train {total / count:.4f} val {val_loss:.4f} acc {val_acc:.4f} "
                f"{clock.timing((epoch + 1) * steps_per_epoch, bound)}")
        if val_loss < best[0]:
            best = (val_loss, epoch, copy.deepcopy(model.state_dict()) if keep_best else None)
        elif config.patience is not None and epoch - best[1] >= config.patience:
            break
    if fmt is not None:
        model.to(memory_format=torch.contiguous_format)
    if keep_best:
        model.load_state_dict(best[2])
    model.eval()
    return TrainResult(model, history, best[1])


def finetune(model: nn.Module, train_data: Subset, task: Task, steps: int, lr: float = 1e-3,
             batch_size: int = 128, seed: int = 0, *,
             augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
             schedule: Literal["constant", "cosine"] = "constant", device: str | None = None,
             autocast: Literal["bf16"] | None = None, optimizer: Literal["adamw", "sgd"] = "adamw",
             momentum: float = 0.9, weight_decay: float = 0.0) -> nn.Module:
    """A fixed number of optimizer steps on a (pruned) model: the draft's second scenario. Trains ``model``
    itself (on ``device``, default: where it is); optimizer "adamw" or "sgd" (Nesterov momentum ``momentum``,
    as the CIFAR networks were trained), with ``weight_decay``; schedule "cosine" takes the lr from lr to 0 over
    the steps; augment(x, generator) transforms each batch; autocast "bf16" runs the forward passes in bfloat16
    (the loss in float32)."""
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"unknown schedule {schedule!r}; use 'constant' or 'cosine'")
    if optimizer not in ("adamw", "sgd"):
        raise ValueError(f"unknown optimizer {optimizer!r}; use 'adamw' or 'sgd'")
    set_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if device is not None:
        model.to(device)
    dev = model_device(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay) if optimizer == "adamw" else \
        torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(1, steps)))) \
        if schedule == "cosine" else None
    model.train()
    done = 0
    while done < steps:
        for b in _batches(len(train_data), batch_size, gen):
            x, y = _inputs(train_data[b], model, dev, augment, gen), train_data.targets[b].to(dev)
            with _autocast(autocast, dev):
                out = task.scored(model(*x))
            loss = task.per_sample(out.float() if autocast is not None else out, y)[0].mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            done += 1
            if done >= steps:
                break
    model.eval()
    return model


# ----------------------------------------------------------------------------------------------------
# checkpoint cache

def default_cache_dir() -> Path:
    """Where ``cached_model`` keeps checkpoints: ``surrogate.paths.cache_root()`` (resolved at call time)."""
    return cache_root()


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {"__class__": type(obj).__name__, **{k: _jsonable(v) for k, v in dataclasses.asdict(obj).items()}}
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in sorted(obj.items())}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, type):  # a module class named in a config (a graph's vertex types)
        return f"{obj.__module__}.{obj.__qualname__}"
    raise TypeError(f"cannot hash {type(obj).__name__} into a cache key; use dataclasses, dicts and literals")


def config_hash(*configs: Any) -> str:
    """A stable short hash of frozen-dataclass / dict configs (the cache key)."""
    text = json.dumps(_jsonable(list(configs)), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# Bumped whenever the code that produces cached weights changes what it produces (2: seeded initialisation),
# so stale checkpoints are never loaded for a new version's configuration.
CACHE_VERSION = 2


def _cache_path(key: tuple, cache_dir: str | os.PathLike | None, kind: str, suffix: str) -> Path:
    """``<cache>/<kind>/<hash of key and CACHE_VERSION><suffix>``: where a cached checkpoint or result lives."""
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return folder / kind / f"{config_hash(*key, {'cache_version': CACHE_VERSION})}{suffix}"


def cached_model(key: tuple, build: Callable[[], nn.Module], fit: Callable[[nn.Module], Any],
                 cache_dir: str | os.PathLike | None = None, kind: str = "model",
                 init_seed: int | None = None) -> tuple[nn.Module, dict]:
    """Return ``build()`` with weights trained by ``fit`` -- or loaded from ``<cache>/<kind>/<hash>.pt``.

    A checkpoint shipped with the project (``surrogate.checkpoints``: ``<project>/checkpoints/<kind>/<hash>.pt``)
    comes first, unless ``$SURROGATE_RETRAIN`` is set. ``key`` holds every config that determines the weights. ``build`` runs under ``set_seed(init_seed)``
    (default: a seed derived from the key), so the initial weights never depend on what the process did
    before. ``fit`` may return a dict of metadata (saved with the weights). A checkpoint that cannot be read
    is reported, deleted and retrained; a new one is written atomically.
    """
    path = _cache_path(key, cache_dir, kind, ".pt")
    seed = int(path.stem[:8], 16) if init_seed is None else init_seed

    def seeded_build() -> nn.Module:
        set_seed(seed)
        return build()

    model = seeded_build()
    shipped = shipped_path(kind, path.name)
    if not retraining() and shipped.exists():  # a tracked checkpoint of the paper (surrogate.checkpoints)
        blob = torch.load(shipped, map_location="cpu", weights_only=True)
        model.load_state_dict(blob["state_dict"])  # copies (and casts bfloat16 weights) into the built model
        model.eval()
        return model, blob.get("meta", {})
    if path.exists():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(blob["state_dict"])
            model.eval()
            return model, blob.get("meta", {})
        except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint is rebuilt
            warnings.warn(f"cached checkpoint {path} is unreadable ({type(exc).__name__}: {exc}); "
                          "deleting it and training again")
            path.unlink(missing_ok=True)
            model = seeded_build()
    meta = fit(model) or {}
    with atomic_path(path) as tmp:
        torch.save({"state_dict": model.state_dict(), "meta": _jsonable(meta), "key": _jsonable(list(key))}, tmp)
    model.eval()
    return model, meta


def cached_result(key: tuple, compute: Callable[[], Any], cache_dir: str | os.PathLike | None = None,
                  kind: str = "result") -> Any:
    """``compute()`` -- or its value from ``<cache>/<kind>/<hash>.pkl`` when computed before with the same
    ``key`` (every config that determines it, plus the code version ``CACHE_VERSION``). For expensive measured
    results (a study's records per network, fine-tuned accuracies): a rerun after an interruption or a change
    in plotting code recomputes nothing. The value must be picklable; an unreadable file is reported and
    recomputed; a new one is written atomically."""
    import pickle
    path = _cache_path(key, cache_dir, kind, ".pkl")
    if path.exists():
        try:
            with open(path, "rb") as f:
                return pickle.load(f)
        except Exception as exc:  # noqa: BLE001 - any unreadable result is recomputed
            warnings.warn(f"cached result {path} is unreadable ({type(exc).__name__}: {exc}); computing it again")
            path.unlink(missing_ok=True)
    value = compute()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            pickle.dump(value, f, protocol=pickle.HIGHEST_PROTOCOL)
    return value
