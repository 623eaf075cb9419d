"""Training: the default configuration trains exactly as before, lr schedules, bf16 autocast, kept weights,
fine-tuning."""
from __future__ import annotations

import copy
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn as nn

from surrogate.data import TeacherTaskConfig, cifar_augment, make_teacher_task
from surrogate.evaluate import Subset, Task
from surrogate.train import (TrainConfig, _batches, _evaluate, finetune, lr_schedule, set_seed, train)

TASK = Task("classification")


@pytest.fixture(scope="module")
def data() -> tuple[Subset, Subset]:
    task = make_teacher_task(TeacherTaskConfig(num_classes=4, n_train=200, n_val=60, n_score=0, n_test=0))
    return Subset("train", *task.train), Subset("val", *task.val)


def _net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def _old_train(model, train_data, val_data, task, config, augment=None):
    """train() as it was before the schedule/autocast/device/keep options (commit c6d8829), verbatim."""
    set_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                              nesterov=True)
    steps = config.epochs * ((len(train_data) + config.batch_size - 1) // config.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, (lambda s: 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps))) if config.schedule == "cosine"
        else (lambda s: 1.0))
    best = (float("inf"), -1, copy.deepcopy(model.state_dict()))
    history = []
    for epoch in range(config.epochs):
        model.train()
        total, count = 0.0, 0
        for b in _batches(len(train_data), config.batch_size, gen):
            x, y = train_data.inputs[b], train_data.targets[b]
            if augment is not None:
                x = augment(x, gen)
            out = model(x)
            if task.kind == "classification" and config.label_smoothing:
                loss = nn.functional.cross_entropy(out, y, label_smoothing=config.label_smoothing)
            else:
                loss = task.per_sample(out, y)[0].mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(b)
            count += len(b)
        val_loss, val_acc = _evaluate(model, val_data, task)
        history.append({"epoch": epoch, "train_loss": total / count, "val_loss": val_loss, "val_acc": val_acc})
        if val_loss < best[0]:
            best = (val_loss, epoch, copy.deepcopy(model.state_dict()))
        elif config.patience is not None and epoch - best[1] >= config.patience:
            break
    model.load_state_dict(best[2])
    model.eval()
    return model, history, best[1]


def _noise(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return x + 0.1 * torch.randn(x.shape, generator=gen)


@pytest.mark.parametrize("config, augment", [
    (TrainConfig(epochs=6, batch_size=32, patience=2), None),
    (TrainConfig(epochs=5, batch_size=48, optimizer="sgd", lr=0.05, schedule="constant", label_smoothing=0.1,
                 patience=None), _noise),
], ids=["adamw_cosine_early_stop", "sgd_constant_smoothing_augment"])
def test_default_options_train_exactly_as_before(data, config, augment) -> None:
    train_data, val_data = data
    new = train(_net(), train_data, val_data, TASK, config, augment=augment)
    model, history, best_epoch = _old_train(_net(), train_data, val_data, TASK, config, augment=augment)
    assert new.history == history and new.best_epoch == best_epoch
    for (k, a), b in zip(new.model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k


# ---------------------------------------------------------------------------------------------------
# schedules

def test_onecycle_warms_up_then_decays_to_zero() -> None:
    config = TrainConfig(epochs=4, schedule="onecycle", warmup_epochs=1.5)
    f = lr_schedule(config, steps_per_epoch=10)
    trace = np.array([f(s) for s in range(40)])
    np.testing.assert_allclose(trace[:15], np.arange(1, 16) / 15)  # linear warmup over 15 steps, to 1
    np.testing.assert_allclose(trace[15:], 1 - np.arange(25) / 25)  # linear decay ...
    assert f(40) == 0.0  # ... to 0 at the end
    cos = lr_schedule(replace(config, decay="cosine"), steps_per_epoch=10)
    down = np.array([cos(s) for s in range(15, 41)])
    assert down[0] == 1.0 and down[-1] == pytest.approx(0.0, abs=1e-12) and (np.diff(down) < 0).all()
    assert cos(20) > f(20)  # cosine stays high longer than linear
    assert lr_schedule(replace(config, warmup_epochs=0), 10)(0) == 1.0
    with pytest.raises(ValueError, match="schedule"):
        lr_schedule(replace(config, schedule="step"), 10)


def test_training_steps_use_the_schedule(data, monkeypatch: pytest.MonkeyPatch) -> None:
    train_data, val_data = data
    seen: list[float] = []
    step = torch.optim.SGD.step

    def recording(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", recording)
    config = TrainConfig(epochs=3, batch_size=50, optimizer="sgd", lr=0.1, schedule="onecycle",
                         warmup_epochs=0.5, decay="cosine", nesterov=False, patience=None)
    train(_net(), train_data, val_data, TASK, config)
    f = lr_schedule(config, steps_per_epoch=4)
    np.testing.assert_allclose(seen, [0.1 * f(s) for s in range(12)])
    assert seen[0] == pytest.approx(0.05) and seen[1] == pytest.approx(0.1) and seen[-1] < 0.01


def test_nesterov_can_be_switched_off(data) -> None:
    train_data, val_data = data
    config = TrainConfig(epochs=2, batch_size=50, optimizer="sgd", lr=0.05, patience=None, keep="last")
    on = train(_net(), train_data, val_data, TASK, config).history
    off = train(_net(), train_data, val_data, TASK, replace(config, nesterov=False)).history
    assert on[0]["train_loss"] != off[0]["train_loss"]


# ---------------------------------------------------------------------------------------------------
# autocast, kept weights, devices

def test_bf16_autocast_trains(data) -> None:
    train_data, val_data = data
    dtypes: list[torch.dtype] = []
    net = _net()
    net[0].register_forward_hook(lambda mod, inp, out: dtypes.append(out.dtype))
    config = TrainConfig(epochs=3, batch_size=50, lr=1e-2, autocast="bf16", patience=None)
    result = train(net, train_data, val_data, TASK, config)
    assert torch.bfloat16 in dtypes and torch.float32 in dtypes  # forward in bf16, validation in float32
    assert all(p.dtype == torch.float32 for p in result.model.parameters())
    losses = [h["train_loss"] for h in result.history]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    with pytest.raises(ValueError, match="autocast"):
        train(_net(), train_data, val_data, TASK, replace(config, autocast="fp8"))


def test_keep_last_returns_the_last_epoch(data) -> None:
    train_data, val_data = data
    config = TrainConfig(epochs=8, batch_size=20, lr=0.05, schedule="constant", patience=None)  # overfits
    best = train(_net(), train_data, val_data, TASK, config)
    last = train(_net(), train_data, val_data, TASK, replace(config, keep="last"))
    assert best.history == last.history and best.best_epoch == last.best_epoch < 7  # same run
    assert _evaluate(last.model, val_data, TASK)[0] == last.history[-1]["val_loss"]
    assert _evaluate(best.model, val_data, TASK)[0] == min(h["val_loss"] for h in best.history)
    with pytest.raises(ValueError, match="keep"):
        train(_net(), train_data, val_data, TASK, replace(config, keep="first"))


def test_train_moves_the_model_to_the_configured_device(data) -> None:
    train_data, val_data = data
    net = _net()
    result = train(net, train_data, val_data, TASK, TrainConfig(epochs=1, device="cpu"))
    assert result.model is net and next(net.parameters()).device.type == "cpu"


# ---------------------------------------------------------------------------------------------------
# fine-tuning

def _old_finetune(model, train_data, task, steps, lr=1e-3, batch_size=128, seed=0):
    """finetune() before the augment/schedule/device options (commit c6d8829), verbatim."""
    set_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    done = 0
    while done < steps:
        for b in _batches(len(train_data), batch_size, gen):
            loss = task.per_sample(model(train_data.inputs[b]), train_data.targets[b])[0].mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            if done >= steps:
                break
    model.eval()
    return model


def test_finetune_defaults_unchanged_and_options(data, monkeypatch: pytest.MonkeyPatch) -> None:
    train_data, _ = data
    new = finetune(_net(), train_data, TASK, steps=11, batch_size=64, seed=3)
    old = _old_finetune(_net(), train_data, TASK, steps=11, batch_size=64, seed=3)
    for a, b in zip(new.state_dict().values(), old.state_dict().values()):
        assert torch.equal(a, b)

    seen, calls = [], []
    step = torch.optim.AdamW.step

    def recording(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        calls.append(len(x))
        return _noise(x, gen)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    finetune(_net(), train_data, TASK, steps=10, lr=0.01, batch_size=64, augment=augment, schedule="cosine",
             device="cpu")
    np.testing.assert_allclose(seen, [0.005 * (1 + np.cos(np.pi * s / 10)) for s in range(10)])
    assert len(calls) == 10


def test_cifar_augment_feeds_training(data) -> None:
    """A float image batch goes through train() with the CIFAR augmentation (seeded by train's generator)."""
    torch.manual_seed(0)
    x, y = torch.randn(40, 3, 8, 8), torch.randint(0, 4, (40,))
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 4))
    config = TrainConfig(epochs=2, batch_size=16, patience=None)
    a = train(copy.deepcopy(net), Subset("t", x, y), Subset("v", x, y), TASK, config, augment=cifar_augment)
    b = train(copy.deepcopy(net), Subset("t", x, y), Subset("v", x, y), TASK, config, augment=cifar_augment)
    assert a.history == b.history  # deterministic under the config's seed


def test_channels_last_training_returns_a_contiguous_model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    x, y = torch.randn(32, 3, 6, 6), torch.randint(0, 2, (32,))
    data = Subset("d", x, y)
    res = train(net, data, data, Task("classification"), TrainConfig(epochs=2, batch_size=8, channels_last=True))
    assert res.model[0].weight.is_contiguous()
    assert len(res.history) == 2 and np.isfinite(res.history[-1]["train_loss"])


def test_cached_result_computes_once_per_key_and_survives_corruption(tmp_path) -> None:
    import warnings
    from surrogate.train import cached_result
    calls = []

    def compute(v):
        calls.append(v)
        return {"value": v, "array": np.arange(3) * v}

    a = cached_result(({"x": 1},), lambda: compute(1), cache_dir=tmp_path, kind="t")
    b = cached_result(({"x": 1},), lambda: compute(99), cache_dir=tmp_path, kind="t")  # served from the cache
    c = cached_result(({"x": 2},), lambda: compute(2), cache_dir=tmp_path, kind="t")
    assert calls == [1, 2] and b["value"] == 1 and np.array_equal(b["array"], a["array"]) and c["value"] == 2
    files = sorted((tmp_path / "t").glob("*.pkl"))
    assert len(files) == 2 and not list((tmp_path / "t").glob(".*tmp*"))
    for f in files:
        f.write_bytes(f.read_bytes()[:5])  # truncated by an interrupted copy
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        d = cached_result(({"x": 1},), lambda: compute(1), cache_dir=tmp_path, kind="t")
    assert d["value"] == 1 and calls == [1, 2, 1] and any("unreadable" in str(x.message) for x in w)


def test_long_epochs_report_progress_without_changing_training(data, monkeypatch: pytest.MonkeyPatch) -> None:
    import surrogate.progress as progress
    train_data, val_data = data
    config = TrainConfig(epochs=2, batch_size=50, patience=None)
    quiet = train(_net(), train_data, val_data, TASK, config)
    lines: list[str] = []
    monkeypatch.setattr(progress, "PROGRESS_SECONDS", -1.0)  # report at every step after the first
    loud = train(_net(), train_data, val_data, TASK, config, log=lines.append)
    steps = [ln for ln in lines if " step " in ln]
    assert len(steps) == 2 * (4 - 1) and steps[0].startswith("epoch   0 step 1/4 train")
    assert all(re.search(r"\(\d+ s so far, ~\d+ s left\)$", ln) for ln in lines)  # no patience: an exact count
    assert quiet.history == loud.history


def test_evaluation_batches_are_capped_by_output_size(data, monkeypatch: pytest.MonkeyPatch) -> None:
    import surrogate.train as train_module
    _, val_data = data
    net = _net().eval()
    sizes: list[int] = []
    net.register_forward_hook(lambda mod, inp, out: sizes.append(len(out)))
    whole = _evaluate(net, val_data, TASK)
    assert sizes[-1] == len(val_data)  # small outputs: one batch (after a one-sample probe)
    monkeypatch.setattr(train_module, "MAX_EVAL_OUTPUT_ELEMENTS", 4 * 7)  # 4 outputs per sample: 7 per batch
    sizes.clear()
    capped = _evaluate(net, val_data, TASK)
    assert max(sizes[1:]) == 7 and sum(sizes[1:]) == len(val_data)
    assert capped[0] == pytest.approx(whole[0], rel=1e-6) and capped[1] == pytest.approx(whole[1])


def test_finetune_with_sgd_trains_and_refuses_unknown_optimizers():
    import pytest
    from surrogate.evaluate import Subset, Task
    from surrogate.train import finetune
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3))
    x = torch.randn(64, 4)
    y = (x[:, 0] > 0).long()
    data, task = Subset("train", x, y), Task("classification")
    before = float(task.per_sample(net(x), y)[0].mean())
    finetune(net, data, task, 30, lr=0.1, batch_size=16, optimizer="sgd", weight_decay=5e-4)
    assert float(task.per_sample(net(x), y)[0].mean()) < before
    with pytest.raises(ValueError, match="optimizer"):
        finetune(net, data, task, 1, optimizer="lion")


def test_config_hash_names_classes_and_refuses_objects() -> None:
    from surrogate.models import Block
    from surrogate.train import config_hash
    assert config_hash({"vertices": (Block,)}) == config_hash({"vertices": (Block,)})
    assert config_hash({"vertices": (Block,)}) != config_hash({"vertices": (nn.Linear,)})
    with pytest.raises(TypeError, match="cache key"):
        config_hash({"model": nn.Linear(2, 2)})
