"""Regression tests for what new users and unseen models ran into (shapes, batch sizes, which merges are
structural, gate ranges, error messages, n-ary sums)."""
from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
import torch.nn as nn

from surrogate import GatedModel, build_graph, prune
from surrogate.models import CausalLMLogits, gpt2_small_random
from test_graph import GPT2_HEADS, _randomise_bn, _resnet20

warnings.filterwarnings("ignore", message=".*token_id.*")


def _masks(graph, count: int, seed: int = 0) -> list[torch.Tensor]:
    """Single-edge masks (up to ``count``), random masks (connected or not) and the empty mask."""
    gen = torch.Generator().manual_seed(seed)
    step = max(1, graph.num_prunable // count)
    masks = [graph.mask_from_removed([i]) for i in range(0, graph.num_prunable, step)]
    masks += [(torch.rand(graph.num_prunable, generator=gen) < p).float() for p in (0.3, 0.6, 0.9)]
    return masks + [torch.zeros(graph.num_prunable)]


def _assert_pruned_matches_gated(graph, masks, x) -> None:
    gated = GatedModel(graph)
    with torch.no_grad():
        for m in masks:
            removed = f"removed {(m == 0).nonzero().flatten().tolist()}"
            small = prune(graph, m)
            assert small(x).shape == gated(x, mask=m).shape, removed
            assert torch.allclose(small(x), gated(x, mask=m), rtol=1e-5, atol=1e-6), removed


# ---------------------------------------------------------------------------------------------------
# 1. a pruned model runs at input shapes other than the traced ones

@pytest.mark.parametrize("edges", ["merge", "all"])
def test_pruned_resnet_runs_at_another_image_size(edges):
    net, x = _resnet20()                                   # traced at 32x32, batch 2
    graph = build_graph(net, x, edges=edges)
    _assert_pruned_matches_gated(graph, _masks(graph, 12), torch.randn(3, 3, 40, 40))


def test_pruned_squeezenet_runs_at_another_image_size():
    import torchvision
    torch.manual_seed(0)
    net = torchvision.models.squeezenet1_1().eval()
    _randomise_bn(net)
    graph = build_graph(net, torch.randn(2, 3, 64, 64))   # a removed expand branch is concatenated
    _assert_pruned_matches_gated(graph, _masks(graph, 4), torch.randn(1, 3, 80, 72))


@pytest.mark.parametrize("heads", [None, GPT2_HEADS])
def test_pruned_gpt2_runs_at_another_sequence_length(heads):
    net = CausalLMLogits(gpt2_small_random(n_layer=2)).eval()
    graph = build_graph(net, torch.randint(0, 128, (2, 8)), heads=heads)
    masks = _masks(graph, 8)
    if heads:  # every head of layer 1 removed: the projection's output is its bias, of the new length
        masks.append(graph.mask_from_removed([e.name for e in graph.prunable if e.part is not None
                                              and ".h.1." in e.dst]))
    _assert_pruned_matches_gated(graph, masks, torch.randint(0, 128, (3, 12)))


def test_shape_oracle_adds_no_state():
    net, x = _resnet20()
    graph = build_graph(net, x)
    mask = graph.mask_from_removed([0, 1])  # both inputs of the first add: their shape is needed at run time
    small = prune(graph, mask)
    full = prune(graph, torch.ones(graph.num_prunable))
    assert set(small.state_dict()) < set(full.state_dict())
    assert all(p.device.type == "cpu" for p in small.parameters())
    x2 = torch.randn(1, 3, 24, 24)
    for other in (copy.deepcopy(small), pickle.loads(pickle.dumps(small))):
        with torch.no_grad():
            assert torch.equal(other(x2), small(x2))


# ---------------------------------------------------------------------------------------------------
# 2. torch.export keeps the batch dimension dynamic when the example batch is 1

class _ShapeBranch(nn.Module):
    """Python control flow on a shape: torch.fx cannot trace it, torch.export can."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 2:
            return self.a(x) + torch.relu(self.b(x))
        return x


class _LiteralBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.a(x) + self.b(x)).reshape(2, 2, 2).sum(-1)  # the batch size written as a literal


def _check_batches(net: nn.Module, graph, x: torch.Tensor) -> None:
    gated = GatedModel(graph)
    masks = torch.stack([torch.ones(graph.num_prunable), graph.mask_from_removed([0])])
    with torch.no_grad():
        assert torch.allclose(gated(x), net(x), atol=1e-6)
        batched = gated(x[:1], mask=masks)                       # a batch of masks at batch 1
        assert batched.shape[:2] == (2, 1)
        for i, m in enumerate(masks):
            assert torch.allclose(batched[i], gated(x[:1], mask=m), atol=1e-6)
        assert torch.allclose(prune(graph, masks[1])(x), gated(x, mask=masks[1]), atol=1e-6)


def test_export_at_batch_one_keeps_the_batch_dynamic():
    torch.manual_seed(0)
    net = _ShapeBranch().eval()
    graph = build_graph(net, torch.randn(1, 4))
    assert graph.tracer == "export" and graph.example_inputs[0].shape == (1, 4)
    _check_batches(net, graph, torch.randn(3, 4))


def test_exported_gpt2_at_batch_one_keeps_the_batch_dynamic():
    net = CausalLMLogits(gpt2_small_random(n_layer=2)).eval()
    graph = build_graph(net, torch.randint(0, 128, (1, 8)), tracer="export")
    _check_batches(net, graph, torch.randint(0, 128, (3, 8)))


def test_export_that_fixes_the_batch_raises():
    from surrogate import TraceError
    with pytest.raises(TraceError, match="fixed dim 0"):
        build_graph(_LiteralBatch(), torch.randn(2, 4), tracer="export")
