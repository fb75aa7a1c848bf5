# The two commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CORES  ?= $(shell nproc)
# Workflow jobs run `python -m segpipe`: make it the venv's python.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: demo test test-slurm lint bench gpu-wheels gpu-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Re-install whenever pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/python -c "import torch, torchvision, cv2, h5py, scipy, snakemake"
	touch $@

# The binary demo study (config.yaml), its multi-class study (below results/classes/), then the
# native-resolution pair (results/native_squashed/, results/native/).
demo: $(VENV)/.installed
	$(BIN)/snakemake --cores $(CORES)
	$(BIN)/snakemake --cores $(CORES) --configfile configs/demo_classes.yaml
	$(BIN)/snakemake --cores $(CORES) --configfile configs/demo_native_squashed.yaml
	$(BIN)/snakemake --cores $(CORES) --configfile configs/demo_native.yaml

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

# The tiny study on a real one-node SLURM cluster (needs root: apt-installs Debian's SLURM).
test-slurm: $(VENV)/.installed
	tests/slurm/cluster.sh install
	$(BIN)/pip install --quiet -e '.[test,slurm]'
	$(BIN)/python -m pytest -q -m slurm tests/slurm

lint: $(VENV)/.installed
	$(BIN)/snakemake --lint

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/bench_data.py
	$(BIN)/python benchmarks/bench_models.py
	$(BIN)/python benchmarks/bench_inference.py

# The GPU check (docs/training.md#the-gpu-check): the wheels a lent GPU machine lacks, into
# .whl/ (git-ignored); then, on that machine, the tests, benchmarks and a study in one call.
gpu-wheels:
	benchmarks/gpu_wheels.sh .whl

gpu-check:
	$(PYTHON) benchmarks/gpu_check.py $(if $(wildcard .whl/*.whl),--wheels .whl) $(GPU_CHECK)

clean:
	rm -rf results .snakemake report.html
