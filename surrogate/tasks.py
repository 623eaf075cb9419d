"""What a measurement scores: a ``Task`` (how a model's output and the targets become per-sample losses) and a
``Subset`` (a named set of samples: the model's inputs, one tensor or several, and the targets), with the
checks that reject data a task cannot score before any work is done (``check_data``).

A subset's inputs are one tensor (N, ...), a tuple of tensors (the model's positional inputs, each (N, ...)),
or a dict {name of a parameter of the model's forward: tensor (N, ...)}, e.g. a tokenizer's output::

    Subset("scoring", (input_ids, attention_mask), labels)
    Subset("scoring", tokenizer(texts, return_tensors="pt", padding=True), labels)

A dict is put in the order of the model's forward parameters wherever it meets a model (``Subset.args``).
"""
from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from .measuring import measuring, model_device

__all__ = ["Task", "Subset", "TASK_KINDS", "check_data", "check_output", "input_names"]

TASK_KINDS = ("classification", "lm", "regression")


@dataclass(frozen=True)
class Task:
    """How outputs and targets become per-sample losses.

    classification: logits (B, C) and labels (B,) (or dense: (B, C, ...) and (B, ...)), cross-entropy and
        accuracy (averaged over the dense positions of a sample).
    lm: logits (B, T, V) for input_ids (B, T); next-token cross-entropy averaged over the T-1 predicted
        tokens of each sequence, next-token accuracy; perplexity = exp(mean loss).
    regression: outputs and targets of the same shape, squared error summed over non-batch dims.

    output: which part of what the model returns is scored. None (default): a tensor as it is, the first
    element of a tuple or list, the ``logits`` of a dict or a Hugging Face ``ModelOutput``; an int: that
    element of a tuple (or field of a ModelOutput, in order); a str: that key (or named-tuple field).
    """
    kind: Literal["classification", "lm", "regression"] = "classification"
    output: int | str | None = None

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ValueError(f"unknown task kind {self.kind!r}; use one of {', '.join(map(repr, TASK_KINDS))}")
        if isinstance(self.output, bool) or not (self.output is None or isinstance(self.output, (int, str))):
            raise TypeError(f"Task(output=...) says which part of the model's output is scored: an int (an element "
                            f"of a tuple), a str (a key of a dict or ModelOutput) or None; got {self.output!r}")

    def scored(self, out: Any) -> torch.Tensor:
        """The tensor this task scores among what the model returned (see ``output``)."""
        if isinstance(out, torch.Tensor):
            return out
        sel = self.output
        if isinstance(out, Mapping):  # a dict, or a Hugging Face ModelOutput (an ordered dict)
            keys = list(out.keys())
            if sel is None and "logits" not in out:
                raise ValueError(f"the model returns a {type(out).__name__} with keys {keys} and no 'logits': "
                                 f"say which one the task scores, e.g. Task({self.kind!r}, output={keys[0]!r})"
                                 if keys else f"the model returns an empty {type(out).__name__}")
            sel = "logits" if sel is None else sel
            if isinstance(sel, int) and not -len(keys) <= sel < len(keys) or isinstance(sel, str) and sel not in out:
                raise ValueError(f"Task(output={sel!r}): the model's {type(out).__name__} has keys {keys}")
            value = out[sel] if isinstance(sel, str) else out[keys[sel]]
        elif isinstance(out, (tuple, list)):
            sel = 0 if sel is None else sel
            if isinstance(sel, str):
                if not hasattr(out, "_fields") or sel not in out._fields:
                    raise ValueError(f"Task(output={sel!r}) names a field, but the model returns a "
                                     f"{type(out).__name__} of {len(out)} elements: pass their position (an int)")
                value = getattr(out, sel)
            elif not -len(out) <= sel < len(out):
                raise ValueError(f"Task(output={sel}): the model returns {len(out)} outputs")
            else:
                value = out[sel]
        else:
            raise TypeError(f"the model returns a {type(out).__name__}, which a task cannot score: return a tensor, "
                            "a tuple (its first element is scored), or a dict / ModelOutput with 'logits'")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"the scored output (Task(output={sel!r})) is a {type(value).__name__}, not a tensor; "
                            "pass Task(..., output=...) naming the model's logits or predictions")
        return value

    def per_sample(self, out: Any, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(loss (B,), correct-fraction (B,) or None) for what the model returned under one mask."""
        out = self.scored(out)
        out = out.float() if out.dtype in (torch.float16, torch.bfloat16) else out  # keep float64 exact
        if self.kind == "classification":
            loss = F.cross_entropy(out, target, reduction="none")
            correct = (out.argmax(1) == target).float()
            if loss.dim() > 1:  # dense labels: the mean over a sample's positions
                return loss.flatten(1).mean(1), correct.flatten(1).mean(1)
            return loss, correct
        if self.kind == "lm":
            logits, labels = out[:, :-1], target[:, 1:]
            tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
            correct = (logits.argmax(-1) == labels).float().mean(1)
            return tok.view(labels.shape).mean(1), correct
        return (out - target.to(out.dtype)).pow(2).flatten(1).sum(1), None


# ----------------------------------------------------------------------------------------------------
# subsets

def _map_inputs(inputs: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(inputs, torch.Tensor):
        return fn(inputs)
    if isinstance(inputs, dict):
        return {k: fn(v) for k, v in inputs.items()}
    return tuple(fn(x) for x in inputs)


@dataclass(frozen=True, eq=False)
class Subset:
    """A named data subset held in memory: what a method may see ("scoring") or the truth ("evaluation").

    inputs: one tensor (N, ...), a tuple of tensors (the model's positional inputs, e.g. ``(input_ids,
    attention_mask)``), or a dict {forward parameter name: tensor} (e.g. a tokenizer's output), each with one
    row per sample; targets (N, ...). ``subset[rows]`` is the subset of those rows (same name);
    ``subset.args(model)`` the model's positional inputs."""
    name: str
    inputs: Any
    targets: torch.Tensor

    def __post_init__(self) -> None:
        inputs = self.inputs
        if isinstance(inputs, Mapping):  # also a tokenizer's BatchEncoding
            inputs = dict(inputs)
        elif isinstance(inputs, list):
            inputs = tuple(inputs)
        object.__setattr__(self, "inputs", inputs)
        parts = self._parts()
        if not isinstance(self.targets, torch.Tensor):
            raise TypeError(f"subset {self.name!r}: targets must be a tensor, got {type(self.targets).__name__}")
        rows = {label: len(t) if t.dim() else None for label, t in parts}
        if None in rows.values() or len(set(rows.values())) > 1:
            raise ValueError(f"subset {self.name!r}: its input tensors must all hold one row per sample (dim 0); "
                             f"got {', '.join(f'{k}: {tuple(t.shape)}' for k, t in parts)}")
        n = next(iter(rows.values()))
        if self.targets.dim() == 0 or len(self.targets) != n:
            several = "" if len(parts) > 1 else (" (a model with several inputs takes them as one tuple or dict: "
                                                 "Subset(name, (input_ids, attention_mask), labels))")
            raise ValueError(f"subset {self.name!r}: {n} samples of inputs but targets of shape "
                             f"{tuple(self.targets.shape)}: pass one target per sample{several}")

    def _parts(self) -> list[tuple[str, torch.Tensor]]:
        """(label, tensor) of every input tensor; raises if the inputs are not tensors."""
        inputs = self.inputs
        if isinstance(inputs, torch.Tensor):
            parts = [("inputs", inputs)]
        elif isinstance(inputs, dict):
            parts = [(f"inputs[{k!r}]", v) for k, v in inputs.items()]
        elif isinstance(inputs, tuple):
            parts = [(f"inputs[{i}]", v) for i, v in enumerate(inputs)]
        else:
            raise TypeError(f"subset {self.name!r}: inputs must be a tensor, a tuple of tensors or a dict of "
                            f"tensors, got {type(inputs).__name__}")
        if not parts:
            raise ValueError(f"subset {self.name!r} has no input tensors")
        for label, t in parts:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"subset {self.name!r}: {label} is a {type(t).__name__}, not a tensor (a tokenizer "
                                "gives tensors with return_tensors='pt')")
        return parts

    def __len__(self) -> int:
        return len(self._parts()[0][1])

    @property
    def num_inputs(self) -> int:
        return len(self._parts())

    def __getitem__(self, rows: Any) -> Subset:
        """The samples ``rows`` (a slice, indices or a boolean mask), under the same name."""
        return Subset(self.name, _map_inputs(self.inputs, lambda t: t[rows]), self.targets[rows])

    def to(self, device: torch.device | str) -> Subset:
        return Subset(self.name, _map_inputs(self.inputs, lambda t: t.to(device)), self.targets.to(device))

    def args(self, model: nn.Module | None = None) -> tuple[torch.Tensor, ...]:
        """The inputs as the positional arguments of ``model``: a dict is put in the order of the model's
        forward parameters (``input_names``), and must name its first parameters (any order)."""
        if isinstance(self.inputs, torch.Tensor):
            return (self.inputs,)
        if isinstance(self.inputs, tuple):
            return self.inputs
        if model is None:
            raise TypeError(f"subset {self.name!r} gives its inputs by name; pass the model they are for")
        names, keys = input_names(model), list(self.inputs)
        if set(keys) != set(names[:len(keys)]):
            missing = [n for n in names[:len(keys)] if n not in keys]
            unknown = [k for k in keys if k not in names]
            raise ValueError(
                f"subset {self.name!r} gives the inputs {keys} by name, but the model takes "
                f"({', '.join(names)}) in this order: a dict must name its first {len(keys)} parameter(s)"
                + (f"; missing {missing}" if missing else "") + (f"; not a parameter: {unknown}" if unknown else "")
                + ". Pass a tuple in the order of the parameters, or wrap the model")
        return tuple(self.inputs[n] for n in names[:len(keys)])

    def batches(self, batch_size: int, model: nn.Module | None = None, device: torch.device | str | None = None
                ) -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
        """(the model's positional inputs, targets) of consecutive batches, moved to ``device`` if given."""
        for b0 in range(0, len(self), batch_size):
            part = self[b0:b0 + batch_size]
            x, y = part.args(model), part.targets
            if device is not None:
                x, y = tuple(t.to(device) for t in x), y.to(device)
            yield x, y


def input_names(model: nn.Module) -> list[str]:
    """The names of a model's positional inputs, in order: those it was traced with for a ``GatedModel``
    (its ``input_names``), else the positional parameters of its ``forward``."""
    names = getattr(model, "input_names", None)
    if names is not None:
        return list(names)
    params = inspect.signature(model.forward).parameters.values()
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


# ----------------------------------------------------------------------------------------------------
# checks before any measurement

def check_data(data: Subset, task: Task, model: nn.Module, *, run: bool = True) -> None:
    """Raise, before any measurement, if ``task`` cannot score ``model`` on ``data``, with what to change: an
    empty subset; meta tensors; floating-point inputs of a dtype the model does not compute in; targets the
    task cannot take (float class labels; with ``run``, also labels outside the model's classes or
    vocabulary and regression targets of another shape than the outputs, from one forward pass on one
    sample in eval mode; without, call ``check_output`` on the first output computed anyway)."""
    if not isinstance(task, Task):
        raise TypeError(f"task must be a surrogate Task, e.g. Task('classification'); got {type(task).__name__}")
    if not isinstance(data, Subset):
        raise TypeError(f"data must be a Subset(name, inputs, targets); got {type(data).__name__}")
    if len(data) == 0:
        raise ValueError(f"subset {data.name!r} is empty: a measurement needs at least one sample")
    meta = [label for label, t in [("targets", data.targets), *data._parts()] if t.is_meta]
    if meta:
        raise ValueError(f"subset {data.name!r}: {', '.join(meta)} on the meta device hold no values; create them "
                         "on the CPU (or the model's device)")
    _check_dtypes(data, model)
    _check_targets(data, task)
    if run:
        x = tuple(t.to(model_device(model)) for t in data[:1].args(model))
        with torch.no_grad(), measuring(model):
            check_output(data, task, task.scored(model(*x)))


def _check_dtypes(data: Subset, model: nn.Module) -> None:
    computes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    for label, t in data._parts():
        if t.is_floating_point() and computes and t.dtype not in computes:
            want = next(iter(computes))
            raise TypeError(f"subset {data.name!r}: {label} is {t.dtype} but the model computes in "
                            f"{', '.join(sorted(map(str, computes)))}: convert the data (e.g. inputs.to({want})) or "
                            f"the model (model.to({t.dtype}))")


def _check_targets(data: Subset, task: Task) -> None:
    y = data.targets
    if task.kind in ("classification", "lm") and (y.is_floating_point() or y.is_complex() or y.dtype == torch.bool):
        what = "class indices" if task.kind == "classification" else "token ids"
        raise TypeError(f"subset {data.name!r}: targets are {y.dtype}, but Task({task.kind!r}) needs integer {what} "
                        f"(targets.long() if they are whole numbers)"
                        + (", or Task('regression') for real-valued targets" if task.kind == "classification" else ""))


def check_output(data: Subset, task: Task, out: torch.Tensor) -> None:
    """Raise if the targets of ``data`` do not fit the scored output ``out`` of the model on some of its
    samples (batch first): the number of classes or the vocabulary, the shapes."""
    y = data.targets
    if task.kind == "regression":
        if tuple(out.shape[1:]) != tuple(y.shape[1:]):
            raise ValueError(f"subset {data.name!r}: targets of shape {tuple(y.shape)} but the model outputs "
                             f"{tuple(out.shape[1:])} per sample: regression needs one target of the output's "
                             "shape per sample")
        return
    if task.kind == "classification":
        if out.dim() < 2 or tuple(out.shape[2:]) != tuple(y.shape[1:]):
            raise ValueError(f"subset {data.name!r}: classification needs logits (B, classes) and labels (B,) "
                             f"(or (B, classes, ...) and (B, ...)); the model outputs {tuple(out.shape)} for one "
                             f"sample, the targets are {tuple(y.shape)}")
        size, what = out.shape[1], "class"
    else:
        if out.dim() != 3 or y.dim() != 2 or out.shape[1] != y.shape[1]:
            raise ValueError(f"subset {data.name!r}: Task('lm') needs logits (B, T, vocabulary) and token ids "
                             f"(B, T) as targets; the model outputs {tuple(out.shape)} for one sample, the targets "
                             f"are {tuple(y.shape)}")
        size, what = out.shape[-1], "vocabulary"
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= size:
        raise ValueError(f"subset {data.name!r}: targets lie in [{lo}, {hi}] but the model has {size} "
                         f"{'classes' if what == 'class' else 'tokens in its vocabulary'}: targets must lie in "
                         f"[0, {size - 1}] (a model with {hi + 1} outputs, or labels counted from 0)")
