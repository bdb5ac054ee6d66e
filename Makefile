# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create .venv if missing and install torch ($(TORCH)) and robustlab with its extras.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
BIN := $(VENV)/bin
# The stamp names the torch spec, so `make test TORCH=...` reinstalls when it changes.
STAMP := $(VENV)/.installed-$(subst /,_,$(subst =,_,$(subst <,_,$(subst >,_,$(TORCH)))))

.PHONY: setup demo test test-all lint format clean mutate

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps "torchattacks==3.5.1"  # peer for tests; --no-deps: its torchvision pin would pull CUDA torch
	$(BIN)/python -m pip install -q --no-deps "imagecorruptions-imaug==1.1.5"  # reference for the corruption tests; --no-deps: it pins opencv-python (GUI, needs libGL), the headless build comes with .[dev]
	@rm -f $(VENV)/.installed-* && touch $@

setup: $(STAMP)

demo: setup
	$(BIN)/robustlab train configs/demo-mnist.yaml --overwrite
	$(BIN)/robustlab train configs/demo-pgd-mnist.yaml --overwrite
	$(BIN)/robustlab compare runs/demo-mnist runs/demo-pgd-mnist --attacks quick --eps 0.1,0.2,0.3 --n 500
	$(BIN)/robustlab attack runs/demo-mnist --attack pgd:steps=40 --eps 0.2 --n 8 --out runs/demo-mnist/adv.npz --overwrite
	$(BIN)/robustlab train configs/demo-lmt-mnist.yaml --overwrite
	$(BIN)/robustlab certify runs/demo-lmt-mnist --radii 0.5,1.0,1.5

test: setup
	$(BIN)/python -m pytest -m "not slow" -q

test-all: setup
	$(BIN)/python -m pytest -q

mutate: setup  # plant each bug listed in mutants/*.yaml, expect its tests to fail
	$(BIN)/python tools/mutate.py

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
