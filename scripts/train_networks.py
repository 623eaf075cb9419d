"""Train the paper's networks (or load them from the cache) and ship them into checkpoints/ with a manifest entry.

    SURROGATE_DATA_DIR=../shared/data python scripts/train_networks.py cifar --seed 0
    SURROGATE_DATA_DIR=../shared/data python scripts/train_networks.py lm --seed 0 --layers 12

Each network is built with exactly the configuration its notebook's paper profile uses (so the notebook finds
the shipped checkpoint by the same cache key), trained on one thread (``--threads``), measured on the whole test
split, and copied to ``checkpoints/<kind>/<hash>.pt`` (language models in bfloat16) with its configuration, this
command, sha256, test metric, machine and wall time in ``checkpoints/manifest.json``. Seeds 100+ are development
networks. With ``--check`` nothing is shipped: the network is retrained into the cache (``SURROGATE_RETRAIN=1``)
and its test metric compared with the manifest's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace

import torch

from surrogate import zoo
from surrogate.checkpoints import RETRAIN_ENV, load_manifest, ship
from surrogate.evaluate import Task
from surrogate.profile import machine
from surrogate.train import CACHE_VERSION, _cache_path, _evaluate, _jsonable


def train_one(name: str, log) -> tuple[dict, tuple, dict, str]:
    """Train (or load) network ``name`` (surrogate.zoo) and measure it on its whole test split: its metrics,
    cache key, training metadata and cache kind."""
    spec, (data, training) = zoo.parse(name), zoo.configs(name)
    if spec["study"] == "cifar":
        from surrogate.cifar import _source, cifar_resnet, cifar_splits
        splits = cifar_splits(data)
        model, meta = cifar_resnet(data, training, seed=spec["seed"], splits=splits, log=log)
        loss, acc = _evaluate(model, splits["test"], Task("classification"))
        key = (data, replace(training, seed=spec["seed"]), {"data": _source(None)})
        return {"test_acc": acc, "test_loss": loss, "test_images": len(splits["test"])}, key, meta, "cifar_resnet"
    from surrogate.lm import _source, gpt2_lm, perplexity, wikitext_splits
    splits = wikitext_splits(data)
    model, meta = gpt2_lm(data, training, seed=spec["seed"], splits=splits, log=log)
    key = (data, replace(training, seed=spec["seed"]), {"data": _source(None), "vocab": 50257})
    return {"test_ppl": perplexity(model, splits["test"]), "test_blocks": len(splits["test"])}, key, meta, "gpt2_lm"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("study", choices=["cifar", "lm"])
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--layers", type=int, default=12, choices=sorted(zoo.GPT2_SIZES))
    ap.add_argument("--epochs", type=int, default=zoo.CIFAR_EPOCHS,
                    help="CIFAR only (development networks may be shorter)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--check", action="store_true", help="retrain into the cache and compare with the manifest")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.check:
        os.environ[RETRAIN_ENV] = "1"
    log = lambda m: print(m, flush=True)  # noqa: E731
    start = time.time()
    if args.study == "cifar":
        name = f"cifar_resnet20_seed{args.seed}" + ("" if args.epochs == zoo.CIFAR_EPOCHS else f"_{args.epochs}ep")
    else:
        name = f"gpt2_{args.layers}l_seed{args.seed}"
    metrics, key, meta, kind = train_one(name, log)
    minutes = (time.time() - start) / 60
    print(name, {k: round(v, 4) for k, v in metrics.items()}, f"{minutes:.1f} min", flush=True)
    if args.check:
        shipped = load_manifest().get(name)
        print("shipped:", None if shipped is None else shipped["metrics"])
        return
    cached = _cache_path(key, None, kind, ".pt")
    command = "python scripts/train_networks.py " + " ".join(sys.argv[1:])
    entry = {"config": _jsonable(list(key)), "cache_version": CACHE_VERSION, "command": command,
             "metrics": metrics, "machine": machine(), "wall_minutes": round(minutes, 1),
             "role": "development" if args.seed >= 100 else "evaluation",
             "best_epoch": meta.get("best_epoch"), "epochs_run": len(meta.get("history", []))}
    dest = ship(cached, name, entry, dtype=torch.bfloat16 if kind == "gpt2_lm" else None)
    print("shipped", dest, json.dumps(metrics))


if __name__ == "__main__":
    main()
