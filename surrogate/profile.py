"""Cost of a model: parameters, multiply-accumulates and measured CPU latency."""
from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["Cost", "count_params", "count_macs", "measure_latency", "measure_cost", "machine"]


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
