"""Run the study notebooks at a parameter profile, all or nothing, and index which cell wrote what.

    python scripts/run_notebooks.py [--only 01_synthetic ...] [--jobs 2] [--set device=cuda ...] [--fast]
                                    [--staging build/staging] [--root .] [--recover]

Every notebook ``notebooks/NN_name.ipynb`` is executed by papermill with ``notebooks/params/NN_name.yaml``
(the paper profile), writing its figures and tables into a staging folder (``build/staging``) instead of
``figures/`` and ``paper/generated/``; its cells' output streams to the terminal (progress, which study and
model, time estimates). Only when every notebook succeeded are the staged files copied over the committed
ones, all or nothing: both folders are swapped for complete new copies, with a journal, so that an interrupt
is completed by the next run (or ``--recover``); a failure names the notebook and cell and leaves every
committed figure, table and macro exactly as it was. The executed notebooks are kept in ``build/executed``.
``paper/generated/INDEX.csv`` lists every macro (name and value), table and figure with the notebook, cell
(number, id, section heading) that wrote it, from the records ``surrogate.paper``'s writers leave in the
executed notebooks; rows of files a run did not write are kept.
``--fast`` runs the notebooks at their stored (fast) defaults instead, into ``build/fast/`` (figures,
generated with its own INDEX.csv, executed), and publishes nothing.
With ``--jobs N`` up to N notebooks run at once, each kernel pinned to one thread and a notebook's own
``workers`` parameter set to 1 (one core per notebook; their output interleaves, each line of a notebook's own
log is in its executed copy); the longest notebooks start first, by the ``_cold_minutes`` estimate in their
profile (keys that start with ``_`` are for this runner and are not passed to the notebook).
``--set key=value`` overrides a parameter of every notebook run (the value is read as YAML: ``--set device=cuda``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this project's package, whatever --root says

STAGING = Path("build/staging")
FAST = Path("build/fast")
EXECUTED = Path("build/executed")
TARGETS = {"figures": Path("figures"), "generated": Path("paper/generated")}


def notebooks(root: Path, only: list[str] | None) -> list[Path]:
    found = sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if only:
        found = [nb for nb in found if nb.stem in only]
        missing = set(only) - {nb.stem for nb in found}
        if missing:
            raise SystemExit(f"no notebook named {sorted(missing)} in {root / 'notebooks'}")
    return found


def run(root: Path, nb: Path, params: Path | None, outputs: Path, executed: Path, extra: dict | None = None,
        one_core: bool = False) -> None:
    """Execute one notebook with its profile (None: its stored defaults) and ``extra`` overrides, writing its
    figures and tables into ``outputs``/{figures,generated} and the executed copy into ``executed``. With
    ``one_core`` (it shares the machine with other notebooks), or on an accelerator (one process drives it), its
    own ``workers`` parameter, if it has one and ``extra`` does not set it, goes to 1."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError
    out = executed / nb.name
    out.parent.mkdir(parents=True, exist_ok=True)
    overrides = {"fig_dir": str(outputs / "figures"), "out_dir": str(outputs / "generated")}
    changes = dict(extra or {})
    values = (_notebook_values(_params(params)) if params else {}) | changes
    accelerator = str(values.get("device", "cpu")).split(":")[0] != "cpu"
    if (one_core or accelerator) and "workers" in values and "workers" not in changes:
        changes["workers"] = 1
    values |= changes | overrides
    start = time.time()
    changed = "".join(f", {k}={v!r}" for k, v in changes.items())
    profile = params.relative_to(root) if params else "its stored (fast) defaults"
    print(f"\n=== {nb.stem}: running with {profile}{changed} ===", flush=True)
    try:
        pm.execute_notebook(str(nb), str(out), parameters=values, cwd=str(nb.parent),
                            progress_bar=False, stdout_file=sys.stdout, stderr_file=sys.stderr)  # each line once
    except PapermillExecutionError as exc:
        raise SystemExit(f"\n{nb.stem} failed in cell {exc.exec_count} ({exc.ename}: {exc.evalue}); the executed "
                         f"notebook is {out}.")
    print(f"=== {nb.stem}: done in {(time.time() - start) / 60:.1f} min ===", flush=True)


def parameters_of(nb: Path) -> set[str]:
    """Names assigned in the notebook's cell tagged "parameters" (what papermill may set)."""
    import ast
    import nbformat
    cells = [c for c in nbformat.read(nb, as_version=4).cells if "parameters" in c.metadata.get("tags", [])]
    if not cells:
        raise SystemExit(f"{nb} has no cell tagged 'parameters'; papermill cannot set its parameters")
    names: set[str] = set()
    for node in ast.parse(cells[0].source).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        for t in targets:  # `a = 1`, `a: int = 1`, `a, b = 1, 2`
            names |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names


def _check_names(nb: Path, settings: dict[str, dict]) -> None:
    """Every name each source (a profile, --set) sets must be a parameter of the notebook."""
    names = parameters_of(nb)
    for source, values in settings.items():
        unknown = sorted(set(values) - names)
        if unknown:
            raise SystemExit(f"{source} sets {unknown}, which {nb.name} has no parameter for (a typo?); its "
                             f"parameters: {', '.join(sorted(names))}")


def _notebook_values(profile: dict) -> dict:
    """A profile without its runner keys (those that start with "_", e.g. _cold_minutes)."""
    return {k: v for k, v in profile.items() if not k.startswith("_")}


def _params(path: Path) -> dict:
    import yaml
    if not path.is_file():
        raise SystemExit(f"missing parameter file {path}: every notebook needs its profile in notebooks/params/")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise SystemExit(f"{path} must be a mapping of parameter names to values, got {type(values).__name__}")
    return values


def _settings(pairs: list[str]) -> dict:
    """``["device=cuda", "seeds=[0, 1]"]`` -> ``{"device": "cuda", "seeds": [0, 1]}`` (values read as YAML)."""
    import yaml
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip().isidentifier():
            raise SystemExit(f"--set expects key=value with a parameter name as key, got {pair!r}")
        if key.strip() in ("fig_dir", "out_dir"):
            raise SystemExit(f"--set cannot change {key.strip()}: this runner writes into its staging folder and "
                             "publishes to figures/ and paper/generated/ (run papermill directly for other folders)")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _cold_minutes(root: Path, nb: Path) -> float:
    value = _params(root / "notebooks" / "params" / f"{nb.stem}.yaml").get("_cold_minutes", 0)
    if not isinstance(value, (int, float)):
        raise SystemExit(f"_cold_minutes in the profile of {nb.stem} must be a number, got {value!r}")
    return float(value)


# Which notebook and cell wrote every macro, table and figure: surrogate.paper's writers leave a record in the
# running cell's outputs (OUTPUT_MIME), which papermill keeps in the executed notebook.
INDEX = "INDEX.csv"
WRITER = ("notebook", "cell", "cell_id", "section")
_MACRO_LINE = re.compile(r"\\newcommand\{(\\[A-Za-z]+)\}\{(.*)\}$")


def written_by(executed: Path, notebook: str, shown: dict[Path, str]) -> dict[str, dict]:
    """Every file the executed notebook recorded writing, as ``shown[folder]/name``, -> its writer: the
    ``notebook``, the cell's number (from 1, markdown cells included, as in the notebook itself), its id and the
    heading of the section it is in."""
    import nbformat
    from surrogate.paper import OUTPUT_MIME
    folders = {folder.resolve(): name for folder, name in shown.items()}
    found, number, section = {}, 0, ""
    for cell in nbformat.read(executed, as_version=4).cells:
        if "injected-parameters" in cell.metadata.get("tags", []):
            continue  # papermill's, not a cell of the notebook
        number += 1
        if cell.cell_type == "markdown":
            headings = [line.lstrip("#").strip() for line in cell.source.splitlines() if line.startswith("#")]
            section = headings[-1] if headings else section
        for output in cell.get("outputs", []):
            record = output.get("data", {}).get(OUTPUT_MIME)
            if record:
                path = Path(record["path"])
                key = f"{folders[path.parent]}/{path.name}" if path.parent in folders else str(path)
                found[key] = {"notebook": notebook, "cell": number, "cell_id": cell.get("id", ""), "section": section}
    return found


def write_index(index: Path, folders: dict[str, Path], writers: dict[str, dict]) -> int:
    """Write ``index`` (CSV): a row per macro (name, value) and per other file in ``folders`` (shown name ->
    folder), with the notebook and cell that wrote it: from ``writers`` (shown path -> writer), else the row
    already in ``index`` (a file this run did not write), else empty (not written by a notebook). Returns rows."""
    import pandas as pd
    from surrogate.paths import atomic_write
    previous = pd.read_csv(index, dtype=str, keep_default_na=False) if index.exists() else pd.DataFrame()
    kept = {row["file"]: {k: row[k] for k in WRITER} for _, row in previous.iterrows()}
    rows = []
    for shown, folder in folders.items():
        for path in sorted(folder.iterdir()):
            if not path.is_file() or path.name == INDEX or path.name.startswith("."):
                continue
            name = f"{shown}/{path.name}"
            writer = writers.get(name) or kept.get(name) or dict.fromkeys(WRITER, "")
            text = path.read_text(errors="replace") if path.suffix == ".tex" else ""
            macros = [m.groups() for m in map(_MACRO_LINE.match, text.splitlines()) if m]
            rows += [{"macro": macro, "value": value, "file": name, **writer} for macro, value in macros or [("", "")]]
    table = pd.DataFrame(rows, columns=["macro", "value", "file", *WRITER])
    atomic_write(index, table.to_csv(index=False, lineterminator="\n"))
    return len(table)


# Publishing is all or nothing across figures/ and paper/generated/: complete new copies of both folders are
# built beside them (<folder>.publish-new), a journal is written, and each folder is swapped in by two renames
# (folder -> <folder>.publish-old, <folder>.publish-new -> folder). A journal on disk means the new copies are
# complete, so an interrupted swap is rolled forward (by the next run, or `--recover`); new copies without a
# journal were interrupted while being built and are deleted: the committed folders were not touched yet.
JOURNAL = Path(".publish-journal.json")
NEW, OLD = ".publish-new", ".publish-old"


def _rename(src: Path, dst: Path) -> None:
    os.rename(src, dst)  # one place, so a test can interrupt the swap in the middle


def _sides(root: Path) -> list[tuple[Path, Path, Path]]:
    """(folder, its new copy, its old copy) for every published folder."""
    return [(root / t, root / f"{t}{NEW}", root / f"{t}{OLD}") for t in TARGETS.values()]


def _roll_forward(root: Path) -> None:
    """Finish a journaled swap; each step is a rename or a removal, so this is safe to repeat after any interrupt."""
    for target, new, old in _sides(root):
        if new.exists():
            if target.exists():
                _rename(target, old)
            _rename(new, target)
    for _, _, old in _sides(root):
        shutil.rmtree(old, ignore_errors=True)
    (root / JOURNAL).unlink()


def recover(root: Path) -> str | None:
    """Finish or undo a publish that was interrupted; returns what was done (None: nothing to do)."""
    if (root / JOURNAL).exists():
        _roll_forward(root)
        return "an interrupted publish was completed (rolled forward): figures/ and paper/generated/ are the new ones"
    leftovers = [p for _, new, old in _sides(root) for p in (new, old) if p.exists()]
    for target, _, old in _sides(root):
        if old.exists() and not target.exists():  # cannot happen through this runner; never lose a folder
            _rename(old, target)
    for p in leftovers:
        shutil.rmtree(p, ignore_errors=True)
    return ("an interrupted publish was undone (its partial copies removed): figures/ and paper/generated/ are "
            "unchanged") if leftovers else None


def publish(root: Path, staging: Path, writers: dict[str, dict] | None = None) -> int:
    """Replace figures/ and paper/generated/ by copies with every staged file added or replaced and the index
    updated with ``writers`` (see ``write_index``), all or nothing."""
    from surrogate.paths import atomic_write
    recover(root)
    count = 0
    for (kind, _), (target, new, _) in zip(TARGETS.items(), _sides(root)):
        if target.exists():
            shutil.copytree(target, new)  # files this run did not write stay, with their times
        else:
            new.mkdir(parents=True)
        for src in sorted((staging / kind).glob("*")):
            if src.is_file():
                shutil.copyfile(src, new / src.name)
                count += 1
    write_index(root / f"{TARGETS['generated']}{NEW}" / INDEX,
                {str(t): root / f"{t}{NEW}" for t in TARGETS.values()}, writers or {})
    atomic_write(root / JOURNAL, json.dumps({"swap": [str(t) for t in TARGETS.values()]}) + "\n")
    try:
        _roll_forward(root)
    except BaseException:
        print(f"\npublishing was interrupted; `python scripts/run_notebooks.py --recover` (or the next run) "
              f"completes it from {JOURNAL}", file=sys.stderr, flush=True)
        raise
    return count


def execute(root: Path, todo: list[Path], profiles: dict[Path, Path | None], outputs: Path, executed: Path,
            extra: dict, jobs: int) -> None:
    """Run every notebook in ``todo``, ``jobs`` at a time (longest first); SystemExit naming each failed cell."""
    start = time.time()
    if jobs == 1 or len(todo) == 1:
        for i, nb in enumerate(todo):
            print(f"[{i + 1}/{len(todo)}] {nb.stem} ({(time.time() - start) / 60:.0f} min so far)", flush=True)
            run(root, nb, profiles[nb], outputs, executed, extra)
        return
    # longest first (their cold-run estimates): the shorter notebooks then fill the other cores
    todo = sorted(todo, key=lambda nb: -_cold_minutes(root, nb))
    print("running " + ", ".join(nb.stem for nb in todo) + f" with {jobs} at a time", flush=True)
    from concurrent.futures import ProcessPoolExecutor
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # inherited by every kernel
    try:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(run, root, nb, profiles[nb], outputs, executed, extra, one_core=True) for nb in todo]
            failed = []
            for fut in futures:
                try:
                    fut.result()
                except SystemExit as exc:  # the notebook's own message: which cell failed
                    failed.append(str(exc))
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    if failed:
        raise SystemExit("\n".join(failed))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=".", help="the project folder")
    ap.add_argument("--only", nargs="*", help="notebook names (e.g. 01_synthetic); default: all")
    ap.add_argument("--fast", action="store_true",
                    help=f"run at the notebooks' stored (fast) defaults into {FAST}/ (figures, generated with its "
                         "INDEX.csv, executed), publishing nothing")
    ap.add_argument("--jobs", type=int, default=1,
                    help="notebooks run at once (each kernel pinned to one thread when more than one)")
    ap.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                    help="override a parameter of every notebook run (value read as YAML), e.g. device=cuda")
    ap.add_argument("--staging", default=str(STAGING),
                    help="staging folder, relative to the root (give two runs of --only in parallel their own)")
    ap.add_argument("--recover", action="store_true",
                    help="only complete (or undo) an interrupted publish, then stop")
    args = ap.parse_args(argv)
    root = Path(args.root).resolve()
    done = recover(root)
    if done or args.recover:
        print(done or "nothing to recover: no publish was interrupted", flush=True)
    if args.recover:
        return
    todo = notebooks(root, args.only)
    extra = _settings(args.set)
    if args.jobs < 1:
        raise SystemExit(f"--jobs must be at least 1, got {args.jobs}")
    profiles = {nb: None if args.fast else root / "notebooks" / "params" / f"{nb.stem}.yaml" for nb in todo}
    for nb, params in profiles.items():  # before anything runs: a misspelt parameter would be injected and ignored
        _check_names(nb, {"--set": extra} | ({} if params is None else
                                             {str(params.relative_to(root)): _notebook_values(_params(params))}))
    outputs, executed = (root / FAST, root / FAST / "executed") if args.fast else (root / args.staging, root / EXECUTED)
    if not args.fast:
        shutil.rmtree(outputs, ignore_errors=True)  # only once the run can start: the last staged outputs stay till then
    start = time.time()
    try:
        execute(root, todo, profiles, outputs, executed, extra, args.jobs)
    except SystemExit as exc:
        raise SystemExit(str(exc) + ("" if args.fast else " Nothing was published: figures/ and paper/generated/ "
                                                          "are unchanged."))
    shown = {k: str(FAST / k) if args.fast else str(t) for k, t in TARGETS.items()}
    writers = {}
    for nb in todo:
        writers |= written_by(executed / nb.name, str(nb.relative_to(root)), {outputs / k: shown[k] for k in TARGETS})
    took = f"all {len(todo)} notebooks succeeded in {(time.time() - start) / 60:.1f} min"
    if args.fast:
        n = write_index(outputs / "generated" / INDEX, {shown[k]: outputs / k for k in TARGETS}, writers)
        print(f"\n{took}; their outputs are in {FAST}/ (which cell wrote what: {FAST}/generated/{INDEX}, "
              f"{n} rows)", flush=True)
    else:
        n = publish(root, outputs, writers)
        print(f"\n{took}; published {n} files to figures/ and paper/generated/ (which cell wrote what: "
              f"paper/generated/{INDEX})", flush=True)


if __name__ == "__main__":
    main()
