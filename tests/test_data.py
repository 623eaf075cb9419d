"""Tests for surrogate.data: the teacher task, data-folder resolution, CIFAR-10, WikiText-2 and GPT-2.

The offline-data tests read $SURROGATE_DATA_DIR, else ../shared/data next to the repo, and are skipped if
neither exists (tests/conftest.py: ``data_dir``). The decoded CIFAR-10 cache lives in the session's private
cache folder (conftest sets $SURROGATE_CACHE_DIR for the session), so each test session decodes it once.
"""
from __future__ import annotations

import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from surrogate import data as D
from surrogate.data import (DATA_DIR_ENV, TeacherTaskConfig, load_cifar10, load_gpt2_tokenizer,
                            load_wikitext2, make_teacher_task, normalize_cifar, resolve_data_dir, subset,
                            teacher_logits)

SMALL = TeacherTaskConfig(n_train=300, n_val=100, n_score=100, n_test=500, seed=3)


# ---- teacher task ---------------------------------------------------------------------------------------

def _splits(task: D.TeacherTask) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [task.train, task.val, task.score, task.test]


def test_teacher_task_is_deterministic_under_seed() -> None:
    a, b = make_teacher_task(SMALL), make_teacher_task(SMALL)
    for (xa, ya), (xb, yb) in zip(_splits(a), _splits(b)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other = replace(SMALL, seed=4)
    c = make_teacher_task(other)
    assert not torch.equal(a.train[0], c.train[0]) and not torch.equal(a.train[1], c.train[1])
    assert not torch.equal(teacher_logits(SMALL, a.test[0]), teacher_logits(other, a.test[0]))


def test_teacher_split_size_does_not_change_other_splits() -> None:
    bigger = make_teacher_task(replace(SMALL, n_train=600))
    small = make_teacher_task(SMALL)
    assert torch.equal(bigger.test[0], small.test[0]) and torch.equal(bigger.test[1], small.test[1])


def test_teacher_splits_have_sizes_dtypes_and_are_disjoint() -> None:
    task = make_teacher_task(SMALL)
    sizes = (SMALL.n_train, SMALL.n_val, SMALL.n_score, SMALL.n_test)
    for (x, y), n in zip(_splits(task), sizes):
        assert x.shape == (n, SMALL.in_features) and x.dtype == torch.float32
        assert y.shape == (n,) and y.dtype == torch.int64
        assert int(y.min()) >= 0 and int(y.max()) < SMALL.num_classes
    rows = torch.cat([x for x, _ in _splits(task)])
    assert torch.unique(rows, dim=0).shape[0] == rows.shape[0]


def test_teacher_labels_are_noisy_but_informative() -> None:
    config = TeacherTaskConfig()
    task = make_teacher_task(config)
    counts = torch.bincount(task.train[1], minlength=config.num_classes)
    assert (counts > 0).all() and counts.max() < 0.5 * config.n_train
    x, y = task.test
    bayes = (teacher_logits(config, x).argmax(-1) == y).float().mean().item()
    assert 0.6 < bayes < 0.85  # non-zero Bayes error, far above chance (1/8)


def test_teacher_rejects_bad_temperature() -> None:
    with pytest.raises(ValueError, match="temperature"):
        make_teacher_task(TeacherTaskConfig(temperature=0.0))


# ---- data folder ----------------------------------------------------------------------------------------

def test_resolve_data_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit, env = tmp_path / "explicit", tmp_path / "env"
    explicit.mkdir()
    env.mkdir()
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    assert resolve_data_dir(None) is None
    monkeypatch.setenv(DATA_DIR_ENV, "")
    assert resolve_data_dir(None) is None
    monkeypatch.setenv(DATA_DIR_ENV, str(env))
    assert resolve_data_dir(None) == env.resolve()
    assert resolve_data_dir(explicit) == explicit.resolve()


def test_resolve_data_dir_missing_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope.*data_dir argument"):
        resolve_data_dir(missing)
    monkeypatch.setenv(DATA_DIR_ENV, str(missing))
    with pytest.raises(FileNotFoundError, match=DATA_DIR_ENV):
        resolve_data_dir(None)


def test_missing_offline_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="cifar10_jpeg.npz"):
        load_cifar10(tmp_path, cache_dir=tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="wiki.valid.raw"):
        load_wikitext2("valid", tmp_path)


def test_online_cifar_failure_explains_the_offline_folder(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(RuntimeError, match=f"{DATA_DIR_ENV}.*cifar10/cifar10_jpeg.npz"):
        load_cifar10(None, cache_dir=tmp_path)


# ---- cache root -----------------------------------------------------------------------------------------

def test_cache_root_follows_the_environment_at_call_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from surrogate.paths import cache_root
    from surrogate.train import default_cache_dir

    for name in ("one", "two"):  # changed after import: nothing is frozen at import time
        monkeypatch.setenv("SURROGATE_CACHE_DIR", str(tmp_path / name))
        assert cache_root() == tmp_path / name
        assert default_cache_dir() == tmp_path / name
        assert D.data_cache_dir() == tmp_path / name / "data"


def test_cache_root_resolves_from_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from surrogate.paths import cache_root, project_dir

    monkeypatch.delenv("SURROGATE_CACHE_DIR", raising=False)
    project, plain = tmp_path / "project", tmp_path / "plain"
    (project / "notebooks" / "deep").mkdir(parents=True)
    (project / "pyproject.toml").write_text("")
    plain.mkdir()
    monkeypatch.chdir(project / "notebooks" / "deep")
    assert project_dir() == project.resolve()
    assert cache_root() == project.resolve() / "cache"
    assert D.data_cache_dir() == project.resolve() / "cache" / "data"
    monkeypatch.setenv("SURROGATE_CACHE_DIR", "")  # empty counts as unset
    assert cache_root() == project.resolve() / "cache"
    (plain / ".git").mkdir()
    monkeypatch.chdir(plain)
    assert project_dir() == plain.resolve()


def test_cifar_loader_caches_under_the_cache_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "data" / "cifar10"
    src.mkdir(parents=True)
    monkeypatch.setenv("SURROGATE_CACHE_DIR", str(tmp_path / "cache"))
    fake = {"train_x": np.zeros((2, 3, 32, 32), np.uint8), "train_y": np.zeros(2, np.int64),
            "test_x": np.zeros((1, 3, 32, 32), np.uint8), "test_y": np.zeros(1, np.int64)}
    (src / "cifar10_jpeg.npz").write_bytes(b"not decoded: _decode_cifar_npz is replaced")
    monkeypatch.setattr(D, "_decode_cifar_npz", lambda path: fake)
    out = load_cifar10(tmp_path / "data")
    assert out["train"][0].shape == (2, 3, 32, 32)
    assert len(list((tmp_path / "cache" / "data").glob("cifar10_jpeg_*.npz"))) == 1


# ---- cache helper ---------------------------------------------------------------------------------------

def test_cache_is_built_once_and_rebuilt_when_corrupt(tmp_path: Path) -> None:
    path, keys, calls = tmp_path / "sub" / "payload.npz", ("a", "b"), []

    def build() -> dict[str, np.ndarray]:
        calls.append(1)
        return {"a": np.arange(1000, dtype=np.int64), "b": np.ones((4, 3), dtype=np.uint8)}

    first = D._cached_arrays(path, build, keys)
    second = D._cached_arrays(path, build, keys)
    assert len(calls) == 1 and all(np.array_equal(first[k], second[k]) for k in keys)
    assert [p.name for p in path.parent.iterdir()] == ["payload.npz"]  # no temp file left behind

    path.write_bytes(path.read_bytes()[:-200])  # truncated, as after a crash mid-copy
    with pytest.warns(RuntimeWarning, match="rebuilding"):
        third = D._cached_arrays(path, build, keys)
    assert len(calls) == 2 and np.array_equal(third["a"], first["a"])
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None

    np.savez(path, other=np.zeros(1))  # readable but stale layout
    with pytest.warns(RuntimeWarning, match="expected"):
        D._cached_arrays(path, build, keys)
    assert len(calls) == 3


# ---- CIFAR-10 -------------------------------------------------------------------------------------------

def test_cifar_shapes_counts_and_means(cifar: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    for name, n in (("train", 50_000), ("test", 10_000)):
        x, y = cifar[name]
        assert x.shape == (n, 3, 32, 32) and x.dtype == torch.uint8
        assert y.shape == (n,) and y.dtype == torch.int64
        assert torch.bincount(y, minlength=10).tolist() == [n // 10] * 10
    mean = cifar["train"][0].float().mean(dim=(0, 2, 3)) / 255
    assert torch.allclose(mean, torch.tensor([0.4913, 0.4821, 0.4465]), atol=0.002)


def test_cifar_cache_is_reused(data_dir: Path, cifar, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_decode(path: Path):
        raise AssertionError("the cached decode should have been used")

    monkeypatch.setattr(D, "_decode_cifar_npz", no_decode)
    again = load_cifar10(data_dir)
    assert torch.equal(again["test"][0], cifar["test"][0])
    assert list(D.data_cache_dir().glob("cifar10_jpeg_*.npz"))


def test_normalize_cifar_standardizes(cifar) -> None:
    x = normalize_cifar(subset(*cifar["train"], 5000, seed=0)[0])  # a prefix would be all airplanes
    assert x.dtype == torch.float32 and x.shape == (5000, 3, 32, 32)
    assert x.mean(dim=(0, 2, 3)).abs().max() < 0.05
    assert (x.std(dim=(0, 2, 3)) - 1).abs().max() < 0.05


def test_cifar_augment_crops_padded_images_and_flips_half() -> None:
    x = torch.randn(64, 3, 6, 6)
    out = D.cifar_augment(x, torch.Generator().manual_seed(0), padding=2)
    again = D.cifar_augment(x, torch.Generator().manual_seed(0), padding=2)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.equal(out, again)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    flips = 0
    for i in range(len(x)):  # each image is one of the 5 x 5 crops of its padded copy, maybe mirrored
        crops = [(padded[i, :, dy:dy + 6, dx:dx + 6], f) for dy in range(5) for dx in range(5) for f in (0, 1)]
        match = [f for c, f in crops if torch.equal(out[i], c.flip(2) if f else c)]
        assert match, f"image {i} is no crop of its padded copy"
        flips += match[0]
    assert 16 < flips < 48
    with pytest.raises(ValueError, match="float batch"):
        D.cifar_augment(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.Generator())


def test_subset_is_seeded_nested_and_shuffled(cifar) -> None:
    x, y = cifar["train"]
    xa, ya = subset(x, y, 200, seed=0)
    xb, yb = subset(x, y, 100, seed=0)
    assert torch.equal(xa[:100], xb) and torch.equal(ya[:100], yb)
    assert not torch.equal(subset(x, y, 100, seed=1)[1], yb)
    assert len(torch.unique(ya)) == 10  # the file is sorted by class; a prefix would be one class
    with pytest.raises(ValueError):
        subset(x, y, len(y) + 1, seed=0)


# ---- WikiText-2 and GPT-2 -------------------------------------------------------------------------------

def test_tokenizer_matches_gpt2(tokenizer) -> None:
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    assert len(tokenizer) == 50257


def test_wrong_tokenizer_files_are_rejected(tmp_path: Path) -> None:
    folder = tmp_path / "gpt2-tokenizer"
    folder.mkdir()
    (folder / "vocab.json").write_text('{"a": 0, "b": 1}')
    (folder / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(RuntimeError, match="not GPT-2's"):
        load_gpt2_tokenizer(tmp_path)


def test_wikitext_test_split_token_count(data_dir: Path, tokenizer) -> None:
    text = load_wikitext2("test", data_dir)
    assert text.startswith("\n\n = Robert Boulter = \n")  # first row is blank, as in the HF dataset
    assert len(tokenizer(text, verbose=False)["input_ids"]) == 287_644


def test_wikitext_split_names(data_dir: Path) -> None:
    assert load_wikitext2("valid", data_dir) == load_wikitext2("validation", data_dir)
    with pytest.raises(ValueError, match="split"):
        load_wikitext2("dev", data_dir)

