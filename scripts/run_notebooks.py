"""Run the study notebooks at a parameter profile, all or nothing.

    python scripts/run_notebooks.py [--only 01_synthetic ...] [--jobs 2] [--set device=cuda ...]
                                    [--staging build/staging] [--root .]

Every notebook ``notebooks/NN_name.ipynb`` is executed by papermill with ``notebooks/params/NN_name.yaml``
(the paper profile), writing its figures and tables into a staging folder (``build/staging``) instead of
``figures/`` and ``paper/generated/``; its cells' output streams to the terminal (progress, which study and
model, time estimates). Only when every notebook succeeded are the staged files copied over the committed
ones, all or nothing: both folders are swapped for complete new copies, with a journal, so that an interrupt
is completed by the next run (or ``--recover``); a failure names the notebook and cell and leaves every
committed figure, table and macro exactly as it was. The executed notebooks are kept in ``build/executed``.
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
import shutil
import sys
import time
from pathlib import Path

STAGING = Path("build/staging")
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


def run(root: Path, nb: Path, params: Path, staging: Path, extra: dict | None = None, one_core: bool = False) -> None:
    """Execute one notebook with its profile and ``extra`` overrides into ``staging``. With ``one_core`` (it shares
    the machine with other notebooks), or on an accelerator (one process drives it), its own ``workers``
    parameter, if it has one and ``extra`` does not set it, goes to 1."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError
    out = root / EXECUTED / nb.name
    out.parent.mkdir(parents=True, exist_ok=True)
    overrides = {"fig_dir": str(staging / "figures"), "out_dir": str(staging / "generated")}
    changes = dict(extra or {})
    values = _notebook_values(_params(params)) | changes
    accelerator = str(values.get("device", "cpu")).split(":")[0] != "cpu"
    if (one_core or accelerator) and "workers" in values and "workers" not in changes:
        changes["workers"] = 1
    values |= changes | overrides
    start = time.time()
    changed = "".join(f", {k}={v!r}" for k, v in changes.items())
    print(f"\n=== {nb.stem}: running with {params.relative_to(root)}{changed} ===", flush=True)
    try:
        pm.execute_notebook(str(nb), str(out), parameters=values, cwd=str(nb.parent),
                            progress_bar=False, stdout_file=sys.stdout, stderr_file=sys.stderr)  # each line once
    except PapermillExecutionError as exc:
        raise SystemExit(f"\n{nb.stem} failed in cell {exc.exec_count} ({exc.ename}: {exc.evalue}); the executed "
                         f"notebook is {out}. Nothing was published: figures/ and paper/generated/ are unchanged.")
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


def publish(root: Path, staging: Path) -> int:
    """Replace figures/ and paper/generated/ by copies with every staged file added or replaced, all or nothing."""
    sys.path.insert(0, str(root))
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
    atomic_write(root / JOURNAL, json.dumps({"swap": [str(t) for t in TARGETS.values()]}) + "\n")
    try:
        _roll_forward(root)
    except BaseException:
        print(f"\npublishing was interrupted; `python scripts/run_notebooks.py --recover` (or the next run) "
              f"completes it from {JOURNAL}", file=sys.stderr, flush=True)
        raise
    return count


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=".", help="the project folder")
    ap.add_argument("--only", nargs="*", help="notebook names (e.g. 01_synthetic); default: all")
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
    staging = root / args.staging
    todo = notebooks(root, args.only)
    extra = _settings(args.set)
    if args.jobs < 1:
        raise SystemExit(f"--jobs must be at least 1, got {args.jobs}")
    for nb in todo:  # before anything runs: a misspelt parameter would be injected and silently ignored
        params = root / "notebooks" / "params" / f"{nb.stem}.yaml"
        _check_names(nb, {str(params.relative_to(root)): _notebook_values(_params(params)), "--set": extra})
    shutil.rmtree(staging, ignore_errors=True)  # only once the run can start: the last staged outputs stay till then
    start = time.time()
    if args.jobs == 1 or len(todo) == 1:
        for i, nb in enumerate(todo):
            print(f"[{i + 1}/{len(todo)}] {nb.stem} ({(time.time() - start) / 60:.0f} min so far)", flush=True)
            run(root, nb, root / "notebooks" / "params" / f"{nb.stem}.yaml", staging, extra)
    else:
        # longest first (their cold-run estimates): the shorter notebooks then fill the other cores
        todo = sorted(todo, key=lambda nb: -_cold_minutes(root, nb))
        print("running " + ", ".join(nb.stem for nb in todo) + f" with {args.jobs} at a time", flush=True)
        from concurrent.futures import ProcessPoolExecutor
        saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # inherited by every kernel
        try:
            with ProcessPoolExecutor(max_workers=args.jobs) as pool:
                futures = [pool.submit(run, root, nb, root / "notebooks" / "params" / f"{nb.stem}.yaml", staging,
                                       extra, one_core=True) for nb in todo]
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
    n = publish(root, staging)
    print(f"\nall {len(todo)} notebooks succeeded in {(time.time() - start) / 60:.1f} min; published {n} files "
          "to figures/ and paper/generated/", flush=True)


if __name__ == "__main__":
    main()
