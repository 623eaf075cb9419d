"""The controlled study on random-graph networks: one network per seed, each run through the shared
experiment protocol (``surrogate.experiment``).

For every graph: train the network (cached), then ``run_experiment`` on it with the teacher task's small
``score`` split as the scoring subset and its ``test`` split as the truth, under two protocols:
- "prior": test masks keep each edge with probability 0.5 (the published protocol; most are disconnected);
- "realistic": test masks remove few edges (a fraction in ``realistic``) and keep the network connected.
Budgeted pruning follows the prior protocol's unconstrained search (picks and optimum may be disconnected
networks), and sample efficiency refits the ``k_methods`` with extra masks of each protocol.
"""
from __future__ import annotations

import math
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from typing import Any

import pandas as pd
import torch

from .data import TeacherTaskConfig, make_teacher_task
from .evaluate import Subset, Task
from .experiment import ExperimentConfig, GraphOptions, MaskFamily, run_experiment
from .models import Block, RandomGraphConfig, RandomGraphNet
from . import progress as _progress_settings  # PROGRESS_SECONDS read when a study runs
from .train import TrainConfig, cached_model, cached_result, train

__all__ = ["StudyConfig", "run_graph", "run_study", "PROTOCOLS", "study_network"]

PROTOCOLS = ("prior", "realistic")


@dataclass(frozen=True)
class StudyConfig:
    sizes: tuple[int, ...] = (2, 5)                  # generator iterations (the prior study: 2, 5, 14, 30)
    graphs_per_size: int = 2                         # independently seeded graphs per size
    first_seed: int = 0                              # graph g of a size uses seed first_seed + g
    width: int = 32                                  # hidden width of every block
    task: TeacherTaskConfig = TeacherTaskConfig(n_score=256, n_test=1000)
    train: TrainConfig = TrainConfig()
    n_test_masks: int = 200                          # per protocol
    keep_prob: float = 0.5                           # prior protocol
    realistic: tuple[float, float] = (0.05, 0.25)    # realistic protocol: fraction of edges removed
    budgets: tuple[float, ...] = (0.1, 0.25)         # regret: fraction of edges removed
    exhaustive_limit: int = 2000                     # exhaustive optimum when C(E, b) is at most this
    search_random: int = 100                         # otherwise: random masks at the budget ...
    search_swaps: int = 100                          # ... and swap moves around the best mask found
    beam_width: int = 4                              # mask search for non-additive predictors
    extra_k: tuple[int, ...] = (0, 25, 50, 100)      # sample efficiency: masks beyond the prior design
    methods: tuple[str, ...] = ("random", "magnitude", "taylor1", "taylor1_abs", "taylor2", "connectivity", "loo",
                                "flow", "linear", "fcn", "prior_graph", "graph_flow", "superposition")
    k_methods: tuple[str, ...] = ("linear", "fcn", "graph_flow", "superposition")
    eval_batch: int = 2048


def _experiment_config(cfg: StudyConfig) -> ExperimentConfig:
    return ExperimentConfig(
        methods=cfg.methods,
        graph=GraphOptions(vertices=(Block,), edges="all"),
        families=(MaskFamily("prior", "bernoulli", n=cfg.n_test_masks, keep_prob=cfg.keep_prob, holdout=False),
                  MaskFamily("realistic", "removed", n=cfg.n_test_masks, removed=cfg.realistic)),
        budgets=cfg.budgets, budget_unit="fraction", connected_picks=False,
        exhaustive_limit=cfg.exhaustive_limit, search_random=cfg.search_random, search_swaps=cfg.search_swaps,
        beam_width=cfg.beam_width, extra_k=cfg.extra_k, k_methods=cfg.k_methods, eval_batch=cfg.eval_batch)


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
    res = run_experiment(net, split["score"], split["test"], Task("classification"), _experiment_config(cfg),
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
              progress: bool = True) -> dict[str, Any]:
    """Run every graph of the study; DataFrames "info", "protocols", "by_k", "regret", "efficiency" and
    per-graph "examples" (predictions on the test masks, importances, a view of the graph)."""
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
    frames = {k: pd.DataFrame([r for res in results for r in (res[k] if k != "info" else [res[k]])])
              for k in ("info", "protocols", "by_k", "regret", "efficiency")}
    frames["examples"] = {(r["info"]["size"], r["info"]["seed"]): r["example"] for r in results}
    return frames


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
