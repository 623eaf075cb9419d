"""Ground truth: the loss S(m) (and accuracy / perplexity) of the gated model under each mask."""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from .gating import GatedModel, check_mask

__all__ = ["Task", "Subset", "MaskEval", "evaluate_masks", "measuring"]


@contextlib.contextmanager
def measuring(*modules: torch.nn.Module) -> Iterator[None]:
    """Every submodule of ``modules`` in eval mode for the duration; afterwards each one gets back its own
    ``training`` flag (not the parent's: ``module.train(flag)`` would overwrite a BatchNorm that its owner
    had frozen in eval mode). Measurements run inside this, so they never update running statistics or
    draw dropout masks, whatever mode the caller left the model in."""
    saved = [(m, m.training) for root in modules for m in root.modules()]
    for m, _ in saved:
        m.training = False
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag


@dataclass(frozen=True)
class Task:
    """How outputs and targets become per-sample losses.

    classification: logits (B, C), labels (B,), cross-entropy and accuracy.
    lm: logits (B, T, V) for input_ids (B, T); next-token cross-entropy averaged over the T-1 predicted
        tokens of each sequence, next-token accuracy; perplexity = exp(mean loss).
    regression: outputs and targets of the same shape, squared error summed over non-batch dims.
    """
    kind: Literal["classification", "lm", "regression"] = "classification"

    def per_sample(self, out: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(loss (B,), correct-fraction (B,) or None) for outputs of one mask."""
        out = out.float() if out.dtype in (torch.float16, torch.bfloat16) else out  # keep float64 exact
        if self.kind == "classification":
            loss = F.cross_entropy(out, target, reduction="none")
            return loss, (out.argmax(-1) == target).float()
        if self.kind == "lm":
            logits, labels = out[:, :-1], target[:, 1:]
            tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
            correct = (logits.argmax(-1) == labels).float().mean(1)
            return tok.view(labels.shape).mean(1), correct
        if self.kind == "regression":
            return (out - target.to(out.dtype)).pow(2).flatten(1).sum(1), None
        raise ValueError(f"unknown task kind {self.kind!r}; use 'classification', 'lm' or 'regression'")

    def targets_of(self, inputs: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return inputs if self.kind == "lm" else labels


@dataclass(frozen=True)
class Subset:
    """A named data subset held in memory: what a method may see ("scoring") or the truth ("evaluation")."""
    name: str
    inputs: torch.Tensor
    targets: torch.Tensor

    def __post_init__(self) -> None:
        if len(self.inputs) != len(self.targets):
            raise ValueError(f"subset {self.name!r}: {len(self.inputs)} inputs but {len(self.targets)} targets")

    def __len__(self) -> int:
        return len(self.inputs)


@dataclass
class MaskEval:
    """Per-mask results on one subset."""
    subset: str
    n_samples: int
    loss: np.ndarray                      # (M,) mean loss
    accuracy: np.ndarray | None = None    # (M,) mean accuracy (classification / next-token)
    outputs: torch.Tensor | None = None   # (M, n, ...) model outputs, if asked for (keep_outputs=True)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def perplexity(self) -> np.ndarray:
        return np.exp(self.loss)


@torch.no_grad()
def evaluate_masks(gated: GatedModel, masks: Any, data: Subset, task: Task, *, batch_size: int = 512,
                   masks_per_pass: int | None = None, progress: bool = False,
                   keep_outputs: bool = False) -> MaskEval:
    """Evaluate every mask on the whole subset: S(m) = mean per-sample loss.

    masks_per_pass masks are stacked into one forward pass (None: as many as keep a pass near 16k
    samples; for convolutional nets on a CPU, 1 is usually fastest). Deterministic: no sampling.
    keep_outputs: also return the outputs of every mask on every sample ((M, n, ...), as the model returns
    them), what output-space surrogates are built from; mind the memory of large outputs (LM logits).
    """
    m = check_mask(masks, gated.num_edges)
    m = m.unsqueeze(0) if m.dim() == 1 else m
    if masks_per_pass is None:
        masks_per_pass = max(1, min(len(m), 16384 // max(1, min(batch_size, len(data)))))
    total_loss = torch.zeros(len(m), dtype=torch.float64)
    total_acc = torch.zeros(len(m), dtype=torch.float64)
    has_acc = True
    kept: list[list[torch.Tensor]] = [[] for _ in range(len(m))] if keep_outputs else []
    chunks = range(0, len(m), masks_per_pass)
    if progress:
        from tqdm.auto import tqdm
        chunks = tqdm(chunks, desc=f"S(m) on {data.name}", unit="chunk")
    with measuring(gated):
        for c0 in chunks:
            mc = m[c0:c0 + masks_per_pass]
            for b0 in range(0, len(data), batch_size):
                x = data.inputs[b0:b0 + batch_size]
                y = data.targets[b0:b0 + batch_size]
                out = gated(x, mask=mc if len(mc) > 1 else mc[0])
                out = out if len(mc) > 1 else out.unsqueeze(0)
                for j in range(len(mc)):
                    if keep_outputs:
                        kept[c0 + j].append(out[j])
                    loss, acc = task.per_sample(out[j], y)
                    total_loss[c0 + j] += loss.double().sum()
                    if acc is None:
                        has_acc = False
                    else:
                        total_acc[c0 + j] += acc.double().sum()
    n = len(data)
    loss = (total_loss / n).numpy()
    if not np.isfinite(loss).all():
        raise FloatingPointError(f"non-finite loss for {int((~np.isfinite(loss)).sum())} masks on {data.name}")
    outputs = torch.stack([torch.cat(parts) for parts in kept]) if keep_outputs else None
    return MaskEval(data.name, n, loss, (total_acc / n).numpy() if has_acc else None, outputs)
