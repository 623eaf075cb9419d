"""Where outputs and caches go (one cache root, resolved from the project the user runs in), and how every
file is written: atomically, so a failed run never leaves half a file behind."""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["CACHE_ENV", "project_dir", "cache_root", "atomic_path", "atomic_write"]

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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is deleted.

    The temporary file keeps ``path``'s suffix so tools that pick a format from the name still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates the file 0600; keep an existing file's mode, else the usual 0644
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike[str], data: str | bytes) -> None:
    """Write ``data`` to ``path`` atomically (str as UTF-8 with '\\n' line endings, unchanged)."""
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    with atomic_path(path) as tmp:
        tmp.write_bytes(raw)
