"""How a model is measured: every module in eval mode for the duration (``measuring``), inputs moved to the
device the model lives on (``model_device``). The ground floor of the package: it imports nothing of it."""
from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator

import torch

__all__ = ["measuring", "model_device"]


@contextlib.contextmanager
def measuring(*modules: torch.nn.Module) -> Iterator[None]:
    """Every submodule of ``modules`` in eval mode for the duration; afterwards each one gets back its own
    ``training`` flag (not the parent's: ``module.train(flag)`` would overwrite a BatchNorm that its owner
    had frozen in eval mode). Measurements run inside this, so they never update running statistics or
    draw dropout masks, whatever mode the caller left the model in."""
    saved = [(m, m.training) for root in modules for m in root.modules()]
    for m, _ in saved:
        m.training = False
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag


def model_device(model: torch.nn.Module, default: torch.device | None = None) -> torch.device:
    """Where the model's parameters (or buffers) live: batches follow them. For a model without any, ``default``
    (e.g. the inputs' device), else the CPU."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu") if default is None else default
