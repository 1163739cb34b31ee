# The two commands of the README: `make demo` and `make test`. Everything else is a convenience.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export SESSIONREC_HOME ?= $(CURDIR)/.sessionrec
export DAGSTER_HOME := $(SESSIONREC_HOME)/dagster
export DO_NOT_TRACK := 1
export GX_ANALYTICS_ENABLED := false
export BENTOML_DO_NOT_TRACK := True
export DAGSTER_DISABLE_TELEMETRY := 1

# CUDA runtime wheels are not pinned in the lock (see its header); keep uv's list of them here.
CUDA_PKGS := triton nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 \
	nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 \
	nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx

.PHONY: setup demo test ui mlflow-ui lock bench clean

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

## The main job: generate demo events and run the whole asset graph in-process.
demo: $(STAMP)
	$(BIN)/sessionrec run

## Install and run the whole test suite (what .ci/run calls).
test: $(STAMP)
	$(BIN)/python -m pytest

## The Dagster UI on the project's workspace (storage under $(DAGSTER_HOME)).
ui: $(STAMP)
	mkdir -p $(DAGSTER_HOME)
	test -f $(DAGSTER_HOME)/dagster.yaml || printf 'telemetry:\n  enabled: false\n' > $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/dagster dev -w workspace.yaml

mlflow-ui: $(STAMP)
	$(BIN)/sessionrec mlflow-ui

bench: $(STAMP)
	$(BIN)/python benchmarks/pipeline.py

lock:
	uv pip compile requirements.in --python-version 3.11 --python-platform x86_64-unknown-linux-gnu \
		--no-header --no-annotate $(addprefix --no-emit-package ,$(CUDA_PKGS)) -o requirements.lock

clean:
	rm -rf $(VENV) $(SESSIONREC_HOME)
