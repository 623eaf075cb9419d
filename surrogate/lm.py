"""The WikiText-2 GPT-2 setup of the paper: token blocks and a trained (or pretrained), cached GPT-2.

Blocks: the text of a split, joined as in the Hugging Face perplexity guide (``load_wikitext2``), as GPT-2
tokens cut into non-overlapping ``block_size`` windows. Splits (seeded): ``train`` -- the training blocks
minus the ``n_score`` scoring blocks (or the first ``n_train_blocks`` of them); ``val`` -- ``n_val`` blocks
of the validation split (model choice); ``scoring`` -- ``n_score`` training blocks held out of ``train`` (all a
pruning method may see); ``test`` -- every block of the test split (the truth).
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from .data import data_cache_dir, load_gpt2_tokenizer, load_wikitext2, resolve_data_dir
from .evaluate import Subset, Task
from .measuring import measuring, model_device
from .models import CausalLMLogits
from .paths import atomic_path
from .train import TrainConfig, cached_model, train

__all__ = ["LMConfig", "PAPER_LM_TRAINING", "SUBLAYER_BRANCHES", "HEAD_PROJECTIONS", "wikitext_blocks",
           "wikitext_splits", "gpt2_lm", "perplexity"]

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
