"""Progress lines of long phases (surrogate.progress): silent unless a log is given or installed, at most one
line per interval, an estimate of the time left, and never a change in what is computed."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn as nn

import surrogate.progress as progress
from surrogate import ExperimentConfig, GatedModel, MaskFamily, Subset, Task, build_graph, evaluate_masks, run_experiment
from surrogate.progress import Ticker, reporting


class Residual(nn.Module):
    def __init__(self, d: int = 6, blocks: int = 4):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(d, d), nn.Tanh()) for _ in range(blocks))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return self.head(x)


@pytest.fixture()
def net():
    torch.manual_seed(0)
    model = Residual().eval()
    x = torch.randn(40, 6)
    return model, Subset("toy", x, torch.randint(0, 3, (40,)))


def test_a_ticker_without_a_log_is_silent_and_one_with_a_log_estimates_the_time_left(capsys):
    Ticker("work", 10, every=0)(5)
    assert capsys.readouterr().out == ""
    lines: list[str] = []
    tick = Ticker("work", 10, lines.append, every=0)
    tick(0)   # nothing done: no estimate possible
    tick(4)
    tick(10)  # finished: the caller says so itself
    assert len(lines) == 1 and re.fullmatch(r"work: 4/10 \(\d+ s so far, ~\d+ s left\)", lines[0])


def test_a_ticker_reports_at_most_once_per_interval():
    lines: list[str] = []
    tick = Ticker("work", 100, lines.append, every=3600)
    for i in range(1, 100):
        tick(i)
    assert lines == []


def test_a_ticker_reports_again_each_time_the_interval_has_passed(monkeypatch):
    from types import SimpleNamespace
    now = [0.0]
    monkeypatch.setattr(progress, "time", SimpleNamespace(monotonic=lambda: now[0]))  # a fake clock
    lines: list[str] = []
    tick = Ticker("work", 100, lines.append, every=10)
    for i in range(1, 100):
        now[0] = float(i)  # one second per unit
        tick(i)
    assert len(lines) == 9 and lines[0] == "work: 10/100 (10 s so far, ~1.5 min left)"
    assert lines[-1] == "work: 90/100 (1.5 min so far, ~10 s left)"


def test_run_experiment_without_a_log_keeps_the_log_installed_around_it(net, monkeypatch):
    model, data = net
    config = ExperimentConfig(methods=("loo",), families=(MaskFamily("all", "exhaustive"),), budgets=(),
                              eval_batch=8, context_batch=16, extra_k=(), eval_strategy="prefix")
    monkeypatch.setattr(progress, "PROGRESS_SECONDS", 0.0)
    lines: list[str] = []
    with reporting(lines.append):
        run_experiment(model, data, data, Task("classification"), config)
    assert any(line.startswith("S(m) of ") for line in lines)


def test_reporting_installs_a_log_for_the_block_only():
    lines: list[str] = []
    with reporting(lines.append):
        Ticker("inside", 3, every=0)(1)
    Ticker("outside", 3, every=0)(1)
    assert [line.split(":")[0] for line in lines] == ["inside"]


@pytest.mark.parametrize("strategy,per_pass", [("stack", 1), ("stack", 12), ("prefix", None)])
def test_evaluate_masks_reports_masks_done_and_computes_the_same(net, monkeypatch, strategy, per_pass):
    model, data = net
    gated = GatedModel(build_graph(model, data.inputs[:2]))
    masks = np.random.default_rng(0).integers(0, 2, (12, gated.num_edges)).astype(np.float32)
    kw = dict(batch_size=16, strategy=strategy, masks_per_pass=per_pass)  # 12 per pass: progress within one stack
    quiet = evaluate_masks(gated, masks, data, Task("classification"), **kw)
    monkeypatch.setattr(progress, "PROGRESS_SECONDS", 0.0)
    lines: list[str] = []
    loud = evaluate_masks(gated, masks, data, Task("classification"), log=lines.append, **kw)
    np.testing.assert_array_equal(quiet.loss, loud.loss)
    assert lines and all(line.startswith("S(m) of 12 masks on toy: ") for line in lines)
    done = [int(re.search(r": (\d+)/12", line).group(1)) for line in lines]
    assert done == sorted(done) and 0 < done[0] and done[-1] < 12


def test_run_experiment_passes_its_log_to_the_measurements_inside_it(net, monkeypatch):
    model, data = net
    config = ExperimentConfig(methods=("loo", "superposition"),
                              families=(MaskFamily("branches", "exhaustive", edges=r"blocks\.\d+\.1 ->"),),
                              budgets=(1,), budget_unit="edges", budget_edges=r"blocks\.\d+\.1 ->",
                              eval_batch=8, context_batch=16, extra_k=(), eval_strategy="prefix")
    monkeypatch.setattr(progress, "PROGRESS_SECONDS", 0.0)
    lines: list[str] = []
    run_experiment(model, data, data, Task("classification"), config, log=lines.append)
    assert any(re.match(r"S\(m\) of \d+ masks on toy\[:half\]: .* left\)$", line) for line in lines)
    assert any(re.match(r"superposition: predicting \d+ masks: ", line) for line in lines)
    assert any(line.startswith("budget 1: 1 of 4 edges removed") for line in lines)
    assert Ticker("after", 3).log is None  # the experiment's log is not left installed
