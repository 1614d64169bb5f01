# Two commands do all the set-up: `make demo` and `make test`. Both create .venv on first use and reuse it.
VENV       ?= .venv
PYTHON     ?= python3
# CPU build by default; GPU users: make TORCH_SPEC='torch==2.13.0' PIP_TORCH_ARGS='--index-url ...' or own venv.
TORCH_SPEC ?= torch==2.13.0
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.mmebm-installed
DATA       ?= data/polymnist
RUN        ?= runs/demo
PYTEST_ARGS ?=

.PHONY: venv demo test lint clean-demo

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $@

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check mmebm_dist kernels tests

demo: venv
	bash launch/demo.sh "$(DATA)" "$(RUN)"

clean-demo:
	rm -rf "$(DATA)" "$(RUN)"
