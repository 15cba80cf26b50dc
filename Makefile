# Every target builds its virtual environment itself: torch 2.13.0 (CPU wheel) first, then the project, so its torch
# range is met. .venv runs transformers 5.x (the default); .venv-compat the oldest transformers 4.x we support, with
# the [optimum] extra (optimum-onnx 0.1.0 needs transformers<4.58).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
COMPAT_VENV ?= .venv-compat
COMPAT_BIN := $(COMPAT_VENV)/bin
# The oldest that works: surgery/model.py passes dtype= to from_pretrained / from_config, which 4.46-4.55 reject.
COMPAT_TRANSFORMERS ?= 4.56.*
# The cross-version checkpoint sets (tests/compat): each job writes v<its major>/ and reads the other's.
export CROSS_DIR ?= build/cross
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
# pytest exits 5 when a selection holds no test (e.g. nothing marked compat): not a failure of these jobs.
NO_TESTS_IS_OK = status=$$?; if [ $$status -eq 5 ]; then echo "pytest: no test selected (exit 5)"; status=0; fi; \
	exit $$status

.PHONY: venv venv-compat demo test test-fast test-compat test-cross bench clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,demo]" "transformers>=5"
	touch $@

$(COMPAT_BIN)/.installed: pyproject.toml
	$(PY) -m venv $(COMPAT_VENV)
	$(COMPAT_BIN)/pip install -q --upgrade pip
	$(COMPAT_BIN)/pip install -q torch==2.13.0
	$(COMPAT_BIN)/pip install -q -e ".[test,optimum]" "transformers==$(COMPAT_TRANSFORMERS)"
	touch $@

venv: $(BIN)/.installed

venv-compat: $(COMPAT_BIN)/.installed

demo: venv
	$(BIN)/python -m surgery.apply configs/demo.yaml --overwrite
	$(BIN)/python -m export.onnx runs/demo --merge

# The whole suite under transformers 5.x, then this major's cross-version set (build/cross/v5).
test: venv
	$(BIN)/python -m pytest -q -x --timeout=900 -m "not cross_version"
	$(BIN)/python -m tests.compat.write_checkpoints $(CROSS_DIR)

test-fast: venv
	$(BIN)/python -m pytest -q -x -m "not slow"

# Under transformers 4.x: writes build/cross/v4, then the tests marked compat and those reading build/cross/v5.
test-compat: venv-compat
	$(COMPAT_BIN)/python -m tests.compat.write_checkpoints $(CROSS_DIR)
	$(COMPAT_BIN)/python -m pytest -q -x --timeout=900 -m "compat or cross_version"; $(NO_TESTS_IS_OK)

# Under transformers 5.x again: reads build/cross/v4 (after make test-compat).
test-cross: venv
	$(BIN)/python -m pytest -q --timeout=900 -m cross_version; $(NO_TESTS_IS_OK)

bench: venv
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf $(VENV) $(COMPAT_VENV) runs build *.egg-info
