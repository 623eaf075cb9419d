# Two entry points (see README):  `make paper` regenerates every result and compiles the paper;
# `make test` runs the unit tests, the notebooks at their fast defaults (nbval) and a paper build.
# The smallest run: `make fast NB=01_synthetic` (one notebook at its fast defaults, into build/fast/).
# Both create the local virtual environment .venv on first use and install TeX if it is missing.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
BUILD  := build
# notebooks run at once by `make paper` (one thread each; 2 cores: the two long studies side by side)
JOBS   ?= 2
# `make paper DEVICE=cuda`: every notebook on that device (default: each profile's own, the CPU)
DEVICE ?=
# `make paper RETRAIN=1`: ignore the shipped checkpoints (checkpoints/) and retrain every network
RETRAIN ?=
# `make fast NB=01_synthetic`: only these notebooks (default: all)
NB     ?=
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))

.PHONY: all setup tex test unit nbval fast paper-build paper results bench clean

all: test

$(STAMP): pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

setup: $(STAMP)

tex:
	@bash scripts/ensure_tex.sh

unit: setup
	$(BIN)/python -m pytest -q tests

# Notebooks at their stored (fast) defaults; they write into build/, never into figures/ or paper/.
nbval: setup
	@if [ -n "$(NOTEBOOKS)" ]; then $(BIN)/python -m pytest -q --nbval-lax -p no:cacheprovider $(NOTEBOOKS); \
	 else echo "no notebooks yet"; fi

# Notebooks at their stored (fast) defaults with their progress in the terminal, into build/fast/ (figures,
# generated with INDEX.csv: which cell wrote what, executed notebooks); never touches figures/ or paper/.
fast: setup
	$(BIN)/python scripts/run_notebooks.py --fast $(if $(NB),--only $(NB)) $(if $(DEVICE),--set device=$(DEVICE))

# Compile the paper from the committed generated inputs, into build/paper (the committed PDF is untouched).
paper-build: tex
	mkdir -p $(BUILD)/paper
	cd paper && latexmk -pdf -interaction=nonstopmode -halt-on-error -outdir=../$(BUILD)/paper main.tex

test: unit nbval paper-build

# The paper profile: every notebook re-run by papermill with notebooks/params/<name>.yaml into a staging
# folder, published to the committed figures/ and paper/generated/ only if every notebook succeeded (all or
# nothing; executed notebooks kept in build/executed; paper/generated/INDEX.csv says which cell wrote what), then
# the paper itself (paper/main.pdf).
results: setup
	$(if $(RETRAIN),SURROGATE_RETRAIN=1) $(BIN)/python scripts/run_notebooks.py --jobs $(JOBS) $(if $(DEVICE),--set device=$(DEVICE))

paper: results tex
	cd paper && latexmk -pdf -interaction=nonstopmode -halt-on-error main.tex

bench: setup
	$(BIN)/python benchmarks/bench_graph.py

clean:
	rm -rf $(BUILD)
	cd paper && latexmk -C main.tex || true
