"""The committed paper: every result number comes from paper/generated/, every macro and figure it uses exists."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAIN = ROOT / "paper" / "main.tex"

# Numbers the text may type itself: configuration and data facts stated once in the setup (a temperature, a
# learning rate, the size of the data), design targets, the significance level, and the published reference accuracies. Anything else
# that looks like a measured number must be a generated macro.
ALLOWED = {"0.05", "0.1", "0.2", "0.5", "0.8", "10--30%", "5.8", "10%", "5--25%", "91--93%", "50{,}000", "5{,}000", "50{,}257", "287{,}644"}


def _body() -> str:
    text = MAIN.read_text()
    body = text[text.index(r"\begin{document}"):]
    body = re.sub(r"(?<!\\)%.*", "", body)                                   # comments
    body = re.sub(r"\\(genfig|includegraphics)(\[[^]]*\])?\{[^}]*\}(\{[^}]*\})?", "", body)  # widths
    body = re.sub(r"\\(texttt|label|ref|eqref|cite[pt]?|url)\{[^}]*\}", "", body)
    return body.replace("$--$", "--")


def test_no_typed_result_numbers():
    typed = re.findall(r"(?<![\w.\-])\d+(?:\.\d+|(?:\{,\}\d{3})+)(?:--\d+(?:\.\d+)?)?\\?%?|(?<![\w.\-])\d+(?:--\d+)?\\%",
                       _body())
    found = {t.replace("\\%", "%") for t in typed}
    assert found <= ALLOWED, f"numbers typed in paper/main.tex instead of generated macros: {sorted(found - ALLOWED)}"


def _macros_defined() -> set[str]:
    names: set[str] = set()
    for f in (ROOT / "paper" / "generated").glob("*.tex"):
        names |= set(re.findall(r"\\newcommand\{\\([A-Za-z]+)\}", f.read_text()))
    return names


@pytest.mark.parametrize("prefix", ["Syn", "Cif", "Lm"])
def test_every_macro_the_text_uses_is_generated(prefix):
    used = {m for m in re.findall(r"\\val\{([A-Za-z]+)\}", _body()) if m.startswith(prefix)}
    assert used, f"the paper uses no {prefix} macro"
    missing = sorted(used - _macros_defined())
    assert not missing, f"\\val of macros no notebook generates: {missing}"


@pytest.mark.parametrize("notebook", ["01", "02", "03"])
def test_every_figure_and_table_of_a_notebook_exists(notebook):
    text = MAIN.read_text()
    figs = [f for f in re.findall(r"\\genfig\{([^}]+)\}", text) if f.startswith(notebook)]
    tables = [t for t in re.findall(r"\\(?:gentable|generated)\{([^}]+)\}", text) if t.startswith(notebook)]
    assert figs or tables, f"the paper shows nothing of notebook {notebook}"
    assert not [f for f in figs if not (ROOT / "figures" / f).is_file()], "a \\genfig file is missing"
    assert not [t for t in tables if not (ROOT / "paper" / "generated" / t).is_file()], "a generated file is missing"


def test_nothing_is_left_to_be_written():
    assert "tbw{" not in _body(), "the paper still has 'to be written' parts"


@pytest.mark.parametrize("needle", ["ivanov2024fewshot"])
def test_prior_work_is_cited(needle):
    assert f"{{{needle}" in (ROOT / "paper" / "references.bib").read_text() and needle in MAIN.read_text()


def test_every_bibliography_entry_is_cited():
    keys = re.findall(r"@\w+\{([^,]+),", (ROOT / "paper" / "references.bib").read_text())
    cited = set()
    for group in re.findall(r"\\cite[pt]?\*?(?:\[[^]]*\])?\{([^}]+)\}", MAIN.read_text()):
        cited |= {k.strip() for k in group.split(",")}
    assert not sorted(set(keys) - cited), f"never cited: {sorted(set(keys) - cited)}"


@pytest.mark.skipif(__import__("shutil").which("latexmk") is None, reason="needs TeX (scripts/ensure_tex.sh)")
def test_the_paper_compiles_to_the_same_bytes_wherever_it_is_built(tmp_path):
    import hashlib
    import subprocess
    digests = set()
    for out in ("a", "b"):
        subprocess.run(["latexmk", "-pdf", "-interaction=nonstopmode", "-halt-on-error", f"-outdir={tmp_path / out}",
                        "main.tex"], cwd=ROOT / "paper", check=True, capture_output=True, timeout=600)
        digests.add(hashlib.sha256((tmp_path / out / "main.pdf").read_bytes()).hexdigest())
    assert len(digests) == 1
