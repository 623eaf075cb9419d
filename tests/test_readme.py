"""Every Python snippet of the README runs as written, in order, in one namespace (as a reader would paste
them into one session)."""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_snippets():
    assert len(_snippets()) >= 4


def test_readme_snippets_run(capsys):
    namespace: dict = {"__name__": "readme"}
    for i, code in enumerate(_snippets()):
        try:
            exec(compile(code, f"README.md snippet {i + 1}", "exec"), namespace)
        except Exception as exc:  # name the snippet that failed
            raise AssertionError(f"README snippet {i + 1} failed: {type(exc).__name__}: {exc}\n{code}") from exc
    out = capsys.readouterr().out
    assert "prunable=18" in out and "Spearman" in out
