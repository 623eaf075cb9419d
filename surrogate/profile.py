"""Cost of a model: parameters, multiply-accumulates and measured CPU latency; the cost of a network's pruned
versions as a table (``pruned_costs``)."""
from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from .gating import prune
from .graph import ComputationGraph
from .masks import mask_from_text
from .train import cached_result

__all__ = ["Cost", "count_params", "count_macs", "measure_latency", "measure_cost", "machine", "pruned_costs"]


@dataclass(frozen=True)
class Cost:
    params: int         # number of parameters
    macs: int           # multiply-accumulates of one forward pass on the given inputs
    latency_ms: float   # median wall time of one forward pass on this machine's CPU


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _as_tuple(inputs: torch.Tensor | Sequence[torch.Tensor]) -> tuple:
    return (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)


@torch.no_grad()
def count_macs(model: nn.Module, inputs: torch.Tensor | Sequence[torch.Tensor], **kwargs: Any) -> int:
    """MACs = FLOPs / 2 as counted by torch's FlopCounterMode (matmuls, convolutions, attention)."""
    with FlopCounterMode(display=False) as counter:
        model(*_as_tuple(inputs), **kwargs)
    return counter.get_total_flops() // 2


@torch.no_grad()
def measure_latency(model: nn.Module, inputs: torch.Tensor | Sequence[torch.Tensor], repeats: int = 20,
                    warmup: int = 3, **kwargs: Any) -> float:
    """Median milliseconds of ``repeats`` forward passes after ``warmup`` untimed ones."""
    args = _as_tuple(inputs)
    for _ in range(warmup):
        model(*args, **kwargs)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model(*args, **kwargs)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def measure_cost(model: nn.Module, inputs: torch.Tensor | Sequence[torch.Tensor], repeats: int = 20) -> Cost:
    return Cost(count_params(model), count_macs(model, inputs), measure_latency(model, inputs, repeats))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str | torch.device = "cpu") -> dict[str, Any]:
    """What a measured latency depends on besides the model: the processor (or accelerator), the cores and
    torch threads, and the torch version. Part of the cache key of cached timings, so that a warm rerun on the
    same machine reuses them (byte-identical outputs) and any other machine or thread setting measures anew."""
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_model()
    return {"device": str(dev), "name": name, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__}


def pruned_costs(graph: ComputationGraph, masks: Mapping[int, str], measure: Callable[..., dict[str, float]],
                 inputs: Sequence[torch.Tensor], *, key: tuple, details: Mapping[str, Any] | None = None,
                 kind: str = "cost", cache_dir: str | os.PathLike[str] | None = None) -> pd.DataFrame:
    """The cost of ``graph``'s model pruned with each mask ({edges removed: mask text}, the dense network at 0
    removed): one row per mask with "removed", the values of ``measure(pruned model, *inputs)`` (a dict, e.g.
    params, MACs, latencies) and, for each of them, ``<name>_rel``: the value over the dense network's.

    Models are pruned physically and timed on the CPU (what the paper reports). Timings depend on the
    machine's load and threads, so the values are measured once per machine: the cache key is ``key`` (the
    configs that determine the network), the masks and ``machine("cpu")``, then ``details``; a warm rerun
    reproduces every number."""
    if 0 not in masks:
        raise ValueError("masks need the dense network (0 edges removed): ratios are taken against it")

    @torch.no_grad()
    def run() -> list[dict[str, Any]]:
        e = graph.num_prunable
        return [{"removed": removed, **measure(prune(graph, mask_from_text(mask, e)).cpu(), *inputs)}
                for removed, mask in masks.items()]

    rows = cached_result((*key, {"masks": list(masks.values()), "machine": machine("cpu")}, dict(details or {})),
                         run, cache_dir, kind=kind)
    cost = pd.DataFrame(rows).sort_values("removed", ignore_index=True)
    for c in [c for c in cost.columns if c != "removed"]:
        cost[f"{c}_rel"] = cost[c] / cost[c].iloc[0]
    return cost
