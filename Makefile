# The README's two commands: `make demo` and `make test`.
# Each creates .venv if missing, installs the package (editable) and the system
# packages the job needs (when apt-get is available as root), then runs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SYSTEM_PACKAGES := dataset-fashion-mnist espeak-ng flite

.PHONY: demo test system-deps

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	else \
	  echo "note: cannot install$$missing (needs apt-get as root); tinyrobust will look for data elsewhere"; \
	fi

demo: $(STAMP) system-deps
	$(BIN)/tinyrobust demo

test: $(STAMP) system-deps
	$(BIN)/python -m pytest
