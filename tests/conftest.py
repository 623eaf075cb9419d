"""Test-wide settings and shared data: one torch thread (an unpinned suite runs several times slower on two
cores); a private cache folder for the whole session, so tests never write into the repository tree and
decoded data is shared by every test module; the offline data folder and what is read from it, once per
session."""
import dataclasses
import os
from pathlib import Path

import pytest
import torch

from surrogate.data import DATA_DIR_ENV, load_cifar10, load_gpt2_tokenizer
from surrogate.methods import METHODS
from surrogate.surrogates import MLPSurrogate, PriorGraphSurrogate

torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory):
    # session-wide, so that session fixtures below (decoded CIFAR-10, tokenized WikiText) cache there too;
    # a test that sets the variable itself gets this value back afterwards
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SURROGATE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
        yield


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The offline data folder: $SURROGATE_DATA_DIR, else ../shared/data next to the repository; the tests
    that read it are skipped without it."""
    folder = Path(os.environ.get(DATA_DIR_ENV) or Path(__file__).resolve().parents[2] / "shared" / "data")
    if not folder.is_dir():
        pytest.skip(f"offline data folder {folder} not found; set {DATA_DIR_ENV} to run these tests")
    return folder


def _needs(data_dir: Path, name: str) -> Path:
    if not (data_dir / name).is_dir():
        pytest.skip(f"{data_dir / name} not found; set {DATA_DIR_ENV} to a folder with it to run these tests")
    return data_dir


@pytest.fixture(scope="session")
def cifar(data_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """CIFAR-10 decoded once per session (uint8 images and labels per split)."""
    return load_cifar10(_needs(data_dir, "cifar10"))


@pytest.fixture(scope="session")
def tokenizer(data_dir: Path):
    return load_gpt2_tokenizer(_needs(data_dir, "gpt2-tokenizer"))


@pytest.fixture(scope="session")
def cifar_dir(data_dir: Path, cifar) -> Path:
    """The offline folder with CIFAR-10, decoded (into the session's cache) before the test runs."""
    return data_dir


@pytest.fixture(scope="session")
def wikitext_dir(data_dir: Path) -> Path:
    """The offline folder with WikiText-2."""
    return _needs(data_dir, "wikitext-2")


@pytest.fixture
def quick_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    """The registry's prior graph surrogate fitted for 100 epochs instead of 3,000 (the published schedule) and
    its FCN for 200 steps instead of 2,000, for tests that check plumbing (every method fits, no measurement
    changes the model), not the fit."""
    for name, build in (("prior_graph", lambda ctx: PriorGraphSurrogate(ctx, epochs=100).fit(ctx.measured)),
                        ("fcn", lambda ctx: MLPSurrogate(ctx, steps=200).fit(ctx.measured))):
        monkeypatch.setitem(METHODS, name, dataclasses.replace(METHODS[name], build=build))
