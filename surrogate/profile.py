"""Cost of a model: parameters, multiply-accumulates and measured CPU latency."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["Cost", "count_params", "count_macs", "measure_latency", "measure_cost"]


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
