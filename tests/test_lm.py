"""The WikiText-2 GPT-2 setup: pretrained weights through the real loading path, seeded disjoint token splits on
the offline copy (skipped without it), a from-scratch GPT-2 that trains, caches and has 2 branch edges per layer."""
from __future__ import annotations

import math
import re
from dataclasses import replace

import matplotlib.pyplot as plt
import pytest
import torch

from surrogate import build_graph
from surrogate.lm import (HEAD_PROJECTIONS, PAPER_LM_TRAINING, SUBLAYER_BRANCHES, LMConfig, gpt2_lm, perplexity,
                          wikitext_blocks, wikitext_splits)
from surrogate.models import gpt2_small_random


def _rows(x: torch.Tensor) -> set[bytes]:
    return {bytes(r) for r in x.numpy()}


def test_pretrained_weights_load_through_from_pretrained(tmp_path):
    lm = gpt2_small_random(n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=32, seed=3)
    lm.save_pretrained(tmp_path)
    model, meta = gpt2_lm(LMConfig(model_name=str(tmp_path)), log=None)
    assert not model.training and meta["model_name"] == str(tmp_path)
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(x), lm(input_ids=x, use_cache=False).logits)
    with pytest.raises(RuntimeError, match="save_pretrained"):
        gpt2_lm(LMConfig(model_name=str(tmp_path / "missing" / "folder")), log=None)


def test_wikitext_splits_are_seeded_and_disjoint(wikitext_dir, tokenizer):
    cfg = LMConfig(block_size=64, n_score=8, n_val=16)
    s = wikitext_splits(cfg, tokenizer, wikitext_dir)
    train_all = wikitext_blocks("train", tokenizer, 64, wikitext_dir)
    assert {k: v.inputs.shape[1] for k, v in s.items()} == dict.fromkeys(("train", "val", "scoring", "test"), 64)
    assert len(s["train"]) + len(s["scoring"]) == len(train_all) and len(s["val"]) == 16
    assert len(s["test"]) == 287644 // 64  # the HF perplexity guide's join of the test split
    assert not _rows(s["scoring"].inputs) & _rows(s["train"].inputs)  # held out of train
    assert _rows(s["scoring"].inputs) <= _rows(train_all)  # ... but from the training split
    assert all(torch.equal(v.inputs, v.targets) for v in s.values())
    small = wikitext_splits(replace(cfg, n_train_blocks=50), tokenizer, wikitext_dir)
    assert torch.equal(small["train"].inputs, s["train"].inputs[:50])
    assert torch.equal(small["scoring"].inputs, s["scoring"].inputs)
    other = wikitext_splits(replace(cfg, split_seed=1, n_train_blocks=50), tokenizer, wikitext_dir)
    assert not torch.equal(other["scoring"].inputs, s["scoring"].inputs)


def test_gpt2_from_scratch_trains_caches_and_has_branch_edges(wikitext_dir, tokenizer, tmp_path):
    cfg = LMConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, n_train_blocks=96, n_score=4, n_val=8)
    splits = wikitext_splits(cfg, tokenizer, wikitext_dir)
    training = replace(PAPER_LM_TRAINING, epochs=1, batch_size=4, lr=1e-2)
    # an untrained GPT-2 of the same size (another cache key: other initial weights)
    untrained = gpt2_lm(cfg, replace(training, epochs=0), data_dir=wikitext_dir, cache_dir=tmp_path, splits=splits,
                        log=None)[0]
    lines: list[str] = []
    model, meta = gpt2_lm(cfg, training, data_dir=wikitext_dir, cache_dir=tmp_path, splits=splits, log=lines.append)
    assert len(lines) == 1 and len(meta["history"]) == 1 and not model.training
    ppl = perplexity(model, splits["val"], batch_size=3)
    assert ppl == pytest.approx(math.exp(meta["history"][0]["val_loss"]), rel=1e-4)  # train() measured the same
    assert ppl < 0.5 * perplexity(untrained, splits["val"])
    again, meta2 = gpt2_lm(cfg, training, data_dir=wikitext_dir, cache_dir=tmp_path, splits=splits, log=lines.append)
    assert len(lines) == 1 and meta2["history"] == meta["history"]  # loaded, not trained again
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    graph = build_graph(model, splits["scoring"].inputs[:2])
    branches = [n for n in graph.edge_names if re.search(SUBLAYER_BRANCHES, n)]
    assert len(branches) == 2 * cfg.n_layer and graph.num_prunable == 4 * cfg.n_layer  # the rest: the residual stream
    assert sum(".attn." in n for n in branches) == sum(".mlp." in n for n in branches) == cfg.n_layer
    heads = build_graph(model, splits["scoring"].inputs[:2], heads={HEAD_PROJECTIONS: cfg.n_head})
    assert sum("[head " in n for n in heads.edge_names) == cfg.n_layer * cfg.n_head


# ------------------------------------------------------------------------------------------------------------
# the study's glue (notebook 03) on a tiny random GPT-2 and random tokens: no data needed

def test_the_sublayer_and_head_studies_give_the_papers_numbers(tmp_path):
    import numpy as np

    from surrogate import Subset, Task
    from surrogate.lm import (head_figure, head_macros, head_protocol, lm_macros, sublayer_interactions,
                              sublayer_protocol)
    from surrogate.models import CausalLMLogits
    from surrogate.profile import pruned_costs
    from surrogate.report import picks_against_oracle, ranking
    from surrogate.scenarios import FinetuneConfig, finetune_picks
    from surrogate.studies import oracle_masks, run_networks
    from surrogate.lm import cost_of

    net = CausalLMLogits(gpt2_small_random(n_layer=2, n_head=2, n_embd=16, vocab_size=64, n_positions=16, seed=1)).eval()
    tokens = torch.randint(0, 64, (40, 16), generator=torch.Generator().manual_seed(0))
    scoring, evaluation, train = (Subset(n, x, x) for n, x in (("s", tokens[:4]), ("e", tokens[4:12]), ("t", tokens[12:])))
    config = sublayer_protocol(["loo", "taylor2", "superposition_state"], 2, n_realistic=4, budgets=(1, 2))
    graph = build_graph(net, scoring.inputs[:4])  # traced once (torch.export): a graph serves every step
    rec = run_networks({0: graph}, scoring, evaluation, Task("lm"), config, key=lambda s: ("lm", s), kind="lm",
                       cache_dir=tmp_path, log=None)
    rank, (picks, oracle) = ranking(rec.protocols), picks_against_oracle(rec.regret, "perplexity")
    inter = sublayer_interactions(rec)
    assert inter.methods == ["taylor2", "loo", "superposition_state"] and len(inter.pairs) == 6  # C(4, 2) branches
    assert set(inter.pairs.pair) >= {"L0.attn + L0.mlp", "L0.attn + L1.mlp"}
    fine = finetune_picks(rec, {0: graph}, None, ["loo"], [1], train, evaluation, Task("lm"),
                          FinetuneConfig(steps=1, batch_size=4), unit="perplexity", cache_dir=tmp_path, log=None)
    assert fine.method.tolist() == ["dense", "loo", "oracle"] and np.allclose(fine.ppl, np.exp(fine.loss))
    fine_sum = fine.groupby("method", as_index=False)[["ppl", "ppl_before"]].mean().rename(
        columns={"ppl": "ppl_mean", "ppl_before": "ppl_before_mean"})
    cost = pruned_costs(graph, oracle_masks(rec.regret, 0), cost_of, (evaluation.inputs[:1], evaluation.inputs[:4]),
                        key=("lm",), cache_dir=tmp_path)
    assert list(cost.columns) == ["removed", "params", "latency_b1_ms", "tokens_per_s", "params_rel",
                                  "latency_b1_ms_rel", "tokens_per_s_rel"]
    m = lm_macros(rec, rank, picks, oracle, inter, fine_sum, cost, model=net.lm.config, tokens=64, dense_ppl={0: 70.0})
    assert m["LmBranchMasks"] == 16 and m["LmLayers"] == 2 and m["LmBranches"] == 4 and m["LmTestPPL"] == "70.0"
    from surrogate.paper import fmt
    assert m["LmStateMiB"] == fmt(64 * 16 * 4 / 2**20, 1) and m["LmLogitsOverState"] == 4.0
    assert m["LmPairMax"] == inter.strongest.pair.iloc[0] and m["LmCostRemoved"] == 2
    assert {"LmSublayersLoo", "LmWithinKRealisticTaylorTwo", "LmPplGapLooOne", "LmOraclePplTwo", "LmByKLooTwo",
            "LmForwardLoo", "LmSuperAdditiveThree", "LmPairRankLoo", "LmFtOracle", "LmZsDense"} <= set(m)

    hconfig = head_protocol(config, ["loo", "sleb", "superposition", "superposition_state"], 2, 2, 4, (2,), 4)
    assert hconfig.methods == ("loo", "superposition_state") and hconfig.families[0].counts == (2,)
    hrec = run_networks({0: net}, scoring, evaluation, Task("lm"), hconfig, key=lambda s: ("heads", s), kind="lm",
                        cache_dir=tmp_path, log=None)
    hm = head_macros(hrec, ranking(hrec.protocols, passes=False), picks_against_oracle(hrec.regret, "perplexity")[0])
    assert hm["LmHeadEdges"] == 4 and hm["LmHeadMasks"] == hrec.info.heads_n_masks.iloc[0]
    assert {"LmHeadRankLoo", "LmHeadWithinKSuperpositionState", "LmHeadGapLooTwo"} <= set(hm)
    # single removals measure every prunable edge of the head graph (the 4 heads and the residual inputs) once
    assert hm["LmHeadFwdLoo"] == str(hrec.info.edges.iloc[0] + 1) and hm["LmHeadBwdLoo"] == "0"
    fig = head_figure(hrec, hconfig.methods, 2, 2)
    assert "Superposition" in fig.axes[0].get_title()  # superposition_state preferred over loo
    plt.close(fig)  # an open figure fails test_paper's check that save_figure closes what it saves


def test_study_protocols_check_their_sizes():
    from surrogate.lm import head_protocol, readout_memory, sublayer_name, sublayer_protocol
    with pytest.raises(ValueError, match="at most 6 layers"):
        sublayer_protocol(["loo"], 7, 10, (1,))
    hconfig = head_protocol(sublayer_protocol(["loo"], 4, 10, (1,)), ["loo", "flow"], 4, 4, 10, (2, 4), 8)
    assert hconfig.families[0].counts == (2, 3, 4) and hconfig.search_swaps == 4  # 10-30% of 16 heads
    assert hconfig.graph.heads == {HEAD_PROJECTIONS: 4}
    assert sublayer_name("lm.transformer.h.3.attn.resid_dropout -> lm.transformer.h.3.add") == "L3.attn"
    with pytest.raises(ValueError, match="not a sub-layer branch"):
        sublayer_name("lm.transformer.ln_f -> output")
    memory = readout_memory(1024, 256, 50257, 16).set_index("space")
    assert memory.loc["state", "MiB_per_mask"] == 1.0 and memory.loc["logits", "MiB_fit_design"] == pytest.approx(
        1024 * 50257 * 4 / 2**20 * 18)
