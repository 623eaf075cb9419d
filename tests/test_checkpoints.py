"""Shipped checkpoints: cached_model reads them before training, bfloat16 copies load into float32 models, tied
weights are stored once, SURROGATE_RETRAIN ignores them, and the manifest records what was shipped."""
import torch
import torch.nn as nn

from surrogate.checkpoints import CHECKPOINT_ENV, RETRAIN_ENV, load_manifest, sha256_of, ship
from surrogate.train import _cache_path, cached_model


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 3)
        self.head = nn.Linear(3, 7, bias=False)
        self.head.weight = self.emb.weight


def _fit_counter():
    calls = []

    def fit(model):
        calls.append(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        return {"trained": True}
    return fit, calls


def test_shipped_checkpoint_is_used_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv(CHECKPOINT_ENV, str(tmp_path / "ship"))
    monkeypatch.delenv(RETRAIN_ENV, raising=False)
    key = ({"net": "tied"},)
    fit, calls = _fit_counter()
    trained, _ = cached_model(key, Tied, fit, cache_dir=tmp_path / "cache", kind="toy")
    assert len(calls) == 1
    cached = _cache_path(key, tmp_path / "cache", "toy", ".pt")
    dest = ship(cached, "toy_net", {"metrics": {"x": 1.0}}, dtype=torch.bfloat16)
    blob = torch.load(dest, weights_only=True)
    assert blob["state_dict"]["emb.weight"].dtype == torch.bfloat16
    assert blob["state_dict"]["emb.weight"].data_ptr() == blob["state_dict"]["head.weight"].data_ptr()
    entry = load_manifest()["toy_net"]
    assert entry["sha256"] == sha256_of(dest) and entry["metrics"] == {"x": 1.0} and entry["dtype"] == "bfloat16"

    cached.unlink()  # a fresh clone: no cache, only the shipped copy
    loaded, meta = cached_model(key, Tied, fit, cache_dir=tmp_path / "cache", kind="toy")
    assert len(calls) == 1 and meta == {"trained": True}
    assert loaded.emb.weight.dtype == torch.float32
    assert torch.equal(loaded.emb.weight, trained.emb.weight.to(torch.bfloat16).float())
    assert loaded.head.weight is loaded.emb.weight

    monkeypatch.setenv(RETRAIN_ENV, "1")  # make paper RETRAIN=1: train again, ignore the shipped copy
    cached_model(key, Tied, fit, cache_dir=tmp_path / "cache", kind="toy")
    assert len(calls) == 2


def test_zoo_names_and_configs():
    import pytest
    from surrogate import zoo
    assert zoo.parse("cifar_resnet20_seed0") == {"study": "cifar", "seed": 0, "epochs": zoo.CIFAR_EPOCHS}
    assert zoo.parse("cifar_resnet20_seed100_12ep")["epochs"] == 12
    assert zoo.parse("gpt2_12l_seed2") == {"study": "lm", "seed": 2, "layers": 12}
    for bad in ("gpt2_7l_seed0", "resnet_seed0", "cifar_resnet20_seedx"):
        with pytest.raises(ValueError):
            zoo.parse(bad)
    data, training = zoo.configs("gpt2_12l_seed0")
    assert (data.n_layer, data.n_embd, training.epochs) == (12, 160, 1)
    assert zoo.configs("cifar_resnet20_seed100_12ep")[1].epochs == 12
