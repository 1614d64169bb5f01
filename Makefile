# Two commands do all the set-up: `make demo` and `make test`. Both create .venv on first use and reuse it.
VENV       ?= .venv
PYTHON     ?= python3
# CPU build by default; GPU users: make TORCH_SPEC='torch==2.13.0' PIP_TORCH_ARGS='--index-url ...' or own venv.
TORCH_SPEC ?= torch==2.13.0
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.mmebm-installed
DOCS_STAMP := $(VENV)/.mmebm-docs-installed
# make demo DATASET=polymnist|mnist-svhn|birds (the latter two build small generated sets; docs/datasets.md);
# make demo FULL=1 trains PolyMNIST at the published scale (configs/polymnist_ebm.yaml). DATA= and RUN=
# replace the default directories (launch/demo.sh).
DATASET    ?= polymnist
FULL       ?= 0
DATA       ?=
RUN        ?=
DEMO_DIRS_polymnist  := data/polymnist_demo runs/demo
DEMO_DIRS_mnist-svhn := data/mnist_svhn_demo runs/demo_mnist_svhn
DEMO_DIRS_birds      := data/birds_demo runs/demo_birds
PYTEST_ARGS ?=

.PHONY: venv demo test docs lint clean-demo

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $@

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The documentation site (mkdocs.yml): pages in docs/, built into site/; a broken link or anchor fails it.
docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e ".[docs]"
	@touch $@

lint: venv
	$(VENV)/bin/ruff check mmebm_dist kernels tests

demo: venv
	FULL=$(FULL) bash launch/demo.sh "$(DATA)" "$(RUN)" "$(DATASET)"

clean-demo:
	rm -rf $(or $(strip $(DATA) $(RUN)),$(DEMO_DIRS_$(DATASET)))
