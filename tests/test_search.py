"""Searches at a budget of passes: each stays within its budget (forward passes counted on the model itself),
finds the optimum of a small space given enough passes, is seeded; the sequential surrogate is exact on what it
measured; the equal-cost benchmark and its truth tables."""
import math

import numpy as np
import pytest
import torch

from surrogate import GatedModel, Subset, Task, build_graph
from surrogate.bench import BenchConfig, load_truth, resolve_budgets, run_bench, save_truth
from surrogate.masks import exhaustive_masks
from surrogate.models import ResNetCifar
from surrogate.passes import BudgetExhausted, LossOracle
from surrogate.methods import Context
from surrogate.search import SEARCHES, Problem, run_search
from surrogate.sequential import sequential


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    net = ResNetCifar(8, 10, 4).eval()  # 3 blocks: 6 prunable edges (3 branches, 3 shortcuts)
    x, y = torch.randn(48, 3, 32, 32), torch.randint(0, 10, (48,))
    graph = build_graph(net, x[:4])
    gated = GatedModel(graph)
    scoring, task = Subset("scoring", x[:32], y[:32]), Task("classification")
    return net, graph, gated, scoring, Subset("test", x[32:], y[32:]), task


def _problem(setup, k=2):
    _, graph, gated, scoring, _, task = setup
    ctx = Context(graph, gated, scoring, task)
    return Problem(graph, k, np.ones(graph.num_prunable, dtype=bool), True, ctx)


class PassCounter:
    """Counts the samples that enter the network's stem: forward passes over the scoring subset."""
    def __init__(self, net, n):
        self.samples, self.n = 0, n
        self.handle = net.conv.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.samples += args[0].shape[0]

    @property
    def passes(self):
        return self.samples / self.n


def test_meter_charges_new_masks_once_and_refuses_to_overspend(setup):
    _, _, gated, scoring, _, task = setup
    oracle = LossOracle(gated, scoring, task)
    meter = oracle.meter(3)
    masks = np.ones((2, 6), dtype=np.float32)
    masks[1, 0] = 0
    first = meter.measure(masks)
    assert meter.spent == 2 and np.array_equal(meter.measure(masks), first) and meter.spent == 2
    meter.measure(masks[1] * 0 + 1 - np.eye(6, dtype=np.float32)[3], fraction=0.25)  # a quarter of the subset
    assert meter.spent == pytest.approx(2.25)
    with pytest.raises(BudgetExhausted):
        meter.measure(1 - np.eye(6, dtype=np.float32)[1:3])  # 2 passes, 0.75 left
    assert meter.spent == pytest.approx(2.25)
    meter.recommend(masks[0])
    assert meter.pick_at(2) is None and np.array_equal(meter.pick_at(2.25), masks[0])


@pytest.mark.parametrize("name", sorted(SEARCHES))
def test_each_search_stays_within_its_budget(setup, name):
    net, graph, gated, scoring, _, task = setup
    problem = _problem(setup)
    for budget in (8, 15):
        counter = PassCounter(net, len(scoring))
        try:
            rows = run_search(name, problem, LossOracle(gated, scoring, task), [budget], seed=0)
        finally:
            counter.handle.remove()
        assert rows[0]["spent"] is None or rows[0]["spent"] <= budget + 1e-9
        assert counter.passes <= budget + 1e-9, f"{name} ran {counter.passes} passes at a budget of {budget}"
        if rows[0]["mask"] is not None:
            assert problem.feasible(rows[0]["mask"])[0]


@pytest.mark.parametrize("name", sorted(SEARCHES))
def test_each_search_is_seeded(setup, name):
    _, _, gated, scoring, _, task = setup
    problem = _problem(setup)
    runs = [run_search(name, problem, LossOracle(gated, scoring, task), [10, 20], seed=3) for _ in range(2)]
    for a, b in zip(*runs):
        assert a["spent"] == b["spent"]
        assert (a["mask"] is None and b["mask"] is None) or np.array_equal(a["mask"], b["mask"])


@pytest.mark.parametrize("name", ["random_search", "evolution", "sequential", "sequential_loss"])
def test_searches_find_the_optimum_of_a_small_space(setup, name):
    _, _, gated, scoring, _, task = setup
    problem = _problem(setup)
    oracle = LossOracle(gated, scoring, task)
    space = exhaustive_masks(6, (2,))
    space = space[problem.feasible(space)]
    best = oracle.losses(space).min()
    rows = run_search(name, problem, oracle, [200], seed=1)
    assert oracle.losses(rows[0]["mask"])[0] == best


@pytest.mark.parametrize("base", ["superposition", "loss"])
def test_sequential_model_is_exact_on_every_mask_it_measured(setup, base):
    _, _, gated, scoring, _, task = setup
    problem = _problem(setup, k=2)
    meter = LossOracle(gated, scoring, task).meter(1000)
    model = sequential(problem, meter, np.random.default_rng(0), base=base)
    masks = np.stack([m for m, _ in meter.measured])
    measured = np.array([l for _, l in meter.measured])
    assert len(masks) >= 7
    np.testing.assert_allclose(model.predict(masks), measured, rtol=0, atol=1e-9)
    # ... and so is its model before the answers from memory: the kernel correction interpolates them
    rows = model._model(masks) + model._kernel(1 - masks[:, problem.units], model.rows) @ model.alpha
    np.testing.assert_allclose(rows, measured, atol=1e-4)


def test_budget_expressions():
    assert resolve_budgets(["E+2", "2*E", "E*(E+1)/2", 5], 18) == [5, 20, 36, 171]
    with pytest.raises(ValueError):
        resolve_budgets(["__import__('os')"], 4)


def test_bench_scores_every_pick_against_the_reference_and_reuses_truth_tables(setup, tmp_path):
    net, graph, gated, scoring, test, task = setup
    config = BenchConfig(ks=(2,), budgets=("E+2", "2*E"), zero_shot=("loo", "taylor1_abs"), ablations=(0.34,),
                         ablation_masks=8)
    result = run_bench(graph, scoring, test, task, config, seed=0)
    rows = result.picks
    ranking = {(r["method"], r["budget"]): r for r in result.ranking}
    assert ranking[("loo", 7)]["spent"] == 7 and ranking[("sequential", 12)]["spent"] <= 12
    assert all(-1 <= r["spearman"] <= 1 for r in result.ranking if not math.isnan(r["spearman"]))
    reach = {r["method"]: r for r in result.reach}
    assert set(reach) == {s for s in config.searches if SEARCHES[s].anytime}
    for r in result.reach:  # a reached pick is one of the method's picks at or before its largest budget
        assert math.isnan(r["passes"]) or 0 < r["passes"] <= r["largest"] <= 12 + 1e-9
    assert {r["method"] for r in rows} == set(config.searches) | set(config.zero_shot)
    for r in rows:
        assert r["reference"].startswith("exhaustive (") and r["units"] == 6
        if r["mask"]:
            assert r["regret"] >= -1e-12 and math.isclose(r["regret"], r["loss"] - r["best_loss"])
            assert r["spent"] <= r["budget"] + 1e-9
    truth = LossOracle(gated, test, task)
    rows_again = run_bench(graph, scoring, test, task, config, seed=0, truth=truth).picks
    path = tmp_path / "truth.csv"
    save_truth(path, "net0", truth)
    again = LossOracle(gated, test, task)
    assert load_truth(path, "net0", again) == len(truth.table()) > 0
    assert load_truth(path, "other", LossOracle(gated, test, task)) == 0
    known = {tuple(m): l for m, l, _ in truth.table()}
    for m, l, _ in again.table():
        assert known[tuple(m)] == l  # loss round-trips exactly (repr of floats)
    assert [r["loss"] for r in rows] == [r["loss"] for r in rows_again]


def test_zero_shot_criteria_measure_only_the_units_when_some_edges_are_not_units(setup):
    net, graph, gated, scoring, test, task = setup
    config = BenchConfig(units=r"bn2", ks=(1,), budgets=("E+2",), searches=("random_search",),
                         zero_shot=("loo", "taylor2"), ablations=(0.34,), ablation_masks=4)
    rows = {r["method"]: r for r in run_bench(graph, scoring, test, task, config, seed=0).picks}
    assert rows["loo"]["spent"] == 4 and rows["taylor2"]["spent"] == 1 + 1 + 3  # 3 units, not 6 edges
    shortcuts = [i for i, n in enumerate(graph.edge_names) if "shortcut" in n]
    for name in ("loo", "taylor2"):
        mask = np.array([float(c) for c in rows[name]["mask"]])
        assert mask.sum() == 5 and (mask[shortcuts] == 1).all()  # one branch removed, never a shortcut
    singles = 1 - np.eye(6, dtype=np.float32)[[i for i in range(6) if i not in shortcuts]]
    best = singles[np.argmin(LossOracle(gated, scoring, task).losses(singles))]
    assert rows["loo"]["mask"] == "".join(str(int(v)) for v in best)  # the cheapest single removal


@pytest.fixture(scope="module")
def tiny_lm():
    from transformers import GPT2Config, GPT2LMHeadModel
    from surrogate.models import CausalLMLogits
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=1100, n_positions=16,
                                    bos_token_id=0, eos_token_id=0))
    net = CausalLMLogits(lm).eval()
    x = torch.randint(0, 1100, (12, 16))
    graph = build_graph(net, x[:2])
    return net, graph, GatedModel(graph), Subset("scoring", x, x), Task("lm")


def test_wide_head_loss_is_exact_at_the_dense_state_and_cheaper_than_the_head(tiny_lm):
    from surrogate.readout import Tail, find_readout
    from surrogate.widehead import WideHeadLoss
    net, graph, gated, scoring, task = tiny_lm
    node = find_readout(gated)
    with torch.no_grad():
        out, taps = gated(scoring.inputs, taps=(node,))
    wide = WideHeadLoss(Tail(gated, node), taps[node], scoring.inputs, scoring.targets, task, k=16)
    exact = float(task.per_sample(out, scoring.targets)[0].mean())
    assert wide.loss(taps[node]) == pytest.approx(exact, abs=1e-5)
    head = 2 * 12 * 15 * 32 * 1100  # FLOPs of the full head on the predicted positions
    assert wide.flops(taps[node]) < head / 10


def test_sequential_on_a_language_model_counts_every_pass(tiny_lm):
    import re
    from surrogate.lm import SUBLAYER_BRANCHES
    net, graph, gated, scoring, task = tiny_lm
    allowed = np.array([re.search(SUBLAYER_BRANCHES, n) is not None for n in graph.edge_names])
    problem = Problem(graph, 2, allowed, True, Context(graph, gated, scoring, task))
    seen = []
    hook = net.lm.transformer.wte.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    try:
        rows = run_search("sequential", problem, LossOracle(gated, scoring, task), [10, 14], seed=0)
    finally:
        hook.remove()
    assert sum(seen) / len(scoring) <= 14 + 1e-9
    assert rows[-1]["mask"] is not None and problem.feasible(rows[-1]["mask"])[0]


def test_summaries_over_networks_pair_ours_with_each_method_at_equal_passes():
    import pandas as pd
    from surrogate.bench import at_budgets, head_to_head, regret_summary, regret_table
    rows = []
    for net in range(3):
        for p in (10, 20):
            rows.append({"network": net, "k": 2, "method": "ours", "kind": "search", "budget": p, "spent": p - 1,
                         "regret": 0.0 if p == 20 else 0.1})
            rows.append({"network": net, "k": 2, "method": "rs", "kind": "search", "budget": p, "spent": p,
                         "regret": 0.2 + net / 10})
        rows.append({"network": net, "k": 2, "method": "zs", "kind": "zero-shot", "budget": 15, "spent": 15,
                     "regret": 0.0})
    table = at_budgets(pd.DataFrame(rows), [10, 20])
    assert set(table[table.P == 10].method) == {"ours", "rs"}  # the zero-shot criterion costs 15 > 10
    summary = regret_summary(table).set_index(["P", "method"])
    assert summary.loc[(10, "rs"), "mean"] == pytest.approx(0.3) and summary.loc[(10, "rs"), "networks"] == 3
    assert summary.loc[(10, "rs"), "lo"] <= 0.3 <= summary.loc[(10, "rs"), "hi"]
    h2h = head_to_head(table, "ours").set_index(["P", "method"])
    assert h2h.loc[(10, "rs"), ["wins", "ties", "losses"]].tolist() == [3, 0, 0]
    assert h2h.loc[(20, "zs"), ["wins", "ties", "losses"]].tolist() == [0, 3, 0]
    assert h2h.loc[("all", "rs"), ["pairs", "wins", "ties", "losses"]].tolist() == [6, 6, 0, 0]  # networks x budgets
    assert h2h.loc[("all", "rs"), "wilcoxon_p"] == pytest.approx(2 / 2 ** 6)  # exact: all six pairs one way
    assert h2h.loc[("all", "zs"), "pairs"] == 3  # only where both have a pick
    shown = regret_table(regret_summary(table)).set_index("Method")
    assert shown.loc["ours", "k=2, P=10"].endswith("(9)") and shown.loc["zs", "k=2, P=20"].endswith("(15)")


def test_a_method_from_outside_the_package_is_benchmarked_in_a_few_lines(tmp_path):
    """The README's promise: register a search, score it on a study, compare it with the truth."""
    from surrogate.bench import BenchConfig, Study, score
    from surrogate.search import Search, register_search

    def last_units(problem, meter, rng):  # a made-up criterion: remove the last k units, measure nothing
        mask = np.ones(problem.num_edges, dtype=np.float32)
        mask[problem.units[-problem.k:]] = 0
        meter.recommend(mask if problem.feasible(mask)[0] else problem.sample(1, rng)[0])

    register_search(Search("last_units", "Last units", last_units), replace=True)

    def tiny(name, data_dir, log):
        torch.manual_seed(int(name[-1]))
        x, y = torch.randn(80, 3, 32, 32), torch.randint(0, 10, (80,))
        return ResNetCifar(8, 10, 4).eval(), {"scoring": Subset("scoring", x[:32], y[:32]),
                                               "test": Subset("test", x[32:], y[32:])}, Task("classification")

    study = Study(("tiny0", "tiny1"), BenchConfig(ks=(2,), budgets=("E", "2*E"), ablations=(0.34,),
                                                  ablation_masks=6), n_eval=40, load=tiny)
    table = tmp_path / "truth.csv"
    res = score(["last_units", "random_search"], study, save_truth_to=table, log=None)
    assert {r["network"] for r in res.picks} == {"tiny0", "tiny1"}
    mine = [r for r in res.picks if r["method"] == "last_units"]
    assert len(mine) == 4 and all(r["spent"] == 0 and r["regret"] >= 0 for r in mine)
    again = score(["last_units"], study, truth=table, log=None)  # the truth is read, not measured again
    assert [r["loss"] for r in again.picks] == [r["loss"] for r in mine]


def test_a_rerun_from_the_truth_table_replays_the_searches_bit_for_bit(tmp_path):
    """The table keeps the scoring subset's masks too: a rerun charges the same passes and picks the same masks."""
    import csv
    from surrogate.bench import BenchConfig, Study, score

    def tiny(name, data_dir, log):
        torch.manual_seed(3)
        x, y = torch.randn(72, 3, 32, 32), torch.randint(0, 10, (72,))
        return ResNetCifar(8, 10, 4).eval(), {"scoring": Subset("scoring", x[:32], y[:32]),
                                               "test": Subset("test", x[32:], y[32:])}, Task("classification")

    study = Study(("tiny",), BenchConfig(ks=(2,), budgets=("E+2",), ablations=(0.34,), ablation_masks=4),
                  n_eval=40, load=tiny)
    table = tmp_path / "truth.csv"
    first = score(["random_search", "sequential_loss"], study, save_truth_to=table, log=None)
    with open(table, newline="") as f:
        subsets = {r["subset"] for r in csv.DictReader(f)}
    assert "scoring" in subsets and len(subsets) == 2
    again = score(["random_search", "sequential_loss"], study, truth=table, log=None)
    cols = ("method", "budget", "spent", "mask", "loss")
    assert [tuple(r[c] for c in cols) for r in again.picks] == [tuple(r[c] for c in cols) for r in first.picks]


@pytest.mark.parametrize("which", ["resnet", "lm"])
def test_the_dense_pass_gives_the_oracles_loss_and_the_merge_shares(setup, tiny_lm, which):
    from surrogate.flow import measure_shares
    from surrogate.readout import find_readout
    from surrogate.sequential import _dense_pass
    if which == "resnet":
        _, graph, gated, scoring, _, task = setup
    else:
        _, graph, gated, scoring, task = tiny_lm
    ctx = Context(graph, gated, scoring, task)
    oracle = LossOracle(gated, scoring, task, batch_size=8)
    meter = oracle.meter(5)
    loss, state = _dense_pass(ctx, find_readout(gated), meter)
    ones = np.ones(graph.num_prunable, dtype=np.float32)
    assert meter.spent == 1 and LossOracle(gated, scoring, task, batch_size=8).losses(ones)[0] == loss
    np.testing.assert_allclose(ctx.memo["shares"], measure_shares(graph, scoring.inputs), rtol=1e-9, atol=1e-12)
    assert state.shape[0] == len(scoring)


def test_study_from_applies_a_notebooks_overrides_and_keeps_the_rest():
    from surrogate.bench import STUDIES, study_from
    s = study_from("cifar", networks=["cifar_resnet20_seed100_12ep"], ks=[3], budgets=["E+2"], zero_shot=["loo"],
                   n_eval=50, ablations=[0.15])
    assert s.networks == ("cifar_resnet20_seed100_12ep",) and s.n_eval == 50
    assert s.config.ks == (3,) and s.config.budgets == ("E+2",) and s.config.ablations == (0.15,)
    assert s.config.strategy == STUDIES["cifar"].config.strategy and "sequential" in s.config.searches
    assert study_from("cifar").networks == STUDIES["cifar"].networks
    per = dict(budgets={"gpt2_12l": ["E+2"]}, ks={"cifar": [3]}, ablations={"gpt2_12l": [0.25]})
    c, g = study_from("cifar", **per), study_from("gpt2_12l", **per)  # per-study values: a study keeps what it
    assert c.config.ks == (3,) and c.config.budgets == STUDIES["cifar"].config.budgets  # is not given
    assert g.config.budgets == ("E+2",) and g.config.ablations == (0.25,) and g.config.ks == STUDIES["gpt2_12l"].config.ks
    with pytest.raises(KeyError, match="unknown study"):
        study_from("imagenet")


def test_bench_macros_quote_the_tables_they_come_from():
    import pandas as pd
    from surrogate.bench import at_budgets, bench_macros, head_to_head, regret_summary
    rows = [{"network": n, "k": 3, "method": m, "kind": "search", "budget": p, "spent": p, "regret": r,
             "eval_samples": 50, "reference": "exhaustive (12 masks)"}
            for n, off in (("a", 0.0), ("b", 0.1)) for p in (10, 20)
            for m, r in (("ours", 0.2 / p + off), ("rs", 0.5 / p + off))]
    picks = pd.DataFrame(rows)
    table = at_budgets(picks, [10, 20])
    summary = regret_summary(table)
    ranking = pd.DataFrame([{"fraction": 0.15, "removed": 3, "method": m, "budget": 20, "spent": 20,
                             "n_masks": 40, "spearman": s, "pearson": s} for m, s in (("ours", 0.9), ("rs", 0.4))])
    reach = pd.DataFrame([{"k": 3, "method": "ours", "tolerance": 0.01, "passes": 12.0, "largest": 20}])
    m = bench_macros("cifar", summary, head_to_head(table, "ours"), ranking, reach, "ours", picks)
    assert m["CifarNets"] == 2 and m["CifarEvalN"] == 50 and m["CifarReferenceMasks"] == 12
    assert m["CifarRankMasks"] == 40 and m["CifarBudgetAPasses"] == 10 and m["CifarBudgetBPasses"] == 20
    assert m["CifarBudgetAOurs"] == pytest.approx(0.02 + 0.05) and m["CifarBudgetABestOther"] == pytest.approx(0.05 + 0.05)
    assert (m["CifarBudgetAWins"], m["CifarBudgetATies"], m["CifarBudgetALosses"]) == (2, 0, 0)
    assert m["CifarRankOneFivePctOurs"] == 0.9 and m["CifarRankOneFivePctBestOther"] == 0.4
    assert m["CifarReachKThreeOurs"] == "12.0"
    assert (m["CifarPooledRsPairs"], m["CifarPooledRsWins"], m["CifarPooledRsLosses"]) == (4, 4, 0)
    assert m["CifarPooledRsP"] == pytest.approx(0.125)
    lo, hi = m["CifarBudgetAOursLo"], m["CifarBudgetAOursHi"]  # the bootstrap interval over the two networks
    assert lo == pytest.approx(0.02) and hi == pytest.approx(0.12) and m["CifarBudgetABestOtherHi"] == pytest.approx(0.15)
    assert "CifarQueryPct" not in m  # no method recorded queries
    picks["queries"] = picks["query_passes"] = np.nan
    ours = picks.method == "ours"  # per network: 100 queries worth 0.5 or 1.5 passes, at the largest budget
    picks.loc[ours, "queries"] = 100.0
    picks.loc[ours, "query_passes"] = np.where(picks[ours].network == "a", 0.5, 1.5) * picks[ours].budget / 20
    q = bench_macros("cifar", summary, head_to_head(table, "ours"), ranking, reach, "ours", picks)
    assert (q["CifarQueryCount"], q["CifarQueryPct"], q["CifarQueryPctMax"]) == ("100", "1.00", "1.50")


def test_network_macros_quote_the_shipped_manifest_and_nothing_for_stand_ins():
    from surrogate.bench import STUDIES, network_macros
    from surrogate.checkpoints import load_manifest
    nets = STUDIES["gpt2_12l"].networks
    m = network_macros("gpt2_12l", nets)
    ppl = [load_manifest()[n]["metrics"]["test_ppl"] for n in nets]
    assert m["GptTwoOneTwoLShipped"] == 3 and m["GptTwoOneTwoLNLayer"] == 12
    assert m["GptTwoOneTwoLTestPplMin"] == f"{min(ppl):.1f}" and m["GptTwoOneTwoLTestPplMean"] == f"{sum(ppl) / 3:.1f}"
    assert "CifarTestAccMean" in network_macros("cifar", STUDIES["cifar"].networks)
    assert network_macros("cifar", ["cifar_resnet20_seed0", "cifar_resnet20_seed7"]) == {}  # one not shipped


def test_cached_bench_records_are_reused_per_network_and_keyed_by_the_weights(tmp_path):
    """With ``cache=True`` a rerun reads each network's records instead of running the searches again (so two
    processes may score a study's networks apart and a third reads them all); other weights or another config
    are not a hit, and a hit leaves the truth table as it was."""
    from dataclasses import replace
    from surrogate.bench import BenchConfig, Study, score
    init = {"tiny1": 1, "tiny2": 2}

    def tiny(name, data_dir, log):
        torch.manual_seed(init[name])
        net = ResNetCifar(8, 10, 4).eval()
        torch.manual_seed(0)
        x, y = torch.randn(72, 3, 32, 32), torch.randint(0, 10, (72,))
        return net, {"scoring": Subset("scoring", x[:32], y[:32]), "test": Subset("test", x[32:], y[32:])}, \
            Task("classification")

    study = Study(("tiny1", "tiny2"), BenchConfig(ks=(2,), budgets=("E+2",), ablations=(0.34,), ablation_masks=4),
                  n_eval=40, load=tiny)
    table, cache = tmp_path / "truth.csv", tmp_path / "cache"
    files = lambda: len(list((cache / "bench").glob("*.pkl")))  # noqa: E731
    kw = dict(save_truth_to=table, cache=True, cache_dir=cache, log=None)
    one = score(["random_search"], study, networks=["tiny1"], **kw)
    written = table.read_text()
    both = score(["random_search"], study, **kw)  # tiny1 read, tiny2 computed
    assert files() == 2 and [r for r in both.picks if r["network"] == "tiny1"] == one.picks
    table.write_text(written)
    assert score(["random_search"], study, **kw).picks == both.picks and table.read_text() == written  # all hits
    init["tiny1"] = 5  # other weights under the same name
    assert score(["random_search"], study, networks=["tiny1"], **kw).picks != one.picks and files() == 3
    fewer = replace(study, config=replace(study.config, budgets=("E",)))
    score(["random_search"], fewer, networks=["tiny2"], **kw)
    assert files() == 4
