"""The paper's trained networks, by name: their configurations, data splits and weights (shipped checkpoints).

    net, splits, task = load("cifar_resnet20_seed0")       # ResNet-20 on CIFAR-10, evaluation network 0
    net, splits, task = load("gpt2_12l_seed100")           # 12-layer GPT-2 on WikiText-2, a development network

Names: ``cifar_resnet20_seed<s>`` (30 epochs, the recipe of notebook 02; ``..._<n>ep`` for a shorter development schedule),
``gpt2_<L>l_seed<s>`` (L = 4 or 12 layers). Seeds 0, 1, 2 are evaluation networks, 100+ development networks.
The weights come from ``checkpoints/`` when shipped (``surrogate.checkpoints``), else from the cache, else they
are trained (``scripts/train_networks.py`` trains and ships them). The notebooks' paper profiles build the same
configurations, so they find the same checkpoints.
"""
from __future__ import annotations

import os
import re
from dataclasses import replace
from typing import Any, Callable, Mapping

import torch.nn as nn

from .evaluate import Subset, Task

__all__ = ["CIFAR_EPOCHS", "GPT2_SIZES", "parse", "load", "configs"]

CIFAR_EPOCHS = 30
GPT2_SIZES = {4: dict(n_layer=4, n_head=4, n_embd=256), 12: dict(n_layer=12, n_head=4, n_embd=160)}
_NAME = re.compile(r"^(?:cifar_resnet20_seed(?P<cseed>\d+)(?:_(?P<epochs>\d+)ep)?|gpt2_(?P<layers>\d+)l_seed(?P<lseed>\d+))$")


def parse(name: str) -> dict:
    """{"study": "cifar" | "lm", "seed", "epochs" or "layers"} of a network name (ValueError for others)."""
    m = _NAME.match(name)
    if m is None:
        raise ValueError(f"unknown network {name!r}; names look like cifar_resnet20_seed0, cifar_resnet20_seed100_12ep, "
                         "gpt2_12l_seed0")
    if m["cseed"] is not None:
        return {"study": "cifar", "seed": int(m["cseed"]), "epochs": int(m["epochs"] or CIFAR_EPOCHS)}
    layers = int(m["layers"])
    if layers not in GPT2_SIZES:
        raise ValueError(f"no {layers}-layer GPT-2 in the paper; sizes: {sorted(GPT2_SIZES)}")
    return {"study": "lm", "seed": int(m["lseed"]), "layers": layers}


def configs(name: str) -> tuple:
    """(data config, training config) of a network: what its cache key is built from."""
    spec = parse(name)
    if spec["study"] == "cifar":
        from .cifar import PAPER_TRAINING, CifarConfig
        return (CifarConfig(depth=20, n_val=5000, n_score=500, n_train=None),
                replace(PAPER_TRAINING, epochs=spec["epochs"], device="cpu"))
    from .lm import PAPER_LM_TRAINING, LMConfig
    return (LMConfig(**GPT2_SIZES[spec["layers"]], block_size=128, n_train_blocks=None, n_val=64, n_score=32),
            replace(PAPER_LM_TRAINING, epochs=1, batch_size=16, device="cpu"))


def load(name: str, data_dir: str | os.PathLike[str] | None = None, log: Callable[[str], None] | None = None, *,
         data: Mapping[str, Any] | None = None, training: Mapping[str, Any] | None = None
         ) -> tuple[nn.Module, dict[str, Subset], Task]:
    """The network (eval mode), its data splits (``cifar_splits`` / ``wikitext_splits``) and its task.
    ``data`` / ``training``: fields of its configurations to change (a small, quickly trained stand-in for a fast
    profile, e.g. ``training={"epochs": 1}``; no longer the paper's network, so trained into the cache)."""
    spec, (d, t) = parse(name), configs(name)
    data, training = replace(d, **(data or {})), replace(t, **(training or {}))
    if spec["study"] == "cifar":
        from .cifar import cifar_resnet, cifar_splits
        splits = cifar_splits(data, data_dir)
        net, _ = cifar_resnet(data, training, seed=spec["seed"], data_dir=data_dir, splits=splits, log=log)
        return net, splits, Task("classification")
    from .lm import gpt2_lm, wikitext_splits
    splits = wikitext_splits(data, data_dir=data_dir)
    net, _ = gpt2_lm(data, training, seed=spec["seed"], data_dir=data_dir, splits=splits, log=log)
    return net, splits, Task("lm")
