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
import dataclasses
import json
import os
import sys
import time
from dataclasses import replace

import torch

from surrogate.checkpoints import RETRAIN_ENV, load_manifest, ship
from surrogate.evaluate import Task
from surrogate.profile import machine
from surrogate.train import CACHE_VERSION, _cache_path, _evaluate, _jsonable

# the paper profiles' networks (notebooks/params/*.yaml must build the same configurations)
CIFAR_EPOCHS = 50
LM = {4: dict(n_layer=4, n_head=4, n_embd=256), 12: dict(n_layer=12, n_head=4, n_embd=160)}


def cifar(seed: int, epochs: int, log) -> tuple[str, dict, object, dict, str]:
    from surrogate.cifar import PAPER_TRAINING, CifarConfig, _source, cifar_resnet, cifar_splits
    cfg = CifarConfig(depth=20, n_val=5000, n_score=500, n_train=None)
    training = replace(PAPER_TRAINING, epochs=epochs, device="cpu")
    splits = cifar_splits(cfg)
    model, meta = cifar_resnet(cfg, training, seed=seed, splits=splits, log=log)
    loss, acc = _evaluate(model, splits["test"], Task("classification"))
    key = (cfg, replace(training, seed=seed), {"data": _source(None)})
    suffix = "" if epochs == CIFAR_EPOCHS else f"_{epochs}ep"
    return f"cifar_resnet20_seed{seed}{suffix}", {"test_acc": acc, "test_loss": loss, "test_images": len(splits["test"])}, \
        key, meta, "cifar_resnet"


def lm(seed: int, layers: int, log) -> tuple[str, dict, object, dict, str]:
    from surrogate.lm import PAPER_LM_TRAINING, LMConfig, _source, gpt2_lm, perplexity, wikitext_splits
    cfg = LMConfig(**LM[layers], block_size=128, n_train_blocks=None, n_val=64, n_score=32)
    training = replace(PAPER_LM_TRAINING, epochs=1, batch_size=16, device="cpu")
    splits = wikitext_splits(cfg)
    model, meta = gpt2_lm(cfg, training, seed=seed, splits=splits, log=log)
    ppl = perplexity(model, splits["test"])
    key = (cfg, replace(training, seed=seed), {"data": _source(None), "vocab": 50257})
    return f"gpt2_{layers}l_seed{seed}", {"test_ppl": ppl, "test_blocks": len(splits["test"])}, key, meta, "gpt2_lm"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("study", choices=["cifar", "lm"])
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--layers", type=int, default=12, choices=sorted(LM))
    ap.add_argument("--epochs", type=int, default=CIFAR_EPOCHS, help="CIFAR only (development networks may be shorter)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--check", action="store_true", help="retrain into the cache and compare with the manifest")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.check:
        os.environ[RETRAIN_ENV] = "1"
    log = lambda m: print(m, flush=True)  # noqa: E731
    start = time.time()
    name, metrics, key, meta, kind = cifar(args.seed, args.epochs, log) if args.study == "cifar" else lm(args.seed, args.layers, log)
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
