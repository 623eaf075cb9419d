"""`make paper`'s notebook runner: all or nothing. A failure in the last cell of the last notebook names it
and leaves the committed outputs exactly as they were; success publishes every staged file."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from nbformat.v4 import new_code_cell, new_notebook

ROOT = Path(__file__).resolve().parents[1]


def _runner():
    spec = importlib.util.spec_from_file_location("run_notebooks", ROOT / "scripts" / "run_notebooks.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["run_notebooks"] = mod  # importable by name: --jobs pickles its functions to worker processes
    spec.loader.exec_module(mod)
    return mod


def _notebook(path: Path, name: str, fail: bool) -> None:
    cells = [new_code_cell('fig_dir = None\nout_dir = None\nvalue = 1', metadata={"tags": ["parameters"]}),
             new_code_cell("from pathlib import Path\n"
                           f"Path(out_dir).mkdir(parents=True, exist_ok=True)\n"
                           f"(Path(out_dir) / '{name}.tex').write_text(f'new {{value}}')\n"
                           f"Path(fig_dir).mkdir(parents=True, exist_ok=True)\n"
                           f"(Path(fig_dir) / '{name}.pdf').write_text('figure')")]
    if fail:
        cells.append(new_code_cell("raise RuntimeError('forced failure in the last cell')"))
    nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                             "language": "python"}})
    nbformat.write(nb, path)


def _project(tmp_path: Path, fail_last: bool) -> Path:
    (tmp_path / "notebooks" / "params").mkdir(parents=True)
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "paper" / "generated").mkdir(parents=True)
    (tmp_path / "figures").mkdir()
    (tmp_path / "paper" / "generated" / "01_a.tex").write_text("old")
    for name, fail in (("01_a", False), ("02_b", fail_last)):
        _notebook(tmp_path / "notebooks" / f"{name}.ipynb", name, fail)
        (tmp_path / "notebooks" / "params" / f"{name}.yaml").write_text("value: 7\n")
    return tmp_path


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_failing_notebook_publishes_nothing(tmp_path, capsys, jobs):
    root = _project(tmp_path, fail_last=True)
    with pytest.raises(SystemExit, match=r"02_b failed in cell .*forced failure"):
        _runner().main(["--root", str(root), "--jobs", jobs])
    assert (root / "paper" / "generated" / "01_a.tex").read_text() == "old"
    assert sorted(p.name for p in (root / "paper" / "generated").iterdir()) == ["01_a.tex"]  # no INDEX.csv either
    assert not any((root / "figures").iterdir())


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_success_publishes_every_staged_file(tmp_path, jobs):
    root = _project(tmp_path, fail_last=False)
    _runner().main(["--root", str(root), "--jobs", jobs])
    assert (root / "paper" / "generated" / "01_a.tex").read_text() == "new 7"  # the profile's parameters
    assert (root / "paper" / "generated" / "02_b.tex").read_text() == "new 7"
    assert sorted(p.name for p in (root / "figures").iterdir()) == ["01_a.pdf", "02_b.pdf"]
    assert (root / "build" / "executed" / "02_b.ipynb").is_file()
    assert not (root / _runner().JOURNAL).exists() and not list(root.glob("**/*.publish-*"))  # nothing left beside


def test_set_overrides_a_parameter_and_runner_keys_stay_out_of_the_notebook(tmp_path):
    root = _project(tmp_path, fail_last=False)
    (root / "notebooks" / "params" / "01_a.yaml").write_text("value: 7\n_cold_minutes: 5\n")
    _runner().main(["--root", str(root), "--set", "value=[1, 2]"])
    assert (root / "paper" / "generated" / "01_a.tex").read_text() == "new [1, 2]"  # read as YAML
    executed = (root / "build" / "executed" / "01_a.ipynb").read_text()
    assert "_cold_minutes" not in executed


@pytest.mark.parametrize("bad", ["value", "=3", "not a name=3", "out_dir=elsewhere"])
def test_set_without_a_parameter_name_is_refused(tmp_path, bad):
    root = _project(tmp_path, fail_last=False)
    with pytest.raises(SystemExit, match="--set expects key=value|--set cannot change"):
        _runner().main(["--root", str(root), "--set", bad])
    assert (root / "paper" / "generated" / "01_a.tex").read_text() == "old"


def test_parallel_runs_start_the_longest_notebook_first(tmp_path, capsys):
    root = _project(tmp_path, fail_last=False)
    (root / "notebooks" / "params" / "02_b.yaml").write_text("value: 7\n_cold_minutes: 90\n")
    (root / "notebooks" / "params" / "01_a.yaml").write_text("value: 7\n_cold_minutes: 10\n")
    _runner().main(["--root", str(root), "--jobs", "2"])
    assert "running 02_b, 01_a with 2 at a time" in capsys.readouterr().out


@pytest.mark.parametrize("nb_path", sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")), ids=lambda p: p.stem)
def test_every_profile_sets_only_parameters_its_notebook_has_and_every_notebook_takes_a_device(nb_path):
    import yaml
    names = _runner().parameters_of(nb_path)
    assert "device" in names, f"{nb_path.name} has no device parameter"
    profile = yaml.safe_load((ROOT / "notebooks" / "params" / f"{nb_path.stem}.yaml").read_text())
    unknown = {k for k in profile if not k.startswith("_")} - names
    assert not unknown, f"the paper profile of {nb_path.stem} sets {sorted(unknown)}, which the notebook lacks"


def test_compare_generated_counts_changed_numbers_and_writes_its_macros(tmp_path):
    spec = importlib.util.spec_from_file_location("compare_generated", ROOT / "scripts" / "compare_generated.py")
    cmp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cmp)
    old, new = tmp_path / "old", tmp_path / "new"
    for d, rho in ((old, 0.5), (new, 0.52)):
        d.mkdir()
        (d / "01_a.csv").write_text(f"method,spearman_mean,spearman_std\nx,{rho},0.04\ny,0.1,0.1\n")
        (d / "01_m.tex").write_text("\\newcommand{\\SynA}{1{,}234}\n")
    res = cmp.compare(old, new, "01_").set_index("file")
    assert not res.loc["01_a.csv", "identical"] and res.loc["01_m.tex", "identical"]
    assert res.loc["01_a.csv", "numbers"] == 4 and res.loc["01_a.csv", "changed"] == 1
    assert res.loc["01_a.csv", "max_change_spearman"] == pytest.approx(0.02)
    assert res.loc["01_a.csv", "max_change_in_std"] == pytest.approx(0.5)
    cmp.main([str(old), str(new), "--prefix", "01_", "--macros", str(tmp_path / "m.tex"), "--name", "Syn"])
    text = (tmp_path / "m.tex").read_text()
    assert "\\newcommand{\\SynNumbersChanged}{1}" in text and "\\newcommand{\\SynFilesIdentical}{1}" in text


@pytest.mark.parametrize("where", ["--set", "profile"])
def test_a_misspelt_parameter_stops_the_run_before_anything_runs(tmp_path, where):
    root = _project(tmp_path, fail_last=False)
    args = ["--root", str(root)]
    if where == "--set":
        args += ["--set", "valeu=3"]
    else:
        (root / "notebooks" / "params" / "02_b.yaml").write_text("valeu: 3\n")
    with pytest.raises(SystemExit, match=r"sets \['valeu'\], which .* has no parameter"):
        _runner().main(args)
    assert not (root / "build" / "executed").exists()


def _published(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for d in ("figures", "paper/generated")
            for p in sorted((root / d).iterdir()) if p.name != "INDEX.csv"}


@pytest.mark.parametrize("interrupted_rename", [1, 2, 3, 4])
def test_an_interrupted_swap_is_rolled_forward_by_the_next_run(tmp_path, monkeypatch, interrupted_rename):
    """The swap renames figures/ aside, the new copy in, then the same for paper/generated/; an interrupt at any
    of the four renames leaves a journal, and the next run completes the publish: every new file, the files the
    run did not write kept, no copies left beside the folders."""
    root = _project(tmp_path, fail_last=False)
    (root / "figures" / "kept.pdf").write_text("kept")
    runner = _runner()
    real, calls = runner._rename, []

    def rename(src, dst):
        calls.append(src)
        if len(calls) == interrupted_rename:
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(runner, "_rename", rename)
    with pytest.raises(KeyboardInterrupt):
        runner.main(["--root", str(root)])
    assert (root / runner.JOURNAL).exists()
    if interrupted_rename == 3:  # a mix on disk until the next run: figures/ new, paper/generated/ old
        assert (root / "figures" / "01_a.pdf").exists() and (root / "paper/generated/01_a.tex").read_text() == "old"
    monkeypatch.setattr(runner, "_rename", real)
    runner.main(["--root", str(root), "--recover"])
    assert _published(root) == {"figures/01_a.pdf": "figure", "figures/02_b.pdf": "figure", "figures/kept.pdf": "kept",
                                "paper/generated/01_a.tex": "new 7", "paper/generated/02_b.tex": "new 7"}
    assert sorted(p.name for p in root.iterdir()) == ["build", "figures", "notebooks", "paper", "pyproject.toml"]
    assert sorted(p.name for p in (root / "paper").iterdir()) == ["generated"]


def test_an_interrupt_while_copying_leaves_the_committed_folders_untouched(tmp_path, monkeypatch, capsys):
    root = _project(tmp_path, fail_last=False)
    runner = _runner()
    real = runner.shutil.copyfile

    def copyfile(src, dst, **kw):
        if Path(src).parent.name == "generated" and "staging" in str(src):
            raise KeyboardInterrupt
        return real(src, dst, **kw)

    monkeypatch.setattr(runner.shutil, "copyfile", copyfile)
    with pytest.raises(KeyboardInterrupt):
        runner.main(["--root", str(root)])
    monkeypatch.setattr(runner.shutil, "copyfile", real)
    assert _published(root) == {"paper/generated/01_a.tex": "old"}
    assert not (root / runner.JOURNAL).exists() and (root / "figures.publish-new").exists()
    runner.main(["--root", str(root), "--recover"])
    assert "undone" in capsys.readouterr().out
    assert not (root / "figures.publish-new").exists() and not (root / "paper" / "generated.publish-new").exists()
    assert _published(root) == {"paper/generated/01_a.tex": "old"}


def _writing_notebook(path: Path, name: str) -> None:
    """A notebook that writes a macro whose name is assembled in code, and a figure, through surrogate.paper."""
    cells = [new_code_cell("fig_dir = None\nout_dir = None\nvalue = 1", metadata={"tags": ["parameters"]}),
             nbformat.v4.new_markdown_cell("## Numbers for the text"),
             new_code_cell("from pathlib import Path\nimport matplotlib\nmatplotlib.use('Agg')\n"
                           "import matplotlib.pyplot as plt\n"
                           "from surrogate.paper import macro_name, save_figure, write_macros\n"
                           f"write_macros(Path(out_dir) / '{name}_macros.tex', {{macro_name('Syn', '{name}', 2): 0.785}})\n"
                           f"save_figure(plt.figure(), Path(fig_dir) / '{name}.pdf')")]
    nbformat.write(new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                      "language": "python"}}), path)


def test_the_index_names_the_notebook_and_cell_of_every_macro_and_figure(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the kernels import this checkout's surrogate
    root = _project(tmp_path, fail_last=False)
    (root / "paper" / "generated" / "rerun_macros.tex").write_text("\\newcommand{\\RerunX}{3}\n")  # from a script
    for name in ("01_a", "02_b"):
        _writing_notebook(root / "notebooks" / f"{name}.ipynb", name)
    runner = _runner()
    runner.main(["--root", str(root)])
    index = pd.read_csv(root / "paper" / "generated" / "INDEX.csv", dtype=str, keep_default_na=False)
    rows = {(r.macro or r.file): r for r in index.itertuples()}
    macro = rows["\\SynZeroOneATwo"]  # assembled by macro_name: literally in the index
    assert (macro.value, macro.file, macro.notebook) == ("0.785", "paper/generated/01_a_macros.tex",
                                                         "notebooks/01_a.ipynb")
    assert (macro.cell, macro.cell_id, macro.section) == ("3", nbformat.read(root / "notebooks" / "01_a.ipynb", 4)
                                                          .cells[2].id, "Numbers for the text")
    assert rows["figures/02_b.pdf"].notebook == "notebooks/02_b.ipynb" and rows["figures/02_b.pdf"].cell == "3"
    assert rows["\\RerunX"].notebook == ""  # not written by a notebook: listed, with no writer
    # a run of one notebook keeps the other notebook's rows; a fast run indexes its own folder
    runner.main(["--root", str(root), "--only", "02_b"])
    again = pd.read_csv(root / "paper" / "generated" / "INDEX.csv", dtype=str, keep_default_na=False)
    pd.testing.assert_frame_equal(again, index)
    runner.main(["--root", str(root), "--only", "01_a", "--fast"])
    fast = pd.read_csv(root / "build" / "fast" / "generated" / "INDEX.csv", dtype=str, keep_default_na=False)
    assert set(fast.file) == {"build/fast/generated/01_a_macros.tex", "build/fast/figures/01_a.pdf"}
    assert set(fast.notebook) == {"notebooks/01_a.ipynb"}


@pytest.mark.parametrize("nb_path", sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")), ids=lambda p: p.stem)
def test_every_notebook_is_thin(nb_path):
    """Parameters, one call per study step, a line per figure or table: the studies' logic lives in the package."""
    cells = nbformat.read(nb_path, as_version=4).cells
    code = [line.strip() for c in cells if c.cell_type == "code" for line in c.source.splitlines()]
    lines = [line for line in code if line and not line.startswith("#")]
    assert len(lines) <= 100, f"{nb_path.name} has {len(lines)} code lines; move logic into the package"
