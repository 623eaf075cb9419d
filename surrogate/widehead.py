"""The loss of a readout state through a wide output head, at a small fraction of the head's cost.

A language model's tail (``surrogate.readout.Tail``: final norm, then a linear head over the vocabulary) costs
about as much as the whole network of a small model: the head is |V| x d per token. A surrogate that answers a
query by running the true tail on a predicted state therefore costs nearly a measured pass per query.

``WideHeadLoss`` computes the cross-entropy of a state through such a tail from the head's input u (everything
before the head runs exactly: it is cheap) and, per predicted position t, the exact logits of K candidate classes
only: the target and the K - 1 classes the dense network ranks highest there. The rest of the partition function
is the dense network's, tilted by the change of u along the mean head row of the rest (the first cumulant):

    log sum_{v not in C_t} exp(w_v . u + b_v)  ~  log R_t + mu_t . (u - u_t),
    R_t = sum_{v not in C_t} exp(w_v . u_t + b_v),   mu_t = the softmax-weighted mean of w_v over v not in C_t,

with u_t the dense network's head input. It is exact at the dense state, and its error grows with the change of
u and with the probability mass that leaves the candidates. A query costs the tail before the head plus
2 K d FLOPs per position instead of 2 |V| d (``flops``).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from .tasks import Task
from .readout import Tail

__all__ = ["split_head", "WideHeadLoss"]

_LINEAR = {torch.ops.aten.linear.default, F.linear, torch._C._nn.linear}


def split_head(tail: Tail) -> tuple[fx.GraphModule, torch.Tensor, torch.Tensor | None] | None:
    """The tail up to the input of its final linear layer (a module taking ``(state, *inputs)``), the layer's
    weight (out, in) and bias, when the tail's only output is such a layer's output; else None."""
    gm = tail.module
    out = next(n for n in gm.graph.nodes if n.op == "output")
    res = out.args[0]
    while isinstance(res, (tuple, list)) and len(res) == 1:
        res = res[0]
    if not isinstance(res, fx.Node):
        return None
    if res.op == "call_function" and res.target in _LINEAR:
        x, w = res.args[0], res.args[1]
        b = res.args[2] if len(res.args) > 2 else res.kwargs.get("bias")
        fetch = lambda n: None if n is None else (gm.get_parameter(n.target) if n.op == "get_attr" else None)  # noqa: E731
        weight, bias = fetch(w), fetch(b)
        if weight is None or (b is not None and bias is None):
            return None
    elif res.op == "call_module" and isinstance(gm.get_submodule(res.target), torch.nn.Linear):
        layer = gm.get_submodule(res.target)
        x, weight, bias = res.args[0], layer.weight, layer.bias
    else:
        return None
    g = fx.Graph()
    env: dict[fx.Node, Any] = {}
    for n in gm.graph.nodes:
        if n.op == "output":
            break
        env[n] = g.node_copy(n, lambda p: env[p])
        if n is x:
            break
    g.output(env[x])
    g.eliminate_dead_code()
    return fx.GraphModule(gm, g), weight.detach(), None if bias is None else bias.detach()


class WideHeadLoss:
    """Mean cross-entropy of readout states through ``tail`` on fixed inputs and targets (module docstring).

    dense_state: the readout state of the dense network on ``inputs`` ((n, ...), as ``Tail`` takes it);
    inputs: the model's positional inputs of those samples (a tensor or a tuple: ``Subset.args(model)``);
    task: "lm" (next-token: position t predicts target t + 1) or "classification"; k: candidates per position."""

    def __init__(self, tail: Tail, dense_state: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor,
                 task: Task, k: int = 64, chunk: int = 1024):
        parts = split_head(tail)
        if parts is None:
            raise ValueError("the tail does not end in a linear layer: WideHeadLoss does not apply")
        if task.kind not in ("lm", "classification"):
            raise ValueError(f"WideHeadLoss computes cross-entropy; the task is {task.kind!r}")
        self.pre, w, b = parts
        self.inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
        self.task = task
        self.dtype = dense_state.dtype
        with torch.no_grad():
            u0, tgt = self._positions(self.pre(dense_state, *self.inputs)), self._targets(targets)
            w, b = w.float(), (torch.zeros(w.shape[0]) if b is None else b.float())
            k = min(k, w.shape[0])
            cands, log_rest, mu = [], [], []
            for c0 in range(0, len(u0), chunk):
                z = u0[c0:c0 + chunk] @ w.T + b
                t = tgt[c0:c0 + chunk]
                z_t = z.gather(1, t[:, None])
                z.scatter_(1, t[:, None], float("-inf"))
                top = z.topk(k - 1, dim=1).indices
                cand = torch.cat([t[:, None], top], 1)
                z.scatter_(1, top, float("-inf"))  # z now holds the rest only
                log_rest.append(torch.logsumexp(z, 1))
                mu.append(torch.softmax(z, 1) @ w)
                cands.append(cand)
                del z_t
            self.cand = torch.cat(cands)
            self.w_cand, self.b_cand = w[self.cand], b[self.cand]          # (N, K, d), (N, K)
            self.log_rest, self.mu, self.u0 = torch.cat(log_rest), torch.cat(mu), u0

    def _positions(self, u: torch.Tensor) -> torch.Tensor:
        u = u.float()
        return (u[:, :-1] if self.task.kind == "lm" else u).reshape(-1, u.shape[-1])

    def _targets(self, targets: torch.Tensor) -> torch.Tensor:
        return (targets[:, 1:] if self.task.kind == "lm" else targets).reshape(-1).long()

    @torch.no_grad()
    def loss(self, state: torch.Tensor) -> float:
        """The mean loss of ``state`` ((n, ...), any float dtype) through the tail."""
        u = self._positions(self.pre(state.to(self.dtype), *self.inputs))
        z = torch.einsum("nd,nkd->nk", u, self.w_cand) + self.b_cand
        rest = self.log_rest + ((u - self.u0) * self.mu).sum(-1)
        lse = torch.logsumexp(torch.cat([z, rest[:, None]], 1), 1)
        return float((lse - z[:, 0]).double().mean())

    def flops(self, state: torch.Tensor) -> int:
        """FLOPs of one ``loss`` call (torch's counter for the tail before the head, plus the candidate logits)."""
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            self.pre(state.to(self.dtype), *self.inputs)
        n, k, d = self.w_cand.shape
        return counter.get_total_flops() + 2 * n * k * d
