"""The controlled study on random-graph networks: one function per graph, tidy records out.

For every graph: train the network (cached), measure the fitting masks on the small scoring subset, and
evaluate every method on held-out test masks whose true losses are measured on the separate evaluation
subset, under two protocols:
- "prior": test masks keep each edge with probability 0.5 (the published protocol; most are disconnected);
- "realistic": test masks remove few edges (a fraction in ``realistic``) and keep the network connected.
Then budgeted pruning (regret against the exhaustive optimum or the best of a large search) and sample
efficiency (accuracy against the number of fitted masks K).
"""
from __future__ import annotations

import math
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from .data import TeacherTaskConfig, make_teacher_task
from .evaluate import MaskEval, Subset, Task, evaluate_masks
from .gating import GatedModel
from .graph import build_graph
from .masks import all_masks_with_removed, bernoulli_masks, prior_design, sparsity_masks, unique_rows
from .metrics import evaluate_predictions, spearman
from .models import Block, RandomGraphConfig, RandomGraphNet
from .pruning import Budget, select_mask
from .scorers import SCORERS, Context, Predictor, score
from .surrogates import SURROGATES, make_surrogate
from .train import TrainConfig, cached_model, train

__all__ = ["StudyConfig", "run_graph", "run_study", "PROTOCOLS"]

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
    scorers: tuple[str, ...] = ("random", "magnitude", "taylor1", "taylor1_abs", "taylor2", "connectivity",
                                "loo", "flow")
    surrogates: tuple[str, ...] = ("linear", "fcn", "prior_graph", "graph_flow", "superposition")
    k_methods: tuple[str, ...] = ("linear", "fcn", "graph_flow", "superposition")
    eval_batch: int = 2048


def _fit_method(name: str, ctx: Context, masks: np.ndarray, losses: np.ndarray) -> Predictor:
    if name in SURROGATES:
        return make_surrogate(name, ctx).fit(masks, losses)
    return score(name, ctx)


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def run_graph(cfg: StudyConfig, size: int, seed: int, cache_dir: str | None = None) -> dict[str, Any]:
    """Everything measured on one random graph: records for the info, protocols, regret and efficiency tables."""
    torch.set_num_threads(1)
    task_cfg = replace(cfg.task, seed=seed)
    data = make_teacher_task(task_cfg)
    split = {k: Subset(k, *getattr(data, k)) for k in ("train", "val", "score", "test")}
    scoring, evaluation = split["score"], split["test"]
    task = Task("classification")
    rg = RandomGraphConfig(iterations=size, in_features=task_cfg.in_features, num_classes=task_cfg.num_classes,
                           width=cfg.width, seed=seed)
    tc = replace(cfg.train, seed=seed)
    net, meta = cached_model((rg, tc, task_cfg), lambda: RandomGraphNet(rg),
                             lambda m: {"best_epoch": train(m, split["train"], split["val"], task, tc).best_epoch},
                             cache_dir=cache_dir, kind="random_graph")
    graph = build_graph(net, scoring.inputs[:4], vertices=(Block,), edges="all")
    gated = GatedModel(graph)
    e = graph.num_prunable
    ev = lambda m, sub: evaluate_masks(gated, m, sub, task, batch_size=cfg.eval_batch)  # noqa: E731
    key = {"size": size, "seed": seed, "edges": e}

    fit = prior_design(e)
    # the outputs of the fitting masks are kept: the superposition surrogate is built from them
    fit_eval = evaluate_masks(gated, fit, scoring, task, batch_size=cfg.eval_batch, keep_outputs=True)
    rng_seed = 10_000 * size + seed
    tests = {"prior": bernoulli_masks(e, cfg.n_test_masks, cfg.keep_prob, seed=rng_seed + 1),
             "realistic": sparsity_masks(graph, cfg.n_test_masks, *cfg.realistic, seed=rng_seed + 2, exclude=fit)}
    # the truth, measured on the two halves of the evaluation subset: their agreement bounds how well any
    # predictor can rank the test masks (the noise ceiling), at no extra cost
    half = len(evaluation) // 2
    halves = (Subset("evaluation[:half]", evaluation.inputs[:half], evaluation.targets[:half]),
              Subset("evaluation[half:]", evaluation.inputs[half:], evaluation.targets[half:]))
    truth, ceiling = {}, {}
    for p, m in tests.items():
        a, b = ev(m, halves[0]), ev(m, halves[1])
        loss = (a.loss * len(halves[0]) + b.loss * len(halves[1])) / len(evaluation)
        truth[p] = MaskEval(evaluation.name, len(evaluation), loss)
        r = spearman(a.loss, b.loss)
        ceiling[p] = float(np.sqrt(max(0.0, 2 * r / (1 + r)))) if r > -1 else 0.0  # Spearman-Brown, sqrt
    full = ev(np.ones((1, e)), evaluation)
    info = {**key, "vertices": len(graph.vertices), "params": sum(p.numel() for p in net.parameters()),
            "best_epoch": meta.get("best_epoch"), "test_loss": float(full.loss[0]),
            "test_acc": float(full.accuracy[0]), "loss_all_removed": float(ev(np.zeros((1, e)), evaluation).loss[0]),
            "prior_frac_connected": float(graph.connected(tests["prior"]).mean()),
            "realistic_n_masks": len(tests["realistic"]), "chance_loss": math.log(task_cfg.num_classes),
            **{f"ceiling_{p}": c for p, c in ceiling.items()}}

    # 1-2. both protocols, every method fitted on the prior design
    ctx = Context(graph, gated, scoring, task, fit, fit_eval.loss, fit_eval.outputs, seed=seed)
    protocols, predictors = [], {}
    # ranking among the connected test masks only: a disconnected network's output does not depend on its
    # input, so connectivity alone separates those; this isolates what a method knows beyond connectivity
    conn = {p: graph.connected(tests[p]) for p in PROTOCOLS}
    for name in (*cfg.scorers, *cfg.surrogates):
        pred, seconds = _timed(lambda: _fit_method(name, ctx, fit, fit_eval.loss))
        predictors[name] = pred
        for p in PROTOCOLS:
            yhat = pred.predict(tests[p])
            metrics = evaluate_predictions(yhat, truth[p].loss)
            c = conn[p]
            metrics["spearman_connected"] = spearman(yhat[c], truth[p].loss[c]) if c.sum() >= 3 else float("nan")
            protocols.append({**key, "protocol": p, "method": name, "seconds": seconds, **metrics})

    # 3. budgeted pruning: true loss of each method's pick against the best achievable
    regret = []
    for frac in cfg.budgets:
        b = max(1, round(frac * e))
        picks = {name: select_mask(pred, e, Budget(edges=b), beam_width=cfg.beam_width)
                 for name, pred in predictors.items()}
        exhaustive = math.comb(e, b) <= cfg.exhaustive_limit
        rng = np.random.default_rng(rng_seed + 100 + b)
        if exhaustive:
            pool = all_masks_with_removed(e, b)
        else:
            rand = np.ones((cfg.search_random, e), dtype=np.float32)
            for row in rand:
                row[rng.choice(e, size=b, replace=False)] = 0
            pool = unique_rows(np.vstack([np.stack(list(picks.values())), rand]))
        pool_loss = ev(pool, evaluation).loss
        if not exhaustive and cfg.search_swaps:  # swap moves around the best mask found so far
            best = pool[int(np.argmin(pool_loss))]
            swaps = np.repeat(best[None], cfg.search_swaps, 0)
            for row in swaps:
                row[rng.choice(np.flatnonzero(row == 0))] = 1
                row[rng.choice(np.flatnonzero(row == 1))] = 0
            swaps = unique_rows(swaps)
            pool = np.vstack([pool, swaps])
            pool_loss = np.concatenate([pool_loss, ev(swaps, evaluation).loss])
        best_loss = float(pool_loss.min())
        lookup = {row.tobytes(): float(l) for row, l in zip(pool.astype(np.float32), pool_loss)}
        for name, mask in picks.items():
            chosen = lookup.get(mask.astype(np.float32).tobytes())
            chosen = float(ev(mask[None], evaluation).loss[0]) if chosen is None else chosen
            best_loss = min(best_loss, chosen)
            regret.append({**key, "budget_frac": frac, "removed": b, "method": name, "chosen_loss": chosen,
                           "exhaustive": exhaustive, "pool": len(pool)})
        for r in regret[-len(picks):]:
            r["best_loss"] = best_loss
            r["regret"] = r["chosen_loss"] - best_loss

    # 4. sample efficiency: masks from each protocol's distribution added to the prior design
    pool_masks = {"prior": bernoulli_masks(e, max(cfg.extra_k), cfg.keep_prob, seed=rng_seed + 3),
                  "realistic": sparsity_masks(graph, max(cfg.extra_k), *cfg.realistic, seed=rng_seed + 4,
                                              exclude=np.vstack([fit, tests["realistic"]]))}
    efficiency = []
    for p in PROTOCOLS:
        extra = pool_masks[p]
        extra_loss = ev(extra, scoring).loss if len(extra) else np.zeros(0)
        for k in cfg.extra_k:
            k_eff = min(k, len(extra))
            masks = np.vstack([fit, extra[:k_eff]])
            losses = np.concatenate([fit_eval.loss, extra_loss[:k_eff]])
            kctx = Context(graph, gated, scoring, task, masks, losses, seed=seed, memo=ctx.memo)
            for name in cfg.k_methods:
                pred, seconds = _timed(lambda: _fit_method(name, kctx, masks, losses))
                metrics = evaluate_predictions(pred.predict(tests[p]), truth[p].loss)
                efficiency.append({**key, "protocol": p, "method": name, "extra": k, "K": len(masks),
                                   "seconds": seconds, **metrics})
    return {"info": info, "protocols": protocols, "regret": regret, "efficiency": efficiency,
            "example": {"graph": graph, "importance": predictors.get("flow", predictors[cfg.scorers[0]]).importance,
                        "truth": {p: truth[p].loss for p in PROTOCOLS},
                        "predictions": {p: {n: pr.predict(tests[p]) for n, pr in predictors.items()} for p in PROTOCOLS}}}


def _run_one(args: tuple) -> dict[str, Any]:
    cfg, size, seed, cache_dir = args
    result = run_graph(cfg, size, seed, cache_dir)
    result["example"]["graph"] = None  # fx graphs do not cross process boundaries; rebuilt by the caller
    return result


def run_study(cfg: StudyConfig, workers: int = 1, cache_dir: str | None = None,
              progress: bool = True) -> dict[str, Any]:
    """Run every graph of the study; DataFrames "info", "protocols", "regret", "efficiency" and per-graph
    "examples" (predictions on the test masks, for scatter plots)."""
    jobs = [(cfg, size, cfg.first_seed + g, cache_dir) for size in cfg.sizes for g in range(cfg.graphs_per_size)]
    if workers > 1:  # largest graphs first balances the workers; every graph is seeded on its own
        order = sorted(range(len(jobs)), key=lambda i: -jobs[i][1])
        with ProcessPoolExecutor(workers) as pool:
            done = _progress(pool.map(_run_one, [jobs[i] for i in order]), len(jobs), progress)
        results = [r for _, r in sorted(zip(order, done), key=lambda t: t[0])]
    else:
        results = _progress(map(_run_one, jobs), len(jobs), progress)
    frames = {k: pd.DataFrame([r for res in results for r in (res[k] if k != "info" else [res[k]])])
              for k in ("info", "protocols", "regret", "efficiency")}
    frames["examples"] = {(r["info"]["size"], r["info"]["seed"]): r["example"] for r in results}
    return frames


def _progress(it, total: int, show: bool) -> list:
    if not show:
        return list(it)
    from tqdm.auto import tqdm
    return list(tqdm(it, total=total, desc="graphs"))
