"""The controlled study on random-graph networks: one network per seed, each run through the shared
experiment protocol (``surrogate.experiment``).

For every graph: train the network (cached), then ``run_experiment`` on it with the teacher task's small
``score`` split as the scoring subset and its ``test`` split as the truth, under two protocols:
- "prior": test masks keep each edge with probability 0.5 (the published protocol; most are disconnected);
- "realistic": test masks remove few edges (a fraction in ``realistic``) and keep the network connected.
Budgeted pruning follows the prior protocol's unconstrained search (picks and optimum may be disconnected
networks), and sample efficiency refits the ``k_methods`` with extra masks of each protocol.

Its tables (per graph size, against the noise ceiling of the truth: ``size_tables``), the over-training
comparison (``overtraining``) and its numbers for the paper (``synthetic_macros``) are here too.
"""
from __future__ import annotations

import math
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from typing import Any

import pandas as pd
import torch

from .data import TeacherTaskConfig, make_teacher_task
from .evaluate import Subset, Task
from .experiment import ExperimentConfig, GraphOptions, MaskFamily, run_experiment
from .models import Block, RandomGraphConfig, RandomGraphNet
from .paper import Macros, macro_name
from . import progress as _progress_settings  # PROGRESS_SECONDS read when a study runs
from .report import macros_from, summarize, wide_table
from .studies import Records, collect
from .train import TrainConfig, cached_model, cached_result, train

__all__ = ["StudyConfig", "study_experiment", "run_graph", "run_study", "PROTOCOLS", "SIZE_METRICS", "study_network",
           "size_bucket", "size_word", "size_tables", "overtraining", "overtraining_macros", "synthetic_macros", "REGRET_METHODS"]

PROTOCOLS = ("prior", "realistic")
SIZE_METRICS = ("spearman", "kendall", "top5", "top10", "spearman_connected")
BUCKETS = {2: "10-15", 5: "20-40", 14: "50-100", 30: "over 100"}  # the prior study's size buckets (edges)
WORDS = {2: "Tiny", 5: "Small", 14: "Medium", 30: "Large"}         # size names in macro names
REGRET_METHODS = ("magnitude", "taylor2", "connectivity", "loo", "fcn", "prior_graph", "flow", "graph_flow",
                  "superposition")                                   # the regret figure and its macros
MACRO_METHODS = ("connectivity", "taylor2", "loo", "prior_graph", "flow", "graph_flow", "superposition")


def study_experiment(n_test_masks: int = 200, keep_prob: float = 0.5,
                     realistic: tuple[float, float] = (0.05, 0.25), **changes: Any) -> ExperimentConfig:
    """The study's protocol: ``n_test_masks`` test masks per protocol, "prior" (each edge kept with
    probability ``keep_prob``; no holdout) and "realistic" (a fraction in ``realistic`` of the edges removed);
    budgets as fractions of the edges, unconstrained picks; ``changes`` override any other field of
    ``ExperimentConfig`` (``budgets``, ``extra_k``, ``methods``, ...)."""
    families = (MaskFamily("prior", "bernoulli", n=n_test_masks, keep_prob=keep_prob, holdout=False),
                MaskFamily("realistic", "removed", n=n_test_masks, removed=realistic))
    base = dict(methods=("random", "magnitude", "taylor1", "taylor1_abs", "taylor2", "connectivity", "loo", "flow",
                         "linear", "fcn", "prior_graph", "graph_flow", "superposition"),
                graph=GraphOptions(vertices=(Block,), edges="all"), families=families, budgets=(0.1, 0.25),
                budget_unit="fraction", connected_picks=False, extra_k=(0, 25, 50, 100),
                k_methods=("linear", "fcn", "graph_flow", "superposition"))
    return ExperimentConfig(**{**base, **changes})


@dataclass(frozen=True)
class StudyConfig:
    """The networks of the study (graph sizes, seeds, width, task, training) and the protocol every one of
    them goes through (``experiment``: ``study_experiment(...)``)."""
    sizes: tuple[int, ...] = (2, 5)                  # generator iterations (the prior study: 2, 5, 14, 30)
    graphs_per_size: int = 2                         # independently seeded graphs per size
    first_seed: int = 0                              # graph g of a size uses seed first_seed + g
    width: int = 32                                  # hidden width of every block
    task: TeacherTaskConfig = TeacherTaskConfig(n_score=256, n_test=1000)
    train: TrainConfig = TrainConfig()
    experiment: ExperimentConfig = field(default_factory=study_experiment)

    def __post_init__(self) -> None:
        names = tuple(f.name for f in self.experiment.families)
        if sorted(names) != sorted(PROTOCOLS):
            raise ValueError(f"the study's tables need the mask families {PROTOCOLS}, got {names}: build the "
                             "experiment with surrogate.study.study_experiment(n_test_masks=..., ...)")

    @property
    def n_test_masks(self) -> int:
        return self.experiment.families[0].n


def study_network(cfg: StudyConfig, size: int, seed: int, cache_dir: str | None = None,
                  train_if_missing: bool = True) -> tuple[RandomGraphNet, dict[str, Subset], dict]:
    """The trained network of one (size, seed) of the study (from the cache if trained before), its data
    splits and training metadata."""
    task_cfg = replace(cfg.task, seed=seed)
    data = make_teacher_task(task_cfg)
    split = {k: Subset(k, *getattr(data, k)) for k in ("train", "val", "score", "test")}
    rg = RandomGraphConfig(iterations=size, in_features=task_cfg.in_features, num_classes=task_cfg.num_classes,
                           width=cfg.width, seed=seed)
    tc = replace(cfg.train, seed=seed)

    def fit(m: RandomGraphNet) -> dict:
        if not train_if_missing:
            raise RuntimeError(f"no cached network for size {size}, seed {seed}: run the study first")
        return {"best_epoch": train(m, split["train"], split["val"], Task("classification"), tc).best_epoch}

    net, meta = cached_model((rg, tc, task_cfg), lambda: RandomGraphNet(rg), fit, cache_dir=cache_dir,
                             kind="random_graph")
    return net, split, meta


def run_graph(cfg: StudyConfig, size: int, seed: int, cache_dir: str | None = None) -> dict[str, Any]:
    """Everything measured on one random graph: records for the info, protocols, regret and efficiency tables."""
    net, split, meta = study_network(cfg, size, seed, cache_dir)
    res = run_experiment(net, split["score"], split["test"], Task("classification"), cfg.experiment,
                         seed=seed, mask_seed=10_000 * size + seed, key={"size": size, "seed": seed})
    info = {**res.info, "best_epoch": meta.get("best_epoch"), "chance_loss": math.log(cfg.task.num_classes)}
    return {"info": info, "protocols": res.protocols, "by_k": res.by_k, "regret": res.regret,
            "efficiency": res.efficiency, "example": res.example}


def _run_one(args: tuple) -> dict[str, Any]:
    torch.set_num_threads(1)  # one thread per worker process: the workers share the machine's cores
    cfg, size, seed, cache_dir = args
    # the records of each graph are cached too: a rerun after an interruption or a change in the figures
    # recomputes nothing (the key: every config of the study, the graph, and the cache's code version)
    return cached_result((cfg, {"size": size, "seed": seed}), lambda: run_graph(cfg, size, seed, cache_dir),
                         cache_dir, kind="random_graph_records")


def run_study(cfg: StudyConfig, workers: int = 1, cache_dir: str | None = None,
              progress: bool = True) -> Records:
    """Run every graph of the study; its records (``surrogate.studies.Records``), the examples keyed by
    (size, seed): predictions on the test masks, importances, a view of the graph."""
    if workers > 1 and torch.device(cfg.train.device).type != "cpu":
        raise ValueError(f"workers={workers} runs graphs in parallel processes on the CPU; with device="
                         f"{cfg.train.device!r} use workers=1 (one process drives the accelerator)")
    jobs = [(cfg, size, cfg.first_seed + g, cache_dir) for size in cfg.sizes for g in range(cfg.graphs_per_size)]
    if workers > 1:  # largest graphs first balances the workers; every graph is seeded on its own
        order = sorted(range(len(jobs)), key=lambda i: -jobs[i][1])
        by_job: dict[int, dict[str, Any]] = {}
        with ProcessPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            futures = {pool.submit(_run_one, jobs[i]): i for i in order}
            for f in _progress(as_completed(futures), len(jobs), progress):  # ticks as each graph ends
                by_job[futures[f]] = f.result()
        results = [by_job[i] for i in range(len(jobs))]
    else:
        threads = torch.get_num_threads()
        try:
            results = list(_progress(map(_run_one, jobs), len(jobs), progress))
        finally:
            torch.set_num_threads(threads)
    return collect({(r["info"]["size"], r["info"]["seed"]): r for r in results})


def _progress(it, total: int, show: bool):
    """``it``, printing "graphs: done/total (time so far, ~time left)" about once a minute if ``show``: plain
    lines, which a notebook, papermill's terminal log and a script all show (a tqdm widget shows in
    JupyterLab only)."""
    if not show:
        yield from it
        return
    tick = _progress_settings.Ticker("graphs", total, lambda line: print(line, flush=True), every=min(60.0, _progress_settings.PROGRESS_SECONDS))
    for done, item in enumerate(it, 1):
        yield item
        tick(done)


def size_bucket(size: int) -> str:
    """The prior study's name of a graph size (its edges), e.g. 5 -> '20-40'."""
    return BUCKETS.get(size, f"{size} it.")


def size_word(size: int) -> str:
    """A graph size in macro names, e.g. 5 -> 'Small'."""
    return WORDS.get(size, macro_name(size))


def size_tables(summary: pd.DataFrame, info: pd.DataFrame, sizes: tuple[int, ...],
                methods: list[str]) -> dict[str, pd.DataFrame]:
    """The paper's tables of the study (methods x graph sizes, "mean +- std" LaTeX cells) by file name:
    per protocol the Spearman correlation (with the noise ceiling of the truth as a last row), Kendall's tau
    and the top-10 overlap; and the prior protocol's Spearman among its connected test masks
    ("spearman_prior_connected"; connectivity left out: it knows only connectivity)."""
    def table(sub, metric, ms, **kw):
        return wide_table(sub, metric, ms, "size", sizes, header=size_bucket, **kw)

    tables = {}
    for p in PROTOCOLS:
        sub = summary[summary.protocol == p]
        ceil = summarize(info.assign(method="ceiling"), ["method", "size"], [f"ceiling_{p}"]).rename(
            columns=lambda c: c.replace(f"ceiling_{p}", "spearman"))
        tables[f"spearman_{p}"] = pd.concat(
            [table(sub, "spearman", methods),
             table(ceil, "spearman", ["ceiling"], best=None, labels=lambda m: "Noise ceiling of the truth")],
            ignore_index=True)
        for metric in ("kendall", "top10"):
            tables[f"{metric}_{p}"] = table(sub, metric, methods)
    tables["spearman_prior_connected"] = table(summary[summary.protocol == "prior"], "spearman_connected",
                                               [m for m in methods if m != "connectivity"])
    return tables


def overtraining(cfg: StudyConfig, size: int, graphs: int, epochs: int, workers: int = 1,
                 cache_dir: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``graphs`` graphs of ``size`` trained as in ``cfg`` (early-stopped) and trained ``epochs`` epochs with
    no early stopping (the last kept), through the same protocol (no budgets or extra masks): the mean
    Spearman per training, protocol and method, and the networks' test accuracy, loss and best epoch per
    training."""
    over = replace(cfg, sizes=(size,), graphs_per_size=graphs,
                   experiment=replace(cfg.experiment, budgets=(), extra_k=()),
                   train=replace(cfg.train, epochs=epochs, patience=None, keep="last"))
    runs = {"early-stopped": run_study(replace(over, train=cfg.train), workers, cache_dir, progress=False),
            "over-trained": run_study(over, workers, cache_dir, progress=False)}
    info = pd.concat([r.info.assign(training=k) for k, r in runs.items()])
    prot = pd.concat([r.protocols.assign(training=k) for k, r in runs.items()])
    return (summarize(prot, ["training", "protocol", "method"], ["spearman"]),
            summarize(info, ["training"], ["test_acc", "test_loss", "best_epoch"]))


def overtraining_macros(spearman: pd.DataFrame, networks: pd.DataFrame, epochs: int, graphs: int) -> Macros:
    """The over-training comparison's numbers (``SynOt...``) from the two tables of ``overtraining``."""
    tag = {"training": lambda t: "Over" if t == "over-trained" else "Early"}
    macros = Macros(SynOtEpochs=epochs, SynOtGraphs=graphs)
    macros.update(macros_from(spearman, "SynOt", ["training", "protocol", "method"], "spearman_mean", names=tag))
    macros.update(macros_from(networks, "SynOtAcc", ["training"], "test_acc_mean", names=tag))
    macros.update(macros_from(networks, "SynOtLoss", ["training"], "test_loss_mean", names=tag))
    macros.update(macros_from(networks, "SynOtBestEpoch", ["training"], "best_epoch_mean", digits=0, names=tag))
    return macros


def synthetic_macros(cfg: StudyConfig, profile: str, info: pd.DataFrame, summary: pd.DataFrame,
                     efficiency: pd.DataFrame, regret: pd.DataFrame, tests: pd.DataFrame) -> Macros:
    """The study's numbers for the paper (``Syn...``) from its tables: the networks (``info``), the rank
    agreement per protocol, method and size (``summary``), sample efficiency and regret summaries, and the
    paired tests."""
    macros = Macros(SynGraphsPerSize=cfg.graphs_per_size, SynTestMasks=cfg.n_test_masks, SynScoreN=cfg.task.n_score,
                    SynEvalN=cfg.task.n_test, SynGraphs=len(info), SynProfile=profile,
                    SynEffMax=max(cfg.experiment.extra_k),
                    SynRegretBudgetPct=int(round(100 * max(cfg.experiment.budgets))))
    key, names = list(MACRO_METHODS), {"size": size_word}
    t = tests[tests.metric == "spearman"]
    per_size = info.groupby("size").agg(EdgesMin=("edges", "min"), EdgesMax=("edges", "max"),
                                        TestAcc=("test_acc", "mean"),
                                        Connected=("prior_frac_connected", lambda v: 100 * v.mean()),
                                        CeilingPrior=("ceiling_prior", "mean"),
                                        CeilingRealistic=("ceiling_realistic", "mean")).reset_index()
    prior = summary[(summary.protocol == "prior") & summary.method.isin(key[1:])]
    for df, prefix, keys, value, digits, nm in (
            (summary[summary.method.isin(key)], "Syn", ["protocol", "method", "size"], "spearman_mean", 3, names),
            (prior, "SynPriorConn", ["method", "size"], "spearman_connected_mean", 3, names),
            (efficiency[efficiency.extra == max(cfg.experiment.extra_k)], "SynEff", ["protocol", "method", "size"],
             "spearman_mean", 3, names),
            (regret[(regret.budget_frac == max(cfg.experiment.budgets)) & regret.method.isin(REGRET_METHODS)], "SynRegret",
             ["method", "size"], "regret_mean", 3, names),
            (t, "SynPaired", ["protocol", "size"], "wilcoxon_p", 2, {"size": lambda s: "P" + size_word(s)}),
            (t, "SynPaired", ["protocol", "size"], "wins", 0, {"size": lambda s: "Wins" + size_word(s)}),
            *((per_size, "Syn" + col, ["size"], col, d, names)
              for col, d in (("EdgesMin", 0), ("EdgesMax", 0), ("TestAcc", 3), ("Connected", 0),
                             ("CeilingPrior", 2), ("CeilingRealistic", 2)))):
        macros.update(macros_from(df, prefix, keys, value, digits=digits, names=nm))
    ours_regret = regret[regret.method == "superposition"].regret_mean
    top = tests[tests.metric == "top10"]
    macros.update(SynRegretSuperpositionWorst=float(ours_regret.max()) if len(ours_regret) else float("nan"),
                  SynTopTenCells=len(top),  # significant: the cells where ours is higher
                  SynTopTenSignificant=int(((top.wilcoxon_p < 0.05) & (top.mean_diff > 0)).sum()))
    return macros
