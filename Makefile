# Two commands do all the set-up: `make demo` and `make test`. Both create .venv on first use and reuse it.
VENV       ?= .venv
PYTHON     ?= python3
# CPU build by default; GPU users: make TORCH_SPEC='torch==2.13.0' PIP_TORCH_ARGS='--index-url ...' or own venv.
TORCH_SPEC ?= torch==2.13.0
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.mmebm-installed
# make demo DATASET=polymnist|mnist-svhn|birds (the latter two build small generated sets; docs/datasets.md)
DATASET    ?= polymnist
DEMO_DATA_polymnist  := data/polymnist
DEMO_DATA_mnist-svhn := data/mnist_svhn_demo
DEMO_DATA_birds      := data/birds_demo
DEMO_RUN_polymnist   := runs/demo
DEMO_RUN_mnist-svhn  := runs/demo_mnist_svhn
DEMO_RUN_birds       := runs/demo_birds
DATA       ?= $(DEMO_DATA_$(DATASET))
RUN        ?= $(DEMO_RUN_$(DATASET))
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
	@test -n "$(DATA)" || { echo "make demo: unknown DATASET '$(DATASET)'; choose polymnist, mnist-svhn or birds"; exit 2; }
	bash launch/demo.sh "$(DATA)" "$(RUN)" "$(DATASET)"

clean-demo:
	rm -rf "$(DATA)" "$(RUN)"
