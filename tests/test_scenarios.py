"""Fine-tuning and transfer of pruned networks (the draft's scenarios 2 and 3) on tiny models."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn as nn

from surrogate import Subset, Task, build_graph
from surrogate.scenarios import FinetuneConfig, finetune_masks


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.a(x)) + torch.relu(self.b(x)))


@pytest.fixture()
def setup():
    torch.manual_seed(0)
    x = torch.randn(256, 6)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    model = Branchy().eval()
    graph = build_graph(model, x[:2])
    return graph, Subset("train", x[:192], y[:192]), Subset("test", x[192:], y[192:])


def test_finetuning_improves_a_pruned_network_and_is_cached(setup, tmp_path):
    graph, train, test = setup
    e = graph.num_prunable
    one_off = np.ones(e, dtype=np.float32)
    one_off[0] = 0
    cfg = FinetuneConfig(steps=60, lr=1e-2, batch_size=32)
    rows = finetune_masks(graph, {"dense": np.ones(e), "pruned": one_off, "same": "".join(map(str, one_off.astype(int)))},
                          train, test, Task("classification"), cfg, key={"seed": 0}, cache_dir=tmp_path)
    assert [r["label"] for r in rows] == ["dense", "pruned", "same"] and rows[1]["removed"] == 1
    assert all(r["loss"] < r["loss_before"] for r in rows)  # an untrained network only gets better
    assert rows[1]["loss"] == rows[2]["loss"]               # one mask, one result
    # the original model is untouched, and a second call is served from the cache, identically
    again = finetune_masks(graph, {"pruned": one_off}, train, test, Task("classification"), cfg, key={"seed": 0},
                           cache_dir=tmp_path)
    assert again[0] == rows[1] | {"label": "pruned"}
    assert len(list((tmp_path / "finetune").glob("*.pkl"))) == 2


def test_transfer_replaces_the_head(setup, tmp_path):
    graph, train, test = setup
    e = graph.num_prunable
    new_y = lambda s: Subset(s.name, s.inputs, (s.inputs[:, 2] > 0).long())  # noqa: E731 - another task, 2 classes
    rows = finetune_masks(graph, {"dense": np.ones(e)}, new_y(train), new_y(test), Task("classification"),
                          FinetuneConfig(steps=80, lr=1e-2, batch_size=32), head="head", num_outputs=2,
                          cache_dir=tmp_path)
    assert rows[0]["accuracy"] > 0.7 and rows[0]["loss"] < rows[0]["loss_before"]
    with pytest.raises(ValueError, match="nn.Linear"):
        finetune_masks(graph, {"d": np.ones(e)}, train, test, Task("classification"), head="a.weight", num_outputs=2,
                       cache_dir=tmp_path)
    with pytest.raises(ValueError, match="prunable edges"):
        finetune_masks(graph, {"d": np.ones(e + 1)}, train, test, Task("classification"), cache_dir=tmp_path)


def test_method_picks_respect_budget_and_allowed_edges():
    from surrogate.models import resnet20
    from surrogate.scenarios import method_picks
    torch.manual_seed(0)
    net = resnet20().eval()
    data = Subset("s", torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,)))
    picks = method_picks(net, data, Task("classification"), ["loo", "superposition_pairs"], [1, 3],
                         allowed=r"bn2 ->", batch_size=8)
    graph = build_graph(net, data.inputs[:2])
    branch = np.array(["bn2 ->" in n for n in graph.edge_names])
    assert set(picks) == {("loo", 1), ("loo", 3), ("superposition_pairs", 1), ("superposition_pairs", 3)}
    for (m, b), mask in picks.items():
        assert (mask == 0).sum() == b and (mask[~branch] == 1).all()
    with pytest.raises(ValueError, match="no prunable edge matches"):
        method_picks(net, data, Task("classification"), ["loo"], [1], allowed="nothing-like-this")


def test_linear_probe_trains_only_the_new_head(setup):
    from surrogate.scenarios import linear_probe
    graph, train, _ = setup
    model = graph.module
    other = Subset("t", train.inputs, (train.inputs[:, 3] > 0).long())
    probe = linear_probe(model, other, FinetuneConfig(steps=100, lr=3e-2, batch_size=32), head="head")
    assert probe.head.out_features == 2 and model.head.out_features == 3  # the original is untouched
    for (n, p), (_, q) in zip(model.named_parameters(), probe.named_parameters()):
        if not n.startswith("head"):
            assert torch.equal(p, q)
    with torch.no_grad():
        acc = (probe(other.inputs).argmax(1) == other.targets).float().mean()
    assert acc > 0.6 and all(p.requires_grad for p in probe.parameters())


def test_bf16_finetuning_runs_and_old_cache_keys_stay_valid(setup, tmp_path):
    from surrogate.scenarios import _config_key
    # a config without autocast hashes as it did before the field existed (cached CIFAR results stay valid)
    assert _config_key(FinetuneConfig()) == {"__class__": "FinetuneConfig", "steps": 300, "lr": 1e-3,
                                             "batch_size": 128, "schedule": "cosine", "seed": 0}
    assert _config_key(FinetuneConfig(autocast="bf16"))["autocast"] == "bf16"
    graph, train, test = setup
    e = graph.num_prunable
    fp32, bf16 = (finetune_masks(graph, {"dense": np.ones(e)}, train, test, Task("classification"),
                                 FinetuneConfig(steps=40, lr=1e-2, batch_size=32, autocast=a), cache_dir=tmp_path)[0]
                  for a in (None, "bf16"))
    assert bf16["loss"] < bf16["loss_before"] and bf16["loss"] != fp32["loss"]  # trained, and a separate cache entry
    with pytest.raises(ValueError, match="autocast"):
        finetune_masks(graph, {"dense": np.ones(e)}, train, test, Task("classification"),
                       FinetuneConfig(steps=1, autocast="fp8"), cache_dir=tmp_path)


def test_transfer_picks_estimate_importance_on_both_tasks_and_transfer(setup, tmp_path):
    from surrogate.scenarios import transfer_picks
    graph, train, test = setup
    relabel = lambda s: Subset(s.name, s.inputs, (s.inputs[:, 2] > 0).long())  # noqa: E731 - a 2-class target task
    target = {"train": relabel(train), "scoring": relabel(Subset("sc", train.inputs[:32], train.targets[:32])),
              "test": relabel(test)}
    cfg = FinetuneConfig(steps=20, lr=1e-2, batch_size=32)
    lines: list[str] = []
    rows = transfer_picks(graph.module, Subset("sc", train.inputs[:32], train.targets[:32]), target,
                          Task("classification"), ["loo", "taylor2"], 1, cfg, probe_key=("tiny",), head="head",
                          cache_dir=tmp_path, log=lines.append)
    assert list(zip(rows.method, rows.importance_on)) == [("dense", "-"), ("loo", "source"), ("taylor2", "source"),
                                                         ("loo", "target"), ("taylor2", "target")]
    assert (rows.removed == [0, 1, 1, 1, 1]).all() and "label" not in rows.columns
    for col in ("accuracy_pct", "accuracy_before_pct"):  # one unit, named, in every accuracy column
        assert rows[col].between(0, 100).all() and rows[col].max() > 1
    assert len(list((tmp_path / "probe").glob("*.pkl"))) == 1  # the probe is cached
    said = "\n".join(lines)  # every phase says what it does, each method's picks how long they took
    assert "transfer: linear probe" in said and "picks on sc: loo (1/2 methods) (" in said
    assert "picks on sc: taylor2 (2/2 methods)" in said and "transfer: fine-tuning 5 networks" in said


class FourBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.branch = nn.ModuleList(nn.Linear(6, 8) for _ in range(4))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.branch[0](x).relu()
        for b in self.branch[1:]:
            h = h + b(x).relu()
        return self.head(h)


def test_finetune_sample_draws_the_same_allowed_masks_on_every_network(setup, tmp_path):
    from surrogate.scenarios import finetune_sample, zero_shot_agreement
    _, train, test = setup
    torch.manual_seed(1)
    nets = {0: FourBranches().eval(), 1: FourBranches().eval()}
    cfg = FinetuneConfig(steps=5, lr=1e-2, batch_size=32)
    rows = finetune_sample(nets, train.inputs[:2], 4, [1, 2], train, test, Task("classification"), cfg,
                           allowed=r"relu_[123] ->", cache_dir=tmp_path, log=None)
    assert len(rows) == 8 and set(rows.seed) == {0, 1} and set(rows.removed) <= {1, 2}
    assert list(rows[rows.seed == 0]["mask"]) == list(rows[rows.seed == 1]["mask"])   # paired across networks
    assert rows["mask"].nunique() == 4
    graph = build_graph(nets[0], train.inputs[:2])
    kept = [i for i, n in enumerate(graph.edge_names) if not re.search(r"relu_[123] ->", n)]
    assert all(m[i] == "1" for m in rows["mask"] for i in kept)                       # only allowed edges removed
    assert rows.accuracy.between(0, 100).all() and (rows.accuracy > 1).any()          # percent, not fractions
    files = len(list((tmp_path / "finetune").glob("*.pkl")))
    again = finetune_sample(nets, train.inputs[:2], 4, [1, 2], train, test, Task("classification"), cfg,
                            allowed=r"relu_[123] ->", cache_dir=tmp_path, log=None)
    assert files == 8 and len(list((tmp_path / "finetune").glob("*.pkl"))) == 8 and again.equals(rows)
    agree = zero_shot_agreement(rows)
    assert list(agree.seed) == [0, 1] and (agree.masks == 4).all() and agree.spearman.between(-1, 1).all()
    with pytest.raises(ValueError, match="n <= 1"):
        finetune_sample(nets, train.inputs[:2], 4, [3], train, test, Task("classification"), cfg,
                        allowed=r"relu_[123] ->", cache_dir=tmp_path, log=None)


def test_finetune_method_picks_makes_fresh_picks_over_any_edges_and_caches_them(setup, tmp_path, monkeypatch):
    import surrogate.scenarios as scenarios
    from surrogate.scenarios import finetune_method_picks, method_picks
    _, train, test = setup
    torch.manual_seed(2)
    nets = {0: FourBranches().eval(), 1: FourBranches().eval()}
    cfg, task = FinetuneConfig(steps=3, lr=1e-2, batch_size=32), Task("classification")
    rows = finetune_method_picks(nets, train, ["loo", "superposition"], [1, 2], train, test, task, cfg,
                                 cache_dir=tmp_path, log=None)
    assert len(rows) == 8 and set(rows.method) == {"loo", "superposition"} and set(rows.budget) == {1, 2}
    assert (rows.removed == rows.budget).all() and rows.accuracy.between(0, 100).all()
    n = build_graph(nets[0], train.inputs[:2]).num_prunable  # loo: each edge and the dense network; ours: the prior
    assert set(zip(rows.method, rows.passes)) == {("loo", n + 1), ("superposition", n + 3)}  # design's n+2 and the flow
    for s, net in nets.items():  # the picks are method_picks' own, over every edge (allowed=None)
        picks = method_picks(net, train, task, ["loo", "superposition"], [1, 2])
        got = rows[rows.seed == s].set_index(["method", "budget"])["mask"]
        assert all(got[k] == scenarios.mask_text(v) for k, v in picks.items())
    monkeypatch.setattr(scenarios, "method_picks", lambda *a, **k: pytest.fail("cached picks were made again"))
    again = finetune_method_picks(nets, train, ["loo", "superposition"], [1, 2], train, test, task, cfg,
                                  cache_dir=tmp_path, log=None)
    assert again.equals(rows)


def test_zero_shot_agreement_ranks_each_network_once_per_mask():
    import pandas as pd
    from surrogate.scenarios import zero_shot_agreement
    df = pd.DataFrame({"seed": [0] * 5, "mask": ["a", "b", "c", "d", "d"], "loss_before": [4.0, 3.0, 2.0, 1.0, 1.0],
                       "accuracy_before": [10.0, 20.0, 30.0, 40.0, 40.0], "accuracy": [50.0, 60.0, 55.0, 70.0, 70.0]})
    agree = zero_shot_agreement(df)
    assert agree.masks.item() == 4 and agree.spearman.item() == pytest.approx(0.8)
    assert agree.spearman_loss.item() == pytest.approx(0.8)  # a lower loss ranks like a higher accuracy
    reversed_ = df.assign(accuracy=-df.accuracy)
    assert zero_shot_agreement(reversed_).spearman.item() == pytest.approx(-0.8)
    with pytest.raises(ValueError, match="at least 3"):
        zero_shot_agreement(df.iloc[:2])
