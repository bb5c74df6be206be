# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv with the pinned CPU stack (requirements/constraints-cpu.txt) if it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONSTRAINTS ?= requirements/constraints-cpu.txt
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench bench-quick clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e ".[dev]"
	# CrypTen 0.4.1 (encrypted inference): its declared deps include the dead `sklearn` package, so --no-deps,
	# then the two it needs (pinned in the constraints: onnx's newest ml_dtypes would pull numpy 2)
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) --no-deps crypten==0.4.1
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) onnx omegaconf
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fetal-fl demo $(DEMO_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

bench-quick: $(STAMP)
	$(BIN)/python bench/run_all.py --quick

clean:
	rm -rf $(VENV) runs .pytest_cache
