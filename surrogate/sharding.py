"""Mask evaluation across processes: each ``torch.distributed`` rank measures its share of the masks, and every
rank gets all the results, in mask order, equal to one process's.

    # measure.py, launched with: torchrun --nproc_per_node 2 measure.py
    dist.init_process_group("gloo")                 # "nccl" on GPUs (one device per rank)
    result = evaluate_masks_sharded(gated, masks, data, task)

Each rank evaluates the whole subset under a contiguous block of the masks (``evaluate_masks``), so the shares
run the same operations on the same batches as one process does: with ``strategy="prefix"`` or a given
``masks_per_pass`` the results are equal bit for bit (the blocks start at multiples of ``masks_per_pass``, and the
default number of masks per pass is decided once, on rank 0). Without an initialised process group (or with one
rank) this is ``evaluate_masks``.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .evaluate import MAX_PASS_ELEMENTS, MaskEval, Subset, Task, default_masks_per_pass, evaluate_masks
from .gating import GatedModel, check_mask

__all__ = ["evaluate_masks_sharded", "shard_bounds"]


def shard_bounds(num_masks: int, world: int, unit: int = 1) -> list[tuple[int, int]]:
    """[start, stop) of each rank's masks: contiguous blocks of whole ``unit``s (masks stacked in one pass),
    as equal as they can be, in rank order, covering every mask once."""
    if world < 1 or unit < 1:
        raise ValueError(f"world size and unit must be at least 1, got {world} and {unit}")
    groups = -(-num_masks // unit)
    cuts = [min(num_masks, unit * (groups * r // world)) for r in range(world + 1)]
    return [(cuts[r], cuts[r + 1]) for r in range(world)]


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def evaluate_masks_sharded(gated: GatedModel, masks: Any, data: Subset, task: Task, **kwargs: Any) -> MaskEval:
    """``evaluate_masks(gated, masks, data, task, **kwargs)`` with the masks shared out over the ranks of the
    default process group (module docstring); every rank calls it with the same masks and data and returns the
    whole result. Progress lines (``log``) come from rank 0 only. An error on any rank is raised on every rank
    (no rank is left waiting)."""
    rank, world = _world()
    if world == 1:
        return evaluate_masks(gated, masks, data, task, **kwargs)
    stacked = kwargs.get("strategy", "stack") == "stack"
    m, per_pass, failure = None, kwargs.get("masks_per_pass"), None
    try:  # every rank reaches the same collectives, whatever fails where
        m = check_mask(masks, gated.num_edges)
        m = m.unsqueeze(0) if m.dim() == 1 else m
        if stacked and per_pass is None and rank == 0:  # decided once: every rank stacks as one process would
            per_pass = default_masks_per_pass(gated, data, len(m), kwargs.get("batch_size", 512),
                                              kwargs.get("max_pass_elements", MAX_PASS_ELEMENTS))
    except Exception as exc:  # noqa: BLE001  (raised below, after the other ranks are told)
        failure = exc
    plans = _gather((None if m is None else len(m), per_pass), failure)
    if len({n for n, _ in plans}) > 1:
        raise ValueError(f"every rank must be given the same masks; the ranks got {[n for n, _ in plans]} masks")
    if stacked:
        kwargs["masks_per_pass"] = plans[0][1]
    if rank != 0:
        kwargs["log"], kwargs["progress"] = (lambda line: None), False
    unit = kwargs["masks_per_pass"] if stacked else 1
    start, stop = shard_bounds(len(m), world, unit)[rank]
    mine = None
    try:
        mine = evaluate_masks(gated, m[start:stop], data, task, **kwargs) if stop > start else None
    except Exception as exc:  # noqa: BLE001
        failure = exc
    parts = _gather(mine, failure)
    return _concat([p for p in parts if p is not None])


def _gather(value: Any, failure: Exception | None) -> list[Any]:
    """Every rank's value, in rank order; if any rank failed, its exception on that rank and a RuntimeError
    naming it on the others."""
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (value, None if failure is None else f"{type(failure).__name__}: {failure}"))
    if failure is not None:
        raise failure
    errors = [f"rank {r}: {e}" for r, (_, e) in enumerate(parts) if e is not None]
    if errors:
        raise RuntimeError("mask evaluation failed on another rank: " + "; ".join(errors))
    return [v for v, _ in parts]


def _concat(parts: list[MaskEval]) -> MaskEval:
    """One MaskEval of the ranks' results, in rank (= mask) order."""
    first = parts[0]
    acc = None if first.accuracy is None else np.concatenate([p.accuracy for p in parts])
    outputs = None if first.outputs is None else torch.cat([p.outputs for p in parts])
    extra = dict(first.extra)
    if "state" in extra:
        extra["state"] = torch.cat([p.extra["state"] for p in parts])
    return MaskEval(first.subset, first.n_samples, np.concatenate([p.loss for p in parts]), acc, outputs, extra)
