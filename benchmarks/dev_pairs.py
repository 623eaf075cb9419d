"""Development study (not a test, not the paper's numbers): pair corrections for the readout superposition on
a CIFAR ResNet development network (seed 100+). Caches truth and pair states in build/dev/."""
from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
import torch

from surrogate import MaskFamily, Subset, Task, build_graph
from surrogate.cifar import CifarConfig, cifar_resnet, cifar_splits
from surrogate.evaluate import evaluate_masks
from surrogate.experiment import within_k_spearman
from surrogate.gating import GatedModel
from surrogate.masks import prior_design
from surrogate.metrics import spearman
from surrogate.readout import find_readout
from surrogate.methods import Context, Measured
from surrogate.surrogates import SuperpositionSurrogate

BRANCHES = r"bn2 ->"

ap = argparse.ArgumentParser()
ap.add_argument("--seed", type=int, default=100)
ap.add_argument("--n-eval", type=int, default=1000)
args = ap.parse_args()
torch.set_num_threads(1)
out = Path("build/dev"); out.mkdir(parents=True, exist_ok=True)
cfg = CifarConfig()
splits = cifar_splits(cfg)
model, _ = cifar_resnet(cfg, seed=args.seed, splits=splits)
task = Task("classification")
scoring = splits["scoring"]
test = splits["test"]
idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(args.seed))[:args.n_eval]
evaluation = Subset("test", test.inputs[idx], test.targets[idx])
graph = build_graph(model, scoring.inputs[:2])
gated = GatedModel(graph)
e = graph.num_prunable
node = find_readout(gated)
print("readout", node, "edges", graph.edge_names)
fit = prior_design(e)
measured = Measured.of(fit, evaluate_masks(gated, fit, scoring, task, batch_size=500, keep_state=node))
ctx = Context(graph, gated, scoring, task, measured, seed=args.seed, batch_size=100)

fam = {"branches": MaskFamily("branches", "exhaustive", edges=BRANCHES, holdout=False),
       "realistic": MaskFamily("realistic", "removed", n=200, counts=(1, 2, 3, 4))}
tf = out / f"truth_{args.seed}_{args.n_eval}.npz"
if tf.exists():
    z = np.load(tf)
    tests = {p: z[f"{p}_m"] for p in fam}
    truth = {p: (z[f"{p}_l"], z[f"{p}_a"]) for p in fam}
else:
    tests = {p: f.draw(graph, 7 + i, exclude=fit) for i, (p, f) in enumerate(fam.items())}
    truth = {}
    for p, m in tests.items():
        r = evaluate_masks(gated, m, evaluation, task, batch_size=500, strategy="prefix", log=print)
        truth[p] = (r.loss, r.accuracy)
    np.savez(tf, **{f"{p}_m": tests[p] for p in fam}, **{f"{p}_l": truth[p][0] for p in fam},
             **{f"{p}_a": truth[p][1] for p in fam})

pairs = list(itertools.combinations(range(e), 2))
pm = np.ones((len(pairs), e), dtype=np.float32)
for r, (i, j) in enumerate(pairs):
    pm[r, [i, j]] = 0
pf = out / f"pairs_{args.seed}.pt"
if pf.exists():
    pair_state, pair_loss = torch.load(pf, weights_only=False)
else:
    res = evaluate_masks(gated, pm, scoring, task, batch_size=500, keep_state=node, masks_per_pass=1, log=print)
    pair_state, pair_loss = res.extra["state"], res.loss
    torch.save((pair_state, pair_loss), pf)

sur = SuperpositionSurrogate(ctx, readout="auto").fit(measured)
coef_p = sur.coefficients(pm)
inter = pair_state.double() - (sur.y1 + torch.tensordot(coef_p, sur.dy, dims=1))  # (P, n, ...)
inter_norm = inter.flatten(1).norm(dim=1)
print("pair interaction norms: median %.3g max %.3g; single change norms median %.3g" % (
    inter_norm.median(), inter_norm.max(), sur.dy.flatten(1).norm(dim=1).median()))


def predict(masks, alpha, allowed_pairs=None, cap=None):
    m = np.asarray(masks)
    coef = sur.coefficients(m)
    outl = np.empty(len(m))
    for t, row in enumerate(m):
        h = sur.y1 + torch.tensordot(coef[t], sur.dy, dims=1)
        rem = np.flatnonzero(row < 0.5)
        r = len(rem)
        if r >= 2 and alpha is not None:
            idxs = [pairs.index((i, j)) for i, j in itertools.combinations(rem, 2)
                    if allowed_pairs is None or (i, j) in allowed_pairs]
            if idxs:
                a = alpha(r)
                h = h + a * inter[idxs].sum(0)
        outl[t] = sur._loss(h, scoring.targets)
    return outl


import sys
dn = sur.dy.flatten(1).norm(dim=1).numpy()
single_loss = ctx.single_edge_losses() - ctx.base_loss()
branch = np.array(["bn2 ->" in n for n in graph.edge_names])
def top(score, n):
    order = np.argsort(-np.asarray(score))[:n]
    return {pairs[t] for t in order}
sel = {
    "all153": None,
    "branch36": {(i, j) for i, j in pairs if branch[i] and branch[j]},
    "normprod18": top([dn[i] * dn[j] for i, j in pairs], 18),
    "normprod36": top([dn[i] * dn[j] for i, j in pairs], 36),
    "lossprod36": top([abs(single_loss[i] * single_loss[j]) for i, j in pairs], 36),
    "oracle36": top(inter_norm.numpy(), 36),
}
rule = {"1/(r-1)": lambda r: 1.0 / (r - 1), "2/r": lambda r: 2.0 / r, "mean": lambda r: 2.0 / (r * (r - 1))}
variants = {}
for sn, rn in [("branch36", "2/r"), ("branch36", "1/(r-1)"), ("normprod18", "2/r"), ("oracle36", "2/r"),
               ("lossprod36", "2/r")]:
    variants[f"{sn} {rn}"] = (rule[rn], sel[sn])
for name, (alpha, allowed) in variants.items():
    row = [name]
    for p in fam:
        m = tests[p]
        with torch.no_grad():
            yhat = predict(m, alpha, allowed)
        y, acc = truth[p]
        k = (m == 0).sum(1)
        row += [f"{p}: rho {spearman(yhat, y):.3f} wk {within_k_spearman(yhat, y, k):.3f}"]
        if p == "branches":
            gaps = []
            for kk in range(1, 7):
                sel_ = np.flatnonzero(k == kk)
                gaps.append(100 * (acc[sel_].max() - acc[sel_[np.argmin(yhat[sel_])]]))
            row += ["gaps " + " ".join(f"{g:.1f}" for g in gaps) + f" mean {np.mean(gaps):.2f}"]
    print(" | ".join(row), flush=True)
