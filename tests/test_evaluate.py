"""evaluate_masks: the prefix-tree strategy equals one pass per mask; default masks per pass; progress."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from surrogate import GatedModel, build_graph
from surrogate.evaluate import MaskEval, Subset, Task, default_masks_per_pass, evaluate_masks
from surrogate.models import (Block, CausalLMLogits, RandomGraphConfig, RandomGraphNet, gpt2_small_random)


class TinyResNet(nn.Module):
    """Stem, three residual blocks (the second downsamples with a 1x1 conv shortcut), pooled classifier."""

    def __init__(self, width: int = 4, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.convs = nn.ModuleList([nn.Conv2d(width, width, 3, padding=1),
                                    nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
                                    nn.Conv2d(2 * width, 2 * width, 3, padding=1)])
        self.bns = nn.ModuleList([nn.BatchNorm2d(c) for c in (width, 2 * width, 2 * width)])
        self.down = nn.Conv2d(width, 2 * width, 1, stride=2)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 8, 8) -> (B, classes)
        h = F.relu(self.stem(x))
        h = F.relu(self.bns[0](self.convs[0](h)) + h)
        h = F.relu(self.bns[1](self.convs[1](h)) + self.down(h))
        h = F.relu(self.bns[2](self.convs[2](h)) + h)
        return self.fc(h.mean((2, 3)))


def _resnet():
    torch.manual_seed(0)
    net = TinyResNet().eval()
    for bn in net.bns:  # non-trivial running statistics, so eval-mode BatchNorm does something
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
    x, y = torch.randn(24, 3, 8, 8), torch.randint(0, 10, (24,))
    gated = GatedModel(build_graph(net, x[:2]))
    return gated, Subset("data", x, y), Task("classification")


def _random_graph():
    torch.manual_seed(0)
    net = RandomGraphNet(RandomGraphConfig(iterations=2, seed=0)).eval()
    x, y = torch.randn(40, 16), torch.randint(0, 8, (40,))
    gated = GatedModel(build_graph(net, x[:4], vertices=(Block,), edges="all"))
    return gated, Subset("data", x, y), Task("classification")


def _gpt2(heads: bool):
    net = CausalLMLogits(gpt2_small_random(n_layer=2)).eval()
    x = torch.randint(0, 128, (6, 12), generator=torch.Generator().manual_seed(0))
    graph = build_graph(net, x[:2], heads={r"attn\.c_proj$": 2} if heads else None)
    return GatedModel(graph), Subset("data", x, x), Task("lm")


def _masks(e: int, count: int | None, seed: int = 0) -> np.ndarray:
    if count is None:
        return np.array(list(itertools.product([0, 1], repeat=e)), dtype=np.float32)
    rng = np.random.default_rng(seed)
    masks = (rng.random((count, e)) < 0.7).astype(np.float32)
    return np.vstack([masks, masks[:3], np.ones((1, e), np.float32)])  # duplicates and the full model


def _assert_equal(a: MaskEval, b: MaskEval) -> None:
    np.testing.assert_array_equal(a.loss, b.loss)
    np.testing.assert_array_equal(a.accuracy, b.accuracy)
    assert torch.equal(a.outputs, b.outputs)


@pytest.mark.parametrize("make, count, batch", [
    (_resnet, None, 10),                    # all 64 masks of 3 residual + 3 shortcut edges
    (_random_graph, 60, 16),                # every edge gated, in fx's node order
    (lambda: _gpt2(False), 30, 4),          # torch.export graph, LM task
    (lambda: _gpt2(True), 30, 4),           # per-head gates: one split decides several entries
], ids=["resnet", "random_graph", "gpt2", "gpt2_heads"])
def test_prefix_strategy_equals_one_mask_per_pass(make, count, batch) -> None:
    gated, data, task = make()
    masks = _masks(gated.num_edges, count)
    one = evaluate_masks(gated, masks, data, task, batch_size=batch, masks_per_pass=1, keep_outputs=True)
    prefix = evaluate_masks(gated, masks, data, task, batch_size=batch, strategy="prefix", keep_outputs=True)
    _assert_equal(prefix, one)  # each mask runs the same operations on the same batch: bit for bit
    stacked = evaluate_masks(gated, masks, data, task, batch_size=batch)
    np.testing.assert_allclose(prefix.loss, stacked.loss, rtol=1e-5, atol=1e-6)
    assert len(np.unique(prefix.loss)) > len(masks) // 3  # the masks really differ


def test_prefix_strategy_shares_the_common_prefix() -> None:
    """Masks that differ only in the last block run the blocks before it once."""
    gated, data, task = _resnet()
    calls: list[str] = []
    for name in ("stem", "convs.0", "convs.2"):
        gated.module.get_submodule(name).register_forward_hook(lambda mod, inp, out, name=name: calls.append(name))
    masks = np.ones((4, gated.num_edges), np.float32)
    last = gated.graph.edge_index(next(n for n in gated.graph.edge_names if n.startswith("bns.2")))
    masks[1::2, last] = 0  # two distinct masks, differing only in the last residual branch
    evaluate_masks(gated, masks, data, task, batch_size=len(data), strategy="prefix")
    assert calls == ["stem", "convs.0", "convs.2"]  # the split comes after the last block's branch


def test_prefix_strategy_rejects_masks_per_pass() -> None:
    gated, data, task = _resnet()
    with pytest.raises(ValueError, match="masks_per_pass"):
        evaluate_masks(gated, np.ones(gated.num_edges), data, task, masks_per_pass=2, strategy="prefix")
    with pytest.raises(ValueError, match="strategy"):
        evaluate_masks(gated, np.ones(gated.num_edges), data, task, strategy="tree")


# ---------------------------------------------------------------------------------------------------
# masks per pass

def _count_masks_per_call(gated: GatedModel) -> list[int]:
    sizes: list[int] = []
    forward = gated.forward

    def recording(*inputs, mask=None):
        sizes.append(0 if mask is None else (1 if torch.as_tensor(mask).dim() == 1 else len(mask)))
        return forward(*inputs, mask=mask)

    gated.forward = recording
    return sizes


def test_small_outputs_keep_the_old_masks_per_pass() -> None:
    gated, data, task = _resnet()
    masks = _masks(gated.num_edges, None)
    for batch in (5, 24, 512):
        old = max(1, min(len(masks), 16384 // max(1, min(batch, len(data)))))
        assert default_masks_per_pass(gated, data, len(masks), batch) == old
    sizes = _count_masks_per_call(gated)
    evaluate_masks(gated, masks, data, task, batch_size=24)
    assert sizes == [0, 64]  # one all-ones pass to measure the output, then every mask in one pass


def test_large_outputs_cap_the_masks_per_pass() -> None:
    gated, data, task = _gpt2(False)
    masks = _masks(gated.num_edges, 9)
    per_mask = 3 * 12 * 128  # batch x tokens x vocabulary of one mask on one batch
    assert default_masks_per_pass(gated, data, len(masks), 3) == len(masks)  # the 2^27 cap does not bind
    assert default_masks_per_pass(gated, data, len(masks), 3, max_pass_elements=4 * per_mask) == 4
    assert default_masks_per_pass(gated, data, len(masks), 3, max_pass_elements=per_mask // 2) == 1
    sizes = _count_masks_per_call(gated)
    capped = evaluate_masks(gated, masks, data, task, batch_size=3, max_pass_elements=4 * per_mask)
    chunks = [min(4, len(masks) - c) for c in range(0, len(masks), 4)]  # 4, 4, 4, 1
    assert sizes == [0] + [c for c in chunks for _ in range(2)]  # two batches per chunk
    free = evaluate_masks(gated, masks, data, task, batch_size=3)
    np.testing.assert_allclose(capped.loss, free.loss, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# progress

@pytest.mark.parametrize("strategy", ["stack", "prefix"])
def test_progress_counts_masks(strategy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import tqdm.auto

    bars = []

    class Recording(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": True})
            self.kwargs, self.counts = kwargs, []
            bars.append(self)

        def update(self, n=1):
            self.counts.append(n)
            self.n += n

    monkeypatch.setattr(tqdm.auto, "tqdm", Recording)
    gated, data, task = _resnet()
    masks = _masks(gated.num_edges, None)
    evaluate_masks(gated, masks, data, task, batch_size=10, masks_per_pass=None if strategy == "prefix" else 5,
                   progress=True, strategy=strategy)
    (bar,) = bars
    assert bar.kwargs["unit"] == "mask" and bar.kwargs["total"] == len(masks)
    assert bar.n == len(masks) and all(isinstance(c, int) and c >= 0 for c in bar.counts)
