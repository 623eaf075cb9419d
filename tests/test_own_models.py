"""Models a user brings: several inputs, tuple and Hugging Face outputs, a mixture of experts, a model left in
training mode; and data a task cannot score, rejected before any work with what to change."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from surrogate import Budget, ExperimentConfig, GatedModel, MaskFamily, auto_prune, build_graph, run_experiment
from surrogate.evaluate import evaluate_masks
from surrogate.scenarios import method_picks
from surrogate.tasks import Subset, Task


def _masks(e: int, n: int = 6, seed: int = 0) -> torch.Tensor:
    m = (torch.rand(n, e, generator=torch.Generator().manual_seed(seed)) < 0.6).float()
    m[0] = 1
    return m


def _same_as_one_per_pass(gated, masks, data, task) -> None:
    stacked = evaluate_masks(gated, masks, data, task)
    alone = evaluate_masks(gated, masks, data, task, masks_per_pass=1)
    np.testing.assert_allclose(stacked.loss, alone.loss, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# several inputs: token ids and an attention mask

class MaskedPooling(nn.Module):
    """Token ids (B, T) and an attention mask (B, T) -> class logits: a residual block, masked mean pooling."""

    def __init__(self, vocab: int = 20, width: int = 8, classes: int = 3):
        super().__init__()
        self.emb, self.fc, self.head = nn.Embedding(vocab, width), nn.Linear(width, width), nn.Linear(width, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.emb(input_ids)
        h = h + torch.relu(self.fc(h))
        w = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * w).sum(1) / w.sum(1))


def _two_inputs(n: int = 12):
    torch.manual_seed(0)
    net = MaskedPooling().eval()
    ids = torch.randint(0, 20, (n, 6))
    am = torch.ones(n, 6, dtype=torch.long)
    am[::2, 4:] = 0  # padding: the mask changes the outputs
    return net, ids, am, torch.randint(0, 3, (n,))


def test_a_subset_carries_several_inputs_as_a_tuple_or_a_dict():
    net, ids, am, y = _two_inputs()
    gated = GatedModel(build_graph(net, (ids[:2], am[:2])))
    task, masks = Task("classification"), _masks(gated.num_edges)
    as_tuple = Subset("s", (ids, am), y)
    as_dict = Subset("s", {"attention_mask": am, "input_ids": ids}, y)   # any order: matched by name
    assert len(as_tuple) == 12 and as_tuple[2:5].args()[1].shape == (3, 6)
    a = evaluate_masks(gated, masks, as_tuple, task)
    b = evaluate_masks(gated, masks, as_dict, task)
    np.testing.assert_array_equal(a.loss, b.loss)
    with torch.no_grad():
        assert a.loss[0] == pytest.approx(float(F.cross_entropy(net(ids, am), y)), rel=1e-6)
        assert a.loss[0] != pytest.approx(float(F.cross_entropy(net(ids, torch.ones_like(am)), y)), rel=1e-3)
    _same_as_one_per_pass(gated, masks, as_tuple, task)
    prefix = evaluate_masks(gated, masks, as_tuple, task, strategy="prefix")
    np.testing.assert_allclose(prefix.loss, a.loss, rtol=1e-6)


def test_errors_name_what_to_pass_when_the_inputs_do_not_fit():
    net, ids, am, y = _two_inputs()
    gated = GatedModel(build_graph(net, (ids[:2], am[:2])))
    with pytest.raises(ValueError, match=r"12 samples of inputs but targets of shape \(2,\).*one tuple or dict"):
        Subset("s", ids, y[:2])
    with pytest.raises(ValueError, match=r"one row per sample.*inputs\[1\]: \(5, 6\)"):
        Subset("s", (ids, am[:5]), y)
    with pytest.raises(TypeError, match=r"takes 2 input tensor\(s\) \(input_ids, attention_mask\).*tuple or dict"):
        evaluate_masks(gated, torch.ones(gated.num_edges), Subset("s", ids, y), Task("classification"))
    with pytest.raises(ValueError, match=r"takes \(input_ids, attention_mask\).*missing \['input_ids'\].*"
                                         r"not a parameter: \['ids'\]"):
        evaluate_masks(gated, torch.ones(gated.num_edges), Subset("s", {"ids": ids, "attention_mask": am}, y),
                       Task("classification"))
    with pytest.raises(TypeError, match="inputs\\['input_ids'\\] is a list.*return_tensors='pt'"):
        Subset("s", {"input_ids": ids.tolist()}, y)


def test_several_inputs_go_everywhere_a_subset_goes():
    net, ids, am, y = _two_inputs(16)
    scoring, evaluation, task = Subset("scoring", (ids[:8], am[:8]), y[:8]), Subset("ev", (ids, am), y), Task()
    res = auto_prune(net, scoring, task, method="superposition")  # at most 80% of the parameters kept
    assert res.params[1] <= 0.8 * res.params[0]
    x = (ids, am)
    torch.testing.assert_close(res.model(*x), GatedModel(build_graph(net, (ids[:2], am[:2])))(*x, mask=res.mask))
    for method in ("taylor2", "magnitude", "flow", "block_influence", "taylor_plus", "superposition_state"):
        picks = method_picks(net, scoring, task, [method], [1])
        assert picks[(method, 1)].shape == (res.mask.shape[0],)
    config = ExperimentConfig(methods=("loo", "taylor1", "superposition"), budgets=(1,), budget_unit="edges",
                              families=(MaskFamily("all", "exhaustive", connected=False, holdout=False),))
    result = run_experiment(net, scoring, evaluation, task, config)
    assert {r["method"] for r in result.protocols} == {"loo", "taylor1", "superposition"}
    tuned = auto_prune(net, scoring, task, method="loo", finetune_steps=2, train_data=evaluation)
    assert tuned.model(*x).shape == (16, 3)


# ---------------------------------------------------------------------------------------------------
# outputs: a tuple (auxiliary head), Hugging Face models

class WithAux(nn.Module):
    """Returns (logits, auxiliary logits)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head, self.aux = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.a(x))
        h = h + torch.relu(self.b(h))
        return self.head(h), self.aux(h)


def test_the_task_scores_the_first_output_of_a_tuple_or_the_one_it_names():
    torch.manual_seed(0)
    net, x = WithAux().eval(), torch.randn(10, 4)
    y3, y2 = torch.randint(0, 3, (10,)), torch.randint(0, 2, (10,))
    gated = GatedModel(build_graph(net, x[:2]))
    masks = _masks(gated.num_edges)
    first = evaluate_masks(gated, masks, Subset("s", x, y3), Task("classification"), keep_outputs=True)
    assert first.loss[0] == pytest.approx(float(F.cross_entropy(net(x)[0], y3)), rel=1e-6)
    assert first.outputs.shape == (len(masks), 10, 3)
    aux = evaluate_masks(gated, masks, Subset("s", x, y2), Task("classification", output=1))
    assert aux.loss[0] == pytest.approx(float(F.cross_entropy(net(x)[1], y2)), rel=1e-6)
    _same_as_one_per_pass(gated, masks, Subset("s", x, y3), Task("classification"))
    assert auto_prune(net, Subset("s", x, y3), Task()).removed
    with pytest.raises(ValueError, match=r"Task\(output=2\): the model returns 2 outputs"):
        evaluate_masks(gated, masks, Subset("s", x, y3), Task("classification", output=2))
    with pytest.raises(ValueError, match="keys \\['a', 'b'\\] and no 'logits'.*output='a'"):
        Task().scored({"a": x, "b": x})
    with pytest.raises(TypeError, match="an int .*a str"):
        Task("classification", output=1.5)


@pytest.fixture(scope="module")
def bert():
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=16, num_labels=3)
    model = BertForSequenceClassification(cfg).eval()
    ids = torch.randint(1, 30, (8, 6))
    am = torch.ones(8, 6, dtype=torch.long)
    am[::2, 4:] = 0
    return model, build_graph(model, (ids[:2], am[:2])), ids, am, torch.randint(0, 3, (8,))


def test_a_hugging_face_classifier_is_scored_on_its_logits(bert):
    model, graph, ids, am, y = bert
    gated = GatedModel(graph)
    data = Subset("scoring", {"input_ids": ids, "attention_mask": am}, y)
    masks = _masks(gated.num_edges, 4)
    result = evaluate_masks(gated, masks, data, Task("classification"))
    with torch.no_grad():
        assert result.loss[0] == pytest.approx(float(F.cross_entropy(model(ids, am).logits, y)), rel=1e-5)
    _same_as_one_per_pass(gated, masks, data, Task("classification"))
    res = auto_prune(model, data, Task("classification"), method="loo")
    with torch.no_grad():
        out = res.model(ids, am)
    torch.testing.assert_close(out.logits, gated(ids, am, mask=res.mask).logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_an_encoder_decoder_takes_encoder_and_decoder_ids(kind: str):
    from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration
    torch.manual_seed(0)
    if kind == "t5":
        model = T5ForConditionalGeneration(T5Config(vocab_size=24, d_model=8, d_kv=4, d_ff=16, num_layers=1,
                                                    num_decoder_layers=1, num_heads=2, use_cache=False))
    else:
        model = BartForConditionalGeneration(BartConfig(vocab_size=24, d_model=8, encoder_layers=1, decoder_layers=1,
                                                        encoder_attention_heads=2, decoder_attention_heads=2,
                                                        encoder_ffn_dim=16, decoder_ffn_dim=16,
                                                        max_position_embeddings=16, use_cache=False))
    model.eval()
    ids, dec = torch.randint(2, 24, (6, 5)), torch.randint(2, 24, (6, 4))
    am = torch.ones_like(ids)
    gated = GatedModel(build_graph(model, (ids[:2], am[:2], dec[:2])))
    data = Subset("s", {"input_ids": ids, "attention_mask": am, "decoder_input_ids": dec}, dec)
    masks = _masks(gated.num_edges, 4)
    result = evaluate_masks(gated, masks, data, Task("lm"))
    with torch.no_grad():
        logits = model(ids, am, dec).logits
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 24), dec[:, 1:].reshape(-1))
    assert result.loss[0] == pytest.approx(float(expected), rel=1e-5)
    _same_as_one_per_pass(gated, masks, data, Task("lm"))


# ---------------------------------------------------------------------------------------------------
# mixture of experts: routing by value, so stacked masks would gate the wrong rows

class TopKMoE(nn.Module):
    """Tokens (B, T, 4) -> logits (B, 3): a residual block, then a top-2 mixture of 3 SwiGLU experts, each
    expert running on the tokens routed to it (gathered by value, as Mixtral and Qwen2-MoE do), whose routing
    therefore depends on the mask of the block before it."""

    def __init__(self, d: int = 4, experts: int = 3, k: int = 2):
        super().__init__()
        self.k = k
        self.inp, self.pre, self.router, self.head = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, experts), nn.Linear(d, 3)
        self.up = nn.ModuleList([nn.Linear(d, 8) for _ in range(experts)])
        self.gate = nn.ModuleList([nn.Linear(d, 8) for _ in range(experts)])
        self.down = nn.ModuleList([nn.Linear(8, d) for _ in range(experts)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = h + torch.relu(self.pre(h))
        flat = h.reshape(-1, h.shape[-1])
        weight, chosen = self.router(flat).softmax(-1).topk(self.k, dim=-1)
        out = torch.zeros_like(flat)
        for e in range(len(self.up)):
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            t = flat[rows]
            y = self.down[e](self.up[e](t) * F.silu(self.gate[e](t)))  # a product merge: gated per expert
            out = out.index_add(0, rows, y * weight[rows, slot].unsqueeze(-1))
        h = h + out.view_as(h)
        return self.head(h.mean(1))


def test_mixture_of_experts_masks_are_measured_one_per_pass():
    torch.manual_seed(0)
    net, x, y = TopKMoE().eval(), torch.randn(10, 5, 4), torch.randint(0, 3, (10,))
    gated = GatedModel(build_graph(net, x[:2]))
    assert any("mul" in n for n in gated.graph.edge_names)  # the experts' products are gated
    masks = _masks(gated.num_edges, 6)
    stacked = gated(x[:4], mask=masks)  # a direct call with several masks: each mask's own outputs
    for j in range(len(masks)):
        torch.testing.assert_close(stacked[j], gated(x[:4], mask=masks[j]), rtol=1e-5, atol=1e-6)
    assert not gated.can_stack((x,))
    data, task = Subset("s", x, y), Task("classification")
    _same_as_one_per_pass(gated, masks, data, task)
    prefix = evaluate_masks(gated, masks, data, task, strategy="prefix")
    np.testing.assert_allclose(prefix.loss, evaluate_masks(gated, masks, data, task).loss, rtol=1e-6)
    dense = GatedModel(build_graph(MaskedPooling().eval(), (torch.zeros(2, 3, dtype=torch.long),) * 2))
    assert dense.can_stack((torch.zeros(2, 3, dtype=torch.long),) * 2)  # elsewhere masks still share a pass


def test_a_hugging_face_mixture_of_experts_gives_one_pass_losses():
    from transformers import MixtralConfig, MixtralForCausalLM

    from surrogate.models import CausalLMLogits
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=16)
    lm = CausalLMLogits(MixtralForCausalLM(cfg).eval())
    ids = torch.randint(0, 32, (6, 6))
    gated = GatedModel(build_graph(lm, ids[:2]))
    data = Subset("s", ids, ids)
    masks = _masks(gated.num_edges, 5)
    _same_as_one_per_pass(gated, masks, data, Task("lm"))
    assert not gated.can_stack((ids,))


# ---------------------------------------------------------------------------------------------------
# a model left in training mode

class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.bn, self.drop, self.head = nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Dropout(0.5), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        return self.head(self.drop(h + self.bn(h)))


def test_gated_calls_run_in_eval_mode_unless_asked_to_train():
    torch.manual_seed(0)
    net, x = BNNet(), torch.randn(8, 4)
    net.bn.running_mean.fill_(0.3)
    graph = build_graph(net.eval(), x[:2])
    expected = net(x)
    net.train()  # left in training mode
    gated = GatedModel(graph)
    stats = net.bn.running_mean.clone()
    torch.testing.assert_close(gated(x), expected, rtol=0, atol=0)   # running statistics, no dropout
    torch.testing.assert_close(gated(x, mask=torch.ones(2, graph.num_prunable))[1], expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(net.bn.running_mean, stats) and all(m.training for m in net.modules())
    trains = GatedModel(graph, train=True)
    trains(x)
    assert not torch.equal(net.bn.running_mean, stats) and all(m.training for m in net.modules())


# ---------------------------------------------------------------------------------------------------
# data a task cannot score: rejected up front, with what to change

def _classifier(dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    net = WithAux().to(dtype).eval()
    return net, GatedModel(build_graph(net, torch.randn(2, 4, dtype=dtype)))


@pytest.mark.parametrize("data, task, error, message", [
    (Subset("scoring", torch.randn(0, 4), torch.zeros(0, dtype=torch.long)), Task(), ValueError,
     "subset 'scoring' is empty"),
    (Subset("scoring", torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 1])), Task(), ValueError,
     r"targets lie in \[0, 3\] but the model has 3 classes.*\[0, 2\]"),
    (Subset("scoring", torch.randn(5, 4), torch.tensor([0, -1, 2, 1, 1])), Task(), ValueError, "lie in \\[-1, 2\\]"),
    (Subset("scoring", torch.randn(5, 4), torch.rand(5)), Task(), TypeError,
     r"targets are torch.float32.*integer class indices.*targets.long\(\).*Task\('regression'\)"),
    (Subset("scoring", torch.randn(5, 4), torch.rand(5)), Task("regression"), ValueError,
     r"targets of shape \(5,\) but the model outputs \(3,\) per sample"),
])
def test_data_errors_are_caught_before_measuring(data, task, error, message):
    net, gated = _classifier()
    with pytest.raises(error, match=message):
        evaluate_masks(gated, torch.ones(gated.num_edges), data, task)
    with pytest.raises(error, match=message):
        auto_prune(net, data, task, Budget(edges=1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_model_in_another_dtype_than_the_data_names_the_dtype(dtype):
    net, gated = _classifier(dtype)
    data = Subset("scoring", torch.randn(5, 4), torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match=f"inputs is torch.float32 but the model computes in {dtype}.*to\\({dtype}\\)"):
        evaluate_masks(gated, torch.ones(gated.num_edges), data, Task())
    with pytest.raises(TypeError, match=f"computes in {dtype}"):
        auto_prune(net, data, Task(), Budget(edges=1))
    ok = Subset("scoring", torch.randn(5, 4, dtype=dtype), torch.zeros(5, dtype=torch.long))
    assert np.isfinite(evaluate_masks(gated, torch.ones(gated.num_edges), ok, Task()).loss).all()


def test_unknown_task_kinds_and_meta_masks_are_rejected():
    with pytest.raises(ValueError, match="unknown task kind 'segmentation'; use one of 'classification', 'lm'"):
        Task("segmentation")
    _, gated = _classifier()
    with pytest.raises(ValueError, match="mask is on the meta device.*CPU"):
        gated(torch.randn(2, 4), mask=torch.ones(gated.num_edges, device="meta"))
    data = Subset("s", torch.randn(3, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="mask is on the meta device"):
        evaluate_masks(gated, torch.ones(2, gated.num_edges, device="meta"), data, Task())
