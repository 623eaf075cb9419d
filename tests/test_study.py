"""The random-graph study driver: records per graph, cached so that a rerun recomputes nothing."""
from __future__ import annotations

from dataclasses import replace

import pandas as pd
import pytest

import surrogate.study as study
from surrogate.data import TeacherTaskConfig
from surrogate.experiment import ExperimentConfig
from surrogate.report import ordered, paired_tests, summarize
from surrogate.study import (PROTOCOLS, SIZE_METRICS, StudyConfig, overtraining, overtraining_macros, run_study,
                             size_tables, study_experiment, synthetic_macros)
from surrogate.train import TrainConfig

TINY = StudyConfig(sizes=(2,), graphs_per_size=2, width=8,
                   task=TeacherTaskConfig(n_train=200, n_val=100, n_score=64, n_test=128),
                   train=TrainConfig(epochs=3, batch_size=64),
                   experiment=study_experiment(12, budgets=(0.2,), extra_k=(), methods=("loo", "superposition"),
                                               k_methods=(), search_random=5, search_swaps=5))


def test_study_records_are_cached_per_graph(tmp_path, monkeypatch: pytest.MonkeyPatch):
    first = run_study(TINY, cache_dir=str(tmp_path), progress=False)
    assert len(first.info) == 2 and set(first.protocols.method) == {"loo", "superposition"}
    assert set(first.examples) == {(2, 0), (2, 1)}

    def not_again(*args, **kwargs):
        raise AssertionError("a cached graph was measured again")

    monkeypatch.setattr(study, "run_graph", not_again)
    again = run_study(TINY, cache_dir=str(tmp_path), progress=False)
    for k in ("info", "protocols", "regret"):
        pd.testing.assert_frame_equal(getattr(first, k), getattr(again, k))
    with pytest.raises(AssertionError, match="measured again"):  # another config is another key
        run_study(replace(TINY, experiment=study_experiment(13, **{k: getattr(TINY.experiment, k) for k in (
            "budgets", "extra_k", "methods", "k_methods", "search_random", "search_swaps")})),
            cache_dir=str(tmp_path), progress=False)


def test_study_config_holds_one_protocol_with_both_families():
    assert TINY.n_test_masks == 12 and TINY.experiment.budgets == (0.2,) and not TINY.experiment.connected_picks
    assert StudyConfig().experiment == study_experiment()  # the defaults are the study's protocol
    with pytest.raises(ValueError, match="study_experiment"):
        StudyConfig(experiment=ExperimentConfig())  # one "realistic" family: the tables need "prior" too


def test_study_progress_is_plain_lines_with_time_left(tmp_path, monkeypatch: pytest.MonkeyPatch, capsys):
    import surrogate.progress as progress
    monkeypatch.setattr(progress, "PROGRESS_SECONDS", 0.0)
    run_study(TINY, cache_dir=str(tmp_path), progress=True)
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("graphs: 1/2 (") and "left)" in line for line in lines)


def test_parallel_workers_are_refused_on_an_accelerator(tmp_path):
    with pytest.raises(ValueError, match="use workers=1"):
        run_study(replace(TINY, train=replace(TINY.train, device="cuda")), workers=2, cache_dir=str(tmp_path))


def test_the_synthetic_tables_and_macros_come_from_the_records(tmp_path):
    cfg = replace(TINY, experiment=replace(TINY.experiment, extra_k=(0, 4), k_methods=("superposition",)))
    rec = run_study(cfg, cache_dir=str(tmp_path), progress=False)
    summary = summarize(rec.protocols, ["protocol", "method", "size"], SIZE_METRICS)
    tables = size_tables(summary, rec.info, cfg.sizes, ordered(cfg.experiment.methods))
    assert set(tables) == {f"{m}_{p}" for m in ("spearman", "kendall", "top10") for p in PROTOCOLS} | {
        "spearman_prior_connected"}
    assert list(tables["spearman_prior"].columns) == ["Method", "10-15"]  # the prior study's name of size 2
    assert tables["spearman_prior"].Method.tolist()[-1] == "Noise ceiling of the truth"
    tests = paired_tests(rec.protocols, PROTOCOLS, ["spearman", "top10"], "size")
    assert set(zip(tests.protocol, tests.metric)) == {(p, m) for p in PROTOCOLS for m in ("spearman", "top10")}
    assert set(tests.ours) == {"superposition"} and set(tests.baseline) == {"loo"} and set(tests.n) == {2}
    esum = summarize(rec.efficiency, ["protocol", "method", "size", "extra"], ["spearman", "top10"])
    rsum = summarize(rec.regret, ["method", "size", "budget_frac"], ["regret", "chosen_loss"])
    m = synthetic_macros(cfg, "tiny", rec.info, summary, esum, rsum, tests)
    assert m["SynGraphs"] == 2 and m["SynEffMax"] == 4 and m["SynProfile"] == "tiny" and m["SynRegretBudgetPct"] == 20
    assert m["SynEdgesMinTiny"] == str(int(rec.info.edges.min())) and "SynEffRealisticSuperpositionTiny" in m
    assert "SynPairedPriorWinsTiny" in m and "SynPairedRealisticPTiny" in m and m["SynTopTenCells"] == 2
    assert m["SynRegretSuperpositionWorst"] == rsum[rsum.method == "superposition"].regret_mean.max()


def test_overtraining_compares_the_same_graphs_trained_longer(tmp_path):
    spearman, networks = overtraining(TINY, 2, 1, epochs=4, cache_dir=str(tmp_path))
    assert networks.training.tolist() == ["early-stopped", "over-trained"] and set(networks.n) == {1}
    assert set(spearman.training) == {"early-stopped", "over-trained"} and set(spearman.protocol) == set(PROTOCOLS)
    m = overtraining_macros(spearman, networks, 4, 1)
    assert m["SynOtEpochs"] == 4 and {"SynOtEarlyPriorLoo", "SynOtOverRealisticSuperposition", "SynOtAccOver",
                                      "SynOtBestEpochEarly"} <= set(m)
