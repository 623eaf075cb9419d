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


def test_shape_pass_is_not_counted_as_computation():
    from surrogate.profile import count_macs
    net, x = _resnet20()
    graph = build_graph(net, x)
    small = prune(graph, graph.mask_from_removed([0, 1]))      # constants shaped at run time
    x2 = torch.randn(1, 3, 40, 40)
    first = count_macs(small, x2)                               # the shapes at 40x40 are computed here
    assert first == count_macs(small, x2) > 0


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


# ---------------------------------------------------------------------------------------------------
# 4. only structural merges are prunable by default

def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class _Merges(nn.Module):
    """Every kind of merge: structural ones (residual add, concatenated branches, gated and
    squeeze-excitation products) and arithmetic on one tensor (rotary embedding, x + relu(x))."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.q, self.f, self.b1, self.b2 = (nn.Linear(d, d) for _ in range(4))
        self.gate, self.up, self.se = nn.Linear(2 * d, d), nn.Linear(2 * d, d), nn.Linear(d, d)
        self.register_buffer("cos", torch.rand(d))
        self.register_buffer("sin", torch.rand(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q(x)
        q = q * self.cos + _rotate_half(q) * self.sin      # rotary: one tensor, no layer in between
        q = q + torch.relu(q)                              # parameter-free branch
        h = q + self.f(q)                                  # residual add
        h = torch.cat([self.b1(h), self.b2(h)], -1)        # concatenated branches
        h = torch.nn.functional.silu(self.gate(h)) * self.up(h)   # gated product (SwiGLU)
        return h * torch.sigmoid(self.se(h))               # squeeze-excitation-like scale


def test_only_structural_merges_are_prunable():
    torch.manual_seed(0)
    net = _Merges().eval()
    graph = build_graph(net, torch.randn(3, 8))
    dst = sorted({e.dst for e in graph.prunable})
    assert dst == ["add_2", "cat_1", "mul_2", "mul_3"]
    assert graph.num_prunable == 8
    every = build_graph(net, torch.randn(3, 8), edges=lambda e: e.merge is not None)
    assert every.num_prunable == 8 + 6                     # cat, add of the rotary, q + relu(q)
    assert set(graph.edge_names) < set(every.edge_names)


def test_llama_merges_without_exclude():
    from test_graph import _llama
    net, x = _llama()
    graph = build_graph(net, x)
    assert not [n for n in graph.edge_names if "self_attn." in n.split(" -> ")[1]]
    for layer in range(2):
        into = [e for e in graph.prunable if f"layers.{layer}." in e.dst]
        residual = [e for e in into if e.merge == "add" and e.dst.split(".")[-2] == str(layer)]
        gated = [e for e in into if e.merge == "mul" and ".mlp." in e.dst]
        assert len(into) == 6 and len(residual) == 4 and len(gated) == 2
        assert {e.src.rsplit(".", 1)[-1] for e in gated} == {"act_fn", "up_proj"}


# ---------------------------------------------------------------------------------------------------
# 5. gates outside [0, 1] only on request

def test_gates_outside_unit_interval_need_allow_extrapolation():
    from surrogate import check_mask
    net, x = _resnet20()
    graph = build_graph(net, x)
    gated = GatedModel(graph)
    e = graph.num_prunable
    for bad in (1.5, -0.5):
        mask = torch.ones(e)
        mask[3] = bad
        with pytest.raises(ValueError, match=r"\[0, 1\].*allow_extrapolation=True"):
            gated(x, mask=mask)
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            gated(x, mask=mask[None].repeat(2, 1))
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            check_mask(mask, e)
        assert torch.equal(check_mask(mask, e, allow_extrapolation=True), mask)
        with torch.no_grad():
            out = gated(x, mask=mask, allow_extrapolation=True)
            assert torch.isfinite(out).all() and not torch.equal(out, gated(x))
    with torch.no_grad():
        half = torch.full((e,), 0.5)
        assert gated(x, mask=half).shape == net(x).shape    # inside [0, 1]: accepted
    gates = torch.ones(e, dtype=torch.float64, requires_grad=True)  # as gate_derivatives uses them
    (grad,) = torch.autograd.grad(gated(x, mask=gates).pow(2).mean(), gates)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------
# 6. errors say what is wrong

def test_gated_errors_mention_shapes_only_when_they_differ():
    net = CausalLMLogits(gpt2_small_random(n_layer=2)).eval()   # vocabulary 128, 64 positions
    x = torch.randint(0, 128, (2, 12))
    gated = GatedModel(build_graph(net, x))
    with pytest.raises(TypeError, match="dtype torch.float32.*traced with torch.int64") as err:
        gated(x.float())
    assert "shape" not in str(err.value)
    with pytest.raises(RuntimeError, match="IndexError") as err:
        gated(x + 128)                                               # token ids beyond the vocabulary
    assert "shape" not in str(err.value) and "vocabulary size" in str(err.value)
    with pytest.raises(RuntimeError, match="build the graph again"):
        gated(torch.randint(0, 128, (2, 70)))                        # more positions than the model has


def test_pruned_model_checks_its_inputs():
    net, x = _resnet20()
    graph = build_graph(net, x)
    small = prune(graph, graph.mask_from_removed([0]))
    assert isinstance(small, torch.fx.GraphModule)
    full = prune(graph, torch.ones(graph.num_prunable))
    assert set(full.state_dict()) == set(net.state_dict())        # the check adds no state
    for model in (small, copy.deepcopy(small), pickle.loads(pickle.dumps(small))):
        with pytest.raises(ValueError, match="input 0 of the pruned model has shape \\(3, 32, 32\\).*dimensions"):
            model(x[0])
        with pytest.raises(TypeError, match="dtype torch.int64.*traced with torch.float32"):
            model(x.long())
        with pytest.raises(TypeError, match="positional argument"):
            model(x, x)
        model.train()
        assert model(x).shape == (2, 10)
        model.eval()


# ---------------------------------------------------------------------------------------------------
# 8. a sum of several terms is one merge with one edge per term

class _ThreeTerms(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.a(x) + self.b(x) + torch.relu(self.c(x)))


def test_sum_of_three_terms_is_one_merge():
    torch.manual_seed(0)
    net, x = _ThreeTerms().eval(), torch.randn(3, 4)
    for edges in ("merge", "all"):
        graph = build_graph(net, x, edges=edges)
        into = [e for e in graph.edges if e.dst == "add_1"]
        assert [e.src for e in into] == ["a", "b", "relu"] and all(e.merge == "add" for e in into)
        assert not any(e.dst == "add" for e in graph.edges)      # the partial sum is no vertex of its own
        # "all": x -> a, b, c; c -> relu; the three terms; the sum -> head
        assert graph.num_prunable == (3 if edges == "merge" else 3 + 1 + 3 + 1)
    graph = build_graph(net, x)
    gated = GatedModel(graph)
    terms = [net.a(x), net.b(x), torch.relu(net.c(x))]
    with torch.no_grad():
        assert torch.equal(gated(x), net(x)) and torch.equal(prune(graph, torch.ones(3))(x), net(x))
        for k in range(8):
            m = torch.tensor([(k >> i) & 1 for i in range(3)], dtype=torch.float32)
            ref = net.head(sum(t * g for t, g in zip(terms, m)))
            assert torch.allclose(gated(x, mask=m), ref, atol=1e-6)
            assert torch.equal(prune(graph, m)(x), gated(x, mask=m))


def test_parallel_residual_is_one_merge_per_layer():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        vocab_size=128, max_position_embeddings=64, rotary_pct=0.5)
    net, x = CausalLMLogits(GPTNeoXForCausalLM(cfg).eval()), torch.randint(0, 128, (2, 12))
    graph = build_graph(net, x)                   # x + attn(ln1(x)) + mlp(ln2(x)) in every layer
    assert graph.num_prunable == 3 * 2 and len({e.dst for e in graph.prunable}) == 2
    gated = GatedModel(graph)
    with torch.no_grad():
        assert torch.equal(gated(x), net(x))
        for m in _masks(graph, 6):
            assert torch.equal(prune(graph, m)(x), gated(x, mask=m))


def test_random_graph_edges_are_unchanged():
    """The published synthetic study depends on these names and their order."""
    import hashlib
    import json
    from surrogate.models import Block, RandomGraphConfig, RandomGraphNet
    names = {}
    for iterations in (2, 5, 14):
        for seed in range(3):
            torch.manual_seed(0)
            net = RandomGraphNet(RandomGraphConfig(iterations=iterations, seed=seed))
            graph = build_graph(net, torch.randn(4, 16), vertices=(Block,), edges="all")
            names[f"{iterations}-{seed}"] = [graph.edge_names, [e.name for e in graph.edges]]
    digest = hashlib.sha256(json.dumps(names, sort_keys=True).encode()).hexdigest()
    assert digest == "7f3b7b9724dbab33148b6019d5726205bbebe1100e0d24329a413a965e23a4e8"


class _StepCounter(nn.Module):
    """Two branches into a residual add, and a forward that counts its calls and averages its inputs in
    buffers (in place, as some models track steps or statistics outside BatchNorm)."""

    def __init__(self, inplace: bool):
        super().__init__()
        self.inplace = inplace
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("mean", torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:
            self.steps.add_(1)
            self.mean.mul_(0.9).add_(0.1 * x.mean(0))
        else:
            self.steps += 1
        return self.a(x) + self.b(x)


@pytest.mark.parametrize("tracer", ["fx", "export"])
@pytest.mark.parametrize("inplace", [True, False])
def test_tracing_restores_buffers_and_warns(tracer, inplace):
    net, x = _StepCounter(inplace).eval(), torch.randn(3, 4)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    buffers = dict(net.named_buffers())
    with pytest.warns(UserWarning, match="updates buffer.*steps.*not part of the computation graph"):
        graph = build_graph(net, x, tracer=tracer)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(net.get_buffer(k) is b for k, b in buffers.items())  # the same objects (the graph shares them)
    assert graph.num_prunable == 2


def test_tracing_a_model_without_buffer_updates_does_not_warn():
    net, x = _resnet20()
    net.train()  # tracing measures in eval mode: BatchNorm statistics are not updated, nothing to warn about
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_graph(net, x[:, :, :8, :8])
    assert not [w for w in caught if "updates buffer" in str(w.message)]
