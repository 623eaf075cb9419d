"""How far two runs of the notebooks agree: the generated tables and macros of one run against another's.

    python scripts/compare_generated.py OLD NEW [--prefix 01_] [--macros OUT.tex --name SynRerun]

OLD and NEW are folders of generated files (``paper/generated`` and a staging folder, or the files of a run on
another machine). For every file present in both, it reports whether the bytes are equal and, where not, the
largest absolute change of any number: in CSVs cell by cell (full precision), in macro files macro by macro (as
printed in the paper). With ``--macros`` it writes what the paper quotes about the comparison as macros
(``<name>Files``, ``<name>FilesIdentical``, ``<name>Numbers``, ``<name>NumbersChanged``, ``<name>MaxChange``,
``<name>MaxChangeSpearman``, and ``<name>MaxChangeInStd``: the largest change of a mean Spearman correlation
over its standard deviation across networks, the larger of the two runs'), atomically.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
MACRO = re.compile(r"\\newcommand\{\\([A-Za-z]+)\}\{(.*)\}")


def _number(text: str) -> float | None:
    t = text.replace("{,}", "").replace("$", "").replace("\\,", "").strip()
    try:
        return float(t)
    except ValueError:
        return None


def _macros(path: Path) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in map(MACRO.fullmatch, path.read_text().splitlines()) if m}


def compare_file(a: Path, b: Path) -> dict:
    """Numbers compared, numbers changed and the largest change (overall and of Spearman columns or macros)."""
    out = {"file": a.name, "identical": a.read_bytes() == b.read_bytes(), "numbers": 0, "changed": 0,
           "max_change": 0.0, "max_change_spearman": 0.0, "worst": "", "max_change_in_std": 0.0,
           "text_changed": 0}

    def add(name: str, x: float, y: float) -> None:
        if math.isnan(x) or math.isnan(y):
            d = 0.0 if math.isnan(x) and math.isnan(y) else math.inf  # NaN against a number: a change
        else:
            d = abs(x - y)
        out["numbers"] += 1
        out["changed"] += d > 0
        if d > out["max_change"]:
            out["max_change"], out["worst"] = d, name
        if "spearman" in name.lower():
            out["max_change_spearman"] = max(out["max_change_spearman"], d)

    if a.suffix == ".csv":
        x, y = pd.read_csv(a), pd.read_csv(b)
        if x.shape != y.shape or list(x.columns) != list(y.columns):
            raise SystemExit(f"{a.name}: the two runs' tables differ in shape or columns; not comparable")
        for col in x.columns:
            if not (pd.api.types.is_numeric_dtype(x[col]) and pd.api.types.is_numeric_dtype(y[col])):
                out["text_changed"] += int((x[col].astype(str) != y[col].astype(str)).sum())  # e.g. another method named
                continue
            for i, (u, v) in enumerate(zip(x[col].astype(float), y[col].astype(float))):
                add(f"{col}[{i}]", u, v)
            std = col[:-len("_mean")] + "_std" if col.endswith("_mean") else None
            if std in x.columns and "spearman" in col.lower():  # a mean's change against its spread over networks
                spread = np.maximum(x[std].astype(float).to_numpy(), y[std].astype(float).to_numpy())
                d = np.abs(x[col].astype(float).to_numpy() - y[col].astype(float).to_numpy())
                ok = np.isfinite(d) & (spread > 0)
                if ok.any():
                    out["max_change_in_std"] = max(out["max_change_in_std"], float((d[ok] / spread[ok]).max()))
    elif a.suffix == ".tex":
        ma, mb = _macros(a), _macros(b)
        for name in sorted(set(ma) & set(mb)):
            u, v = _number(ma[name]), _number(mb[name])
            if u is not None and v is not None:
                add(name, u, v)
    return out


def compare(old: Path, new: Path, prefix: str = "") -> pd.DataFrame:
    a = {p.name for p in old.glob(f"{prefix}*") if p.is_file() and p.name != "INDEX.csv"}  # which cell wrote what
    b = {p.name for p in new.glob(f"{prefix}*") if p.is_file() and p.name != "INDEX.csv"}
    for side, only in ((old, a - b), (new, b - a)):
        if only:
            print(f"only in {side}: {', '.join(sorted(only))} (not compared)")
    names = sorted(a & b)
    if not names:
        raise SystemExit(f"no file named {prefix}* is in both {old} and {new}")
    return pd.DataFrame([compare_file(old / n, new / n) for n in names])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--prefix", default="", help="compare only files whose names start with this (e.g. 01_)")
    ap.add_argument("--macros", type=Path, help="write the summary as LaTeX macros to this file")
    ap.add_argument("--name", default="Rerun", help="macro name prefix (letters only)")
    args = ap.parse_args(argv)
    res = compare(args.old, args.new, args.prefix)
    with pd.option_context("display.width", 160, "display.max_rows", 200):
        print(res.to_string(index=False))
    csv = res[res.file.str.endswith(".csv")]
    if res.text_changed.any():
        print(f"{int(res.text_changed.sum())} text cells differ too (e.g. a different method named in a row)")
    print(f"\n{int(res.identical.sum())} of {len(res)} files identical; {int(res.changed.sum())} of "
          f"{int(res.numbers.sum())} numbers changed; largest change {res.max_change.max():.4g} "
          f"({res.loc[res.max_change.idxmax(), 'file']} {res.loc[res.max_change.idxmax(), 'worst']}); "
          f"largest change of a Spearman correlation {res.max_change_spearman.max():.4g}, of a mean Spearman "
          f"correlation over its standard deviation {res.max_change_in_std.max():.3g}")
    if args.macros:
        sys.path.insert(0, str(ROOT))
        from surrogate.paper import write_macros
        write_macros(args.macros, {"Files": len(res), "FilesIdentical": int(res.identical.sum()),
                                   "Numbers": int(csv.numbers.sum()), "NumbersChanged": int(csv.changed.sum()),
                                   "MaxChange": float(csv.max_change.max()),
                                   "MaxChangeSpearman": float(csv.max_change_spearman.max()),
                                   "MaxChangeInStd": float(csv.max_change_in_std.max())},
                     prefix=args.name, digits=4)
        print(f"macros -> {args.macros}")


if __name__ == "__main__":
    main()
