"""Where outputs and caches go: one cache root, resolved from the project the user runs in."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CACHE_ENV", "project_dir", "cache_root"]

CACHE_ENV = "SURROGATE_CACHE_DIR"


def project_dir() -> Path:
    """The nearest ancestor of the current working directory (itself included) that holds a
    ``pyproject.toml`` or ``.git``; the working directory itself if there is none. Resolved at call time,
    so a notebook run from ``notebooks/`` and a script run from the root share one project folder, and an
    installed package never writes next to its own source."""
    cwd = Path.cwd().resolve()
    for folder in (cwd, *cwd.parents):
        if (folder / "pyproject.toml").is_file() or (folder / ".git").exists():
            return folder
    return cwd


def cache_root() -> Path:
    """``$SURROGATE_CACHE_DIR`` if set (an empty value counts as unset), else ``project_dir() / "cache"``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else project_dir() / "cache"
