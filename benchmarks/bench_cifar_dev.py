"""Development benchmark of the methods on a CIFAR-10 ResNet (not a test; not the paper's numbers).

    SURROGATE_DATA_DIR=../shared/data python benchmarks/bench_cifar_dev.py [--seed 100] [--n-eval 1000]

Trains (or loads from the cache) the ResNet of ``--seed`` with the paper recipe, then runs the shared
experiment protocol: the fitting design on the 500-image scoring subset, the truth of all 2^9 residual-branch
masks (shortcuts kept) and of realistic masks over all 18 edges on ``--n-eval`` test images, and each
method's pick for 1..6 branches removed against the exhaustive optimum. Seeds 100+ are development networks:
design choices are made on them, never on the evaluation networks of the paper (seeds 0, 1, ...).
Writes build/bench/cifar_dev_<seed>.csv (rank agreement) and ..._picks.csv (budgets).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch

from surrogate import ExperimentConfig, MaskFamily, Subset, Task, run_experiment
from surrogate.cifar import CifarConfig, cifar_resnet, cifar_splits

METHODS = ("random", "magnitude", "taylor1_abs", "taylor2", "loo", "flow", "prior_graph", "block_influence",
           "taylor_plus", "synflow", "sleb", "bonsai", "superposition", "superposition_state")
BRANCHES = r"bn2 ->"  # the residual branches of the CIFAR ResNet (its shortcuts are the other merge inputs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=100)
    ap.add_argument("--n-eval", type=int, default=1000)
    ap.add_argument("--out", default="build/bench")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = CifarConfig()
    splits = cifar_splits(cfg)
    model, meta = cifar_resnet(cfg, seed=args.seed, splits=splits)
    test = splits["test"]
    g = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(len(test), generator=g)[:args.n_eval]
    evaluation = Subset("test", test.inputs[idx], test.targets[idx])
    config = ExperimentConfig(
        methods=METHODS,
        families=(MaskFamily("branches", "exhaustive", edges=BRANCHES, holdout=False),
                  MaskFamily("realistic", "removed", n=100, counts=(1, 2, 3, 4))),
        budgets=(1, 2, 3, 4, 5, 6), budget_unit="edges", budget_edges=BRANCHES, eval_strategy="prefix",
        eval_batch=500, context_batch=100)
    res = run_experiment(model, splits["scoring"], evaluation, Task("classification"), config, seed=args.seed,
                         key={"seed": args.seed}, log=print)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prot, reg = pd.DataFrame(res.protocols), pd.DataFrame(res.regret)
    prot.to_csv(out / f"cifar_dev_{args.seed}.csv", index=False)
    reg.to_csv(out / f"cifar_dev_{args.seed}_picks.csv", index=False)
    print("dense test accuracy", res.info["test_acc"])
    print(prot.pivot_table(index="method", columns="protocol", values=["spearman", "spearman_within_k"]).round(3))
    reg["acc_gap_pt"] = 100 * (reg.best_accuracy - reg.chosen_accuracy)
    print(reg.pivot_table(index="method", columns="removed", values="acc_gap_pt").round(2))


if __name__ == "__main__":
    main()
