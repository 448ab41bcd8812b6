# Two entry points, both self-contained on a fresh machine:
#   make demo   - set up .venv and Auto-segment the built-in sample with the shipped model
#   make test   - set up .venv (and the system tools the tests use) and run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The demo's input and output; override with `make demo INPUT=my_series/ OUTPUT=my.seg.nrrd`.
INPUT  ?=
OUTPUT ?= out/demo.seg.nrrd

.PHONY: demo test system-deps clean

$(STAMP): requirements.txt constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -r requirements.txt -c constraints.txt
	$(BIN)/pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	$(BIN)/python -c "import torch, segment_anything, SAMSelfPromptLib; print('environment ready: torch', torch.__version__)"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/samselfprompt demo $(if $(INPUT),--input $(INPUT)) -o $(OUTPUT)

system-deps:
	bash .ci/system-deps.sh

test: $(STAMP) system-deps
	$(BIN)/python -m pytest -q -ra Testing

clean:
	rm -rf $(VENV) out
