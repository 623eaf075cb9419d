"""Mask evaluation across processes: two gloo ranks give one process's results, in mask order, bit for bit."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from surrogate.sharding import evaluate_masks_sharded, shard_bounds

from test_evaluate import _assert_equal, _gpt2, _masks, _resnet

ROOT = Path(__file__).resolve().parents[1]
MAKERS = {"resnet": _resnet, "gpt2": lambda: _gpt2(False)}


@pytest.mark.parametrize("num, world, unit", [(10, 2, 1), (10, 3, 4), (3, 4, 1), (0, 2, 1), (64, 2, 5)])
def test_shard_bounds_cover_every_mask_once(num: int, world: int, unit: int) -> None:
    bounds = shard_bounds(num, world, unit)
    assert len(bounds) == world and bounds[0][0] == 0 and bounds[-1][1] == num
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # contiguous, in rank order
    assert all(start % unit == 0 or start == num for start, _ in bounds)  # whole stacked passes
    sizes = [-(-(stop - start) // unit) for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1


def _worker(rank: int, world: int, store: str, make: str, kwargs: dict, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        gated, data, task = MAKERS[make]()
        masks = _masks(gated.num_edges, 21)
        if kwargs.pop("bad_rank", None) == rank:  # one rank gets a mask of the wrong length
            masks = masks[:, :-1]
        try:
            result = evaluate_masks_sharded(gated, masks, data, task, **kwargs)
        except Exception as exc:  # noqa: BLE001
            result = f"{type(exc).__name__}: {exc}"
        with open(f"{out}.{rank}", "wb") as f:
            pickle.dump(result, f)
    finally:
        torch.distributed.destroy_process_group()


def _spawn(tmp_path: Path, make: str, kwargs: dict, world: int = 2) -> list:
    mp.start_processes(_worker, args=(world, str(tmp_path / "store"), make, kwargs, str(tmp_path / "out")),
                       nprocs=world, start_method="spawn")
    return [pickle.loads((tmp_path / f"out.{r}").read_bytes()) for r in range(world)]


@pytest.mark.parametrize("make, kwargs", [
    ("resnet", dict(batch_size=10, strategy="prefix", keep_outputs=True)),
    ("resnet", dict(batch_size=10, masks_per_pass=4, keep_outputs=True)),
    ("gpt2", dict(batch_size=4, keep_outputs=True)),        # the default masks per pass, decided on rank 0
], ids=["prefix", "stacked", "gpt2_default"])
def test_two_ranks_equal_one_process(tmp_path: Path, make: str, kwargs: dict) -> None:
    gated, data, task = MAKERS[make]()
    one = evaluate_masks_sharded(gated, _masks(gated.num_edges, 21), data, task, **kwargs)  # no process group
    ranks = _spawn(tmp_path, make, dict(kwargs))
    for got in ranks:  # every rank holds the whole result
        assert not isinstance(got, str), got
        _assert_equal(got, one)
    assert len(np.unique(one.loss)) > 5


def test_an_error_on_one_rank_reaches_every_rank(tmp_path: Path) -> None:
    ranks = _spawn(tmp_path, "resnet", dict(batch_size=10, masks_per_pass=1, bad_rank=1))
    assert all(isinstance(r, str) for r in ranks), ranks  # nobody hangs, nobody returns a partial result
    assert "entries" in ranks[1] or "edges" in ranks[1]
    assert ranks[0].startswith("RuntimeError") and "rank 1" in ranks[0]


def test_the_readme_launch_line(tmp_path: Path, cifar_dir: Path) -> None:
    """torchrun with two gloo processes writes the same CSV as one process (the shipped CIFAR network)."""
    env = {**os.environ, "SURROGATE_DATA_DIR": str(cifar_dir), "OMP_NUM_THREADS": "1"}
    common = ["cifar_resnet20_seed0", "--masks", "6", "--samples", "40", "--subset", "test"]
    script = str(ROOT / "scripts" / "measure_masks.py")
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    subprocess.run([torchrun, "--nproc_per_node", "2", script, *common, "--out", str(tmp_path / "two.csv")],
                   check=True, env=env, cwd=ROOT, capture_output=True)
    subprocess.run([sys.executable, script, *common, "--out", str(tmp_path / "one.csv")],
                   check=True, env=env, cwd=ROOT, capture_output=True)
    two = (tmp_path / "two.csv").read_text()
    assert two == (tmp_path / "one.csv").read_text() and len(two.splitlines()) == 7
