"""Development benchmark of the equal-cost protocol on a development network (not a test; not the paper's numbers).

    SURROGATE_DATA_DIR=../shared/data python benchmarks/bench_equal_cost.py cifar --seed 100 --epochs 12
    SURROGATE_DATA_DIR=../shared/data python benchmarks/bench_equal_cost.py lm --seed 100 --layers 12

Loads the network (shipped checkpoint or cache; trains it if neither has it), runs ``surrogate.bench.run_bench``
on it (CIFAR: all 18 edges of the ResNet-20; LM: the attention and MLP sub-layers), and writes the picks and the
rank agreement to build/bench/equal_cost_<study>_<seed>_{picks,ranking}.csv, with the wall time of each method
in the log. Seeds 100+ are development networks: the design's choices are made on them only.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

from surrogate import Subset
from surrogate import zoo
from surrogate.bench import BenchConfig, at_budgets, head_to_head, regret_summary, run_bench
from surrogate.lm import SUBLAYER_BRANCHES



def load(args):
    name = f"cifar_resnet20_seed{args.seed}_{args.epochs}ep" if args.study == "cifar" else f"gpt2_{args.layers}l_seed{args.seed}"
    if args.study == "cifar" and args.epochs == zoo.CIFAR_EPOCHS:
        name = f"cifar_resnet20_seed{args.seed}"
    net, splits, task = zoo.load(name)
    units, strategy = (None, "prefix") if args.study == "cifar" else (SUBLAYER_BRANCHES, "stack")
    return net, splits["scoring"], splits["test"], task, units, strategy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("study", choices=["cifar", "lm"])
    ap.add_argument("--seed", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--n-eval", type=int, default=1000, help="test images (CIFAR) or blocks (LM) for the truth")
    ap.add_argument("--ks", type=int, nargs="+", default=[3, 5])
    ap.add_argument("--budgets", nargs="+", default=["E+2", "2*E", "4*E", "E*(E+1)/2"])
    ap.add_argument("--searches", nargs="+", default=None)
    ap.add_argument("--exhaustive-limit", type=int, default=2000, help="reference: every k-mask up to this many")
    ap.add_argument("--reference", type=int, default=3, help="else a search of this many x the largest budget")
    ap.add_argument("--ablation-masks", type=int, default=100)
    ap.add_argument("--out", default="build/bench")
    args = ap.parse_args()
    if args.seed < 100:
        raise SystemExit("seeds below 100 are evaluation networks: develop on 100+")
    torch.set_num_threads(1)
    net, scoring, test, task, units, strategy = load(args)
    pick = torch.randperm(len(test), generator=torch.Generator().manual_seed(args.seed))[:args.n_eval]
    evaluation = Subset("test", test.inputs[pick], test.targets[pick])
    extra = {} if args.searches is None else {"searches": tuple(args.searches)}
    config = BenchConfig(units=units, ks=tuple(args.ks), budgets=tuple(args.budgets), strategy=strategy,
                         batch_size=500 if args.study == "cifar" else 16, exhaustive_limit=args.exhaustive_limit,
                         reference=args.reference, ablation_masks=args.ablation_masks, **extra)
    t0 = time.time()
    res = run_bench(net, scoring, evaluation, task, config, seed=args.seed, log=lambda m: print(m, flush=True))
    print(f"total {(time.time() - t0) / 60:.1f} min")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"{args.study}_{args.seed}"
    picks, ranking = pd.DataFrame(res.picks).assign(network=args.seed), pd.DataFrame(res.ranking)
    pd.DataFrame(res.reach).to_csv(out / f"equal_cost_{tag}_reach.csv", index=False)
    picks.to_csv(out / f"equal_cost_{tag}_picks.csv", index=False)
    ranking.to_csv(out / f"equal_cost_{tag}_ranking.csv", index=False)
    budgets = sorted(picks[picks.kind == "search"].budget.unique())
    table = at_budgets(picks, budgets)
    pd.set_option("display.width", 200)
    print(regret_summary(table).pivot_table(index=["method"], columns=["k", "P"], values="mean").round(4))
    print(head_to_head(table, "sequential").to_string())
    print(ranking.pivot_table(index="method", columns=["fraction", "budget"], values="spearman").round(3))


if __name__ == "__main__":
    main()
