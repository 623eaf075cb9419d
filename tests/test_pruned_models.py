"""Pruned models of kinds the core tests (test_graph.CASES) do not hold: a mixture of experts (data-dependent
routing, traced with torch.export), an encoder-decoder (two inputs of independent lengths) and a U-Net whose
decoder reads a skip's shape. Every pruned model runs at other batch sizes and lengths and computes what the
gated model computes there, and its parameters and MACs are what the cost model says."""
from __future__ import annotations

import functools
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from surrogate import GatedModel, build_graph, prune
from test_graph import _sample_masks, assert_costs_of_pruned

warnings.filterwarnings("ignore", message=".*token_id.*")


def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM
    from surrogate.models import CausalLMLogits
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=64)
    net = CausalLMLogits(MixtralForCausalLM(cfg)).eval()
    other = [(torch.randint(0, 50, s),) for s in [(3, 8), (2, 5), (1, 11)]]
    return net, (torch.randint(0, 50, (2, 8)),), other


class _Seq2SeqLogits(nn.Module):
    """(encoder ids, decoder ids) -> logits of a transformers encoder-decoder."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, decoder_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, decoder_input_ids=decoder_ids, use_cache=False).logits


def _bart():
    from transformers import BartConfig, BartForConditionalGeneration
    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=40, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64)
    net = _Seq2SeqLogits(BartForConditionalGeneration(cfg)).eval()

    def ids(b: int, t: int, u: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randint(0, 40, (b, t)), torch.randint(0, 40, (b, u))

    return net, ids(2, 7, 5), [ids(3, 7, 5), ids(2, 9, 6), ids(1, 4, 3)]


class _TinyUNet(nn.Module):
    """An encoder level, a lateral 1x1 skip and a decoder that upsamples to the skip's size (U-Net, FPN)."""

    def __init__(self):
        super().__init__()
        self.enc1, self.enc2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 8, 3, padding=1, stride=2)
        self.lateral, self.head = nn.Conv2d(4, 8, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.enc1(x))
        b = F.relu(self.enc2(a))
        skip = self.lateral(a)
        return self.head(F.interpolate(b, size=skip.shape[-2:]) + skip)


def _unet():
    torch.manual_seed(0)
    return _TinyUNet().eval(), (torch.randn(2, 3, 8, 8),), [(torch.randn(b, 3, s, s),) for b, s in [(3, 8), (1, 10)]]


MODELS = {"mixtral": _mixtral, "bart": _bart, "unet": _unet}


@functools.lru_cache(maxsize=None)
def _built(name: str):
    net, x, other = MODELS[name]()
    return net, x, other, build_graph(net, x)  # torch.export takes ~30 s per transformer: once per session


@pytest.fixture(params=list(MODELS))
def model(request):
    return _built(request.param)


def _masks(graph) -> list[torch.Tensor]:
    """Sampled masks, plus for every merge the mask that removes all of its gated inputs."""
    into: dict[str, list[int]] = {}
    for i, e in enumerate(graph.prunable):
        into.setdefault(e.dst, []).append(i)
    return _sample_masks(graph) + [graph.mask_from_removed(ins) for ins in into.values() if len(ins) > 1]


def test_pruned_model_runs_at_other_shapes(model):
    _, _, other, graph = model
    gated = GatedModel(graph)
    with torch.no_grad():
        for m in _masks(graph):
            small = prune(graph, m)
            for x in other:
                removed = f"removed {(m == 0).nonzero().flatten().tolist()} at {[tuple(t.shape) for t in x]}"
                torch.testing.assert_close(small(*x), gated(*x, mask=m), rtol=1e-5, atol=1e-6, msg=removed)


def test_cost_model_counts_what_pruning_keeps(model):
    """Parameters and MACs of every pruned module are the cost model's; a skip read only for its shape
    (the U-Net's) is not computed once its edge is removed."""
    _, x, _, graph = model
    assert_costs_of_pruned(graph, _masks(graph), x)


def test_removed_experts_take_their_router_along():
    """Cutting a mixture-of-experts block's output removes its routing (softmax, top-k, sort, the in-place
    normalisation and scatter into temporaries), not only the experts."""
    graph = _built("mixtral")[3]
    blocks = [i for i, e in enumerate(graph.prunable) if ".mlp." in e.src and ".mlp." not in e.dst]
    assert len(blocks) == 2  # the block's output into the residual add, one per layer
    ops = lambda module: sum(n.op == "call_function" and "topk" in str(n.target) for n in module.graph.nodes)
    assert ops(prune(graph, torch.ones(graph.num_prunable))) == 2
    assert ops(prune(graph, graph.mask_from_removed(blocks[:1]))) == 1
    assert ops(prune(graph, graph.mask_from_removed(blocks))) == 0
