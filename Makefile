# Every target builds .venv itself: torch 2.13.0 (CPU wheel) first, then the project, so its torch range is met.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: venv demo test test-fast bench clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,demo]"
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/python -m surgery.apply configs/demo.yaml
	$(BIN)/python -m export.onnx runs/demo --merge

test: venv
	$(BIN)/python -m pytest -q -x --timeout=900

test-fast: venv
	$(BIN)/python -m pytest -q -x -m "not slow"

bench: venv
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf $(VENV) runs build *.egg-info
