"""Run notebook 04's benchmark on one network of a study, into that network's own truth table, so that the
networks of a study can be measured in parallel processes (one thread each) and merged before the notebook
replays them from the merged table.

    SURROGATE_DATA_DIR=../shared/data python scripts/bench_network.py cifar cifar_resnet20_seed0   # -> truth/parts/
    python scripts/bench_network.py cifar --merge                                                  # -> truth/cifar.csv

The benchmark's parameters are the notebook's paper profile (notebooks/params/04_equal_cost.yaml, or --params),
so the notebook's rerun from the merged table charges the same passes and finds the same picks, measuring only
what a table does not keep (readout states).
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch
import yaml

from surrogate.bench import score, study_from, write_truth

ROOT = Path(__file__).resolve().parents[1]


def merge(study: str, truth_dir: Path) -> Path:
    """Every part table of ``study`` (truth/parts/<study>_*.csv) and the study's table, one row per (network,
    subset, samples, mask) (a part's row wins), written by bench.write_truth."""
    rows: dict[tuple[str, ...], dict[str, str]] = {}
    for path in [truth_dir / f"{study}.csv", *sorted((truth_dir / "parts").glob(f"{study}_*.csv"))]:
        if path.exists():
            with open(path, newline="") as f:
                for r in csv.DictReader(f):
                    rows[(r["network"], r["subset"], r["samples"], r["mask"])] = r
    target = truth_dir / f"{study}.csv"
    write_truth(target, list(rows.values()))
    return target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("study")
    ap.add_argument("network", nargs="?")
    ap.add_argument("--params", default=str(ROOT / "notebooks/params/04_equal_cost.yaml"))
    ap.add_argument("--merge", action="store_true", help="merge the part tables into truth/<study>.csv")
    args = ap.parse_args()
    p = yaml.safe_load(Path(args.params).read_text())
    truth_dir = ROOT / p.get("truth_dir", "truth")
    if args.merge:
        print(f"merged into {merge(args.study, truth_dir)}")
        return
    if not args.network:
        sys.exit("give a network of the study (e.g. cifar_resnet20_seed0), or --merge")
    torch.set_num_threads(1)
    keys = ("ks", "budgets", "searches", "zero_shot", "n_eval", "reference", "ablation_masks", "ablations")
    study = study_from(args.study, networks=[args.network], quick=(p.get("quick") or {}).get(args.study),
                       **{k: p.get(k) for k in keys})  # each a value or a mapping study -> value
    part = truth_dir / "parts" / f"{args.study}_{args.network}.csv"
    part.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    score(study.config.searches, study, zero_shot=study.config.zero_shot, truth=part if part.exists() else
          truth_dir / f"{args.study}.csv", save_truth_to=part, log=lambda m: print(m, flush=True))
    print(f"{args.network}: done in {(time.time() - t0) / 60:.1f} min; truth in {part}")


if __name__ == "__main__":
    main()
