"""auto_prune checks its request before measuring anything, saves what its budget says, warns about picks that
save nothing or cut the input off, and reports progress through log= like the rest of the package."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import surrogate.methods
from surrogate import Budget, auto_prune, build_graph
from surrogate.pruning import CostModel
from surrogate.tasks import Subset, Task


class Residual(nn.Module):
    """An input layer, three residual blocks with identity shortcuts (free edges: removing one saves no
    parameter), a classifier."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.inp, self.head = nn.Linear(4, width), nn.Linear(width, 3)
        self.blocks = nn.ModuleList([nn.Linear(width, width) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        for block in self.blocks:
            h = h + torch.relu(block(h))
        return self.head(h)


@pytest.fixture
def setup():
    torch.manual_seed(0)
    net = Residual().eval()
    scoring = Subset("scoring", torch.randn(16, 4), torch.randint(0, 3, (16,)))
    return net, scoring, Task("classification")


def _no_measuring(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("measured before checking the request")
    monkeypatch.setattr(surrogate.methods, "evaluate_masks", fail)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(method="superpositon"), KeyError, "unknown method 'superpositon'; registered: random"),
    (dict(budget=Budget(edges=7)), ValueError, r"Budget\(edges=7\) asks for more edges than the graph's 6"),
    (dict(budget=Budget(max_params=10)), ValueError,
     r"Budget\(max_params=10\) cannot be met: it allows 10 parameters.*still has \d+"),
    (dict(budget=3), TypeError, r"budget must be a Budget, e.g. Budget\(edges=3\)"),
    (dict(finetune_steps=3), ValueError, "finetune_steps > 0 needs train_data"),
])
def test_the_request_is_checked_before_anything_is_measured(setup, monkeypatch, kwargs, error, message):
    net, scoring, task = setup
    _no_measuring(monkeypatch)
    with pytest.raises(error, match=message):
        auto_prune(net, scoring, task, **kwargs)


def test_budgets_are_validated_when_made():
    for kwargs, message in [(dict(edges=1.5), "whole number"), (dict(params=1.5), r"fraction.*in \(0, 1\]"),
                            (dict(max_macs=-1), "non-negative"), (dict(edges=1, params=0.5), "exactly one")]:
        with pytest.raises(ValueError, match=message):
            Budget(**kwargs)


def test_the_default_budget_saves_parameters(setup):
    net, scoring, task = setup
    res = auto_prune(net, scoring, task)  # Budget(params=0.8)
    assert res.params[1] <= 0.8 * res.params[0] and res.removed
    assert res.params[1] == sum(p.numel() for p in res.model.parameters())
    macs = auto_prune(net, scoring, task, Budget(macs=0.5), method="loo")
    assert macs.macs[1] <= 0.5 * macs.macs[0]


def test_a_pick_that_saves_nothing_is_flagged(setup):
    net, scoring, task = setup
    graph = build_graph(net, scoring.inputs[:2])
    params, _ = CostModel(graph).cost(1 - np.eye(graph.num_prunable))
    assert (params == params.max()).sum() == 3  # three identity shortcuts save nothing
    with pytest.warns(UserWarning, match=r"saves neither parameters nor MACs.*Budget\(params=0.8\)"):
        res = auto_prune(net, scoring, task, Budget(edges=1), method="param_l1")  # a shortcut has no parameters
    assert res.params[0] == res.params[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = auto_prune(net, scoring, task, Budget(params=0.8), method="param_l1")  # a cost budget saves
    assert res.params[1] < res.params[0]


def test_a_network_cut_off_from_its_input_is_flagged(setup):
    net, scoring, task = setup
    with pytest.warns(UserWarning, match="output no longer depends on its input: it is the same for 8 different"):
        res = auto_prune(net, scoring, task, Budget(edges=6), method="loo", allow_disconnected=True)
    assert not res.connected


def test_progress_is_asked_for_with_log(setup):
    net, scoring, task = setup
    lines: list[str] = []
    auto_prune(net, scoring, task, log=lines.append)
    assert lines[0] == "auto_prune: 6 prunable edges; measuring 8 masks on 16 scoring samples"
    assert lines[-1].startswith("auto_prune: removed 1 edges: 283 -> 211 parameters")
    with pytest.warns(DeprecationWarning, match="progress=.*deprecated: pass log=print"):
        auto_prune(net, scoring, task, method="loo", progress=False)
