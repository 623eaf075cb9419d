"""The WikiText-2 GPT-2 setup of the paper: token blocks and a trained (or pretrained), cached GPT-2.

Blocks: the text of a split, joined as in the Hugging Face perplexity guide (``load_wikitext2``), as GPT-2
tokens cut into non-overlapping ``block_size`` windows. Splits (seeded): ``train`` -- the training blocks
minus the ``n_score`` scoring blocks (or the first ``n_train_blocks`` of them); ``val`` -- ``n_val`` blocks
of the validation split (model choice); ``scoring`` -- ``n_score`` training blocks held out of ``train`` (all a
pruning method may see); ``test`` -- every block of the test split (the truth).

The study's protocols: the sub-layer branches (``sublayer_protocol``: every mask of them, the exhaustive truth)
and the attention heads (``head_protocol``); the cost of pruned networks (``cost_of``) and the memory a
superposition keeps (``readout_memory``); its numbers for the paper (``lm_macros``, ``head_macros``).
"""
from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from .data import data_cache_dir, load_gpt2_tokenizer, load_wikitext2, resolve_data_dir
from .evaluate import Subset, Task
from .experiment import ExperimentConfig, MaskFamily
from .interactions import Interactions, interactions
from .measuring import measuring, model_device
from .methods import METHODS
from .models import CausalLMLogits
from .paper import Macros, fmt
from .paths import atomic_path
from .plotting import heatmap
from .profile import count_params, measure_latency
from .report import cost_macros, family_macros, macros_from, ranking_macros, summarize
from .studies import Records
from .train import TrainConfig, cached_model, train

__all__ = ["LMConfig", "PAPER_LM_TRAINING", "SUBLAYER_BRANCHES", "HEAD_PROJECTIONS", "HEAD_EDGES", "wikitext_blocks",
           "wikitext_splits", "gpt2_lm", "perplexity", "training_curve", "sublayer_protocol", "head_protocol",
           "sublayer_name", "sublayer_interactions", "head_importance", "head_figure", "cost_of", "readout_memory",
           "lm_macros", "head_macros"]

# the training recipe of the paper profile (nanoGPT-like): AdamW, 0.1 epoch of warmup then cosine decay to 0,
# weight decay 0.1 (on every parameter: train() has no parameter groups), batches of 16 blocks, bf16 autocast
PAPER_LM_TRAINING = TrainConfig(epochs=2, batch_size=16, lr=1e-3, weight_decay=0.1, optimizer="adamw",
                                schedule="onecycle", warmup_epochs=0.1, decay="cosine", patience=None,
                                keep="best", autocast="bf16")

# edge names in the graph of a transformers GPT-2 (build_graph): each layer's attention and MLP branch into the
# residual stream ("lm.transformer.h.0.attn.resid_dropout -> lm.transformer.h.0.add_4"), and the module paths
# of the attention output projections (build_graph(heads={HEAD_PROJECTIONS: n_head}))
SUBLAYER_BRANCHES = r"\.(attn\.resid_dropout|mlp\.dropout) -> "
HEAD_PROJECTIONS = r"attn\.c_proj$"
HEAD_EDGES = r"\[head \d+\]$"  # the head edges of a graph built with heads={HEAD_PROJECTIONS: n_head}
MAX_EXHAUSTIVE_BRANCHES = 12    # 2^12 masks: the largest exhaustive family of sub-layer branches measured
PAIR_METHODS = ("superposition_pairs", "superposition_state", "loo", "taylor2", "block_influence")  # interactions


@dataclass(frozen=True)
class LMConfig:
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    block_size: int = 128
    n_train_blocks: int | None = None  # use only this many training blocks (quick profiles); None: all the rest
    n_score: int = 32                  # scoring blocks held out of train: all a method may see
    n_val: int | None = 64             # validation blocks for model choice (None: all; train() evaluates them
                                       # in batches of 1024, whose logits must fit in memory)
    dropout: float = 0.0               # of the from-scratch model (2 epochs underfit: none needed)
    split_seed: int = 0
    model_name: str | None = None      # None: a GPT-2 of the size above trained from scratch; else a name or
                                       # folder for from_pretrained (the sizes above are then ignored)


def wikitext_blocks(split: str, tokenizer: Any, block_size: int,
                    data_dir: str | os.PathLike[str] | None = None) -> torch.Tensor:
    """int64 (N, block_size) GPT-2 token blocks of a WikiText-2 split, the remainder dropped. The token ids of
    a text are cached under ``data_cache_dir()`` by a hash of the text (tokenizing train takes ~10 s)."""
    text = load_wikitext2(split, data_dir)
    digest = hashlib.sha256(f"{type(tokenizer).__name__}/{len(tokenizer)}/{text}".encode()).hexdigest()[:16]
    path = data_cache_dir() / f"wikitext2_gpt2_{digest}.pt"
    try:
        ids = torch.load(path, weights_only=True)
    except Exception:  # noqa: BLE001 - missing or unreadable: tokenize again
        # one call on the whole text (chunks could split BPE words differently); verbose=False silences the
        # expected "longer than the model's maximum" warning
        ids = torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.int32)
        with atomic_path(path) as tmp:
            torch.save(ids, tmp)
    n = len(ids) // block_size
    return ids[:n * block_size].long().view(n, block_size)


def wikitext_splits(config: LMConfig, tokenizer: Any = None,
                    data_dir: str | os.PathLike[str] | None = None) -> dict[str, Subset]:
    """The seeded splits of ``config`` (module docstring); targets are the inputs (``Task("lm")``)."""
    tokenizer = tokenizer if tokenizer is not None else load_gpt2_tokenizer(data_dir)
    blocks = {s: wikitext_blocks(s, tokenizer, config.block_size, data_dir) for s in ("train", "validation", "test")}
    tr, va = blocks["train"], blocks["validation"]
    if not 0 < config.n_score < len(tr):
        raise ValueError(f"n_score={config.n_score} does not fit {len(tr)} training blocks")
    gen = torch.Generator().manual_seed(config.split_seed)
    perm = torch.randperm(len(tr), generator=gen)
    score_idx, train_idx = perm[:config.n_score], perm[config.n_score:]
    if config.n_train_blocks is not None:
        if not 0 < config.n_train_blocks <= len(train_idx):
            raise ValueError(f"n_train_blocks={config.n_train_blocks} must lie in [1, {len(train_idx)}]")
        train_idx = train_idx[:config.n_train_blocks]
    if config.n_val is not None:
        va = va[torch.randperm(len(va), generator=gen)[:config.n_val]]
    out = {"train": tr[train_idx], "val": va, "scoring": tr[score_idx], "test": blocks["test"]}
    return {name: Subset(name, x, x) for name, x in out.items()}


def _source(data_dir: str | os.PathLike[str] | None) -> str:
    """Which copy of WikiText-2 the numbers come from: part of every cache key."""
    return "datasets" if resolve_data_dir(data_dir) is None else "offline-raw"


def _pretrained(name: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM
    try:
        return AutoModelForCausalLM.from_pretrained(name)
    except Exception as exc:  # noqa: BLE001 - every failure here has the same remedy
        raise RuntimeError(
            f"could not load the pretrained model {name!r} ({type(exc).__name__}: {exc}). Without network access, "
            "set model_name to a local folder written by model.save_pretrained(folder) (or have the model in the "
            "Hugging Face cache); the offline data folder ($SURROGATE_DATA_DIR) holds no weights.") from exc


def gpt2_lm(config: LMConfig, training: TrainConfig = PAPER_LM_TRAINING, seed: int = 0, *,
            data_dir: str | os.PathLike[str] | None = None, cache_dir: str | os.PathLike[str] | None = None,
            splits: dict[str, Subset] | None = None,
            log: Callable[[str], None] | None = print) -> tuple[CausalLMLogits, dict]:
    """GPT-2 as ``input_ids -> logits`` (eval mode, on ``training.device``) and its metadata. With
    ``config.model_name``: the pretrained model, not trained. Else a GPT-2 of ``config``'s size trained from
    scratch with ``training`` (seeded by ``seed``) on the ``train`` split, from the cache when it was trained
    before (keyed by every config and the data source); meta: validation loss per epoch."""
    if config.model_name is not None:
        model = CausalLMLogits(_pretrained(config.model_name)).to(training.device).eval()
        return model, {"model_name": config.model_name}
    from transformers import GPT2Config, GPT2LMHeadModel
    tc = replace(training, seed=seed)
    gpt = GPT2Config(n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd, vocab_size=50257,
                     n_positions=config.block_size, resid_pdrop=config.dropout, embd_pdrop=config.dropout,
                     attn_pdrop=config.dropout)

    def fit(model: CausalLMLogits) -> dict:
        data = splits if splits is not None else wikitext_splits(config, data_dir=data_dir)
        res = train(model, data["train"], data["val"], Task("lm"), tc, log=log)
        return {"history": res.history, "best_epoch": res.best_epoch}

    model, meta = cached_model((config, tc, {"data": _source(data_dir), "vocab": gpt.vocab_size}),
                               lambda: CausalLMLogits(GPT2LMHeadModel(gpt)), fit, cache_dir=cache_dir, kind="gpt2_lm")
    return model.to(training.device).eval(), meta


@torch.no_grad()
def perplexity(model: torch.nn.Module, data: Subset, batch_size: int = 16) -> float:
    """exp(mean next-token loss) over the blocks of ``data`` (every block predicts block_size - 1 tokens)."""
    device = model_device(model)
    total = 0.0
    with measuring(model):
        for b0 in range(0, len(data), batch_size):
            x = data.inputs[b0:b0 + batch_size].to(device)
            total += float(Task("lm").per_sample(model(x), x)[0].double().sum())
    return math.exp(total / len(data))


def training_curve(metas: dict[int, dict]) -> pd.DataFrame:
    """The validation curve of each trained network (seed -> ``gpt2_lm`` metadata) with its perplexity
    ("val_ppl"); empty for pretrained models."""
    curve = pd.DataFrame([{"seed": s, **h} for s, m in metas.items() for h in m.get("history", [])])
    if len(curve):
        curve["val_ppl"] = np.exp(curve.val_loss)
    return curve


def sublayer_protocol(methods: Sequence[str], n_layer: int, n_realistic: int,
                      budgets: Sequence[int]) -> ExperimentConfig:
    """The study's protocol on the sub-layer branches: every mask of the 2 x ``n_layer`` branches (the
    exhaustive truth) and ``n_realistic`` masks removing 1..n_layer of them; picks remove ``budgets`` branches."""
    if 2 * n_layer > MAX_EXHAUSTIVE_BRANCHES:
        raise ValueError(f"{n_layer} layers give 2^{2 * n_layer} sub-layer masks: too many for the exhaustive "
                         f"family; use a model with at most {MAX_EXHAUSTIVE_BRANCHES // 2} layers")
    return ExperimentConfig(
        methods=tuple(methods), eval_strategy="prefix", eval_batch=16, context_batch=8,
        families=(MaskFamily("sublayers", "exhaustive", edges=SUBLAYER_BRANCHES, holdout=False),
                  MaskFamily("realistic", "removed", n=n_realistic, counts=tuple(range(1, n_layer + 1)),
                             edges=SUBLAYER_BRANCHES)),
        budgets=tuple(budgets), budget_unit="edges", budget_edges=SUBLAYER_BRANCHES)


def head_protocol(sublayers: ExperimentConfig, methods: Sequence[str], n_layer: int, n_head: int, n_realistic: int,
                  budgets: Sequence[int], search: int) -> ExperimentConfig:
    """The head study: the graph of ``sublayers`` with one edge per attention head; ``n_realistic`` masks
    removing 10-30% of the heads (at least 2: single removals are fitting masks); picks of ``budgets`` heads
    against the best mask found by ``search`` random masks and ``search // 2`` swap moves around the best.
    Methods: the predicting ones of ``methods`` but output-space "superposition" (vocabulary-sized outputs)."""
    hm = tuple(m for m in methods if METHODS[m].predicts and m != "superposition")
    heads = n_layer * n_head
    counts = tuple(range(max(2, math.ceil(0.1 * heads)), max(2, math.floor(0.3 * heads)) + 1))
    return ExperimentConfig(methods=hm, eval_batch=16, context_batch=8, budgets=tuple(budgets),
                            budget_unit="edges", exhaustive_limit=0, search_random=search, search_swaps=search // 2,
                            graph=replace(sublayers.graph, heads={HEAD_PROJECTIONS: n_head}), budget_edges=HEAD_EDGES,
                            families=(MaskFamily("heads", "removed", n=n_realistic, counts=counts, edges=HEAD_EDGES),))


def sublayer_name(edge: str) -> str:
    """'lm.transformer.h.1.mlp.dropout -> ...' -> 'L1.mlp'."""
    found = re.search(r"\.h\.(\d+)\.(attn|mlp)\.", edge)
    if found is None:
        raise ValueError(f"{edge!r} is not a sub-layer branch of a GPT-2 graph (SUBLAYER_BRANCHES)")
    layer, kind = found.groups()
    return f"L{layer}.{kind}"


def sublayer_interactions(records: Records, methods: Sequence[str] = PAIR_METHODS) -> Interactions:
    """The interactions of the sub-layer branches (``surrogate.interactions``) from the exhaustive "sublayers"
    family, pairs named "L<layer>.<attn|mlp>", as predicted by those of ``methods`` that were run."""
    return interactions(records, "sublayers", SUBLAYER_BRANCHES, methods, name=sublayer_name)


def head_importance(records: Records, methods: Sequence[str], n_layer: int, n_head: int,
                    prefer: Sequence[str] = ("superposition_state", "superposition_pairs", "loo"),
                    ) -> tuple[str, np.ndarray]:
    """The importance of every attention head (the predicted cost of removing it alone), averaged over the
    networks of the head study (run with ``methods``), as a (layers, heads) array, by the first method of
    ``prefer`` that was run (else the first of ``methods``): (method, array)."""
    first = next(iter(records.examples.values()))
    method = next((m for m in prefer if m in methods), methods[0])
    on_heads = np.array([bool(re.search(HEAD_EDGES, n)) for n in first["edge_names"]])
    imp = np.mean([ex["importance"][method][on_heads] for ex in records.examples.values()], axis=0)
    return method, imp.reshape(n_layer, n_head)


def head_figure(records: Records, methods: Sequence[str], n_layer: int, n_head: int):
    """A heatmap of ``head_importance`` (layers x heads) titled with the method that estimated it."""
    method, imp = head_importance(records, methods, n_layer, n_head)
    return heatmap(imp, xlabel="head", ylabel="layer", label="scoring loss increase",
                   title=f"removing one head ({METHODS[method].label.split(' (')[0]})")


def cost_of(model: nn.Module, one: torch.Tensor, batch: torch.Tensor) -> dict[str, float]:
    """Parameters, the CPU latency of one block (milliseconds) and tokens per second at the ``batch`` given."""
    batch_ms = measure_latency(model, batch, repeats=5, warmup=2)
    return {"params": count_params(model), "latency_b1_ms": measure_latency(model, one, repeats=10),
            "tokens_per_s": batch.numel() / batch_ms * 1e3}


def readout_memory(tokens: int, width: int, vocab: int, edges: int) -> pd.DataFrame:
    """What superposing measured changes keeps per measured mask (float32 over ``tokens`` scoring tokens) at the
    readout state (``width``) against the output logits (``vocab``), and over the prior design (edges + 2)."""
    memory = pd.DataFrame([{"space": "state", "width": width, "MiB_per_mask": tokens * width * 4 / 2**20},
                           {"space": "logits", "width": vocab, "MiB_per_mask": tokens * vocab * 4 / 2**20}])
    memory["MiB_fit_design"] = memory.MiB_per_mask * (edges + 2)
    return memory


def lm_macros(records: Records, rank: pd.DataFrame, picks: pd.DataFrame, oracle: pd.DataFrame,
              interactions: Interactions, finetuned: pd.DataFrame, cost: pd.DataFrame, *, model: Any, tokens: int,
              dense_ppl: Mapping[int, float]) -> Macros:
    """The sub-layer study's measured numbers for the paper (``Lm...``): the model's shape (``model``: its
    transformers config), its dense perplexity (seed -> perplexity), the memory a superposition keeps over
    ``tokens`` scoring tokens (``readout_memory``), mask families, rank agreement (``rank``, and per number
    removed), the perplexity of the picks against the oracle (perplexity unit), passes, interactions,
    perplexity after fine-tuning and before (``finetuned``: the summary per method) and the cost of the
    largest pruning."""
    per_k, pair_rank, strongest = interactions.per_k, interactions.pair_rank, interactions.strongest
    memory = readout_memory(tokens, model.n_embd, model.vocab_size, int(records.info.edges.iloc[0]))
    by_k = records.by_k[records.by_k.protocol == "sublayers"]
    macros = Macros(LmLayers=model.n_layer, LmHeads=model.n_head, LmWidth=model.n_embd, LmBranches=2 * model.n_layer,
                    LmLogitsOverState=float(model.vocab_size / model.n_embd),
                    LmTestPPL=fmt(np.mean(list(dense_ppl.values())), 1),  # as the paper quotes them
                    LmStateMiB=fmt(memory.MiB_per_mask[0], 1), LmLogitsMiB=fmt(memory.MiB_per_mask[1], 1),
                    LmEdges=int(records.info.edges.iloc[0]), LmPairMaxRatio=float(strongest.ratio.iloc[0]),
                    LmPairMax=strongest.pair.iloc[0])
    macros.update(family_macros(records.info, "Lm", {"sublayers": "Branch", "realistic": "Realistic"}))
    macros.update(ranking_macros(rank, "Lm"))
    for table, prefix, keys, value, digits in (
            (summarize(picks, ["method", "removed"], ["gap"]), "LmPplGap", ["method", "removed"], "gap_mean", 2),
            (summarize(picks, ["method", "removed"], ["ratio"]), "LmPplRatio", ["method", "removed"], "ratio_mean", 3),
            (summarize(by_k, ["method", "removed"], ["spearman"]), "LmByK", ["method", "removed"], "spearman_mean", 3),
            (summarize(oracle, ["removed"], ["ppl"]), "LmOraclePpl", ["removed"], "ppl_mean", 1),
            (summarize(records.regret, ["method"], ["forward"]), "LmForward", ["method"], "forward_mean", 0),
            (summarize(records.regret, ["method"], ["backward"]), "LmBackward", ["method"], "backward_mean", 0),
            (per_k, "LmSuperAdditive", ["removed"], "median_ratio", 2),
            (pair_rank, "LmPairRank", ["method"], "spearman_mean", 3),
            (finetuned, "LmFt", ["method"], "ppl_mean", 1),
            (finetuned, "LmZs", ["method"], "ppl_before_mean", 1)):
        macros.update(macros_from(table, prefix, keys, value, digits=digits))
    macros.update(cost_macros(cost, "Lm", {"params_rel": "ParamsRatio", "latency_b1_ms_rel": "LatencyOneRatio",
                                           "tokens_per_s_rel": "ThroughputRatio"}))
    return macros


def head_macros(records: Records, rank: pd.DataFrame, picks: pd.DataFrame) -> Macros:
    """The head study's numbers (``LmHead...``): head edges and test masks, rank agreement (``rank``) and the
    perplexity gap of the picks to the best mask found (``picks``, perplexity unit), and the forward and backward
    passes each method made over the scoring blocks (``LmHeadFwd...``, ``LmHeadBwd...``)."""
    example = next(iter(records.examples.values()))
    macros = Macros(LmHeadEdges=sum(re.search(HEAD_EDGES, n) is not None for n in example["edge_names"]),
                    LmHeadMasks=int(records.info.heads_n_masks.iloc[0]))
    macros.update(ranking_macros(rank, "LmHeadRank", "LmHeadWithinK", keys=["method"]))
    macros.update(macros_from(summarize(picks, ["method", "removed"], ["gap"]), "LmHeadGap", ["method", "removed"],
                              "gap_mean", digits=1))
    passes = records.protocols.groupby("method", as_index=False)[["forward", "backward"]].mean()
    macros.update(macros_from(passes, "LmHeadFwd", ["method"], "forward", digits=0))  # what each method cost
    macros.update(macros_from(passes, "LmHeadBwd", ["method"], "backward", digits=0))
    return macros
