"""The WikiText-2 GPT-2 setup: pretrained weights through the real loading path, seeded disjoint token splits on
the offline copy (skipped without it), a from-scratch GPT-2 that trains, caches and has 2 branch edges per layer."""
from __future__ import annotations

import math
import os
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from surrogate import build_graph
from surrogate.data import DATA_DIR_ENV, load_gpt2_tokenizer
from surrogate.lm import (HEAD_PROJECTIONS, PAPER_LM_TRAINING, SUBLAYER_BRANCHES, LMConfig, gpt2_lm, perplexity,
                          wikitext_blocks, wikitext_splits)
from surrogate.models import gpt2_small_random


@pytest.fixture(scope="module")
def data_dir() -> Path:
    folder = Path(os.environ.get(DATA_DIR_ENV) or Path(__file__).resolve().parents[2] / "shared" / "data")
    if not (folder / "wikitext-2").is_dir():
        pytest.skip(f"offline data folder {folder} not found; set {DATA_DIR_ENV} to run these tests")
    return folder


@pytest.fixture(scope="module")
def tokenizer(data_dir):
    return load_gpt2_tokenizer(data_dir)


def _rows(x: torch.Tensor) -> set[bytes]:
    return {bytes(r) for r in x.numpy()}


def test_pretrained_weights_load_through_from_pretrained(tmp_path):
    lm = gpt2_small_random(n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=32, seed=3)
    lm.save_pretrained(tmp_path)
    model, meta = gpt2_lm(LMConfig(model_name=str(tmp_path)), log=None)
    assert not model.training and meta["model_name"] == str(tmp_path)
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(x), lm(input_ids=x, use_cache=False).logits)
    with pytest.raises(RuntimeError, match="save_pretrained"):
        gpt2_lm(LMConfig(model_name=str(tmp_path / "missing" / "folder")), log=None)


def test_wikitext_splits_are_seeded_and_disjoint(data_dir, tokenizer):
    cfg = LMConfig(block_size=64, n_score=8, n_val=16)
    s = wikitext_splits(cfg, tokenizer, data_dir)
    train_all = wikitext_blocks("train", tokenizer, 64, data_dir)
    assert {k: v.inputs.shape[1] for k, v in s.items()} == dict.fromkeys(("train", "val", "scoring", "test"), 64)
    assert len(s["train"]) + len(s["scoring"]) == len(train_all) and len(s["val"]) == 16
    assert len(s["test"]) == 287644 // 64  # the HF perplexity guide's join of the test split
    assert not _rows(s["scoring"].inputs) & _rows(s["train"].inputs)  # held out of train
    assert _rows(s["scoring"].inputs) <= _rows(train_all)  # ... but from the training split
    assert all(torch.equal(v.inputs, v.targets) for v in s.values())
    small = wikitext_splits(replace(cfg, n_train_blocks=50), tokenizer, data_dir)
    assert torch.equal(small["train"].inputs, s["train"].inputs[:50])
    assert torch.equal(small["scoring"].inputs, s["scoring"].inputs)
    other = wikitext_splits(replace(cfg, split_seed=1, n_train_blocks=50), tokenizer, data_dir)
    assert not torch.equal(other["scoring"].inputs, s["scoring"].inputs)


def test_gpt2_from_scratch_trains_caches_and_has_branch_edges(data_dir, tokenizer, tmp_path):
    cfg = LMConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, n_train_blocks=96, n_score=4, n_val=8)
    splits = wikitext_splits(cfg, tokenizer, data_dir)
    training = replace(PAPER_LM_TRAINING, epochs=1, batch_size=4, lr=1e-2)
    # an untrained GPT-2 of the same size (another cache key: other initial weights)
    untrained = gpt2_lm(cfg, replace(training, epochs=0), data_dir=data_dir, cache_dir=tmp_path, splits=splits,
                        log=None)[0]
    lines: list[str] = []
    model, meta = gpt2_lm(cfg, training, data_dir=data_dir, cache_dir=tmp_path, splits=splits, log=lines.append)
    assert len(lines) == 1 and len(meta["history"]) == 1 and not model.training
    ppl = perplexity(model, splits["val"], batch_size=3)
    assert ppl == pytest.approx(math.exp(meta["history"][0]["val_loss"]), rel=1e-4)  # train() measured the same
    assert ppl < 0.5 * perplexity(untrained, splits["val"])
    again, meta2 = gpt2_lm(cfg, training, data_dir=data_dir, cache_dir=tmp_path, splits=splits, log=lines.append)
    assert len(lines) == 1 and meta2["history"] == meta["history"]  # loaded, not trained again
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    graph = build_graph(model, splits["scoring"].inputs[:2])
    branches = [n for n in graph.edge_names if re.search(SUBLAYER_BRANCHES, n)]
    assert len(branches) == 2 * cfg.n_layer and graph.num_prunable == 4 * cfg.n_layer  # the rest: the residual stream
    assert sum(".attn." in n for n in branches) == sum(".mlp." in n for n in branches) == cfg.n_layer
    heads = build_graph(model, splits["scoring"].inputs[:2], heads={HEAD_PROJECTIONS: cfg.n_head})
    assert sum("[head " in n for n in heads.edge_names) == cfg.n_layer * cfg.n_head
