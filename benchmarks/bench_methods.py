"""Benchmark of every method on small random-graph networks (not a test).

    python benchmarks/bench_methods.py [--size 5] [--seeds 1000 1001 1002] [--out build/bench/bench_methods.csv]

Per method: Spearman, Kendall, top-5%/10% overlap on held-out masks of both protocols (fitted on the prior
design), regret of its pick at 10% and 25% of the edges removed, and wall time to score/fit. Seeds 1000+ are
development graphs, disjoint from the seeds the paper's study uses (0-9).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from surrogate.data import TeacherTaskConfig
from surrogate.study import StudyConfig, run_graph, study_experiment


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=5, help="generator iterations (5: 20-40 edges)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1000, 1001, 1002])
    ap.add_argument("--out", default="build/bench/bench_methods.csv")
    args = ap.parse_args()
    cfg = StudyConfig(sizes=(args.size,), task=TeacherTaskConfig(n_score=1000, n_test=4000),
                      experiment=study_experiment(300, budgets=(0.1, 0.25), extra_k=(0,), k_methods=()))
    prot, reg = [], []
    for seed in args.seeds:
        r = run_graph(cfg, args.size, seed)
        prot += r["protocols"]
        reg += r["regret"]
    prot, reg = pd.DataFrame(prot), pd.DataFrame(reg)
    table = prot.pivot_table(index="method", columns="protocol", values=["spearman", "kendall", "top5", "top10"])
    table.columns = [f"{p}_{m}" for m, p in table.columns]
    table["seconds"] = prot.groupby("method").seconds.mean()
    for b, d in reg.groupby("budget_frac"):
        table[f"regret_{int(100 * b)}pct"] = d.groupby("method").regret.mean()
    table = table.sort_values("realistic_spearman", ascending=False)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out)
    pd.set_option("display.width", 200)
    print(f"random graphs: {args.size} iterations, seeds {args.seeds}; means over graphs")
    print(table.round(3).to_string())


if __name__ == "__main__":
    main()
