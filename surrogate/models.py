"""Models the paper studies: random-graph MLPs, CIFAR ResNet-20, and a logits wrapper for HF causal LMs."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["RandomGraphConfig", "RandomGraphNet", "Block", "random_graph_spec", "resnet20",
           "CausalLMLogits", "gpt2_small_random"]


# ----------------------------------------------------------------------------------------------------
# random-graph MLPs (the synthetic study)

@dataclass(frozen=True)
class RandomGraphConfig:
    iterations: int = 5      # generator iterations; 2 / 5 / 14 / 30 give ~10-15 / 20-40 / 50-100 / >100 edges
    in_features: int = 16    # input dimension
    num_classes: int = 8     # output dimension
    width: int = 32          # width of every hidden block
    end_width: int = 16      # width of the end blocks that connect hanging vertices to the classifier
    seed: int = 0            # seed of the graph structure (weights are seeded separately)


def random_graph_spec(config: RandomGraphConfig) -> list[tuple[str, tuple[str, ...]]]:
    """The vertices (name, parents) of a random graph, in topological order.

    Start with input -> n0. Each iteration picks two parents (with replacement) among the existing hidden
    vertices, gives each a new vertex, and merges the two new vertices into a third. Every vertex without
    children then gets an end block; the classifier sums the end blocks.
    """
    rng = np.random.default_rng(config.seed)
    spec: list[tuple[str, tuple[str, ...]]] = [("n0", ("input",))]
    for _ in range(config.iterations):
        hidden = [name for name, _ in spec]
        p1, p2 = (hidden[i] for i in rng.integers(0, len(hidden), size=2))
        k = len(spec)
        a, b, c = f"n{k}", f"n{k + 1}", f"n{k + 2}"
        spec += [(a, (p1,)), (b, (p2,)), (c, (a, b))]
    used = {p for _, parents in spec for p in parents}
    hanging = [name for name, _ in spec if name not in used]
    spec += [(f"end{i}", (h,)) for i, h in enumerate(hanging)]
    return spec


class Block(nn.Module):
    """A vertex of the random graph: h = act(W * sum(inputs) + b)."""

    def __init__(self, fan_in: int, fan_out: int, act: bool = True):
        super().__init__()
        self.linear = nn.Linear(fan_in, fan_out)
        self.act = nn.ReLU() if act else nn.Identity()

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        h = inputs[0]
        for x in inputs[1:]:
            h = h + x
        return self.act(self.linear(h))


class RandomGraphNet(nn.Module):
    """MLP whose layers form a random DAG (random_graph_spec). Vertices are the Block modules:
    build its graph with ``build_graph(net, x, vertices=(Block,), edges="all")``."""

    def __init__(self, config: RandomGraphConfig):
        super().__init__()
        self.config = config
        self.spec = random_graph_spec(config)
        self.nodes = nn.ModuleDict()
        for name, parents in self.spec:
            fan_in = config.in_features if parents == ("input",) else config.width
            self.nodes[name] = Block(fan_in, config.end_width if name.startswith("end") else config.width)
        self.ends = [name for name, _ in self.spec if name.startswith("end")]
        self.head = Block(config.end_width, config.num_classes, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in_features) -> (B, num_classes)
        h = {"input": x}
        for name, parents in self.spec:
            h[name] = self.nodes[name](*[h[p] for p in parents])
        return self.head(*[h[e] for e in self.ends])


# ----------------------------------------------------------------------------------------------------
# CIFAR ResNet-20 (He et al. 2016, option-A shortcuts: 0.27M parameters)

class PadShortcut(nn.Module):
    """Parameter-free downsampling shortcut: stride-2 subsampling and zero channel padding."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.extra = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::2, ::2]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = PadShortcut(c_out - c_in) if stride != 1 or c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    def __init__(self, depth: int = 20, num_classes: int = 10, width: int = 16):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56), got {depth}")
        n = (depth - 2) // 6
        self.conv = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        layers, c = [], width
        for stage, c_out in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(c, c_out, 2 if stage > 0 and i == 0 else 1))
                c = c_out
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(c, num_classes)
        for mod in self.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(mod.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 32, 32) -> (B, classes)
        x = F.relu(self.bn(self.conv(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def resnet20(num_classes: int = 10) -> ResNetCifar:
    return ResNetCifar(20, num_classes)


# ----------------------------------------------------------------------------------------------------
# Hugging Face causal language models

class CausalLMLogits(nn.Module):
    """input_ids (B, T) -> logits (B, T, V) for a transformers causal LM, without a KV cache.

    Tracing needs plain tensors in and out; this wrapper gives torch.export exactly that."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, use_cache=False).logits


def gpt2_small_random(n_layer: int = 2, n_head: int = 2, n_embd: int = 32, vocab_size: int = 128,
                      n_positions: int = 64, seed: int = 0) -> nn.Module:
    """A randomly initialised GPT2LMHeadModel of the given (small) size, for tests and offline runs."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab_size,
                     n_positions=n_positions)
    return GPT2LMHeadModel(cfg).eval()
