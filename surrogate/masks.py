"""Mask designs: which pruned networks to measure (to fit a surrogate) or to test on."""
from __future__ import annotations

import itertools
import math
from typing import Sequence

import numpy as np

from .graph import ComputationGraph

__all__ = ["mask_key", "mask_text", "mask_from_text", "prior_design", "bernoulli_masks", "sparsity_masks",
           "exhaustive_masks", "all_masks_with_removed", "unique_rows"]


def mask_key(mask: Sequence[float] | np.ndarray) -> bytes:
    """A mask as bytes (its float32 values), to find it in a dict or a set whatever its dtype."""
    return np.asarray(mask, dtype=np.float32).tobytes()


def prior_design(num_edges: int) -> np.ndarray:
    """The prior protocol's |E|+2 fitting masks: all ones, all zeros, and every single edge removed."""
    return np.vstack([np.ones(num_edges), np.zeros(num_edges), 1 - np.eye(num_edges)]).astype(np.float32)


def bernoulli_masks(num_edges: int, n: int, keep_prob: float, seed: int) -> np.ndarray:
    """n masks with every edge kept independently with probability keep_prob (the prior test design)."""
    rng = np.random.default_rng(seed)
    return (rng.random((n, num_edges)) < keep_prob).astype(np.float32)


def sparsity_masks(graph: ComputationGraph, n: int, min_frac: float, max_frac: float, seed: int,
                   connected: bool = True, exclude: np.ndarray | None = None,
                   enumerate_limit: int = 50_000, allowed: np.ndarray | None = None,
                   counts: Sequence[int] | None = None) -> np.ndarray:
    """Up to n distinct masks removing between min_frac and max_frac of the removable edges (at least one),
    optionally only networks that keep an input->output path, and never a row of ``exclude`` (e.g. the
    fitting masks, so test masks are held out). Small spaces are enumerated and sampled without
    replacement (all of them if fewer than n exist); large ones are sampled uniformly per removal count.

    allowed: (E,) booleans, which edges may be removed (default: all); the fractions are of these.
    counts: exact numbers of removed edges to draw from (instead of the fractions)."""
    e = graph.num_prunable
    idx = np.arange(e) if allowed is None else np.flatnonzero(np.asarray(allowed, dtype=bool))
    a = len(idx)
    if counts is not None:
        ks = sorted({int(k) for k in counts})
        if not ks or ks[0] < 1 or ks[-1] > a:
            raise ValueError(f"removal counts {list(counts)} must lie in 1..{a} (the removable edges)")
    else:
        lo = max(1, math.ceil(min_frac * a))
        hi = max(lo, math.floor(max_frac * a))
        ks = list(range(lo, min(hi, a) + 1))
        if not ks:
            raise ValueError("no edge may be removed: check `allowed`")
    rng = np.random.default_rng(seed)
    seen = {mask_key(r) for r in (exclude if exclude is not None else [])}
    space = sum(math.comb(a, k) for k in ks)
    if space <= enumerate_limit:
        cand = np.vstack([_embed(all_masks_with_removed(a, k), idx, e) for k in ks])
        ok = np.array([mask_key(r) not in seen for r in cand])
        if connected:
            ok &= graph.connected(cand)
        cand = cand[ok]
        return cand[np.sort(rng.choice(len(cand), size=min(n, len(cand)), replace=False))]
    out: list[np.ndarray] = []
    for _ in range(200 * n):
        if len(out) == n:
            break
        k = int(rng.integers(ks[0], ks[-1] + 1)) if counts is None else int(rng.choice(ks))
        m = np.ones(e, dtype=np.float32)
        m[idx[rng.choice(a, size=k, replace=False)]] = 0
        key = mask_key(m)
        if key in seen or (connected and not graph.connected(m)):
            continue
        seen.add(key)
        out.append(m)
    if len(out) < n:
        raise RuntimeError(f"drew only {len(out)} of {n} distinct masks removing {ks[0]}-{ks[-1]} of {a} edges"
                           f"{' with a connected network' if connected else ''}; ask for fewer masks")
    return np.stack(out) if out else np.zeros((0, e), dtype=np.float32)


def _embed(masks: np.ndarray, idx: np.ndarray, num_edges: int) -> np.ndarray:
    """Masks over the edges ``idx`` as masks over all ``num_edges`` edges (the others kept)."""
    if len(idx) == num_edges:
        return masks
    out = np.ones((len(masks), num_edges), dtype=np.float32)
    out[:, idx] = masks
    return out


def exhaustive_masks(num_edges: int, counts: Sequence[int] | None = None,
                     allowed: np.ndarray | None = None) -> np.ndarray:
    """Every mask that removes ``counts`` (default: any number, 0 included) of the ``allowed`` edges and keeps
    the others, ordered by the number removed (e.g. all 2^9 masks over the 9 residual branches of a ResNet-20)."""
    idx = np.arange(num_edges) if allowed is None else np.flatnonzero(np.asarray(allowed, dtype=bool))
    ks = range(len(idx) + 1) if counts is None else sorted({int(k) for k in counts})
    return np.vstack([_embed(all_masks_with_removed(len(idx), k), idx, num_edges) for k in ks])


def all_masks_with_removed(num_edges: int, k: int, limit: int = 200_000) -> np.ndarray:
    """Every mask with exactly k edges removed (for exhaustive budgeted search on small graphs)."""
    count = math.comb(num_edges, k)
    if count > limit:
        raise ValueError(f"C({num_edges}, {k}) = {count} masks exceed the limit {limit}; use a search instead")
    out = np.ones((count, num_edges), dtype=np.float32)
    for row, idx in enumerate(itertools.combinations(range(num_edges), k)):
        out[row, list(idx)] = 0
    return out


def unique_rows(masks: np.ndarray) -> np.ndarray:
    """Rows in first-seen order without duplicates."""
    _, idx = np.unique(masks, axis=0, return_index=True)
    return masks[np.sort(idx)]


def mask_text(mask: Sequence[float] | np.ndarray) -> str:
    """A mask as a string of 0/1, one character per edge (as in the experiment records)."""
    return "".join(str(int(round(float(v)))) for v in np.asarray(mask).ravel())


def mask_from_text(text: str, num_edges: int | None = None) -> np.ndarray:
    """The inverse of ``mask_text``: a string of 0/1 (one character per edge) as a float32 mask; with
    ``num_edges``, its length is checked against the graph's prunable edges."""
    text = str(text).strip()
    if not text or set(text) - {"0", "1"}:
        raise ValueError(f"a mask as text is a string of 0 and 1, one per prunable edge; got {text[:60]!r}")
    if num_edges is not None and len(text) != num_edges:
        raise ValueError(f"mask {text!r} has {len(text)} entries; the graph has {num_edges} prunable edges")
    return np.frombuffer(text.encode(), dtype=np.uint8).astype(np.float32) - ord("0")
