"""Datasets: a synthetic teacher task, CIFAR-10, WikiText-2 and the GPT-2 tokenizer.

The real loaders (torchvision / ``datasets`` / ``transformers``) are used unless a data folder is given,
either as ``data_dir`` or through the environment variable ``SURROGATE_DATA_DIR``. That folder holds the
offline copies described in ``shared/data/README.md``: ``cifar10/cifar10_jpeg.npz`` (a JPEG q75 copy of
CIFAR-10: close to, not identical with, the lossless original), ``wikitext-2/wiki.{split}.raw`` and
``gpt2-tokenizer/{vocab.json,merges.txt}``. A loader never switches to the offline copies on its own.
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .paths import atomic_path, cache_root

__all__ = ["DATA_DIR_ENV", "resolve_data_dir", "data_cache_dir",
           "TeacherTaskConfig", "TeacherTask", "make_teacher_task", "teacher_logits",
           "CIFAR10_MEAN", "CIFAR10_STD", "load_cifar10", "normalize_cifar", "cifar_augment", "subset",
           "WIKITEXT2_SPLITS", "load_wikitext2", "load_gpt2_tokenizer"]

DATA_DIR_ENV = "SURROGATE_DATA_DIR"

Split = tuple[torch.Tensor, torch.Tensor]  # (inputs, int64 labels)


def data_cache_dir() -> Path:
    """Where decoded datasets are cached: ``<cache root>/data`` (``surrogate.paths.cache_root``, so
    ``$SURROGATE_CACHE_DIR`` if set, else ``cache/`` in the project folder), resolved at call time."""
    return cache_root() / "data"


def resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> Path | None:
    """The offline data folder: ``data_dir`` if given, else ``$SURROGATE_DATA_DIR``, else None (go online)."""
    source = "the data_dir argument"
    if data_dir is None:
        # An empty variable counts as unset, so `SURROGATE_DATA_DIR= cmd` switches the offline copies off.
        data_dir = os.environ.get(DATA_DIR_ENV) or None
        source = f"the environment variable {DATA_DIR_ENV}"
    if data_dir is None:
        return None
    path = Path(data_dir).expanduser().resolve()
    if not path.is_dir():
        raise FileNotFoundError(
            f"data folder {path} (from {source}) does not exist. Point it at the folder holding the offline "
            f"copies (cifar10/, wikitext-2/, gpt2-tokenizer/), or pass data_dir=None and unset {DATA_DIR_ENV} "
            "to use the online loaders.")
    return path


def _require_file(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(
            f"expected the offline file {path}, which does not exist. Pass data_dir (or set {DATA_DIR_ENV}) "
            "to a folder laid out like shared/data (see its README.md).")
    return path


def _online_error(what: str, offline_layout: str, exc: BaseException) -> RuntimeError:
    return RuntimeError(
        f"could not load {what} online ({type(exc).__name__}: {exc}). Without network access, pass data_dir "
        f"or set {DATA_DIR_ENV} to a folder containing {offline_layout}.")


# --------------------------------------------------------------------------------------------------------
# Synthetic teacher task: labels sampled from a random MLP, so the Bayes error is non-zero and a student
# that drives its training loss to zero is overfitting.

@dataclass(frozen=True)
class TeacherTaskConfig:
    in_features: int = 16  # x ~ N(0, I_in_features)
    num_classes: int = 8
    hidden: int = 64  # width of the teacher's single tanh layer
    # Label noise. Bayes accuracy (the teacher's argmax) is 0.76-0.79 on seeds 0-4; an MLP trained on
    # n_train reaches ~0.61-0.64 and falls to ~0.60 once it fits the training labels exactly.
    temperature: float = 0.2
    n_train: int = 4000
    n_val: int = 1000  # early stopping / model selection
    n_score: int = 1000  # data on which pruning scores and surrogate targets are computed
    n_test: int = 5000
    seed: int = 0


@dataclass(frozen=True)
class TeacherTask:
    train: Split  # X float32 (N, in_features), y int64 (N,)
    val: Split
    score: Split
    test: Split


_SPLIT_NAMES = ("train", "val", "score", "test")


def _generators(seed: int, n: int) -> list[torch.Generator]:
    """Independent streams, so changing one split's size leaves the teacher and the other splits unchanged."""
    states = [s.generate_state(2, dtype=np.uint32) for s in np.random.SeedSequence(seed).spawn(n)]
    return [torch.Generator().manual_seed(int(a) << 32 | int(b)) for a, b in states]


def _teacher_weights(config: TeacherTaskConfig, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    d, h, c = config.in_features, config.hidden, config.num_classes
    # Pre-activations ~ N(0, 4 + 0.25): tanh saturates often enough that the task is not linearly separable.
    w1 = torch.randn(d, h, generator=gen) * (2.0 / math.sqrt(d))
    b1 = torch.randn(h, generator=gen) * 0.5
    w2 = torch.randn(h, c, generator=gen) / math.sqrt(h)
    return w1, b1, w2


def teacher_logits(config: TeacherTaskConfig, x: torch.Tensor) -> torch.Tensor:
    """The teacher's logits (before the temperature) for inputs x (N, in_features); argmax is Bayes-optimal."""
    w1, b1, w2 = _teacher_weights(config, _generators(config.seed, 1 + len(_SPLIT_NAMES))[0])
    return torch.tanh(x @ w1 + b1) @ w2  # (N, num_classes)


def make_teacher_task(config: TeacherTaskConfig = TeacherTaskConfig()) -> TeacherTask:
    """Sample the train/val/score/test splits of the teacher task; fully determined by ``config``."""
    if config.temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {config.temperature}")
    gens = _generators(config.seed, 1 + len(_SPLIT_NAMES))[1:]
    sizes = (config.n_train, config.n_val, config.n_score, config.n_test)
    splits = {}
    for name, n, gen in zip(_SPLIT_NAMES, sizes, gens):
        x = torch.randn(n, config.in_features, generator=gen)
        probs = torch.softmax(teacher_logits(config, x) / config.temperature, dim=-1)
        y = torch.multinomial(probs, 1, generator=gen).squeeze(1) if n else torch.zeros(0, dtype=torch.long)
        splits[name] = (x, y)
    return TeacherTask(**splits)


# --------------------------------------------------------------------------------------------------------
# CIFAR-10

# Per-channel mean and (per-pixel) std of the lossless training set; the JPEG copy matches the means to 1e-3.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

_CIFAR_KEYS = ("train_x", "train_y", "test_x", "test_y")
_CIFAR_CACHE_VERSION = b"cifar10-nchw-v1"  # bump when the decoded layout changes


def normalize_cifar(x: torch.Tensor) -> torch.Tensor:
    """uint8 images (..., 3, H, W) -> float32, standardized per channel."""
    mean = torch.tensor(CIFAR10_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(CIFAR10_STD, device=x.device).view(3, 1, 1)
    return (x.float() / 255 - mean) / std


def cifar_augment(x: torch.Tensor, gen: torch.Generator, padding: int = 4) -> torch.Tensor:
    """The standard CIFAR training augmentation of a float batch (N, C, H, W): a random H x W crop of the
    image zero-padded by ``padding`` pixels on every side (zero is the mean colour once normalized), then a
    horizontal flip with probability 1/2; per image, drawn from ``gen`` (a CPU generator), on x's device."""
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"cifar_augment takes a float batch (N, C, H, W), got {x.dtype} of shape "
                         f"{tuple(x.shape)}; normalize first (normalize_cifar)")
    n, _, h, w = x.shape
    shift = torch.randint(0, 2 * padding + 1, (2, n), generator=gen).to(x.device)  # crop corner (dy, dx)
    flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    rows = (shift[0, :, None] + torch.arange(h, device=x.device))[:, :, None]            # (N, H, 1)
    cols = shift[1, :, None] + torch.arange(w, device=x.device)                          # (N, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, :]                     # (N, 1, W)
    out = padded[torch.arange(n, device=x.device)[:, None, None], :, rows, cols]         # (N, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def subset(images: torch.Tensor, labels: torch.Tensor, n: int, seed: int) -> Split:
    """A seeded random subset of n examples; the sets for one seed are nested (n=100 is a prefix of n=200)."""
    if not 0 <= n <= len(labels):
        raise ValueError(f"cannot take {n} of {len(labels)} examples; choose 0 <= n <= {len(labels)}")
    idx = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:n]
    return images[idx], labels[idx]


def _file_key(path: Path, chunk: int = 1 << 20) -> str:
    """Cheap content key: size plus first and last MB (hashing all 62 MB each load would cost more)."""
    size = path.stat().st_size
    h = hashlib.sha256(_CIFAR_CACHE_VERSION + str(size).encode())
    with path.open("rb") as f:
        h.update(f.read(chunk))
        f.seek(max(size - chunk, 0))
        h.update(f.read(chunk))
    return h.hexdigest()[:16]


def _save_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write atomically, so readers (or concurrent builders) never see a partial file."""
    with atomic_path(path) as tmp:
        with tmp.open("wb") as f:
            np.savez(f, **arrays)


def _cached_arrays(path: Path, build: Callable[[], dict[str, np.ndarray]],
                   keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Load the arrays cached at ``path``; build and cache them if missing, rebuild if corrupt."""
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}  # reading every member checks its CRC
            if set(arrays) == set(keys):
                return arrays
            problem = f"has keys {sorted(arrays)}, expected {sorted(keys)}"
        except Exception as exc:  # noqa: BLE001 - any failure to read means the file is unusable
            problem = f"failed to load ({type(exc).__name__}: {exc})"
        warnings.warn(f"cache file {path} {problem}; deleting and rebuilding it", RuntimeWarning, stacklevel=2)
        path.unlink(missing_ok=True)
    arrays = build()
    _save_npz_atomic(path, arrays)
    return arrays


def _decode_cifar_npz(path: Path) -> dict[str, np.ndarray]:
    """Decode the offline JPEG copy into NCHW uint8 arrays, keeping the file's (split, class) order."""
    from PIL import Image

    with np.load(path, allow_pickle=False) as z:
        jpeg, offsets, y, split = z["jpeg"], z["offsets"], z["y"], z["split"]
    images = np.empty((len(y), 32, 32, 3), dtype=np.uint8)
    for i in range(len(y)):
        buf = io.BytesIO(jpeg[offsets[i]:offsets[i + 1]].tobytes())
        images[i] = np.asarray(Image.open(buf).convert("RGB"))
    images = np.ascontiguousarray(images.transpose(0, 3, 1, 2))  # (N, 3, 32, 32)
    train, test = split == 0, split == 1
    return {"train_x": images[train], "train_y": y[train].astype(np.int64),
            "test_x": images[test], "test_y": y[test].astype(np.int64)}


def _download_cifar(root: Path) -> dict[str, np.ndarray]:
    try:
        from torchvision.datasets import CIFAR10

        sets = {name: CIFAR10(root=str(root), train=name == "train", download=True) for name in ("train", "test")}
    except Exception as exc:  # noqa: BLE001 - every failure here has the same remedy
        raise _online_error("CIFAR-10 with torchvision", "cifar10/cifar10_jpeg.npz", exc) from exc
    arrays = {}
    for name, ds in sets.items():
        arrays[f"{name}_x"] = np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2))
        arrays[f"{name}_y"] = np.asarray(ds.targets, dtype=np.int64)
    return arrays


def load_cifar10(data_dir: str | os.PathLike[str] | None = None,
                 cache_dir: str | os.PathLike[str] | None = None) -> dict[str, Split]:
    """CIFAR-10 as {"train": (images, labels), "test": ...}: uint8 (N, 3, 32, 32) and int64 (N,).

    Offline, the examples are sorted by class (use ``subset`` or shuffle before slicing) and the pixels are
    the JPEG q75 copy; online they come from torchvision in the original order.
    """
    folder = resolve_data_dir(data_dir)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else data_cache_dir()
    if folder is None:
        arrays = _download_cifar(cache / "torchvision")
    else:
        src = _require_file(folder / "cifar10" / "cifar10_jpeg.npz")
        target = cache / f"cifar10_jpeg_{_file_key(src)}.npz"
        arrays = _cached_arrays(target, lambda: _decode_cifar_npz(src), _CIFAR_KEYS)
    return {name: (torch.from_numpy(arrays[f"{name}_x"]), torch.from_numpy(arrays[f"{name}_y"]).long())
            for name in ("train", "test")}


# --------------------------------------------------------------------------------------------------------
# WikiText-2 and GPT-2

WIKITEXT2_SPLITS = ("train", "validation", "test")
_WIKITEXT_FILES = {"train": "train", "validation": "valid", "test": "test"}


def _raw_rows(path: Path) -> list[str]:
    """The rows of the Hugging Face dataset: each line with its newline, blank lines as ''.

    This mirrors the ``datasets`` wikitext script; it is what makes the HF perplexity guide's join give
    287,644 GPT-2 tokens on the test split (dropping the newlines would give 286,220).
    """
    with path.open(encoding="utf-8") as f:
        return [line if line.strip() else "" for line in f]


def load_wikitext2(split: str, data_dir: str | os.PathLike[str] | None = None) -> str:
    """The raw text of a WikiText-2 split, joined as in the Hugging Face perplexity guide."""
    split = "validation" if split == "valid" else split
    if split not in WIKITEXT2_SPLITS:
        raise ValueError(f"unknown WikiText-2 split {split!r}; use one of {WIKITEXT2_SPLITS} ('valid' also works)")
    folder = resolve_data_dir(data_dir)
    if folder is not None:
        rows = _raw_rows(_require_file(folder / "wikitext-2" / f"wiki.{_WIKITEXT_FILES[split]}.raw"))
    else:
        try:
            from datasets import load_dataset

            rows = load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split=split)["text"]
        except Exception as exc:  # noqa: BLE001
            raise _online_error("WikiText-2 with datasets", "wikitext-2/wiki.{train,valid,test}.raw", exc) from exc
    return "\n\n".join(rows)


def _checked_gpt2(tokenizer: Any, source: str) -> Any:
    # transformers 5 can return an empty tokenizer instead of raising when the files are unreachable.
    ids = tokenizer("Hello world")["input_ids"]
    if len(tokenizer) != 50257 or ids != [15496, 995]:
        raise RuntimeError(
            f"the GPT-2 tokenizer from {source} is not GPT-2's ({len(tokenizer)} entries, 'Hello world' -> {ids}; "
            f"expected 50257 and [15496, 995]). Without network access, pass data_dir or set {DATA_DIR_ENV} to a "
            "folder containing gpt2-tokenizer/{vocab.json,merges.txt}.")
    return tokenizer


def load_gpt2_tokenizer(data_dir: str | os.PathLike[str] | None = None) -> Any:
    """GPT-2's BPE tokenizer (a ``transformers.GPT2TokenizerFast``), checked to be the real one."""
    from transformers import GPT2TokenizerFast

    folder = resolve_data_dir(data_dir)
    if folder is not None:
        tok_dir = folder / "gpt2-tokenizer"
        for name in ("vocab.json", "merges.txt"):
            _require_file(tok_dir / name)
        return _checked_gpt2(GPT2TokenizerFast.from_pretrained(str(tok_dir)), str(tok_dir))
    try:
        tokenizer = GPT2TokenizerFast.from_pretrained("gpt2")
    except Exception as exc:  # noqa: BLE001
        raise _online_error("the GPT-2 tokenizer", "gpt2-tokenizer/{vocab.json,merges.txt}", exc) from exc
    return _checked_gpt2(tokenizer, "the Hugging Face Hub ('gpt2')")
