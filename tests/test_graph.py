"""Properties of the computation graph, the gates and physical pruning, on tiny models of many kinds."""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from surrogate import GatedModel, TraceError, build_graph, prune
from surrogate.models import (Block, CausalLMLogits, RandomGraphConfig, RandomGraphNet, gpt2_small_random,
                              resnet20)
from surrogate.profile import count_macs, count_params
from surrogate.pruning import CostModel

warnings.filterwarnings("ignore", message=".*token_id.*")


@dataclass
class Case:
    name: str
    make: Callable[[], tuple[nn.Module, torch.Tensor]]
    build: dict
    expected_edges: Callable[[nn.Module], int]  # what the architecture implies
    # pruned == gated bit for bit; False where pruning removes input columns of a matmul (attention heads):
    # a sum over fewer terms may take another BLAS blocking and round differently in the last bits
    prune_exact: bool = True


def _random_graph():
    torch.manual_seed(0)
    net = RandomGraphNet(RandomGraphConfig(iterations=5, seed=7)).eval()
    return net, torch.randn(4, 16)


def _resnet20():
    torch.manual_seed(0)
    net = resnet20().eval()
    _randomise_bn(net)
    return net, torch.randn(2, 3, 32, 32)


def _randomise_bn(net: nn.Module) -> None:
    # fresh BatchNorm layers are identities in eval mode; random statistics make the test meaningful
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)


def _torchvision(name: str):
    def make():
        import torchvision
        torch.manual_seed(0)
        net = getattr(torchvision.models, name)().eval()
        _randomise_bn(net)
        return net, torch.randn(2, 3, 64, 64)
    return make


def _gpt2():
    return CausalLMLogits(gpt2_small_random(n_layer=2)).eval(), torch.randint(0, 128, (2, 12))


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    return CausalLMLogits(LlamaForCausalLM(cfg).eval()), torch.randint(0, 128, (2, 12))


class _TinyAttention(nn.Module):
    """Pre-norm self-attention with a fused qkv projection and a residual add, traceable by torch.fx."""

    def __init__(self, dim: int = 16, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.norm, self.qkv, self.out = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, dim) -> (B, T, 5)
        b, t, d = x.shape[0], x.shape[1], x.shape[2]
        qkv = self.qkv(self.norm(x)).reshape(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(b, t, d)
        return self.head(x + self.out(a))


def _tiny_attention():
    torch.manual_seed(0)
    return _TinyAttention().eval(), torch.randn(3, 6, 16)


GPT2_HEADS = {r"attn\.c_proj$": 2}            # gpt2_small_random: 2 heads of width 16
LLAMA_HEADS = {r"self_attn\.o_proj$": 4}      # _llama: 4 query heads of width 8


def _mobilenet_edges(net: nn.Module) -> int:
    from torchvision.ops.misc import SqueezeExcitation
    se = sum(isinstance(m, SqueezeExcitation) for m in net.modules())
    res = sum(getattr(m, "use_res_connect", False) for m in net.modules())
    return 2 * se + 2 * res


CASES = [
    # every edge of the random DAG: input edge + 4 per iteration + 2 per end block
    Case("random_graph", _random_graph, dict(vertices=(Block,), edges="all"),
         lambda n: 1 + 4 * n.config.iterations + 2 * len(n.ends)),
    # 9 residual branches + 9 shortcuts
    Case("resnet20", _resnet20, {}, lambda n: 18),
    # 8 basic blocks, each an add of branch and shortcut
    Case("resnet18", _torchvision("resnet18"), {}, lambda n: 16),
    # depthwise convs, squeeze-excitation (product of features and scale) and residual adds
    Case("mobilenet_v3_small", _torchvision("mobilenet_v3_small"), {}, _mobilenet_edges),
    # 8 Fire modules, each a concatenation of two expand branches
    Case("squeezenet1_1", _torchvision("squeezenet1_1"), {}, lambda n: 16),
    # two residual adds per layer (attention and MLP sub-layers), each with skip and branch
    Case("gpt2", _gpt2, {}, lambda n: 4 * 2),
    # grouped-query attention and gated (SwiGLU) MLP: two residual adds and one gated product per layer; the
    # rotary-embedding arithmetic inside attention is not a structural merge
    Case("llama_gqa", _llama, {}, lambda n: (4 + 2) * 2),
    # plus one edge per attention head into each attention output projection (Conv1D)
    Case("gpt2_heads", _gpt2, dict(heads=GPT2_HEADS), lambda n: 4 * 2 + 2 * 2, prune_exact=False),
    # the same with nn.Linear projections (no bias)
    Case("llama_heads", _llama, dict(heads=LLAMA_HEADS), lambda n: (4 + 2) * 2 + 4 * 2,
         prune_exact=False),
    # torch.fx (call_module projection): residual add (2 edges) and 4 heads
    Case("tiny_attention_fx", _tiny_attention, dict(heads={r"^out$": 4}), lambda n: 2 + 4, prune_exact=False),
    # the same exported: the gated input placeholder comes after the exported parameter reads
    Case("tiny_attention_export", _tiny_attention, dict(heads={r"^out$": 4}, tracer="export"), lambda n: 2 + 4,
         prune_exact=False),
]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c.name)
def case(request):
    c: Case = request.param
    net, x = c.make()
    graph = build_graph(net, x, **c.build)
    return c, net, x, graph, GatedModel(graph)


def test_prunable_edge_count(case):
    c, net, x, graph, _ = case
    assert graph.num_prunable == c.expected_edges(net)
    assert len(set(graph.edge_names)) == graph.num_prunable  # names are unique


def test_all_ones_mask_reproduces_model_exactly(case):
    _, net, x, graph, gated = case
    with torch.no_grad():
        ref = net(x)
        assert torch.equal(gated(x), ref)
        assert torch.equal(gated(x, mask=torch.ones(graph.num_prunable)), ref)
        assert torch.equal(gated(x, mask=torch.ones(graph.num_prunable, dtype=torch.bool)), ref)


def test_pruned_model_equals_masked_model(case):
    c, net, x, graph, gated = case
    gen = torch.Generator().manual_seed(0)
    masks = [graph.mask_from_removed([i]) for i in range(graph.num_prunable)]
    masks += [(torch.rand(graph.num_prunable, generator=gen) < 0.5).float() for _ in range(3)]
    masks += [torch.zeros(graph.num_prunable)]
    with torch.no_grad():
        for m in masks:
            small = prune(graph, m)
            removed = f"removed {(m == 0).nonzero().flatten().tolist()}"
            if c.prune_exact:
                assert torch.equal(small(x), gated(x, mask=m)), removed
            else:  # see Case.prune_exact (bit for bit on the machine this was written on)
                torch.testing.assert_close(small(x), gated(x, mask=m), rtol=1e-5, atol=1e-6, msg=removed)
            assert count_params(small) <= count_params(net)


def _sample_masks(graph, seed: int = 0, single: int = 24) -> list[torch.Tensor]:
    """Every single-edge mask (every k-th beyond ``single`` edges), random masks and the empty mask."""
    gen = torch.Generator().manual_seed(seed)
    step = max(1, graph.num_prunable // single)
    masks = [graph.mask_from_removed([i]) for i in range(0, graph.num_prunable, step)]
    masks += [(torch.rand(graph.num_prunable, generator=gen) < p).float() for p in (0.3, 0.5, 0.8)]
    return masks + [torch.zeros(graph.num_prunable)]


def assert_costs_of_pruned(graph, masks: list[torch.Tensor], x) -> None:
    """CostModel's parameters and MACs per example equal those of the pruned module for each mask (``x``: the
    input, or a tuple of inputs whose first gives the batch size)."""
    params, macs = CostModel(graph).cost(torch.stack(masks).numpy())
    batch = len(x[0]) if isinstance(x, tuple) else len(x)
    with torch.no_grad():
        for m, p, c in zip(masks, params, macs):
            small = prune(graph, m)
            removed = f"removed {(m == 0).nonzero().flatten().tolist()}"
            assert (count_params(small), count_macs(small, x) // batch) == (p, c), removed


def test_cost_model_counts_what_pruning_keeps(case):
    """CostModel's parameters and MACs per example are those of the pruned module, for every sampled mask."""
    _, _, x, graph, _ = case
    assert_costs_of_pruned(graph, _sample_masks(graph), x)


def test_masking_changes_output(case):
    _, net, x, graph, gated = case
    with torch.no_grad():
        ref = gated(x)
        changed = [not torch.equal(gated(x, mask=graph.mask_from_removed([i])), ref)
                   for i in range(graph.num_prunable)]
    assert all(changed)


def test_batch_of_masks_matches_one_at_a_time(case):
    _, _, x, graph, gated = case
    gen = torch.Generator().manual_seed(1)
    masks = (torch.rand(4, graph.num_prunable, generator=gen) < 0.6).float()
    with torch.no_grad():
        batched = gated(x, mask=masks)
        for i, m in enumerate(masks):
            # one larger batch may take other CPU kernel paths: equal up to float reordering
            torch.testing.assert_close(batched[i], gated(x, mask=m), rtol=1e-5, atol=1e-6)


def test_gates_are_differentiable(case):
    _, _, x, graph, gated = case
    from torch.nn.attention import SDPBackend, sdpa_kernel
    gates = torch.ones(graph.num_prunable, requires_grad=True)
    with sdpa_kernel(SDPBackend.MATH):
        out = gated(x, mask=gates)
    (grad,) = torch.autograd.grad(out.float().pow(2).mean(), gates)
    assert grad.shape == gates.shape and torch.isfinite(grad).all() and grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------
# hand-written references: removing an edge = the consumer sees zeros instead of that tensor

def _random_graph_reference(net: RandomGraphNet, x: torch.Tensor, removed: set[tuple[str, str]]):
    h = {"input": x}
    for name, parents in net.spec:
        h[name] = net.nodes[name](*[h[p] * (0.0 if (p, name) in removed else 1.0) for p in parents])
    return net.head(*[h[e] * (0.0 if (e, "head") in removed else 1.0) for e in net.ends])


def test_random_graph_edges_match_reference():
    net, x = _random_graph()
    graph = build_graph(net, x, vertices=(Block,), edges="all")
    gated = GatedModel(graph)

    def vertex_to_node(v: str) -> str:
        return {"x": "input", "head": "head"}.get(v, v.removeprefix("nodes."))

    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        m = (torch.rand(graph.num_prunable, generator=gen) < 0.7).float()
        removed = {(vertex_to_node(e.src), vertex_to_node(e.dst)) for e, k in zip(graph.prunable, m) if k == 0}
        with torch.no_grad():
            assert torch.equal(gated(x, mask=m), _random_graph_reference(net, x, removed))


def _resnet20_reference(net, x, drop_branch: set[str], drop_skip: set[str]):
    x = F.relu(net.bn(net.conv(x)))
    for lname in ("layer1", "layer2", "layer3"):
        for i, blk in enumerate(getattr(net, lname)):
            key = f"{lname}.{i}"
            out = blk.bn2(blk.conv2(F.relu(blk.bn1(blk.conv1(x)))))
            out = torch.zeros_like(out) if key in drop_branch else out
            skip = torch.zeros_like(out) if key in drop_skip else blk.shortcut(x)
            x = F.relu(out + skip)
    return net.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_resnet20_edges_match_reference():
    net, x = _resnet20()
    graph = build_graph(net, x)
    gated = GatedModel(graph)
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        m = (torch.rand(graph.num_prunable, generator=gen) < 0.6).float()
        branch = {e.dst.rsplit(".", 1)[0] for e, k in zip(graph.prunable, m) if k == 0 and e.src.endswith("bn2")}
        skip = {e.dst.rsplit(".", 1)[0] for e, k in zip(graph.prunable, m) if k == 0
                and e.src.endswith("shortcut")}
        assert len(branch) + len(skip) == int((m == 0).sum())
        with torch.no_grad():
            assert torch.equal(gated(x, mask=m), _resnet20_reference(net, x, branch, skip))


def test_gpt2_branch_edges_match_hooks():
    net, x = _gpt2()
    graph = build_graph(net, x)
    gated = GatedModel(graph)
    blocks = net.lm.transformer.h
    for i, blk in enumerate(blocks):
        for sub, mod in (("attn", blk.attn.resid_dropout), ("mlp", blk.mlp.dropout)):
            name = next(e.name for e in graph.prunable if e.src.endswith(f"h.{i}.{sub}.{'resid_dropout' if sub == 'attn' else 'dropout'}"))
            handle = mod.register_forward_hook(lambda m, inp, out: torch.zeros_like(out))
            try:
                with torch.no_grad():
                    ref = net(x)
            finally:
                handle.remove()
            with torch.no_grad():
                torch.testing.assert_close(gated(x, mask=graph.mask_from_removed([name])), ref, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# physical pruning removes computation and parameters

def test_pruning_a_resnet_branch_removes_its_parameters():
    net, x = _resnet20()
    graph = build_graph(net, x)
    name = next(e.name for e in graph.prunable if e.src == "layer3.2.bn2")
    small = prune(graph, graph.mask_from_removed([name]))
    blk = net.layer3[2]
    removed = sum(p.numel() for m in (blk.conv1, blk.bn1, blk.conv2, blk.bn2) for p in m.parameters())
    assert count_params(small) == count_params(net) - removed
    full = prune(graph, torch.ones(graph.num_prunable))  # budget 0: the original network
    assert count_params(full) == count_params(net)
    with torch.no_grad():
        assert torch.equal(full(x), net(x))


def test_pruned_model_is_independent_of_original():
    net, x = _resnet20()
    graph = build_graph(net, x)
    small = prune(graph, graph.mask_from_removed([0]))
    with torch.no_grad():
        for p in small.parameters():
            p.add_(1.0)
        assert torch.equal(GatedModel(graph)(x), net(x))


# ---------------------------------------------------------------------------------------------------
# connectivity

def _paths(graph) -> list[list[int]]:
    """Input->output paths as lists of the prunable-edge indices they cross, enumerated (the reference)."""
    gate = {e.name: i for i, e in enumerate(graph.prunable)}
    out_edges: dict[str, list] = {}
    for e in graph.edges:
        out_edges.setdefault(e.src, []).append(e)
    result, stack = [], [(v, []) for v in graph.input_vertices]
    while stack:
        v, crossed = stack.pop()
        if v == graph.output_vertex:
            result.append(crossed)
            continue
        for e in out_edges.get(v, []):
            stack.append((e.dst, crossed + ([gate[e.name]] if e.name in gate else [])))
    return result


def test_connectivity_agrees_with_path_enumeration():
    net, x = _random_graph()
    graph = build_graph(net, x, vertices=(Block,), edges="all")
    paths = _paths(graph)
    gen = torch.Generator().manual_seed(0)
    masks = (torch.rand(200, graph.num_prunable, generator=gen) < 0.5)
    brute = [any(all(m[i] for i in p) for p in paths) for m in masks]
    assert graph.connected(masks).tolist() == brute
    assert graph.connected(torch.ones(graph.num_prunable)) and not graph.connected(torch.zeros(graph.num_prunable))


def test_resnet_stays_connected_without_any_single_edge():
    net, x = _resnet20()
    graph = build_graph(net, x)
    assert all(graph.connected(graph.mask_from_removed([i])) for i in range(graph.num_prunable))
    # removing both edges into one add disconnects it
    assert not graph.connected(graph.mask_from_removed([0, 1]))


# ---------------------------------------------------------------------------------------------------
# attention heads: one prunable edge per head into the output projection

def _head_edge(graph, layer: int, head: int) -> str:
    return next(e.name for e in graph.prunable if e.part == (head, 2) and e.dst.endswith(f"h.{layer}.attn.c_proj"))


def test_gpt2_head_edges_match_hooks():
    """Removing head k of layer l = zeroing the slice [k*d, (k+1)*d) of that layer's c_proj input."""
    net, x = _gpt2()
    graph = build_graph(net, x, heads=GPT2_HEADS)
    gated = GatedModel(graph)
    d = net.lm.config.n_embd // 2
    for removed in ([(0, 0)], [(0, 1)], [(1, 0)], [(1, 1)], [(0, 1), (1, 0)], [(1, 0), (1, 1)]):
        def zero_heads(layer: int):
            def hook(module, args):
                h = args[0].clone()
                for k in (k for l, k in removed if l == layer):
                    h[..., k * d:(k + 1) * d] = 0
                return (h,)
            return hook
        handles = [blk.attn.c_proj.register_forward_pre_hook(zero_heads(i))
                   for i, blk in enumerate(net.lm.transformer.h)]
        try:
            with torch.no_grad():
                ref = net(x)
        finally:
            for h in handles:
                h.remove()
        mask = graph.mask_from_removed([_head_edge(graph, l, k) for l, k in removed])
        with torch.no_grad():  # the traced graph and eager HF code may differ in the last bits
            torch.testing.assert_close(gated(x, mask=mask), ref, rtol=0, atol=1e-6)
            torch.testing.assert_close(prune(graph, mask)(x), ref, rtol=0, atol=1e-6)


def test_head_edges_replace_the_projection_input_edge():
    net, x = _gpt2()
    graph = build_graph(net, x, edges="all", heads=GPT2_HEADS)
    plain = build_graph(net, x, edges="all")
    into = [e for e in graph.edges if e.dst == "lm.transformer.h.0.attn.c_proj"]
    assert [e.part for e in into] == [(0, 2), (1, 2)] and len({(e.src, e.links) for e in into}) == 1
    assert len(graph.edges) == len(plain.edges) + 2 and graph.num_prunable == plain.num_prunable + 2
    assert f"{into[0].src} -> {into[0].dst}" in plain.edge_names
    assert f"{into[0].src} -> {into[0].dst}" not in graph.edge_names  # not gated twice
    # exclude= applies to head edges too: an excluded head stays, ungated
    only0 = build_graph(net, x, heads=GPT2_HEADS, exclude=r"\[head 1\]")
    full = build_graph(net, x, heads=GPT2_HEADS)
    assert only0.num_prunable == 8 + 2 and all(e.part in (None, (0, 2)) for e in only0.prunable)
    with torch.no_grad():
        name = _head_edge(full, 1, 0)
        m, m_full = only0.mask_from_removed([name]), full.mask_from_removed([name])
        assert torch.equal(GatedModel(only0)(x, mask=m), GatedModel(full)(x, mask=m_full))
        assert torch.equal(GatedModel(only0)(x, mask=m[None].repeat(2, 1))[1], GatedModel(full)(x, mask=m_full))
        torch.testing.assert_close(prune(only0, m)(x), GatedModel(full)(x, mask=m_full), rtol=1e-5, atol=1e-6)


def test_head_edges_connectivity():
    net, x = _gpt2()
    graph = build_graph(net, x, heads=GPT2_HEADS)
    skip = "lm.transformer.drop -> lm.transformer.h.0.add_4"
    heads0 = [_head_edge(graph, 0, k) for k in range(2)]
    assert graph.connected(graph.mask_from_removed([skip, heads0[0]]))          # one head still carries it
    assert not graph.connected(graph.mask_from_removed([skip] + heads0))        # all heads gone: path cut
    paths = _paths(graph)
    gen = torch.Generator().manual_seed(0)
    masks = torch.rand(100, graph.num_prunable, generator=gen) < 0.5
    assert graph.connected(masks).tolist() == [any(all(m[i] for i in p) for p in paths) for m in masks]


@pytest.mark.parametrize("removed", [(1,), (0, 2), (0, 1, 2, 3)])
def test_pruning_heads_shrinks_the_projection(removed):
    net, x = _llama()
    graph = build_graph(net, x, heads=LLAMA_HEADS)
    names = [e.name for e in graph.prunable if e.dst.endswith("layers.1.self_attn.o_proj") and e.part[0] in removed]
    mask = graph.mask_from_removed(names)
    small = prune(graph, mask)
    attn = net.lm.model.layers[1].self_attn
    head_dim, out = attn.o_proj.in_features // 4, attn.o_proj.out_features
    proj = small.get_submodule("lm.model.layers.1.self_attn.o_proj")
    assert proj.in_features == (4 - len(removed)) * head_dim
    dropped = len(removed) * head_dim * out
    if len(removed) == 4:  # nothing reads the attention any more: q/k/v and the input norm go too
        feeding = (attn.q_proj, attn.k_proj, attn.v_proj, net.lm.model.layers[1].input_layernorm)
        dropped += sum(p.numel() for m in feeding for p in m.parameters())
    assert count_params(small) == count_params(net) - dropped
    with torch.no_grad():
        torch.testing.assert_close(small(x), GatedModel(graph)(x, mask=mask), rtol=1e-5, atol=1e-6)
        assert torch.equal(prune(graph, torch.ones(graph.num_prunable))(x), net(x))


def test_pruning_gpt2_heads_keeps_conv1d_and_bias():
    net, x = _gpt2()
    c_proj = net.lm.transformer.h[0].attn.c_proj
    with torch.no_grad():
        c_proj.bias.normal_()  # GPT-2 starts with zero biases; the bias must survive head removal
    graph = build_graph(net, x, heads=GPT2_HEADS)
    small = prune(graph, graph.mask_from_removed([_head_edge(graph, 0, 1)]))
    proj = small.get_submodule("lm.transformer.h.0.attn.c_proj")
    assert type(proj) is type(c_proj) and proj.weight.shape == (16, 32)   # Conv1D weight is (in, out)
    assert torch.equal(proj.weight, c_proj.weight[:16]) and torch.equal(proj.bias, c_proj.bias)
    assert count_params(small) == count_params(net) - 16 * 32
    mask = graph.mask_from_removed([_head_edge(graph, 0, 0), _head_edge(graph, 0, 1)])
    small = prune(graph, mask)  # every head gone: the projection outputs its bias
    assert torch.equal(small.get_submodule("lm.transformer.h.0.attn.c_proj").bias, c_proj.bias)
    with torch.no_grad():
        torch.testing.assert_close(small(x), GatedModel(graph)(x, mask=mask), rtol=1e-5, atol=1e-6)


def test_pruning_heads_leaves_the_original_alone():
    net, x = _tiny_attention()  # torch.fx: the traced module shares the model's submodules
    graph = build_graph(net, x, heads={r"^out$": 4})
    assert graph.tracer == "fx"
    small = prune(graph, graph.mask_from_removed([e.name for e in graph.prunable if e.part in ((0, 4), (3, 4))]))
    assert small.get_submodule("out").in_features == 8 and net.out.in_features == 16
    with torch.no_grad():
        assert torch.equal(GatedModel(graph)(x), net(x))


def test_bad_heads_raise():
    net, x = _gpt2()
    with pytest.raises(ValueError, match="matches no module"):
        build_graph(net, x, heads={r"attn\.o_proj$": 2})
    with pytest.raises(ValueError, match="not divisible"):
        build_graph(net, x, heads={r"attn\.c_proj$": 3})
    with pytest.raises(TypeError, match="Linear and transformers.pytorch_utils.Conv1D"):
        build_graph(net, x, heads={r"h\.0\.ln_1$": 2})
    with pytest.raises(ValueError, match="positive int"):
        build_graph(net, x, heads={r"attn\.c_proj$": 0})
    with pytest.raises(ValueError, match="more than one heads pattern"):
        build_graph(net, x, heads={r"attn\.c_proj$": 2, r"h\.0\.attn\.c_proj": 2})


# ---------------------------------------------------------------------------------------------------
# bad input gets a clear error

class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # control flow on a tensor value: neither tracer can capture both branches
            return self.a(x) + x
        return self.b(x) + x


def test_untraceable_model_raises_trace_error(capfd):
    """Control flow on a tensor's value: one short error that says so and what to change (export's partial
    graph dump is not printed)."""
    with pytest.raises(TraceError, match="branches on a tensor's value") as err:
        build_graph(_DataDependent(), torch.randn(3, 4))
    assert "torch.where" in str(err.value) and len(str(err.value).splitlines()) <= 5
    assert "def forward" not in capfd.readouterr().err


class _Cond(_DataDependent):
    def forward(self, x):
        h = self.a(x) + x
        return torch.cond(h.sum() > 0, lambda t: self.b(t) + t, lambda t: t - self.b(t), (h,))


def test_torch_cond_raises_trace_error():
    with pytest.raises(TraceError, match="torch.cond: not supported.*torch.where"):
        build_graph(_Cond(), torch.randn(3, 4))


def test_bad_masks_and_names_raise(case):
    _, _, x, graph, gated = case
    e = graph.num_prunable
    with pytest.raises(ValueError, match=f"{e} prunable edges"):
        gated(x, mask=torch.ones(e + 1))
    with pytest.raises(ValueError, match="NaN"):
        gated(x, mask=torch.full((e,), float("nan")))
    with pytest.raises(TypeError, match="dtype"):
        gated(x, mask=torch.ones(e, dtype=torch.complex64))
    with pytest.raises(ValueError, match="binary"):
        prune(graph, torch.full((e,), 0.5))
    with pytest.raises(KeyError, match="no prunable edge"):
        graph.edge_index("not -> an edge")
    first = graph.edge_names[0]
    assert graph.edges_matching(None).all() and graph.edges_matching(None).shape == (e,)
    assert graph.edges_matching("^" + re.escape(first) + "$").tolist() == [True] + [False] * (e - 1)
    with pytest.raises(ValueError, match="no prunable edge matches"):
        graph.edges_matching("not -> an edge")
    with pytest.raises(ValueError, match="dimensions"):
        gated(x[0])


def test_example_inputs_must_be_tensors():
    with pytest.raises(TypeError, match="tensor"):
        build_graph(nn.Linear(2, 2), [1.0, 2.0])
