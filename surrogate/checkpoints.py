"""Shipped checkpoints: the paper's trained networks, tracked in ``checkpoints/`` with a manifest.

A trained network lives in the git-ignored cache under ``<cache>/<kind>/<hash>.pt`` (``train.cached_model``, the
hash of every configuration that determines its weights). The networks the paper uses are also *shipped*: copied
to ``<project>/checkpoints/<kind>/<hash>.pt`` (language models in bfloat16), with one manifest entry each
(``checkpoints/manifest.json``: name, configuration, training command, sha256, test metrics, machine, wall time).
``cached_model`` reads a shipped checkpoint before it trains anything, so a fresh clone measures the paper's
networks without retraining them. ``SURROGATE_RETRAIN=1`` ignores shipped checkpoints (the weights are trained
again into the cache; ``compare_with_manifest`` then checks the new metrics against the shipped ones).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from .paths import atomic_path, atomic_write, project_dir

__all__ = ["CHECKPOINT_ENV", "RETRAIN_ENV", "checkpoint_root", "shipped_path", "retraining", "load_manifest",
           "ship", "sha256_of"]

CHECKPOINT_ENV = "SURROGATE_CHECKPOINT_DIR"
RETRAIN_ENV = "SURROGATE_RETRAIN"
MANIFEST = "manifest.json"


def checkpoint_root() -> Path:
    """``$SURROGATE_CHECKPOINT_DIR`` if set (non-empty), else ``<project>/checkpoints``."""
    env = os.environ.get(CHECKPOINT_ENV)
    return Path(env).expanduser() if env else project_dir() / "checkpoints"


def retraining() -> bool:
    """True when ``$SURROGATE_RETRAIN`` is set to a non-empty value other than 0: shipped checkpoints are ignored."""
    return os.environ.get(RETRAIN_ENV, "") not in ("", "0")


def shipped_path(kind: str, name: str) -> Path:
    """Where the shipped copy of cache entry ``<kind>/<name>`` lives (it may not exist)."""
    return checkpoint_root() / kind / name


def sha256_of(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_manifest(root: Path | None = None) -> dict[str, dict[str, Any]]:
    """The manifest's entries by network name ({} when there is none)."""
    path = (root or checkpoint_root()) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else {}


def _compact(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The state dict cast to ``dtype`` (floating tensors only), tensors that shared storage (tied embeddings)
    still shared, so that each is stored once."""
    done: dict[tuple[int, int], torch.Tensor] = {}
    out = {}
    for k, v in state.items():
        if dtype is None or not v.is_floating_point():
            out[k] = v
            continue
        ident = (v.untyped_storage().data_ptr(), v.storage_offset())
        if ident not in done:
            done[ident] = v.detach().to(dtype).clone()
        out[k] = done[ident]
    return out


def ship(cached: str | os.PathLike[str], name: str, entry: dict[str, Any], *, dtype: torch.dtype | None = None,
         root: Path | None = None) -> Path:
    """Copy the cache checkpoint ``cached`` (``<cache>/<kind>/<hash>.pt``) into the checkpoint folder (floating
    weights cast to ``dtype``, e.g. torch.bfloat16 for language models) and record ``entry`` (configuration,
    command, metrics, ...) under ``name`` in the manifest, with the file's path and sha256. Both writes are
    atomic; the manifest is written last, so a failure leaves at most an unlisted file behind."""
    cached = Path(cached)
    root = root or checkpoint_root()
    dest = root / cached.parent.name / cached.name
    blob = torch.load(cached, map_location="cpu", weights_only=True)
    blob["state_dict"] = _compact(blob["state_dict"], dtype)
    with atomic_path(dest) as tmp:
        torch.save(blob, tmp)
    manifest = load_manifest(root)
    manifest[name] = {**entry, "file": dest.relative_to(root).as_posix(), "sha256": sha256_of(dest),
                      "bytes": dest.stat().st_size, "dtype": str(dtype or "float32").replace("torch.", "")}
    atomic_write(root / MANIFEST, json.dumps(dict(sorted(manifest.items())), indent=1, sort_keys=True) + "\n")
    return dest
