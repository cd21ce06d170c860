# The two commands of README.md. Each sets up what it needs on a fresh machine.
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-slow test-slurm test-llm lint clean

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

# the whole DAG on a real single-node Slurm, a scancel mid-trial and the resume (~8 min), and the
# SIGKILL-and-resume tests of the dataset and train_router stages (~1 min): every slow test but the LLM's
test-slurm: $(STAMP)
	tests/services/install.sh
	$(PY) -m pytest -m slow --ignore tests/test_llm_server.py; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; exit 1; fi; exit $$rc

# the openai backend against a real llama.cpp server (SmolLM2-135M); builds llama-cpp-python into wheels/
# the first time (~4 min of CPU); the test itself takes ~15 s
test-llm: $(STAMP)
	tests/services/llama_server_wheel.sh $(PY)
	$(PY) -m pytest -m slow tests/test_llm_server.py; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; exit 1; fi; exit $$rc

test-slow: $(STAMP)
	tests/services/install.sh
	tests/services/llama_server_wheel.sh $(PY)
	$(PY) -m pytest -m slow

lint: $(STAMP)
	snakemake --lint
	snakefmt --check Snakefile rules/

clean:
	rm -rf results .snakemake
