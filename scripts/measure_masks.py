"""Measure random masks of one of the paper's networks, shared out over processes (surrogate.sharding).

    SURROGATE_DATA_DIR=../shared/data torchrun --nproc_per_node 2 scripts/measure_masks.py cifar_resnet20_seed0 \\
        --masks 200 --out build/masks.csv

Every rank loads the network (shipped checkpoint or cache), builds its graph and measures a contiguous block
of the masks on the whole subset with one torch thread; rank 0 writes one CSV row per mask (mask as a 0/1
string over the graph's prunable edges, loss, accuracy), in mask order: the same file one process writes
(``python scripts/measure_masks.py ...`` without torchrun).
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import time

import torch
import torch.distributed as dist

from surrogate import GatedModel, build_graph, zoo
from surrogate.bench import evaluation_subset
from surrogate.masks import bernoulli_masks, mask_text
from surrogate.paths import atomic_write
from surrogate.sharding import evaluate_masks_sharded


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("network", help="a network of surrogate.zoo, e.g. cifar_resnet20_seed0 or gpt2_4l_seed0")
    ap.add_argument("--masks", type=int, default=100, help="how many random masks")
    ap.add_argument("--keep", type=float, default=0.85, help="probability that an edge stays")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random masks")
    ap.add_argument("--subset", default="scoring", choices=["scoring", "val", "test"])
    ap.add_argument("--samples", type=int, default=None,
                    help="this many samples of the subset, drawn as the benchmark's evaluation subsets are "
                         "(bench.evaluation_subset: a seed-0 permutation; the test split is ordered by class)")
    ap.add_argument("--strategy", default="stack", choices=["stack", "prefix"])
    ap.add_argument("--out", required=True, help="CSV file (written by rank 0, atomically)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if "WORLD_SIZE" in os.environ:  # launched by torchrun
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    log = print if rank == 0 else None
    net, splits, task = zoo.load(args.network, log=log)
    data = splits[args.subset]
    if args.samples is not None:
        if not 2 <= args.samples <= len(data):
            ap.error(f"--samples must be between 2 and the {len(data)} samples of the {args.subset} subset")
        data = evaluation_subset(data, args.samples)
    gated = GatedModel(build_graph(net, data[:2].args(net)))
    masks = bernoulli_masks(gated.num_edges, args.masks, args.keep, args.seed)
    start = time.time()
    result = evaluate_masks_sharded(gated, masks, data, task, strategy=args.strategy, log=log)
    if rank == 0:
        out = io.StringIO()
        w = csv.writer(out, lineterminator="\n")
        w.writerow(["mask", "loss", "accuracy"])
        for i, mask in enumerate(masks):
            acc = "" if result.accuracy is None else repr(float(result.accuracy[i]))
            w.writerow([mask_text(mask), repr(float(result.loss[i])), acc])
        atomic_write(args.out, out.getvalue())
        world = dist.get_world_size() if dist.is_initialized() else 1
        print(f"{len(masks)} masks of {args.network} on {len(data)} {args.subset} samples, {world} process(es): "
              f"{time.time() - start:.1f} s -> {args.out}", flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
