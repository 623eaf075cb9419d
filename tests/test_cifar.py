"""The CIFAR-10 setup on the offline copy (skipped without it): seeded, disjoint splits; class subsets."""
from __future__ import annotations

import pytest
import torch

from surrogate.cifar import CifarConfig, cifar_splits


def _rows(x: torch.Tensor) -> set[bytes]:
    return {bytes(r) for r in (x.flatten(1)[:, :64] * 1000).to(torch.int32).numpy()}


def test_cifar_splits_are_seeded_and_disjoint(cifar_dir):
    s = cifar_splits(CifarConfig(n_val=1000, n_score=200), cifar_dir)
    assert [len(s[k]) for k in ("train", "val", "scoring", "test")] == [49000, 1000, 200, 10000]
    assert not _rows(s["val"].inputs) & _rows(s["train"].inputs[:5000])
    assert torch.equal(s["scoring"].inputs, s["train"].inputs[:200])  # scoring images come from train
    assert abs(float(s["train"].inputs.mean())) < 0.1  # normalised
    again = cifar_splits(CifarConfig(n_val=1000, n_score=200), cifar_dir)
    assert torch.equal(again["val"].targets, s["val"].targets)
    other = cifar_splits(CifarConfig(n_val=1000, n_score=200, split_seed=1), cifar_dir)
    assert not torch.equal(other["val"].targets, s["val"].targets)


def test_cifar_class_subsets_are_relabelled(cifar_dir):
    s = cifar_splits(CifarConfig(n_val=500, n_score=100, classes=(7, 2)), cifar_dir)
    assert len(s["test"]) == 2000 and set(s["test"].targets.tolist()) == {0, 1}
    with pytest.raises(ValueError, match="do not fit"):
        cifar_splits(CifarConfig(n_val=20000, n_score=100, classes=(7, 2)), cifar_dir)
