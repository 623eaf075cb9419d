"""The studies' glue on tiny networks: the protocol run per network and cached, records to tables, the ranking
table, picks against the oracle, fine-tuning the picks, the cost of pruned networks and the paper's numbers,
for a CIFAR-style ResNet (notebook 02) and a GPT-2 (notebook 03)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import surrogate.studies as studies
from surrogate import Subset, Task, build_graph
from surrogate.cifar import branch_protocol, cifar_macros, cost_of
from surrogate.methods import label
from surrogate.models import ResNetCifar
from surrogate.paper import fmt
from surrogate.profile import pruned_costs
from surrogate.report import (by_budget, cost_macros, family_macros, macros_of, picks_against_oracle, predicting,
                              ranking, ranking_table, readable, spearman_of, summarize)
from surrogate.scenarios import FinetuneConfig, finetune_picks

METHODS = ("loo", "taylor2", "sleb", "superposition")


def _images(n: int, seed: int) -> Subset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g)
    return Subset(f"images{seed}", x, (x[:, 0].mean((1, 2)) > 0).long() + 2 * (x[:, 1].mean((1, 2)) > 0).long())


def _resnet(seed: int) -> ResNetCifar:
    torch.manual_seed(seed)
    return ResNetCifar(depth=8, num_classes=4, width=4).eval()  # 3 residual branches, 3 shortcuts


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Two tiny ResNets through notebook 02's protocol (3 branches: 8 exhaustive masks), cached in a folder."""
    cache = tmp_path_factory.mktemp("studies")
    nets, scoring, evaluation = {0: _resnet(0), 1: _resnet(1)}, _images(32, 1), _images(64, 2)
    config = branch_protocol(METHODS, n_realistic=6, budgets=(1, 2))
    rec = studies.run_networks(nets, scoring, evaluation, Task("classification"), config, kind="tiny",
                               key=lambda s: ("tiny", s, config), cache_dir=cache, log=None)
    return nets, scoring, evaluation, config, rec, cache


def test_the_protocol_runs_once_per_network_and_is_cached(study, monkeypatch):
    nets, scoring, evaluation, config, rec, cache = study
    assert rec.info.seed.tolist() == [0, 1] and set(rec.examples) == {0, 1}
    assert len(rec.protocols) == 2 * 3 * 2  # networks x predicting methods (not sleb) x mask families
    assert set(rec.regret.method) == set(METHODS) and set(rec.regret.removed) == {1, 2}

    def not_again(*args, **kwargs):
        raise AssertionError("a cached network was measured again")

    monkeypatch.setattr(studies, "run_experiment", not_again)
    again = studies.run_networks(nets, scoring, evaluation, Task("classification"), config, kind="tiny",
                                 key=lambda s: ("tiny", s, config), cache_dir=cache, log=None)
    pd.testing.assert_frame_equal(again.protocols, rec.protocols)
    with pytest.raises(AssertionError, match="measured again"):  # another key is another run
        studies.run_networks(nets, scoring, evaluation, Task("classification"), config, kind="tiny",
                             key=lambda s: ("other", s, config), cache_dir=cache, log=None)
    with pytest.raises(ValueError, match="no networks"):
        studies.run_networks({}, scoring, evaluation, Task("classification"), config, kind="tiny", key=str)


def test_held_out_subsets_are_seeded_and_nested():
    data = _images(50, 3)
    small, large = studies.held_out(data, 10), studies.held_out(data, 20)
    assert torch.equal(small.inputs, large.inputs[:10]) and small.name == data.name
    assert not torch.equal(small.inputs, data.inputs[:10])  # shuffled
    assert not torch.equal(studies.held_out(data, 10, seed=1).inputs, small.inputs)
    assert studies.held_out(data, None) is data
    with pytest.raises(ValueError, match="cannot hold out 51"):
        studies.held_out(data, 51)


def test_the_ranking_table_has_one_row_per_predicting_method_and_bolds_each_best(study):
    rec = study[4]
    rank = ranking(rec.protocols)
    assert set(rank.n) == {2} and {"forward_mean", "backward_mean", "top10_std"} <= set(rank.columns)
    methods = predicting(METHODS)
    assert methods == ["taylor2", "loo", "superposition"]  # registry order, the search method sleb left out
    table = ranking_table(rank, ["branches", "realistic"], methods)
    assert list(table.columns) == ["Method", "branches: all", "branches: within k", "realistic: all",
                                   "realistic: within k", "Passes"]
    assert len(table) == 3
    for col in table.columns[1:-1]:
        assert sum(str(c).startswith("\\textbf{") for c in table[col]) >= 1  # the best of each column
    shown = readable(table)  # what a notebook displays: plain text, the best of each column marked
    assert not any("\\" in str(c) or "$" in str(c) for c in shown.to_numpy().ravel())
    for col in table.columns[1:-1]:
        bold = table[col].str.startswith("\\textbf{")
        assert (shown[col].str.endswith(" *") == bold).all() and shown[col].str.contains("±").all()
    loo = rank[(rank.protocol == "branches") & (rank.method == "loo")].iloc[0]
    assert table.set_index("Method").loc[label("loo"), "Passes"] == f"{int(loo.forward_mean)}+{int(loo.backward_mean)}"
    rho = spearman_of(rec.protocols, "branches", seed=0)
    assert set(rho.index) == set(methods) and rho.between(-1, 1).all()


def test_picks_against_the_oracle_never_beat_it(study):
    rec = study[4]
    picks, oracle = picks_against_oracle(rec.regret, "accuracy")
    assert (picks.gap >= 0).all() and picks.accuracy.between(0, 100).all()
    assert len(oracle) == 2 * 2  # one row per network and budget
    best = oracle.set_index(["seed", "removed"]).accuracy
    assert all(p.accuracy <= best[(p.seed, p.removed)] for p in picks.itertuples())
    ppl, ppl_oracle = picks_against_oracle(rec.regret, "perplexity")
    assert (ppl.ratio >= 1 - 1e-12).all() and np.allclose(ppl.ppl, np.exp(ppl.chosen_loss))
    assert (ppl_oracle.ppl <= ppl.groupby(["seed", "removed"]).ppl.transform("min").loc[ppl_oracle.index] + 1e-9).all()
    table = by_budget(picks, "gap")
    assert list(table.columns) == [1, 2] and set(table.index) == set(METHODS)
    with pytest.raises(ValueError, match="unknown unit"):
        picks_against_oracle(rec.regret, "bits")


def test_finetuning_the_picks_gives_dense_methods_and_oracle_per_budget(study, tmp_path):
    nets, scoring, evaluation, _, rec, _ = study
    train = _images(96, 4)
    fine = finetune_picks(rec, nets, scoring.inputs[:2], ["loo", "superposition"], [1, 2], train, evaluation,
                          Task("classification"), FinetuneConfig(steps=2, batch_size=16), oracle="best_accuracy_mask",
                          cache_dir=tmp_path, log=None)
    assert len(fine) == 2 * (1 + 2 * 3)  # per network: dense, then per budget two methods and the oracle
    assert set(fine[fine.method == "dense"].budget) == {0} and (fine.removed == fine.budget).all()
    assert fine.accuracy.between(0, 100).all() and fine.accuracy_before.between(0, 100).all()  # percent
    oracle = fine[(fine.method == "oracle") & (fine.seed == 0)].set_index("budget")["mask"]
    expected = rec.regret[rec.regret.seed == 0].drop_duplicates("removed").set_index("removed").best_accuracy_mask
    assert oracle.to_dict() == expected.to_dict()
    with pytest.raises(ValueError, match="fine-tune methods the protocol ran"):
        finetune_picks(rec, nets, scoring.inputs[:2], ["magnitude"], [1], train, evaluation, Task("classification"),
                       cache_dir=tmp_path, log=None)


def test_pruned_costs_are_relative_to_the_dense_network_and_cached_per_machine(study, tmp_path):
    nets, scoring, evaluation, _, rec, _ = study
    graph = build_graph(nets[0], scoring.inputs[:2])
    masks = studies.oracle_masks(rec.regret, 0)
    assert list(masks) == [0, 1, 2] and masks[0] == "1" * graph.num_prunable
    assert all(m.count("0") == r for r, m in masks.items())
    inputs = (evaluation.inputs[:1], evaluation.inputs[:8])
    cost = pruned_costs(graph, masks, cost_of, inputs, key=("tiny",), details={"n": 8}, cache_dir=tmp_path)
    assert cost.removed.tolist() == [0, 1, 2] and (cost.filter(like="_rel").iloc[0] == 1).all()
    assert cost.params_rel.iloc[-1] < 1 and cost.macs_rel.iloc[-1] < 1  # a branch's convolutions are gone
    quality = studies.mask_quality(graph, masks, evaluation, Task("classification"))
    best = rec.regret[rec.regret.seed == 0].drop_duplicates("removed").set_index("removed").best_loss
    assert quality.removed.tolist() == [0, 1, 2] and quality.accuracy.between(0, 100).all()
    assert np.allclose(quality.set_index("removed").loss.loc[[1, 2]], best.loc[[1, 2]], atol=1e-5)  # the truth's

    def not_again(*args):
        raise AssertionError("measured again")

    pd.testing.assert_frame_equal(cost, pruned_costs(graph, masks, not_again, inputs, key=("tiny",), details={"n": 8},
                                                     cache_dir=tmp_path))
    with pytest.raises(ValueError, match="dense network"):
        pruned_costs(graph, {1: masks[1]}, cost_of, inputs, key=("tiny",), cache_dir=tmp_path)


def test_the_cifar_macros_come_from_the_tables(study, tmp_path):
    nets, scoring, evaluation, _, rec, _ = study
    rank = ranking(rec.protocols)
    picks, _ = picks_against_oracle(rec.regret, "accuracy")
    fine = pd.DataFrame({"method": ["dense", "loo"], "budget": [0, 2], "accuracy_mean": [50.0, 40.0],
                         "accuracy_before_mean": [50.0, 30.0]})
    cost = pd.DataFrame({"removed": [0, 2], "macs_rel": [1.0, 0.8], "latency_b1_ms_rel": [1.0, 0.9],
                         "latency_b256_ms_rel": [1.0, 0.7]})
    transfer = pd.DataFrame({"method": ["loo", "dense"], "importance_on": ["source", "-"], "accuracy_pct": [60.0, 70.0]})
    m = cifar_macros(rec, rank, picks, fine, cost, transfer)
    assert m["CifBranchMasks"] == 8 and m["CifTestAcc"] == fmt(100 * rec.info.test_acc.mean(), 2)
    assert m["CifCostRemoved"] == 2 and m["CifMacsRatio"] == 0.8 and m["CifLatencyBatchRatio"] == 0.7
    assert m["CifFtLooTwo"] == "40.0" and m["CifZsDenseZero"] == "50.0" and m["CifTrLooSource"] == "60.0"
    gap = summarize(picks, ["method", "removed"], ["gap"])
    mine = cifar_macros(rec, rank, picks, fine, cost, ours=("superposition",))["CifOursMeanGap"]
    assert mine == pytest.approx(gap[gap.method == "superposition"].gap_mean.mean())
    assert m["CifGapLooTwo"] == fmt(gap.set_index(["method", "removed"]).gap_mean[("loo", 2)], 2)
    assert m["CifBranchesLoo"] == fmt(rank.set_index(["protocol", "method"]).spearman_mean[("branches", "loo")])
    assert "CifWithinKRealisticTaylorTwo" in m and "CifFwdBranchesTaylorTwo" in m
    regret = summarize(picks, ["method", "removed"], ["regret"]).set_index(["method", "removed"]).regret_mean
    assert m["CifRegretLooTwo"] == fmt(regret[("loo", 2)]) and m["CifRegretLooTwo"] != m["CifGapLooTwo"]
    assert m["CifMeanRegretLoo"] == fmt(regret.loc["loo"].mean())
    assert m["CifPickFwdLoo"] == fmt(rec.regret[rec.regret.method == "loo"].forward.mean(), 0)
    edges = pd.DataFrame({"seed": [0, 1, 0], "method": ["loo", "loo", "taylor2"], "budget": [3, 3, 3],
                          "accuracy": [80.0, 70.0, 60.0], "accuracy_before": [20.0, 30.0, 10.0], "passes": [19, 19, 20]})
    e = cifar_macros(rec, rank, picks, fine, cost, finetune_edges=edges)
    assert e["CifFtEdgeLooThree"] == "75.0" and e["CifZsEdgeLooThree"] == "25.0" and e["CifFtEdgeTaylorTwoThree"] == "60.0"
    assert e["CifFtEdgePassesLooThree"] == "19"
    assert "CifFtEdgeLooThree" not in m
    per_net = rec.protocols[(rec.protocols.protocol == "branches") & (rec.protocols.method == "loo")].spearman
    lo, hi = float(m["CifBranchesLooLo"]), float(m["CifBranchesLooHi"])
    assert per_net.min() - 1e-3 <= lo <= float(m["CifBranchesLoo"]) <= hi <= per_net.max() + 1e-3
    assert int(m["CifPickFwdSleb"]) > 0  # the greedy search counts the masks it measured


def test_macro_helpers_name_every_row_and_refuse_twins():
    df = pd.DataFrame({"method": ["loo", "flow"], "a_mean": [0.5, 0.25], "b_mean": [1.0, 2.0]})
    m = macros_of(df, ["method"], {"a_mean": "X", "b_mean": ("Y", 0)})
    assert m == {"XLoo": "0.500", "XFlow": "0.250", "YLoo": "1", "YFlow": "2"}
    info = pd.DataFrame({"fam_n_masks": [12, 12], "ceiling_fam": [0.5, 0.7]})
    assert family_macros(info, "P", {"fam": "Family"}) == {"PFamilyMasks": 12, "PCeilingFam": pytest.approx(0.6)}
    cost = pd.DataFrame({"removed": [0, 3], "params_rel": [1.0, 0.5]})
    assert cost_macros(cost, "P", {"params_rel": "ParamsRatio"}) == {"PCostRemoved": 3, "PParamsRatio": 0.5}
    with pytest.raises(KeyError, match="twice"):
        macros_of(pd.concat([df, df]), ["method"], {"a_mean": "X"})
