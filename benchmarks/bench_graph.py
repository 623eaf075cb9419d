"""Benchmark of the graph core (not a test): build time, masking overhead, and pruned-model cost.

    python benchmarks/bench_graph.py [--repeats 10] [--out build/bench/bench_graph.json]

Reports (1) graph build time per architecture, (2) ResNet-20 on a 256-image CIFAR-sized batch: plain
forward vs gated forward with one mask, and masks evaluated per second with batches of masks, (3) the
parameters / MACs / CPU latency of ResNet-20 before and after physically removing edges.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from surrogate import GatedModel, build_graph, prune
from surrogate.models import Block, CausalLMLogits, RandomGraphConfig, RandomGraphNet, gpt2_small_random, resnet20
from surrogate.profile import measure_cost


def timed(fn, repeats: int, warmup: int = 2) -> float:
    """Minimum wall time over repeats (the least noisy estimate on a shared 2-core machine)."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def interleaved(fns: dict, repeats: int) -> dict:
    """Time several functions round-robin so machine noise hits them alike; min and median seconds."""
    for fn in fns.values():
        fn()
    ts: dict = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            ts[k].append(time.perf_counter() - t)
    return {k: {"min_s": min(v), "median_s": statistics.median(v)} for k, v in ts.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default="build/bench/bench_graph.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    report: dict = {"machine": {"cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
                                "python": platform.python_version()}}

    # 1. graph build time
    import torchvision
    models = {
        "resnet20": (resnet20().eval(), torch.randn(2, 3, 32, 32), {}),
        "resnet18": (torchvision.models.resnet18().eval(), torch.randn(2, 3, 224, 224), {}),
        "random_graph_30": (RandomGraphNet(RandomGraphConfig(iterations=30)).eval(), torch.randn(2, 16),
                            dict(vertices=(Block,), edges="all")),
        "gpt2_4layer": (CausalLMLogits(gpt2_small_random(n_layer=4, n_embd=128, n_head=4, vocab_size=50257,
                                                         n_positions=256)).eval(),
                        torch.randint(0, 50257, (2, 128)), {}),
    }
    report["build_seconds"] = {}
    for name, (model, x, kw) in models.items():
        t = time.perf_counter()
        g = build_graph(model, x, **kw)
        report["build_seconds"][name] = {"seconds": time.perf_counter() - t, "tracer": g.tracer,
                                         "vertices": len(g.vertices), "prunable_edges": g.num_prunable}

    # 2. masking overhead on ResNet-20, 256 CIFAR-sized images
    net = resnet20().eval()
    x = torch.randn(256, 3, 32, 32)
    graph = build_graph(net, x[:2])
    gated = GatedModel(graph)
    ones = torch.ones(graph.num_prunable)
    with torch.no_grad():
        some_cut = (torch.rand(graph.num_prunable, generator=torch.Generator().manual_seed(0)) < 0.8).float()
        tt = interleaved({"plain": lambda: net(x), "gated": lambda: gated(x, mask=ones),
                          "gated_20pct_cut": lambda: gated(x, mask=some_cut)},
                         args.repeats)
        t_plain, t_gated = tt["plain"]["min_s"], tt["gated"]["min_s"]
        batches = {}
        for m in (1, 4, 8):  # M masks x 256 images in one pass
            masks = (torch.rand(m, graph.num_prunable) < 0.8).float()
            t = timed(lambda: gated(x, mask=masks), max(3, args.repeats // m))
            batches[m] = {"seconds_per_pass": t, "masks_per_second": m / t}
    report["resnet20_masking"] = {
        "batch": 256, "timings": tt, "plain_forward_s": t_plain, "gated_forward_s": t_gated,
        "overhead_percent": 100 * (t_gated / t_plain - 1), "masks_per_second_256_images": 1 / t_gated,
        "mask_batches_256_images_each": batches,
        "note": "M masks are evaluated as one batch of M*256 images; on this CPU large convolution batches are "
                "memory-bound, so per-mask throughput drops for M > 1 (it is the same for the plain model)"}

    # 3. pruned-model cost: remove the three residual branches of stage 3, then half the branches
    xb = torch.randn(64, 3, 32, 32)
    stage3 = [e.name for e in graph.prunable if e.src.startswith("layer3") and e.src.endswith("bn2")]
    every_other = [e.name for e in graph.prunable if e.src.endswith("bn2")][1::2]
    report["resnet20_pruning"] = {}
    for label, removed in (("none", []), ("stage3_branches", stage3), ("every_other_branch", every_other)):
        c = measure_cost(prune(graph, graph.mask_from_removed(removed)), xb, repeats=args.repeats)
        report["resnet20_pruning"][label] = {"removed": removed, "params": c.params, "macs_per_image": c.macs // 64,
                                            "latency_ms_64_images": c.latency_ms}

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
