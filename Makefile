# The two commands of README.md. Each sets up what it needs on a fresh machine.
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-slow test-slurm lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU wheel on disk; a plain `torch` can pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# the demo's real-question dev set, scored by evaluate when the shared data sits beside the checkout
DEV_QUESTIONS := ../shared/data/questions/dsci_seed_dev.csv
DEMO_CONFIG   := $(if $(wildcard $(DEV_QUESTIONS)),--config 'evaluate={"real_questions": "$(DEV_QUESTIONS)"}')

demo: $(STAMP)
	snakemake --cores 2 $(DEMO_CONFIG)

test: $(STAMP)
	tests/services/install.sh
	$(PY) -m pytest; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; exit 1; fi; exit $$rc

# the whole DAG on a real single-node Slurm, a scancel mid-trial and the resume (~8 min)
test-slurm: $(STAMP)
	tests/services/install.sh
	$(PY) -m pytest -m "slurm and slow"; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; exit 1; fi; exit $$rc

test-slow: $(STAMP)
	tests/services/install.sh
	tests/services/llama_server_wheel.sh $(PY)
	$(PY) -m pytest -m slow

lint: $(STAMP)
	snakemake --lint
	snakefmt --check Snakefile rules/

clean:
	rm -rf results .snakemake
