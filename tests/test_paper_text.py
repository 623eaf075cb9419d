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
ALLOWED = {"0.01", "0.03", "0.05", "0.1", "0.2", "0.5", "0.8", "0.9", "10--30%", "5.8", "10%", "5--25%", "91--93%", "50{,}000",
           "5{,}000", "50{,}257", "287{,}644"}


def _body() -> str:
    text = MAIN.read_text()
    body = text[text.index(r"\begin{document}"):]
    body = re.sub(r"(?<!\\)%.*", "", body)                                   # comments
    body = re.sub(r"\\(genfig|includegraphics)(\[[^]]*\])?\{[^}]*\}(\{[^}]*\})?", "", body)  # widths
    body = re.sub(r"\\begin\{minipage\}(\[[^]]*\])?\{[^}]*\}|\\setlength\{[^}]*\}\{[^}]*\}", "", body)  # layout
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


@pytest.mark.parametrize("notebook", ["01", "02", "03", "04"])
def test_every_figure_and_table_of_a_notebook_exists(notebook):
    text = MAIN.read_text()
    figs = [f for f in re.findall(r"\\genfig\{([^}]+)\}", text) if f.startswith(notebook)]
    tables = [t for t in re.findall(r"\\(?:gentable|generated)\{([^}]+)\}", text) if t.startswith(notebook)]
    assert figs or tables, f"the paper shows nothing of notebook {notebook}"
    assert not [f for f in figs if not (ROOT / "figures" / f).is_file()], "a \\genfig file is missing"
    assert not [t for t in tables if not (ROOT / "paper" / "generated" / t).is_file()], "a generated file is missing"


def test_nothing_is_left_to_be_written():
    assert "tbw{" not in _body(), "the paper still has 'to be written' parts"


# The prior work of the authors and the works the paper must position itself against (issue 20's list).
POSITIONED = ["ivanov2024fewshot", "fang2023depgraph", "veit2016residual", "men2024shortgpt", "gromov2024unreasonable",
              "song2024sleb", "zhong2025blockpruner", "sieberling2025evopress", "dery2024everybody", "shah2024decomposing",
              "ding2026cooperative", "jansen2026block", "kim2026rethinking", "baptista2018bocs", "lee2019snip",
              "wang2020grasp", "tanaka2020pruning", "mellor2021naswot", "ghorbani2020neuron", "sundararajan2020shapley",
              "ma2023llmpruner", "ashkboos2024slicegpt"]


@pytest.mark.parametrize("needle", POSITIONED)
def test_related_work_is_cited(needle):
    assert f"{{{needle}," in (ROOT / "paper" / "references.bib").read_text()
    related = MAIN.read_text().split(r"\section{Related work}", 1)[1].split(r"\section{", 1)[0]
    assert needle in related, f"{needle} is not discussed in the related-work section"


def test_every_bibliography_entry_has_a_venue_or_an_archive():
    entries = re.split(r"\n(?=@)", (ROOT / "paper" / "references.bib").read_text())
    where = re.compile(r"^\s*(booktitle|journal|institution|publisher|eprint|howpublished|url)\s*=", re.M)
    missing = [e.split(",", 1)[0] for e in entries if e.startswith("@") and not where.search(e)]
    assert not missing, f"entries without a venue, publisher or archive: {missing}"


def test_every_figure_and_table_is_referenced():
    text = MAIN.read_text()
    labels = set(re.findall(r"\\label\{((?:fig|tab):[^}]+)\}", text))
    referenced = set(re.findall(r"\\ref\{([^}]+)\}", re.sub(r"(?<!\\)%.*", "", text)))
    assert labels, "no figure or table labels found"
    assert not sorted(labels - referenced), f"never referenced in the text: {sorted(labels - referenced)}"


def test_todo_notes_stay_in_comments():
    assert "TODO" not in _body(), "a TODO outside a comment would print in the PDF"


def _macro_values() -> dict[str, str]:
    values: dict[str, str] = {}
    for f in (ROOT / "paper" / "generated").glob("*.tex"):
        values.update(re.findall(r"\\newcommand\{\\([A-Za-z]+)\}\{(.*)\}", f.read_text()))
    return values


def test_no_p_value_prints_as_zero():
    values = _macro_values()
    quoted = re.findall(r"p\s*[=<]\s*\$?\s*\\val\{([A-Za-z]+)\}", _body())
    zero = [m for m in quoted if re.fullmatch(r"0(\.0*)?", values.get(m, ""))]
    assert not zero, f"p-values printed as zero (an exact test has a floor; quote the table): {zero}"


# Sentences the data do not support (issue 20): none may come back.
UNSUPPORTED = ["on any hardware", "with paired tests across them", "every method loses", "confirmed on the evaluation",
               "carry almost no information", "removals interact super-additively"]


@pytest.mark.parametrize("phrase", UNSUPPORTED)
def test_unsupported_claims_stay_out(phrase):
    assert phrase not in " ".join(_body().split())


def test_every_bibliography_entry_is_cited():
    keys = re.findall(r"@\w+\{([^,]+),", (ROOT / "paper" / "references.bib").read_text())
    cited = set()
    for group in re.findall(r"\\cite[pt]?\*?(?:\[[^]]*\])?\{([^}]+)\}", MAIN.read_text()):
        cited |= {k.strip() for k in group.split(",")}
    assert not sorted(set(keys) - cited), f"never cited: {sorted(set(keys) - cited)}"


def _compile(out: Path) -> Path:
    import subprocess
    subprocess.run(["latexmk", "-pdf", "-interaction=nonstopmode", "-halt-on-error", f"-outdir={out}", "main.tex"],
                   cwd=ROOT / "paper", check=True, capture_output=True, timeout=600)
    return out


NEEDS_TEX = pytest.mark.skipif(__import__("shutil").which("latexmk") is None, reason="needs TeX (scripts/ensure_tex.sh)")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The paper compiled once into a temporary folder (main.pdf, main.aux)."""
    return _compile(tmp_path_factory.mktemp("paper"))


@NEEDS_TEX
def test_the_paper_compiles_to_the_same_bytes_wherever_it_is_built(built, tmp_path):
    import hashlib
    digests = {hashlib.sha256((out / "main.pdf").read_bytes()).hexdigest() for out in (built, _compile(tmp_path))}
    assert len(digests) == 1


MAX_MAIN_PAGES = 10  # the venue's limit for the main text (references and appendix excluded)


@NEEDS_TEX
def test_main_text_fits_the_page_limit(built):
    aux = (built / "main.aux").read_text()
    start = re.search(r"\\newlabel\{references-start\}\{\{[^}]*\}\{(\d+)\}", aux)
    assert start, "main.tex must mark where the references start (\\label{references-start})"
    assert int(start.group(1)) - 1 <= MAX_MAIN_PAGES, f"the main text takes {int(start.group(1)) - 1} pages"


# ----------------------------------------------------------------------------- figures readable in print

MIN_PT = 7.0

# Figures committed before the theme was fitted to the paper's text width would print below 7 pt until the next
# `make paper` redraws them; list them here (strict: a figure that prints readably must leave the list). Empty
# since notebook 01's rerun redrew 01_graph.pdf with 7-pt vertex labels.
DRAWN_FOR_THE_OLD_PAGE: set[str] = set()


def _text_width_pt() -> float:
    m = re.search(r"textwidth=([\d.]+)in", MAIN.read_text())
    assert m, "main.tex sets the text width with geometry (textwidth=...in)"
    return float(m.group(1)) * 72


def _included_figures() -> dict[str, float]:
    """Every \\genfig of main.tex and its printed width in points (widths are fractions of \\textwidth, which a
    minipage sets to its own width)."""
    body = re.sub(r"(?<!\\)%.*", "", MAIN.read_text())
    token = re.compile(r"\\begin\{minipage\}(?:\[[^]]*\])?\{([\d.]*)\\textwidth\}|\\end\{minipage\}"
                       r"|\\genfig\{([^}]+)\}\{([\d.]*)\\textwidth\}")
    widths, stack = {}, [_text_width_pt()]
    for m in token.finditer(body):
        if m.group(0).startswith(r"\begin"):
            stack.append(stack[-1] * float(m.group(1) or 1))
        elif m.group(0).startswith(r"\end"):
            stack.pop()
        else:
            widths[m.group(2)] = stack[-1] * float(m.group(3) or 1)
    return widths


def test_every_included_figure_has_a_width_in_text_widths():
    body = re.sub(r"(?<!\\)%.*", "", MAIN.read_text())
    assert set(_included_figures()) == set(re.findall(r"\\genfig\{([^}]+)\}", body[body.index(r"\begin{document}"):]))


@pytest.mark.parametrize("name", sorted(_included_figures()))
def test_figure_text_prints_at_least_7pt(name, request):
    from pdf_fonts import page_width, text_sizes
    if name in DRAWN_FOR_THE_OLD_PAGE:
        request.applymarker(pytest.mark.xfail(strict=True, reason="drawn before the theme fit the page; make paper"))
    path = ROOT / "figures" / name
    sizes = text_sizes(path)
    assert sizes, f"{name}: no text found"
    printed = min(sizes) * _included_figures()[name] / page_width(path)
    assert printed >= MIN_PT, f"{name}: smallest text prints at {printed:.1f} pt"
