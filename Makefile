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
	$(BIN)/python -m pip install -q --no-deps "pyautoattack==0.2.0"  # AutoAttack, the reference of benchmarks/bench_standard.py
	$(BIN)/python -m pip install -q --no-deps "imagecorruptions-imaug==1.1.5"  # reference for the corruption tests; --no-deps: it pins opencv-python (GUI, needs libGL), the headless build comes with .[dev]
	@rm -f $(VENV)/.installed-* && touch $@

setup: $(STAMP)

demo: setup
	$(BIN)/robustlab train configs/demo-mnist.yaml --overwrite
	$(BIN)/robustlab train configs/demo-pgd-mnist.yaml --overwrite
	$(BIN)/robustlab train configs/demo-advprop-mnist.yaml --overwrite
	$(BIN)/robustlab train configs/demo-bitdepth-mnist.yaml --overwrite
	$(BIN)/robustlab train configs/demo-lmt-mnist.yaml --overwrite
	for run in demo-mnist demo-pgd-mnist demo-advprop-mnist; do \
	  $(BIN)/robustlab eval runs/$$run --attacks quick --eps 0.1,0.2,0.3 --n 300 || exit 1; done
	$(BIN)/robustlab eval runs/demo-bitdepth-mnist --attacks pgd:steps=20 --eps 0.1,0.2,0.3 --n 200
	$(BIN)/robustlab attack runs/demo-mnist --attack pgd:steps=40 --eps 0.2 --n 8 --out runs/demo-mnist/adv.npz --overwrite
	$(BIN)/robustlab certify runs/demo-lmt-mnist --radii 0.5,1.0,1.5
	$(BIN)/robustlab report runs/demo-mnist runs/demo-pgd-mnist runs/demo-advprop-mnist \
	  runs/demo-bitdepth-mnist runs/demo-lmt-mnist -o runs/demo/report.html --overwrite \
	  --title "robustlab demo: mnist5k"
	@echo "the report: open runs/demo/report.html in a browser"

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
