"""The random-graph study driver: records per graph, cached so that a rerun recomputes nothing."""
from __future__ import annotations

from dataclasses import replace

import pandas as pd
import pytest

import surrogate.study as study
from surrogate.data import TeacherTaskConfig
from surrogate.study import StudyConfig, run_study
from surrogate.train import TrainConfig

TINY = StudyConfig(sizes=(2,), graphs_per_size=2, width=8,
                   task=TeacherTaskConfig(n_train=200, n_val=100, n_score=64, n_test=128),
                   train=TrainConfig(epochs=3, batch_size=64), n_test_masks=12, budgets=(0.2,), extra_k=(),
                   methods=("loo", "superposition"), k_methods=(), search_random=5, search_swaps=5)


def test_study_records_are_cached_per_graph(tmp_path, monkeypatch: pytest.MonkeyPatch):
    first = run_study(TINY, cache_dir=str(tmp_path), progress=False)
    assert len(first["info"]) == 2 and set(first["protocols"].method) == {"loo", "superposition"}

    def not_again(*args, **kwargs):
        raise AssertionError("a cached graph was measured again")

    monkeypatch.setattr(study, "run_graph", not_again)
    again = run_study(TINY, cache_dir=str(tmp_path), progress=False)
    for k in ("info", "protocols", "regret"):
        pd.testing.assert_frame_equal(first[k], again[k])
    with pytest.raises(AssertionError, match="measured again"):  # another config is another key
        run_study(replace(TINY, n_test_masks=13), cache_dir=str(tmp_path), progress=False)


def test_study_progress_is_plain_lines_with_time_left(tmp_path, monkeypatch: pytest.MonkeyPatch, capsys):
    import surrogate.progress as progress
    monkeypatch.setattr(progress, "PROGRESS_SECONDS", 0.0)
    run_study(TINY, cache_dir=str(tmp_path), progress=True)
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("graphs: 1/2 (") and "left)" in line for line in lines)


def test_parallel_workers_are_refused_on_an_accelerator(tmp_path):
    with pytest.raises(ValueError, match="use workers=1"):
        run_study(replace(TINY, train=replace(TINY.train, device="cuda")), workers=2, cache_dir=str(tmp_path))
