"""Paper outputs: LaTeX macros, booktabs tables, CSVs and figures, written atomically and deterministically.

Every number in the paper comes from a file written here by a notebook, so two properties matter:
- atomic: a file is written to a temporary sibling and ``os.replace``d onto its name only when complete, so
  a crashed run leaves the previous version (or nothing), never half a table;
- deterministic: sorted macro names, fixed number formats and figures without timestamps, so rerunning a
  notebook on the same results gives byte-identical files and a clean ``git diff``.

Inside a notebook, every writer also leaves a record of the file in the running cell's outputs (a line
"wrote <file>" and a machine-readable copy, ``OUTPUT_MIME``), from which ``scripts/run_notebooks.py`` indexes
which notebook and cell wrote every macro, table and figure (``INDEX.csv`` beside the macros).

Strings are LaTeX-escaped unless marked as LaTeX source with ``Raw`` (``fmt`` and ``format_mean_std``
return ``Raw``). Inside a DataFrame pandas may turn ``Raw`` into plain ``str``, so ``write_table`` also takes
``raw_columns``.
"""
from __future__ import annotations

import math
import numbers
import os
import re
import sys
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from .paths import atomic_path, atomic_write, project_dir

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["macro_name", "Macros", "project_root", "atomic_write", "atomic_path", "Raw", "escape_latex", "fmt", "format_mean_std",
           "write_macros", "write_table", "write_csv", "save_figure", "OutputDirs", "output_dirs", "OUTPUT_MIME"]

MISSING = "--"  # what None / NaN print as, in macros and tables
_MINUS = r"\ensuremath{-}"  # a real minus sign in text and math mode alike (a bare "-" is a hyphen in text)
_DIGIT_WORDS = ["Zero", "One", "Two", "Three", "Four", "Five", "Six", "Seven", "Eight", "Nine"]
_FULL_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
_MACRO_ESCAPES = {c: _FULL_ESCAPES[c] for c in "%&_#"}


# ----------------------------------------------------------------------------------------------- paths

def project_root() -> Path:
    """The project the user runs in (``surrogate.paths.project_dir``: the nearest folder above the working
    directory holding pyproject.toml or .git), not wherever the package is installed."""
    return project_dir()


@dataclass(frozen=True)
class OutputDirs:
    figures: Path  # figure files (PDF/PNG) that the paper includes as ../figures/<name>
    generated: Path  # LaTeX macros/tables and CSVs that the paper inputs as generated/<name>


def output_dirs(fig_dir: str | os.PathLike[str] | None, out_dir: str | os.PathLike[str] | None,
                profile_name: str) -> OutputDirs:
    """Resolve a notebook's output parameters and create the folders.

    None selects the git-ignored ``<root>/build/<profile_name>/{figures,generated}``, so a default run never
    touches the committed ``figures/`` and ``paper/generated/``; relative paths are taken from the repo root.
    """
    if not profile_name or profile_name in {".", ".."} or re.search(r"[\\/]", profile_name):
        raise ValueError(f"profile_name must be a plain folder name, got {profile_name!r}")
    root = project_root()

    def resolve(given: str | os.PathLike[str] | None, default: str) -> Path:
        folder = root / "build" / profile_name / default if given is None else Path(given).expanduser()
        folder = (root / folder).resolve() if not folder.is_absolute() else folder.resolve()
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    return OutputDirs(figures=resolve(fig_dir, "figures"), generated=resolve(out_dir, "generated"))


# ------------------------------------------------------------------------------------------ provenance

OUTPUT_MIME = "application/vnd.surrogate.written+json"  # a cell output recording a file the cell wrote


def _announce(path: str | os.PathLike[str], kind: str) -> None:
    """In a notebook's kernel, record in the running cell's outputs that it wrote ``path`` (``kind``: macros,
    table, csv or figure): shown as one line, kept by papermill in the executed notebook, where the runner finds
    the notebook and the cell. Outside a kernel (scripts, tests) nothing happens."""
    if "ipykernel" not in sys.modules:
        return
    from IPython import get_ipython
    from IPython.display import display
    if getattr(get_ipython(), "kernel", None) is None:
        return
    path = Path(path).resolve()
    shown = path.relative_to(project_root()) if path.is_relative_to(project_root()) else path
    display({OUTPUT_MIME: {"path": str(path), "kind": kind}, "text/plain": f"wrote {shown}"}, raw=True)


# ------------------------------------------------------------------------------------------ formatting

class Raw(str):
    """A string that is already LaTeX source and must not be escaped."""

    __slots__ = ()


def escape_latex(text: str) -> str:
    """Escape all ten LaTeX special characters so ``text`` prints literally."""
    return "".join(_FULL_ESCAPES.get(c, c) for c in text)


def _format_int(n: int) -> str:
    body = format(abs(int(n)), ",").replace(",", "{,}")  # braces stop math mode adding space after the comma
    return _MINUS + body if n < 0 else body


def fmt(x: float | None, digits: int = 3) -> Raw:
    """``x`` with ``digits`` decimals as LaTeX: 0.8123 -> '0.812', -1.5 -> '\\ensuremath{-}1.500', NaN -> '--'."""
    if x is None or (isinstance(x, numbers.Real) and math.isnan(x)):
        return Raw(MISSING)
    x = float(x)
    if math.isinf(x):
        return Raw(("" if x > 0 else _MINUS) + r"\ensuremath{\infty}")
    text = f"{abs(x):,.{digits}f}".replace(",", "{,}")
    negative = x < 0 and any(c in "123456789" for c in text)  # no "-0.000"
    return Raw(_MINUS + text if negative else text)


def format_mean_std(mean: float, std: float, digits: int = 3) -> Raw:
    """'0.812 $\\pm$ 0.031' (a missing mean gives '--', a missing std just the mean)."""
    if mean is None or (isinstance(mean, numbers.Real) and math.isnan(mean)):
        return Raw(MISSING)
    if std is None or (isinstance(std, numbers.Real) and math.isnan(std)):
        return fmt(mean, digits)
    return Raw(f"{fmt(mean, digits)} $\\pm$ {fmt(std, digits)}")


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, (str, bytes)):
        return False
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # array-likes
        return False


def _latex_value(value: Any, digits: int, escape: Mapping[str, str]) -> str:
    """One macro value or table cell as LaTeX source."""
    if isinstance(value, Raw):
        return str(value)
    if _is_missing(value):
        return MISSING
    if isinstance(value, str):
        return "".join(escape.get(c, c) for c in value)
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, numbers.Integral):
        return _format_int(int(value))
    if isinstance(value, numbers.Real):
        return fmt(float(value), digits)
    raise TypeError(f"cannot format {type(value).__name__} {value!r} for LaTeX; pass a str, a number or Raw(...)")


# ------------------------------------------------------------------------------------------------ macros

def _suggest_macro_name(name: str) -> str:
    """'acc_top1' -> 'AccTopOne': CamelCase the words, spell out the digits."""
    words = re.findall(r"[A-Za-z]+|[0-9]", name)
    return "".join(_DIGIT_WORDS[int(w)] if w.isdigit() else w[:1].upper() + w[1:] for w in words) or "Value"


def macro_name(*parts: object) -> str:
    """A TeX macro name from parts: each part CamelCased, digits spelled out, other characters dropped:
    ``macro_name("Syn", "prior", "taylor2", 14)`` -> 'SynPriorTaylorTwoOneFour'."""
    if not parts:
        raise ValueError("macro_name needs at least one part")
    return "".join(_suggest_macro_name(str(p)) for p in parts)


class Macros(dict):
    """The numbers a notebook hands to the paper: a dict that refuses to define a name twice with another
    value (two results silently sharing one macro name would print the wrong number)."""

    def __setitem__(self, name: str, value: object) -> None:
        if name in self and not _same(self[name], value):
            raise KeyError(f"macro {name!r} is defined twice ({self[name]!r} and {value!r}); make the names distinct")
        super().__setitem__(name, value)

    def update(self, *args: Any, **kw: Any) -> None:  # route through __setitem__
        for k, v in dict(*args, **kw).items():
            self[k] = v


def _same(a: object, b: object) -> bool:
    try:
        return bool(a == b) or (_is_missing(a) and _is_missing(b))
    except (TypeError, ValueError):
        return a is b


def write_macros(path: str | os.PathLike[str], values: Mapping[str, object], prefix: str = "", *,
                 digits: int | Mapping[str, int] = 3, raw: bool = False) -> None:
    """Write ``\\newcommand{\\<prefix><name>}{<value>}`` lines, sorted by name, to a .tex file.

    Values: ``str`` with % & _ # escaped (as-is with ``raw=True`` or when wrapped in ``Raw``); ``int`` with
    grouped thousands (12{,}345); ``float`` with ``digits`` decimals (an int, or a per-name mapping falling
    back to 3; for one-off precision pass ``fmt(x, d)``); None/NaN as '--'. Names must be letters only,
    because TeX control words cannot contain digits or underscores.
    """
    if prefix and not re.fullmatch(r"[A-Za-z]+", prefix):
        raise ValueError(f"macro prefix {prefix!r} must be letters only; try {_suggest_macro_name(prefix)!r}")
    lines = ["% Generated by surrogate.paper.write_macros; rerun the notebook instead of editing.\n"]
    for name in sorted(values):
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z]+", name):
            raise ValueError(f"macro name {name!r} must be letters only (TeX control words cannot contain "
                             f"digits, '_' or spaces); try {_suggest_macro_name(str(name))!r}")
        value = values[name]
        places = digits.get(name, 3) if isinstance(digits, Mapping) else digits
        if raw and isinstance(value, str):
            value = Raw(value)
        text = _latex_value(value, places, _MACRO_ESCAPES)
        if "\n" in text:
            raise ValueError(f"macro {name!r}: value contains a newline, which would break the one-line format")
        lines.append(f"\\newcommand{{\\{prefix}{name}}}{{{text}}}\n")
    atomic_write(path, "".join(lines))
    _announce(path, "macros")


# ------------------------------------------------------------------------------------------------ tables

def write_table(path: str | os.PathLike[str], df: pd.DataFrame, caption: str | None = None,
                label: str | None = None, bold_best: Mapping[str, Literal["max", "min"]] | None = None,
                float_digits: int | Mapping[str, int] = 3, column_format: str | None = None, *,
                raw_columns: Collection[str] = (), headers: Mapping[str, str] | None = None) -> None:
    """Write ``df`` (index ignored: ``reset_index()`` first to keep it) as a booktabs tabular.

    With a ``caption`` (LaTeX source, not escaped) the tabular is wrapped in a centred ``table`` float with
    an optional ``label``. Plain-string cells and headers are escaped; cells in ``raw_columns`` or of type
    ``Raw`` are not, and ``headers`` maps column names to LaTeX headers used as-is. ``bold_best`` bolds,
    per named numeric column, every cell that prints the same as the column's max or min. ``float_digits``
    is an int or a per-column mapping (default 3). ``column_format`` defaults to 'r' for numeric columns
    and 'l' otherwise.
    """
    if isinstance(df.columns, pd.MultiIndex):
        raise ValueError("write_table does not support MultiIndex columns; flatten them first")
    columns = [str(c) for c in df.columns]
    if len(set(columns)) != len(columns):
        raise ValueError(f"duplicate column names: {columns}")
    if label is not None and caption is None:
        raise ValueError("a label needs a caption: without one there is no table float to refer to")
    for name in [*(bold_best or {}), *raw_columns, *(headers or {})]:
        if name not in columns:
            raise ValueError(f"unknown column {name!r}; the table has {columns}")

    def digits_of(col: str) -> int:
        return float_digits.get(col, 3) if isinstance(float_digits, Mapping) else float_digits

    cells = [[_latex_value(Raw(v) if c in raw_columns and isinstance(v, str) else v, digits_of(c), _FULL_ESCAPES)
              for c, v in zip(columns, row)] for row in df.itertuples(index=False, name=None)]

    for col, mode in (bold_best or {}).items():
        if mode not in ("max", "min"):
            raise ValueError(f"bold_best[{col!r}] must be 'max' or 'min', got {mode!r}")
        j = columns.index(col)
        series = df.iloc[:, j]
        if not pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series):
            raise ValueError(f"bold_best needs a numeric column, {col!r} has dtype {series.dtype}; "
                             "bold a separate numeric column, or wrap cells in \\textbf yourself via Raw")
        if series.notna().any():
            numeric = series.to_numpy(dtype=float, na_value=np.nan)
            best_row = int(np.nanargmax(numeric) if mode == "max" else np.nanargmin(numeric))
            best_text = cells[best_row][j]
            for row in cells:  # ties as printed are all bold
                if row[j] == best_text:
                    row[j] = f"\\textbf{{{best_text}}}"

    if column_format is None:
        column_format = "".join("r" if pd.api.types.is_numeric_dtype(df.iloc[:, j])
                                and not pd.api.types.is_bool_dtype(df.iloc[:, j]) else "l"
                                for j in range(len(columns)))
    head = [(headers or {}).get(c, escape_latex(c)) for c in columns]

    body = [f"\\begin{{tabular}}{{{column_format}}}", "\\toprule", " & ".join(head) + r" \\", "\\midrule",
            *(" & ".join(row) + r" \\" for row in cells), "\\bottomrule", "\\end{tabular}"]
    if caption is not None:
        body = ["\\begin{table}[t]", "\\centering", f"\\caption{{{caption}}}",
                *([f"\\label{{{label}}}"] if label is not None else []), *body, "\\end{table}"]
    atomic_write(path, "% Generated by surrogate.paper.write_table; rerun the notebook instead of editing.\n"
                 + "\n".join(body) + "\n")
    _announce(path, "table")


def write_csv(path: str | os.PathLike[str], df: pd.DataFrame, float_format: str = "%.10g") -> None:
    """Write ``df`` without its index as CSV, atomically, with a fixed float format and '\\n' line ends."""
    atomic_write(path, df.to_csv(index=False, float_format=float_format, lineterminator="\n"))
    _announce(path, "csv")


# ----------------------------------------------------------------------------------------------- figures

# Metadata keys that would otherwise carry a timestamp (PDF, SVG) or the matplotlib version (PNG). Only these
# formats: matplotlib's PostScript output stamps the wall-clock time and the file name regardless.
_STABLE_METADATA: dict[str, dict[str, None]] = {
    "pdf": {"CreationDate": None, "ModDate": None},
    "png": {"Software": None},
    "svg": {"Date": None},
}


def save_figure(fig: Figure, path: str | os.PathLike[str], **kw: Any) -> None:
    """Save ``fig`` atomically as PDF, PNG or SVG (from the suffix), without timestamps, then close it.

    Extra keywords go to ``fig.savefig``; a ``metadata`` dict there is merged over the stable defaults.
    """
    import matplotlib
    import matplotlib.pyplot as plt

    path = Path(path)
    fmt_name = path.suffix.lstrip(".").lower()
    try:
        if fmt_name not in _STABLE_METADATA:
            raise ValueError(f"cannot save {path.name}: use a .pdf, .png or .svg name (formats that can be "
                             f"written without timestamps), not {path.suffix or 'no suffix'!r}")
        metadata = {**_STABLE_METADATA[fmt_name], **(kw.pop("metadata", None) or {})}
        # svg.hashsalt fixes the otherwise random clip-path ids in SVG output
        with matplotlib.rc_context({"svg.hashsalt": "surrogate"}), atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt_name, metadata=metadata, **kw)
    finally:
        plt.close(fig)
    _announce(path, "figure")
