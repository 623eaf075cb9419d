"""Properties of the paper-output helpers: atomic, deterministic, LaTeX-shaped."""
import re
import shutil
import subprocess

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from surrogate.paper import (Raw, atomic_path, atomic_write, fmt, format_mean_std, output_dirs,  # noqa: E402
                             project_root, save_figure, write_csv, write_macros, write_table)

MACRO_LINE = re.compile(r"\\newcommand\{\\([A-Za-z]+)\}\{(.*)\}")


def parse_macros(text: str) -> dict[str, str]:
    lines = [line for line in text.splitlines() if line and not line.startswith("%")]
    parsed = [MACRO_LINE.fullmatch(line) for line in lines]
    assert all(parsed), f"not one macro per line: {lines}"
    return {m.group(1): m.group(2) for m in parsed}


def tabular_rows(text: str) -> list[list[str]]:
    """The cells of every row between \\toprule and \\bottomrule, rules dropped."""
    body = text.split("\\toprule\n", 1)[1].split("\\bottomrule", 1)[0]
    rows = [line for line in body.splitlines() if line != "\\midrule"]
    assert all(row.endswith(r" \\") for row in rows)
    return [row[:-3].split(" & ") for row in rows]


def small_figure():
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1, 2], [2.0, 0.5, 1.0], label="a_b")
    ax.set_xlabel("pruned edges")
    ax.legend()
    return fig


# --------------------------------------------------------------------------------------- atomic writes

def test_atomic_path_failure_leaves_nothing(tmp_path):
    target = tmp_path / "sub" / "out.tex"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half a table")
            raise RuntimeError("crash mid-write")
    assert not target.exists()
    assert list((tmp_path / "sub").iterdir()) == []  # no temporary file left either


def test_atomic_path_failure_keeps_old_content(tmp_path):
    target = tmp_path / "out.tex"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("new but broken")
            raise RuntimeError
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.tex"]


def test_atomic_path_success_replaces(tmp_path):
    target = tmp_path / "out.tex"
    target.write_text("old")
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.suffix == target.suffix and tmp != target
        tmp.write_text("new")
        assert target.read_text() == "old"  # untouched until the block ends
    assert target.read_text() == "new"
    atomic_write(target, b"bytes")
    assert target.read_bytes() == b"bytes"
    assert [p.name for p in tmp_path.iterdir()] == ["out.tex"]


# -------------------------------------------------------------------------------------------- macros

def test_write_macros_values_and_order(tmp_path):
    path = tmp_path / "m.tex"
    write_macros(path, {"Zeta": 0.81234, "Count": 12345, "Big": -1234567, "Name": "top_1 50% & #2",
                        "Missing": None, "NotANumber": float("nan"), "Math": Raw(r"$\alpha_1$"),
                        "Mixed": fmt(0.5, 1), "Pm": format_mean_std(0.8123, 0.0312, 3), "Small": np.float32(1.5)},
                 prefix="Synth")
    text = path.read_text()
    macros = parse_macros(text)
    assert list(macros) == sorted(macros)
    assert macros == {
        "SynthBig": r"\ensuremath{-}1{,}234{,}567",
        "SynthCount": "12{,}345",
        "SynthMath": r"$\alpha_1$",
        "SynthMissing": "--",
        "SynthMixed": "0.5",
        "SynthName": r"top\_1 50\% \& \#2",
        "SynthNotANumber": "--",
        "SynthPm": r"0.812 $\pm$ 0.031",
        "SynthSmall": "1.500",
        "SynthZeta": "0.812",
    }
    assert text.count("{") == text.count("}")


def test_write_macros_digits_and_raw_flag(tmp_path):
    path = tmp_path / "m.tex"
    write_macros(path, {"A": 1.23456, "B": 1.23456, "C": "$x_1$"}, digits={"A": 1}, raw=True)
    assert parse_macros(path.read_text()) == {"A": "1.2", "B": "1.235", "C": "$x_1$"}
    write_macros(path, {"A": -0.0001}, digits=2)
    assert parse_macros(path.read_text()) == {"A": "0.00"}  # no negative zero


@pytest.mark.parametrize("bad", ["acc_top1", "resnet18", "two words", ""])
def test_write_macros_rejects_bad_names(tmp_path, bad):
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        write_macros(tmp_path / "m.tex", {bad: 1})
    assert not (tmp_path / "m.tex").exists()


def test_write_macros_suggests_fix(tmp_path):
    with pytest.raises(ValueError, match="AccTopOne"):
        write_macros(tmp_path / "m.tex", {"acc_top1": 1})
    with pytest.raises(ValueError, match="prefix"):
        write_macros(tmp_path / "m.tex", {"A": 1}, prefix="Exp1")


def test_write_macros_byte_identical(tmp_path):
    values = {"B": 2.5, "A": 3, "C": "x_y"}
    write_macros(tmp_path / "one.tex", values, prefix="P")
    write_macros(tmp_path / "two.tex", dict(reversed(values.items())), prefix="P")
    assert (tmp_path / "one.tex").read_bytes() == (tmp_path / "two.tex").read_bytes()


# -------------------------------------------------------------------------------------------- tables

@pytest.fixture
def results():
    return pd.DataFrame({"method": ["rand_edges", "grad&norm", "ours"], "acc": [0.51, 0.9, 0.87],
                         "loss": [1.25, 0.40, 0.35], "params": [1200, 20000, 3]})


def test_write_table_shape_and_bold(tmp_path, results):
    path = tmp_path / "t.tex"
    write_table(path, results, bold_best={"acc": "max", "loss": "min"})
    text = path.read_text()
    assert text.count(r"\begin{tabular}{lrrr}") == 1 and text.count(r"\end{tabular}") == 1
    assert r"\begin{table}" not in text and r"\caption" not in text  # no float without a caption
    assert text.count("{") - text.count(r"\{") == text.count("}") - text.count(r"\}")
    rows = tabular_rows(text)
    assert len(rows) == 1 + len(results)
    assert all(len(row) == results.shape[1] for row in rows)
    assert rows[0] == ["method", "acc", "loss", "params"]
    assert [row[0] for row in rows[1:]] == [r"rand\_edges", r"grad\&norm", "ours"]
    bold = {(i, j) for i, row in enumerate(rows[1:]) for j, cell in enumerate(row) if cell.startswith(r"\textbf")}
    assert bold == {(1, 1), (2, 2)}
    assert rows[2][1] == r"\textbf{0.900}" and rows[2][3] == "20{,}000"


def test_write_table_float_ties_raw_and_digits(tmp_path, results):
    results["acc"] = [0.9001, 0.9004, 0.5]  # equal once printed with 3 digits: both bold
    results["note"] = ["$k$", "x_y", None]
    path = tmp_path / "t.tex"
    write_table(path, results, caption="Accuracy of each method.", label="tab:acc", bold_best={"acc": "max"},
                float_digits={"loss": 1}, raw_columns=["note"], headers={"acc": r"Acc.\ $\uparrow$"})
    text = path.read_text()
    assert text.startswith("%")
    assert text.count(r"\begin{table}") == text.count(r"\end{table}") == 1
    assert r"\caption{Accuracy of each method.}" in text and r"\label{tab:acc}" in text
    rows = tabular_rows(text)
    assert rows[0][1] == r"Acc.\ $\uparrow$"
    assert [row[1] for row in rows[1:]] == [r"\textbf{0.900}", r"\textbf{0.900}", "0.500"]
    assert [row[2] for row in rows[1:]] == ["1.2", "0.4", "0.3"]
    assert [row[4] for row in rows[1:]] == ["$k$", "x_y", "--"]


def test_write_table_rejects_bad_requests(tmp_path, results):
    with pytest.raises(ValueError, match="unknown column"):
        write_table(tmp_path / "t.tex", results, bold_best={"accuracy": "max"})
    with pytest.raises(ValueError, match="numeric"):
        write_table(tmp_path / "t.tex", results, bold_best={"method": "max"})
    with pytest.raises(ValueError, match="caption"):
        write_table(tmp_path / "t.tex", results, label="tab:x")
    assert not (tmp_path / "t.tex").exists()


def test_write_table_and_csv_deterministic(tmp_path, results):
    for name in ("a", "b"):
        write_table(tmp_path / f"{name}.tex", results.copy(), caption="c", bold_best={"acc": "max"})
        write_csv(tmp_path / f"{name}.csv", results.copy())
    assert (tmp_path / "a.tex").read_bytes() == (tmp_path / "b.tex").read_bytes()
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    back = pd.read_csv(tmp_path / "a.csv")
    pd.testing.assert_frame_equal(back, results)


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex not installed")
def test_generated_files_compile(tmp_path, results):
    write_macros(tmp_path / "macros.tex", {"Acc": 0.8, "Edges": 12345, "Name": "a_b 5%", "Delta": -0.25},
                 prefix="Test")
    write_table(tmp_path / "table.tex", results, caption="c", label="tab:t", bold_best={"acc": "max"})
    (tmp_path / "doc.tex").write_text(
        "\\documentclass{article}\\usepackage{booktabs}\\usepackage{amsmath}\\begin{document}\n"
        "\\input{macros.tex}\\TestAcc, \\TestEdges, \\TestName, \\TestDelta, $\\TestDelta$\n"
        "\\input{table.tex}\\end{document}\n")
    run = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout[-2000:]


# ------------------------------------------------------------------------------------------- figures

@pytest.mark.parametrize("suffix", [".pdf", ".png", ".svg"])
def test_save_figure_byte_identical(tmp_path, suffix):
    first, second = tmp_path / f"a{suffix}", tmp_path / "sub" / f"a{suffix}"
    save_figure(small_figure(), first)
    save_figure(small_figure(), second)
    assert first.read_bytes() == second.read_bytes()
    assert plt.get_fignums() == []  # closed
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == [first.name]  # no temporary files


def test_save_figure_pdf_has_no_date(tmp_path):
    save_figure(small_figure(), tmp_path / "f.pdf")
    data = (tmp_path / "f.pdf").read_bytes()
    assert data.startswith(b"%PDF") and b"CreationDate" not in data


def test_save_figure_rejects_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="pdf"):
        save_figure(small_figure(), tmp_path / "f.ps")
    assert plt.get_fignums() == [] and not (tmp_path / "f.ps").exists()


# ------------------------------------------------------------------------------------------- folders

def test_project_root_is_the_project_the_user_runs_in(tmp_path, monkeypatch):
    assert (project_root() / "pyproject.toml").is_file()  # the tests run from this repository
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")
    assert project_root() == tmp_path  # not wherever the package is installed


def test_output_dirs(tmp_path, monkeypatch):
    dirs = output_dirs(str(tmp_path / "figs"), str(tmp_path / "gen"), "unused")
    assert dirs.figures == tmp_path / "figs" and dirs.generated == tmp_path / "gen"
    assert dirs.figures.is_dir() and dirs.generated.is_dir()
    with pytest.raises(Exception):  # frozen
        dirs.figures = tmp_path  # type: ignore[misc]
    # relative paths are relative to the project root, not the cwd; None is build/<profile>/...
    root = tmp_path / "project"
    (root / "notebooks").mkdir(parents=True)
    (root / "pyproject.toml").write_text("")
    monkeypatch.chdir(root / "notebooks")
    profile = "pytest-output-dirs"
    dirs = output_dirs(None, f"build/{profile}/gen", profile)
    assert dirs.figures == root / "build" / profile / "figures"
    assert dirs.generated == root / "build" / profile / "gen"
    assert dirs.figures.is_dir() and dirs.generated.is_dir()
    with pytest.raises(ValueError):
        output_dirs(None, None, "../escape")
