"""Test-wide settings: one torch thread (an unpinned suite runs several times slower on two cores) and a
private cache folder, so tests never write into the repository tree."""
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SURROGATE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
